"""Steps that the main job and ``check`` share: the sample batch, what the report states about a
sample run (so that ``check`` can recompute it), and parity of a bundle's backends."""

from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..backends import open_runner
from ..console import Console
from ..errors import UserError
from ..flops import ViTDims, baseline_gflops, run_gflops
from ..images import builtin_images, load_images, preprocess, require_finite
from ..parity import Reference, check_backend, ort_extra_checks, tolerance_for
from ..patch import ATMVisionTransformer
from ..registry import ModelEntry
from ..report.model import BackendParity, Flops, ModelInfo, Tokens, load_section
from ..schedule import MergeConfig
from ..settings import Settings
from ..weights import WeightsInfo

FLOPS_CONVENTION = "multiply-adds, fvcore-style; LayerNorm 2 per element (docs/flops.md)"


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


def environment() -> dict:
    import onnx
    import onnxruntime
    import timm

    return {"atm_export": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads()}


def check_parity(bundle, names: list[str], refs: list[Reference], console: Console, *, strict: bool = False,
                 atol: float | None = None, rtol: float | None = None,
                 precisions: dict[str, str] | None = None, plugin_library: str | None = None,
                 against: str = "eager PyTorch") -> dict[str, BackendParity]:
    """Every backend of ``names`` against the eager references (one step, a note per backend;
    ``against`` names the references in the step's title).

    The ONNX Runtime backends also get the replay and lowering checks (atm_export.parity).
    atol, rtol: replace the default tolerance of each backend's precision when given.
    """
    extra = {}
    if bundle.plugin is not None:
        extra = ort_extra_checks(bundle.plugin, lambda plans: open_runner(bundle, "ort_plugin", replay=plans),
                                 bundle.portable, tolerance_for("fp32", atol, rtol))
    results = {}
    sizes = [r.images.shape[0] for r in refs]
    with console.step(f"parity against {against} at batch sizes {sizes}: {', '.join(names)}"):
        for name in names:
            precision = (precisions or {}).get(name, "fp32")
            tol = tolerance_for(precision, atol, rtol)
            with open_runner(bundle, name, plugin_library=plugin_library) as runner:
                result = check_backend(runner, refs, precision, strict, extra.get(name), tol)
            results[name] = parity = load_section(BackendParity, result)
            ratio = "-" if parity.max_error_ratio is None else f"{parity.max_error_ratio:.2g}"
            console.note(f"{name}: {parity.status}; max abs diff {parity.max_abs_diff or 0:.3g} ({ratio} of atol "
                         f"{tol.atol:g} + rtol {tol.rtol:g}), top-1 agreement {parity.top1_agreement}, token counts "
                         f"equal {parity.token_counts_equal}")
            for note in parity.notes:
                console.note(f"{name}, {note}", detail=parity.status == "passed")
    return results


def check_static_parity(static, batches: list[torch.Tensor], console: Console, *, tensorrt: bool = True,
                        **options) -> dict[str, BackendParity]:
    """Parity of the static-schedule models (a bundle's ``static``) against the eager model that
    replays their schedule, on ``batches``; keyed ``<backend>_static``. tensorrt=False leaves
    the engine out; ``options``: those of ``check_parity``."""
    from ..backends import unavailable
    from ..parity import reference_run

    names = [n for n in ("ort_portable", "ort_plugin", "tensorrt")
             if unavailable(n, static) is None and (tensorrt or n != "tensorrt")]
    refs = [reference_run(static.atm, b) for b in batches]
    results = check_parity(static, names, refs, console, against="the eager replay of the static schedule", **options)
    return {f"{name}_static": result for name, result in results.items()}
