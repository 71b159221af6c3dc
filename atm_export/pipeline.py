"""The main job: model -> ATM -> report (and, with later steps, ONNX, parity, benchmarks).

The CLI parses arguments into :class:`JobOptions` and calls :func:`run_job`; nothing here
prints except through :class:`~atm_export.progress.Progress`.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .artifacts import ArtifactWriter
from .errors import UserError
from .flops import ViTDims, baseline_gflops, run_gflops
from .images import builtin_images, load_images, preprocess
from .patch import ATMVisionTransformer, patch_model
from .progress import Progress
from .registry import ModelEntry, Preset, resolve_model
from .report import render_markdown
from .schedule import MergeConfig
from .weights import WeightsInfo, create_model

DEFAULT_PRESET = "lossless"


@dataclass
class JobOptions:
    model: str
    output: Path
    preset: str | None = None
    overrides: dict = field(default_factory=dict)  # MergeConfig fields given on the command line
    weights: str | None = None
    random_init: bool = False
    images: str | None = None
    batch_size: int = 8
    force: bool = False


def resolve_config(entry: ModelEntry, preset_name: str | None, overrides: dict) -> tuple[MergeConfig, Preset | None]:
    """The preset's settings with command-line overrides on top; validated."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    preset = None
    if preset_name is None and not overrides and entry.presets:
        preset_name = DEFAULT_PRESET
    if preset_name is not None:
        preset = entry.preset(preset_name)
        config = dataclasses.replace(preset.config, **overrides)
    elif overrides:
        config = MergeConfig(**overrides)
    else:
        raise UserError(f"{entry.display_name} has no presets; give the settings "
                        "(e.g. --alpha 0.99 --beta 0.04 --theta-min 0.88, or --policy tome --r 8)")
    return config, preset


def sample_batch(model, images_dir: str | None, batch_size: int) -> tuple[torch.Tensor, dict]:
    """The sample batch: the user's images or the built-in scenes, preprocessed for ``model``."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if images_dir:
        images = load_images(images_dir, limit=batch_size)
        info = {"source": str(Path(images_dir).resolve()), "count": len(images)}
    else:
        images = builtin_images(batch_size)
        info = {"source": "builtin", "count": len(images)}
    return preprocess(images, model), info


def environment() -> dict:
    import timm

    return {
        "atm_export": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }


def core_report(entry: ModelEntry, preset: Preset | None, config: MergeConfig, atm: ATMVisionTransformer,
                weights: WeightsInfo, images_info: dict, stats) -> dict:
    """The fields every run reports: model, settings, weights, FLOPs, token counts."""
    dims = ViTDims.from_timm(atm.vit)
    base = baseline_gflops(dims)
    gflops_atm = run_gflops(atm, stats)
    report = {
        "atm_export_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": entry.display_name,
        "timm_name": entry.timm_name,
        "timm_kwargs": entry.timm_kwargs,
        "preset": preset.name if preset else None,
        "preset_source": preset.to_dict() if preset else None,
        "params": {**config.to_dict(atm.depth), "prop_attn": atm.prop_attn, "num_protected": atm.num_protected},
        "weights": weights.to_dict(),
        "images": images_info,
        "batch_size": images_info["count"],
        "gflops": {
            "baseline": round(base, 4),
            "atm": round(gflops_atm, 4),
            "reduction": round(1.0 - gflops_atm / base, 4),
            "convention": "multiply-adds, fvcore-style; LayerNorm 2 per element (docs/flops.md)",
        },
        "tokens_per_layer": stats.tokens_per_layer,
        "r_per_layer": stats.r_per_layer,
        "environment": environment(),
    }
    if entry.paper_model:
        report["gflops"]["paper"] = {"model": entry.paper_model, "baseline": entry.baseline_gflops,
                                     "atm": preset.gflops if preset and not preset.borrowed_from else None}
    if weights.random:
        report["warning"] = weights.to_dict()["warning"]
    return report


def run_job(opts: JobOptions, progress: Progress | None = None) -> dict:
    """Run the whole job and write its artifacts. Returns the report."""
    progress = progress or Progress(enabled=False)
    entry = resolve_model(opts.model)
    config, preset = resolve_config(entry, opts.preset, opts.overrides)
    writer = ArtifactWriter(opts.output, force=opts.force)
    try:
        with progress.step(f"loading {entry.display_name} ({entry.timm_name})"):
            model, weights = create_model(entry, opts.weights, opts.random_init)
            atm = patch_model(model, config)
            if weights.random:
                progress.note("WARNING: random weights (--random-init); outputs do not reflect a trained model")
        batch, images_info = sample_batch(model, opts.images, opts.batch_size)
        with progress.step(f"running ATM on {images_info['count']} sample images"):
            with torch.inference_mode():
                atm(batch)
            stats = atm.last_stats
        report = core_report(entry, preset, config, atm, weights, images_info, stats)
        progress.note(f"GFLOPs {report['gflops']['baseline']:.2f} -> {report['gflops']['atm']:.2f}; "
                      f"tokens per block {[round(t, 1) for t in stats.tokens_per_layer]}")
        report["artifacts"] = ["report.json", "report.md"]
        writer.write_text("report.md", render_markdown(report))
        writer.write_json("report.json", report)
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    return report
