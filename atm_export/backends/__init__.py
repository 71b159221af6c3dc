"""Backends: one runner interface (``base.Runner``) and one factory, ``open_runner``.

Every backend a run can compare or time, by name, and the unmerged model each merged backend
is timed against. A new backend is one module here plus its lines in ``_RUNNERS`` and
``unavailable``. Nothing here knows of jobs, reports or artifact files.
"""

from __future__ import annotations

from .base import Outputs, Runner

__all__ = ["BASELINES", "MERGED", "NAMES", "STATIC", "Outputs", "Runner", "open_runner", "unavailable"]

#: Each merged backend, and the unmerged model on the same runtime.
BASELINES = {
    "eager_atm": "eager_baseline",
    "ort_portable": "ort_baseline",
    "ort_plugin": "ort_baseline",
    "ort_cuda_portable": "ort_cuda_baseline",
    "tensorrt": "tensorrt_baseline",
    "ort_portable_static": "ort_baseline",
    "tensorrt_static": "tensorrt_baseline",
}
#: The backends of the static-schedule models (--static-schedule): timed with the others, but
#: compared with their own eager replay (a bundle's ``static``), not with the adaptive model.
STATIC = ("ort_portable_static", "tensorrt_static")
MERGED = tuple(BASELINES)
NAMES = (*MERGED, *dict.fromkeys(BASELINES.values()))

#: What each backend runs: (model attribute of the bundle, runtime, device or None).
_RUNNERS = {
    "eager_atm": ("atm", "eager", None),
    "eager_baseline": ("vit", "eager", None),
    "ort_portable": ("portable", "ort", "cpu"),
    "ort_plugin": ("plugin", "ort", "cpu"),
    "ort_baseline": ("baseline", "ort", "cpu"),
    "ort_cuda_portable": ("portable", "ort", "cuda"),
    "ort_cuda_baseline": ("baseline", "ort", "cuda"),
    "tensorrt": ("engine", "tensorrt", None),
    "tensorrt_baseline": ("engine_baseline", "tensorrt", None),
    "ort_portable_static": ("static_portable", "ort", "cpu"),
    "tensorrt_static": ("static_engine", "tensorrt", None),
}


def unavailable(name: str, bundle) -> str | None:
    """Why backend ``name`` cannot be opened on ``bundle``, or None when it can."""
    attribute, runtime, device = _RUNNERS[name]
    if runtime == "ort" and device == "cuda":
        from .ort import available

        if not available("cuda"):
            return "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a CUDA machine)"
    if runtime == "tensorrt":
        from .tensorrt import unavailable_reason

        reason = unavailable_reason()
        if reason:
            return reason
    if getattr(bundle, attribute) is None:
        return {"plugin": "not exported (--no-onnx)", "portable": "not exported (--no-onnx)",
                "baseline": "the unmerged baseline was not exported (it is made for benchmarks)",
                "engine": "no TensorRT engine was built", "engine_baseline": "no TensorRT baseline engine was built",
                "static_portable": "no static-schedule export (--static-schedule)",
                "static_engine": "no static-schedule TensorRT engine was built",
                }.get(attribute, f"the bundle has no {attribute}")
    return None


def open_runner(bundle, name: str, *, replay: list | None = None, profile: bool = False,
                plugin_library: str | None = None) -> Runner:
    """The runner of backend ``name`` on ``bundle`` (not yet active: use ``with``).

    replay: merge plans the plugin flavour applies instead of its own choices (``ort_plugin``);
    profile: ONNX Runtime's profiler on (``run_profiled``); plugin_library: the TensorRT plugin.
    """
    reason = unavailable(name, bundle)
    if reason:
        raise ValueError(f"backend {name} cannot be opened: {reason}")
    attribute, runtime, device = _RUNNERS[name]
    model = getattr(bundle, attribute)
    if runtime == "eager":
        from .eager import EagerRunner

        return EagerRunner(model, name)
    if runtime == "ort":
        from .ort import OrtRunner

        return OrtRunner(model, name, plugin=attribute == "plugin", device=device, profile=profile, replay=replay)
    from .tensorrt import EngineRunner

    return EngineRunner(model, name, plugin=plugin_library, needs_plugin=attribute in ("engine", "static_engine"),
                        built_on=bundle.engine_info)
