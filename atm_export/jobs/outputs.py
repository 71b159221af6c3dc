"""The main job's last step: the typed report, its views (report.json, report.md) and pictures."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .. import __version__
from ..artifacts import ARTIFACT_NAMES, ArtifactWriter
from ..backends import BASELINES
from ..console import Console
from ..errors import UserError
from ..export.bundle import Bundle
from ..patch import patch_model
from ..report.model import SCHEMA_VERSION, Benchmark, Flops, Report, SettingsInfo, StaticSchedule
from .common import Model, created, deployment_info, environment, model_info, run_params, run_tokens


def build_report(model: Model, stats, flops: Flops, parity: dict, benchmark: Benchmark | None, bundle: Bundle,
                 skipped: dict, static: dict | None = None, triton: dict | None = None) -> Report:
    entry = model.entry
    if entry.paper_model:
        preset = model.settings.preset
        flops.paper = {"model": entry.paper_model, "baseline": entry.baseline_gflops,
                       "atm": preset.gflops if preset and not preset.borrowed_from else None}
    report = Report(
        schema_version=SCHEMA_VERSION, status="passed", atm_export_version=__version__,
        created=created(),
        model=model_info(entry),
        settings=SettingsInfo(**model.settings.to_dict(), params=run_params(model.settings.config, model.atm)),
        weights=model.weights.to_dict(), images=model.images, flops=flops, tokens=run_tokens(stats),
        parity=parity, benchmark=benchmark, tensorrt=bundle.engine_info, skipped=skipped,
        static_schedule=None if static is None else StaticSchedule(**static),
        triton=triton,
        **deployment_info(model),
        warnings=[model.weights.to_dict()["warning"]] if model.weights.random else [],
        environment=environment())
    report.status = report.overall_status()
    return report


def write_report(report: Report, model: Model, opts, writer: ArtifactWriter, console: Console) -> None:
    """report.json, report.md and the pictures, staged with the other artifacts."""
    import json

    from ..report import plots
    from ..report.markdown import render_markdown

    with console.step("writing the report and its pictures"):
        report.steps = [dataclasses.asdict(r) for r in console.records]
        t = report.tokens
        plots.plot_tokens(t.mean, t.min, t.max, writer.path("tokens.png"), title=f"Tokens entering each block: "
                          f"{report.model.name}")
        if report.benchmark is not None:
            latency = {n: {int(b): s.p50 for b, s in per.items()} for n, per in report.benchmark.latency.items()}
            plots.plot_latency(latency, BASELINES, writer.path("latency.png"))
        if opts.visualize:
            draw_merge_maps(model, opts, writer.path("merge_maps.png"))
        report.pictures = [n for n in ("tokens.png", "latency.png", "merge_maps.png") if writer.staged(n)]
        report.artifacts = [n for n in ARTIFACT_NAMES if n.startswith("model.") and writer.staged(n)]
        report.artifacts += ["report.json", "report.md", *report.pictures]
        writer.write_text("report.md", render_markdown(report, opts.output, plugin_library(report, opts)))
        writer.write_text("report.json", json.dumps(report.to_dict(), indent=2) + "\n")


def plugin_library(report: Report, opts) -> str | None:
    """The TensorRT plugin library the next steps name: the one the engine was built with, the
    one given, or the one `atm-export build-plugin` built (None where there is none)."""
    from ..plugin_lib import find_plugin_library

    if report.tensorrt and report.tensorrt.get("plugin_library"):
        return report.tensorrt["plugin_library"]
    found = opts.trt_plugin or find_plugin_library()
    return None if found is None else str(Path(found).resolve())


def merge_map_blocks(atm, requested: tuple[int, ...] | None) -> list[int]:
    """The blocks (1-based) after which to draw merge maps: ``requested``, or the split layer
    and the last merging block. UserError for blocks that do not merge."""
    merging = [i + 1 for i, step in enumerate(atm.steps) if step is not None]
    if not merging:
        raise UserError("--visualize: these settings merge in no block, so there is nothing to draw")
    split = atm.config.resolved_split_layer(atm.depth)
    blocks = list(requested) if requested else sorted({b for b in (split, merging[-1]) if b in merging} or {merging[-1]})
    missing = [b for b in blocks if b not in merging]
    if missing:
        raise UserError(f"--visualize-blocks {missing}: those blocks do not merge (merging blocks: {merging})")
    return blocks


def draw_merge_maps(model: Model, opts, path: Path) -> None:
    """ToMe-style maps of which patches each token holds, after the chosen blocks."""
    from timm.data import resolve_data_config

    from ..report.visualize import denormalize, draw_merge_maps as draw

    atm = model.atm
    blocks = merge_map_blocks(atm, opts.visualize_blocks)
    traced = patch_model(atm.vit, atm.config, trace_source=True)
    with torch.inference_mode():
        _, stats = traced.run(model.batch)
    after = stats.sources_after
    config = resolve_data_config({}, model=atm.vit)
    images = denormalize(model.batch.numpy(), config["mean"], config["std"])
    grid = atm.vit.patch_embed.grid_size
    draw(images, {f"after block {b}": after[b].numpy() for b in blocks}, atm.num_protected, tuple(grid), path)
