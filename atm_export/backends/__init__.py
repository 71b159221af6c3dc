"""Backends: one runner interface (``base.Runner``) and one factory, ``open_runner``.

Every backend a run can compare or time, by name, and the unmerged model each merged backend
is timed against. A new backend is one module here plus its lines in ``_RUNNERS`` and
``unavailable``. Nothing here knows of jobs, reports or artifact files.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Outputs, Runner

__all__ = ["BASELINES", "FAMILIES", "MERGED", "NAMES", "STATIC", "Outputs", "Runner", "RuntimeOptions", "open_runner",
           "precision_of", "runtime_unavailable", "unavailable"]

#: Each merged backend, and the unmerged model on the same runtime.
BASELINES = {
    "eager_atm": "eager_baseline",
    "ort_portable": "ort_baseline",
    "ort_plugin": "ort_baseline",
    "ort_cuda_portable": "ort_cuda_baseline",
    "tensorrt": "tensorrt_baseline",
    "openvino": "openvino_baseline",
    "openvino_bf16": "openvino_bf16_baseline",
    "openvino_fp16": "openvino_fp16_baseline",
    "ort_portable_static": "ort_baseline",
    "tensorrt_static": "tensorrt_baseline",
    "openvino_static": "openvino_baseline",
}
#: The backends of the static-schedule models (--static-schedule): timed with the others, but
#: compared with their own eager replay (a bundle's ``static``), not with the adaptive model.
STATIC = ("ort_portable_static", "tensorrt_static", "openvino_static")
MERGED = tuple(BASELINES)
NAMES = (*MERGED, *dict.fromkeys(BASELINES.values()))
#: What ``--backends`` may name besides single backends: every backend of one runtime.
FAMILIES = {"eager": ("eager_atm",), "ort": ("ort_portable", "ort_plugin", "ort_cuda_portable"),
            "tensorrt": ("tensorrt",), "openvino": ("openvino", "openvino_bf16", "openvino_fp16")}


@dataclass(frozen=True)
class RuntimeOptions:
    """How the runtimes are set up: the TensorRT plugin library (None: the one
    ``atm-export build-plugin`` built), and the OpenVINO device and thread count (None: all)."""

    plugin_library: str | None = None
    openvino_device: str = "CPU"
    openvino_threads: int | None = None


#: What each backend runs: (model attribute of the bundle, runtime, device for ONNX Runtime or
#: precision for OpenVINO, else None).
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
    "openvino": ("portable", "openvino", "fp32"),
    "openvino_bf16": ("portable", "openvino", "bf16"),
    "openvino_fp16": ("portable", "openvino", "fp16"),
    "openvino_baseline": ("baseline", "openvino", "fp32"),
    "openvino_bf16_baseline": ("baseline", "openvino", "bf16"),
    "openvino_fp16_baseline": ("baseline", "openvino", "fp16"),
    "openvino_static": ("static_portable", "openvino", "fp32"),
}


def precision_of(name: str) -> str | None:
    """The precision backend ``name`` always runs at (OpenVINO's), or None where a run's options
    choose it (TensorRT) or it is fp32 anyway."""
    _, runtime, option = _RUNNERS[name]
    return option if runtime == "openvino" else None


def runtime_unavailable(name: str, runtime_options: RuntimeOptions = RuntimeOptions()) -> str | None:
    """Why backend ``name``'s runtime cannot run here (a package, a device or a precision is
    missing), whatever the models; None when it can."""
    _, runtime, option = _RUNNERS[name]
    if runtime == "ort" and option == "cuda":
        from .ort import available

        if not available("cuda"):
            return "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a CUDA machine)"
    if runtime == "tensorrt":
        from .tensorrt import unavailable_reason

        return unavailable_reason()
    if runtime == "openvino":
        from .openvino import precision_problem

        return precision_problem(runtime_options.openvino_device, option)
    return None


def unavailable(name: str, bundle, runtime_options: RuntimeOptions = RuntimeOptions()) -> str | None:
    """Why backend ``name`` cannot be opened on ``bundle``, or None when it can."""
    attribute = _RUNNERS[name][0]
    reason = runtime_unavailable(name, runtime_options)
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
                runtime_options: RuntimeOptions = RuntimeOptions()) -> Runner:
    """The runner of backend ``name`` on ``bundle`` (not yet active: use ``with``).

    replay: merge plans the plugin flavour applies instead of its own choices (``ort_plugin``);
    profile: ONNX Runtime's profiler or OpenVINO's per-node timing on (``run_profiled``); runtime_options: the TensorRT
    plugin, OpenVINO's device and threads.
    """
    reason = unavailable(name, bundle, runtime_options)
    if reason:
        raise ValueError(f"backend {name} cannot be opened: {reason}")
    attribute, runtime, option = _RUNNERS[name]
    model = getattr(bundle, attribute)
    if runtime == "eager":
        from .eager import EagerRunner

        return EagerRunner(model, name)
    if runtime == "ort":
        from .ort import OrtRunner

        return OrtRunner(model, name, plugin=attribute == "plugin", device=option, profile=profile, replay=replay,
                         weights_dir=bundle.directory)
    if runtime == "openvino":
        from .openvino import OpenVinoRunner

        return OpenVinoRunner(model, name, precision=option, device=runtime_options.openvino_device,
                              threads=runtime_options.openvino_threads, profile=profile, weights_dir=bundle.directory)
    from .tensorrt import EngineRunner

    return EngineRunner(model, name, plugin=runtime_options.plugin_library,
                        needs_plugin=attribute in ("engine", "static_engine"), built_on=bundle.engine_info)


#: The backends ``--backends`` chooses among: the adaptive merged models. Their unmerged
#: baselines and static-schedule twins follow them (``follows``).
SELECTABLE = tuple(n for n in MERGED if n not in STATIC)


def select(spec: str | None) -> tuple[str, ...]:
    """The backends of SELECTABLE that ``--backends`` names: a comma list of backends or
    runtimes (FAMILIES), each prefixed ``-`` to leave it out; only exclusions start from all.
    None or "all": all. ValueError, naming the choices, for a name it does not know."""
    if spec is None or spec.strip() == "all":
        return SELECTABLE
    chosen, excluded = [], []
    for token in filter(None, (t.strip() for t in spec.split(","))):
        word = token.lstrip("-")
        names = FAMILIES.get(word) or ((word,) if word in SELECTABLE else None)
        if names is None:
            raise ValueError(f"unknown backend {word!r} in --backends; choose from {', '.join(FAMILIES)} or "
                             f"{', '.join(SELECTABLE)} (prefix - to leave one out)")
        (excluded if token.startswith("-") else chosen).extend(names)
    return tuple(n for n in SELECTABLE if n in (chosen or SELECTABLE) and n not in excluded)


def follows(name: str, selected: tuple[str, ...]) -> bool:
    """Whether backend ``name`` (any of NAMES) runs when ``selected`` are chosen: a baseline with
    any of its merged backends, a static-schedule model with its adaptive twin."""
    if name in STATIC:
        return name.removesuffix("_static") in selected
    if name in MERGED:
        return name in selected
    return any(BASELINES[m] == name for m in selected)
