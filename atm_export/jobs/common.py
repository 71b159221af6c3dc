"""Steps that the main job and ``check`` share: the sample batch, what the report states about a
sample run (so that ``check`` can recompute it), and parity of a bundle's backends."""

from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..backends import RuntimeOptions, open_runner, precision_of, runtime_unavailable, select
from ..console import Console
from ..errors import UserError
from ..flops import ViTDims, baseline_gflops, run_gflops
from ..images import builtin_images, load_images, preprocess, require_finite
from ..parity import Reference, check_backend, settling_checks, tolerance_for
from ..patch import ATMVisionTransformer
from ..registry import ModelEntry
from ..report.model import BackendParity, Flops, ModelInfo, Tokens, load_section
from ..schedule import MergeConfig
from ..settings import Settings
from ..weights import WeightsInfo

FLOPS_CONVENTION = "multiply-adds, fvcore-style; LayerNorm 2 per element (docs/flops.md)"


@dataclass(kw_only=True)
class RuntimeChoices:
    """The options of the runtimes a job opens, shared by the jobs' option classes (keyword-only,
    so they follow each job's own fields)."""

    trt_plugin: str | None = None  # the TokenMerge plugin library; None: the one build-plugin built
    openvino_device: str = "CPU"
    openvino_threads: int | None = None  # None: OpenVINO's default (every core)

    def runtime_options(self) -> RuntimeOptions:
        return RuntimeOptions(self.trt_plugin, self.openvino_device, self.openvino_threads)


def check_backend_options(spec: str | None, runtime: RuntimeOptions) -> None:
    """UserError for a --backends naming what does not exist, or only what cannot run here (a
    runtime that is not installed: asked for by name, it is a mistake, not a skip), and for
    OpenVINO options naming a device OpenVINO does not have."""
    from ..backends.openvino import DEFAULT_DEVICE, device_problem

    try:
        select(spec)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for token in (t.strip() for t in (spec or "").split(",")):
        if not token or token.startswith("-") or token == "all":
            continue
        reasons = [runtime_unavailable(n, runtime) for n in select(token)]
        if all(reasons):
            raise UserError(f"--backends {token}: {reasons[0]}")
    if runtime.openvino_device != DEFAULT_DEVICE or runtime.openvino_threads is not None:
        problem = device_problem(runtime.openvino_device)
        if problem:
            raise UserError(f"--openvino-device {runtime.openvino_device}: {problem}")


@dataclass
class Model:
    """The loaded model and its sample batch."""

    entry: ModelEntry
    settings: Settings
    atm: ATMVisionTransformer
    weights: WeightsInfo
    batch: torch.Tensor
    images: dict  # source, count
    static_tokens: list[int] | None = None  # --static-schedule's tokens per block, when known before the sample run


def sample_batch(model, images_dir: str | None, batch_size: int) -> tuple[torch.Tensor, dict]:
    """The sample batch: the user's images or the built-in scenes, preprocessed for ``model``."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if images_dir:
        images, names = load_images(images_dir, limit=batch_size)
        info = {"source": str(Path(images_dir).resolve()), "count": len(images)}
    else:
        images = builtin_images(batch_size)
        names = [f"built-in scene {i}" for i in range(len(images))]
        info = {"source": "builtin", "count": len(images)}
    batch = preprocess(images, model)
    require_finite(batch, names)
    return batch, info


def run_params(config: MergeConfig, atm: ATMVisionTransformer) -> dict:
    """The merge settings as run, as report.json records them (``check`` re-derives them)."""
    return {**config.to_dict(atm.depth), "prop_attn": atm.prop_attn, "num_protected": atm.num_protected}


def run_flops(atm: ATMVisionTransformer, stats) -> Flops:
    """GFLOPs of the sample run (``stats``: its RunStats), rounded as the report states them."""
    base = baseline_gflops(ViTDims.from_timm(atm.vit))
    merged = run_gflops(atm, stats)
    return Flops(baseline=round(base, 4), atm=round(merged, 4), reduction=round(1.0 - merged / base, 4),
                 convention=FLOPS_CONVENTION)


def run_tokens(stats) -> Tokens:
    """Tokens entering each block in the sample run: batch mean and per-image range."""
    per_block = list(zip(*stats.per_image_tokens))
    return Tokens(mean=[float(t) for t in stats.tokens_per_layer], min=[int(min(b)) for b in per_block],
                  max=[int(max(b)) for b in per_block], merged=[float(r) for r in stats.r_per_layer])


def deployment_info(model: Model) -> dict:
    """The signature and preprocessing of the run's merged graphs, for report.json and metadata."""
    from ..export.signature import preprocessing, signature

    vit = model.atm.vit
    return {"signature": signature(vit, model.atm.depth), "preprocessing": preprocessing(vit)}


def created() -> str:
    """When a report is made: UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def model_info(entry: ModelEntry) -> ModelInfo:
    """The model as every report names it."""
    return ModelInfo(entry.display_name, entry.timm_name, dict(entry.timm_kwargs), entry.paper_model)


#: The CPU features that decide which kernels and precisions CPU runtimes can use.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def cpu_info() -> dict:
    """The CPU's model name and which of CPU_FLAGS it has (Linux: /proc/cpuinfo; else empty)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name"), "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def environment() -> dict:
    import onnx
    import onnxruntime
    import timm

    from ..backends.openvino import version as openvino_version

    return {"atm_export": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "openvino": openvino_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), **cpu_info(),
            "cpu_threads": torch.get_num_threads()}


def check_parity(bundle, names: list[str], refs: list[Reference], console: Console, *, strict: bool = False,
                 atol: float | None = None, rtol: float | None = None,
                 precisions: dict[str, str] | None = None, runtime_options: RuntimeOptions = RuntimeOptions(),
                 against: str = "eager PyTorch") -> dict[str, BackendParity]:
    """Every backend of ``names`` against the eager references (one step, a note per backend;
    ``against`` names the references in the step's title).

    The ONNX Runtime backends and OpenVINO at fp32 also get the replay and lowering checks
    (atm_export.parity).
    precisions: the precision of backends whose precision a run chooses (TensorRT); OpenVINO's
    backends have theirs in their names, the others are fp32. atol, rtol: replace the default
    tolerance of each backend's precision when given.
    """
    extra = {}
    if bundle.plugin is not None:
        openvino_step = None
        if "openvino" in names:
            from functools import partial

            from ..backends.openvino import run_step

            openvino_step = partial(run_step, device=runtime_options.openvino_device)
        extra = settling_checks(bundle.plugin, lambda plans: open_runner(bundle, "ort_plugin", replay=plans),
                                bundle.portable, tolerance_for("fp32", atol, rtol), openvino_step, bundle.directory)
    results = {}
    sizes = [r.images.shape[0] for r in refs]
    with console.step(f"parity against {against} at batch sizes {sizes}: {', '.join(names)}"):
        if any(name in extra for name in names):  # the replays first (memoized), each in a session of its own,
            for ref in refs:  # not inside another backend's: one copy of a large model's weights at a time
                extra["ort_plugin"]["replay"](ref)
        for name in names:
            precision = (precisions or {}).get(name) or precision_of(name) or "fp32"
            tol = tolerance_for(precision, atol, rtol)
            with open_runner(bundle, name, runtime_options=runtime_options) as runner:
                result = check_backend(runner, refs, precision, strict, extra.get(name), tol)
            results[name] = parity = load_section(BackendParity, result)
            ratio = "-" if parity.max_error_ratio is None else f"{parity.max_error_ratio:.2g}"
            diff = "-" if parity.max_abs_diff is None else f"{parity.max_abs_diff:.3g}"
            console.note(f"{name}: {parity.status}; max abs diff {diff} ({ratio} of atol "
                         f"{tol.atol:g} + rtol {tol.rtol:g}), top-1 agreement {parity.top1_agreement}, token counts "
                         f"equal {parity.token_counts_equal}")
            for note in parity.notes:
                console.note(f"{name}, {note}", detail=parity.status == "passed")
    return results


def check_static_parity(static, batches: list[torch.Tensor], console: Console, *,
                        selected: tuple[str, ...] | None = None, **options) -> dict[str, BackendParity]:
    """Parity of the static-schedule models (a bundle's ``static``) against the eager model that
    replays their schedule, on ``batches``; keyed ``<backend>_static``. selected: the backends
    to check (default: every one available); ``options``: those of ``check_parity``."""
    from ..backends import unavailable
    from ..parity import reference_run

    runtime = options.get("runtime_options", RuntimeOptions())
    names = [n for n in ("ort_portable", "ort_plugin", "tensorrt", "openvino")
             if unavailable(n, static, runtime) is None and (selected is None or n in selected)]
    refs = [reference_run(static.atm, b) for b in batches]
    results = check_parity(static, names, refs, console, against="the eager replay of the static schedule", **options)
    return {f"{name}_static": result for name, result in results.items()}
