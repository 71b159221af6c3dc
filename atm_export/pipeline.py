"""The main job: model -> ATM -> ONNX (two flavours) -> parity -> benchmarks -> report.

The CLI parses arguments into :class:`JobOptions` and calls :func:`run_job`; nothing here
prints except through :class:`~atm_export.progress.Progress`.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .artifacts import ArtifactWriter
from .errors import ParityError, UserError
from .flops import ViTDims, baseline_gflops, run_gflops
from .images import builtin_images, load_images, preprocess, require_finite, take_batch
from .patch import ATMVisionTransformer, patch_model
from .progress import Progress
from .registry import ModelEntry, Preset, resolve_model
from .report import render_markdown
from .schedule import MergeConfig
from .signals import deferred
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
    export: bool = True
    opset: int = 18
    parity_batches: tuple[int, ...] = (1, 3)
    strict_parity: bool = False
    atol: float | None = None  # parity tolerances; None: the default of each backend's precision
    rtol: float | None = None
    benchmark: bool = True
    bench_batches: tuple[int, ...] = (1, 8, 32)
    bench_runs: int = 5
    bench_schedule: str | None = None
    tensorrt: bool = True
    trt_precision: str = "fp32"
    trt_plugin: str | None = None


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
        images, names = load_images(images_dir, limit=batch_size)
        info = {"source": str(Path(images_dir).resolve()), "count": len(images)}
    else:
        images = builtin_images(batch_size)
        names = [f"built-in scene {i}" for i in range(len(images))]
        info = {"source": "builtin", "count": len(images)}
    batch = preprocess(images, model)
    require_finite(batch, names)
    return batch, info


def environment() -> dict:
    import onnx
    import onnxruntime
    import timm

    return {
        "atm_export": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }


def run_params(config: MergeConfig, atm: ATMVisionTransformer) -> dict:
    """The merge settings as report.json records them (``check`` re-derives and compares them)."""
    return {**config.to_dict(atm.depth), "prop_attn": atm.prop_attn, "num_protected": atm.num_protected}


def run_figures(atm: ATMVisionTransformer, stats) -> dict:
    """What report.json states about the sample run (``check`` recomputes and compares them)."""
    base = baseline_gflops(ViTDims.from_timm(atm.vit))
    gflops_atm = run_gflops(atm, stats)
    return {
        "gflops": {"baseline": round(base, 4), "atm": round(gflops_atm, 4), "reduction": round(1.0 - gflops_atm / base, 4)},
        "tokens_per_layer": stats.tokens_per_layer,
        "r_per_layer": stats.r_per_layer,
    }


def core_report(entry: ModelEntry, preset: Preset | None, config: MergeConfig, atm: ATMVisionTransformer,
                weights: WeightsInfo, images_info: dict, stats) -> dict:
    """The fields every run reports: model, settings, weights, FLOPs, token counts."""
    figures = run_figures(atm, stats)
    report = {
        "atm_export_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": entry.display_name,
        "timm_name": entry.timm_name,
        "timm_kwargs": entry.timm_kwargs,
        "preset": preset.name if preset else None,
        "preset_source": preset.to_dict() if preset else None,
        "params": run_params(config, atm),
        "weights": weights.to_dict(),
        "images": images_info,
        "batch_size": images_info["count"],
        "gflops": {**figures["gflops"],
                   "convention": "multiply-adds, fvcore-style; LayerNorm 2 per element (docs/flops.md)"},
        "tokens_per_layer": figures["tokens_per_layer"],
        "r_per_layer": figures["r_per_layer"],
        "environment": environment(),
    }
    if entry.paper_model:
        report["gflops"]["paper"] = {"model": entry.paper_model, "baseline": entry.baseline_gflops,
                                     "atm": preset.gflops if preset and not preset.borrowed_from else None}
    if weights.random:
        report["warning"] = weights.to_dict()["warning"]
    return report


@dataclass
class Job:
    """What the steps of a run share."""

    opts: JobOptions
    entry: ModelEntry
    config: MergeConfig
    preset: Preset | None
    vit: torch.nn.Module
    atm: ATMVisionTransformer
    weights: WeightsInfo
    batch: torch.Tensor
    images_info: dict
    progress: Progress = field(default_factory=lambda: Progress(enabled=False))
    report: dict = field(default_factory=dict)
    bench_tokens: list[int] | None = None  # a fixed token schedule to benchmark with
    plugin_model: object = None
    portable_model: object = None


def load(opts: JobOptions, progress: Progress) -> Job:
    entry = resolve_model(opts.model)
    config, preset = resolve_config(entry, opts.preset, opts.overrides)
    with progress.step(f"loading {entry.display_name} ({entry.timm_name})"):
        vit, weights = create_model(entry, opts.weights, opts.random_init)
        atm = patch_model(vit, config)
        if weights.random:
            progress.note("WARNING: random weights (--random-init); outputs do not reflect a trained model")
    batch, images_info = sample_batch(vit, opts.images, opts.batch_size)
    return Job(opts, entry, config, preset, vit, atm, weights, batch, images_info, progress)


def run_eager(job: Job, progress: Progress) -> None:
    with progress.step(f"running ATM on {job.images_info['count']} sample images"):
        with torch.inference_mode():
            job.atm(job.batch)
        stats = job.atm.last_stats
    job.report = core_report(job.entry, job.preset, job.config, job.atm, job.weights, job.images_info, stats)
    g = job.report["gflops"]
    progress.note(f"GFLOPs {g['baseline']:.2f} -> {g['atm']:.2f}; "
                  f"tokens per block {[round(t, 1) for t in stats.tokens_per_layer]}")


def export_onnx(job: Job, writer: ArtifactWriter, progress: Progress) -> None:
    import onnx

    from .export.onnx import check_model, export_plugin_flavour, portable_flavour

    metadata = {"model": job.entry.display_name, "timm_name": job.entry.timm_name,
                "params": job.report["params"], "preset": job.report["preset"], "weights": job.weights.to_dict()}
    with progress.step("exporting model.plugin.onnx (one TokenMerge node per merge step; about a minute)"):
        stats = job.atm.last_stats
        kept = [t - r for t, r in zip(stats.tokens_per_layer, stats.r_per_layer)]
        job.plugin_model = export_plugin_flavour(job.atm, job.batch[:2], job.opts.opset, metadata, typical_tokens=kept)
        check_model(job.plugin_model, "plugin")
        onnx.save(job.plugin_model, writer.path("model.plugin.onnx"))
    with progress.step("lowering to standard ops: model.onnx"):
        job.portable_model = portable_flavour(job.plugin_model)
        check_model(job.portable_model, "portable")
        onnx.save(job.portable_model, writer.path("model.onnx"))


def parity_batches(job: Job) -> list[torch.Tensor]:
    """The sample batch, then the other requested batch sizes (cycling the sample images)."""
    sizes = [job.batch.shape[0]] + [b for b in job.opts.parity_batches if b != job.batch.shape[0]]
    return [take_batch(job.batch, b) for b in dict.fromkeys(sizes)]


def backends(job: Job, skipped: dict, writer: ArtifactWriter) -> dict:
    """Every available backend as images -> (logits, tokens); unavailable ones go to ``skipped``."""
    from .backends import ort as ort_backend
    from .backends import tensorrt as trt_backend

    atm = job.atm

    def eager_atm(images: np.ndarray):
        with torch.inference_mode():
            logits, tokens = atm.forward_export(torch.from_numpy(images))
        return logits.numpy(), tokens.tolist()

    found = {"eager_atm": eager_atm}
    if job.portable_model is not None:
        found["ort_portable"] = ort_backend.OrtRunner(job.portable_model, "portable").run
        found["ort_plugin"] = ort_backend.OrtRunner(job.plugin_model, "plugin").run
        if ort_backend.available("cuda"):
            found["ort_cuda_portable"] = ort_backend.OrtRunner(job.portable_model, "portable", device="cuda").run
        else:
            skipped["ort_cuda_portable"] = "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a CUDA machine)"
        if job.opts.tensorrt:
            reason = trt_backend.unavailable_reason()
            if reason:
                skipped["tensorrt"] = reason
            else:
                found["tensorrt"] = trt_backend.engine_backend(job, writer, skipped)
        else:
            skipped["tensorrt"] = "not requested (--no-tensorrt)"
    else:
        skipped["onnx"] = "not requested (--no-onnx)"
    return {name: fn for name, fn in found.items() if fn is not None}


def run_parity(job: Job, runners: dict, progress: Progress) -> dict:
    from .parity import ort_extra_checks, reference_run, tolerance_for

    refs = [reference_run(job.atm, b) for b in parity_batches(job)]
    extra = {}
    if "ort_plugin" in runners:
        extra = ort_extra_checks(job.plugin_model, runners["ort_plugin"], job.portable_model,
                                 tolerance_for("fp32", job.opts.atol, job.opts.rtol))
    precisions = {"tensorrt": job.opts.trt_precision}
    return parity_all(runners, refs, extra, precisions, job.opts.strict_parity, progress, job.opts.atol, job.opts.rtol)


def parity_all(runners: dict, refs: list, extra: dict, precisions: dict, strict: bool, progress: Progress,
               atol: float | None = None, rtol: float | None = None) -> dict:
    """Every backend against the eager references, with progress lines.

    atol, rtol: replace the default tolerance of each backend's precision when given.
    """
    from .parity import check_backend, tolerance_for

    results = {}
    sizes = [r.images.shape[0] for r in refs]
    for name, backend in runners.items():
        precision = precisions.get(name, "fp32")
        tol = tolerance_for(precision, atol, rtol)
        with progress.step(f"parity: {name} against eager PyTorch at batch sizes {sizes} "
                           f"({precision}: atol {tol.atol:g}, rtol {tol.rtol:g})"):
            results[name] = r = check_backend(backend, refs, precision, strict, extra.get(name), tol)
            ratio = "-" if r["max_error_ratio"] is None else f"{r['max_error_ratio']:.2g}"
            progress.note(f"{r['status']}: max abs diff {r['max_abs_diff']}, {ratio} of the tolerance, "
                          f"top-1 agreement {r['top1_agreement']}, token counts equal {r['token_counts_equal']}")
            for note in r["notes"]:
                progress.note(note)
    return results


def run_benchmark(job: Job, runners: dict, progress: Progress) -> tuple[dict, dict]:
    """Latency of every backend and of the unmerged baselines at the benchmark batch sizes.

    Without a schedule, the merged backends merge the sample images as they would (cycled to
    each batch size); with ``--bench-schedule`` every merged backend replays the same fixed token
    schedule instead (a ToMe-style eager model, and copies of the exported graph whose
    TokenMerge nodes merge a fixed r).
    """
    from .backends import ort as ort_backend
    from .bench import eager_merge_share, ort_merge_share, schedule_gflops, time_calls
    from .export.onnx import export_baseline, portable_flavour, with_fixed_schedule
    from .schedule import r_from_tokens, replay_config

    dims = ViTDims.from_timm(job.vit)
    info = {"runs": job.opts.bench_runs, "threads": torch.get_num_threads(), "batches": list(job.opts.bench_batches)}
    atm, graph, lowered = job.atm, job.plugin_model, job.portable_model
    timed = {name: fn for name, fn in runners.items() if name != "eager_atm"}
    if job.bench_tokens:
        tokens = job.bench_tokens
        r = r_from_tokens(tokens, dims.num_prefix, job.atm.class_token_head)
        atm = patch_model(job.vit, replay_config(r, job.config.resolved_split_layer(dims.depth), job.atm.prop_attn))
        gflops = schedule_gflops(dims, tokens, job.atm.class_token_head)
        info["schedule"] = {"tokens_per_layer": tokens, "gflops": round(gflops, 4), "source": job.opts.bench_schedule}
        info["description"] = (f"fixed token schedule {tokens} ({gflops:.2f} GFLOPs), "
                               f"{info['runs']} timed runs after a warm-up, {info['threads']} threads")
        timed = {}
        if graph is not None:
            graph = with_fixed_schedule(graph, r)
            lowered = portable_flavour(graph)
            timed["ort_portable"] = ort_backend.OrtRunner(lowered, "portable").run
            timed["ort_plugin"] = ort_backend.OrtRunner(graph, "plugin").run
    else:
        gflops = job.report["gflops"]["atm"]
        info["description"] = (f"the sample images' own merging (cycled to each batch size), "
                               f"{info['runs']} timed runs after a warm-up, {info['threads']} threads")

    def eager(model):
        def run(images):
            with torch.inference_mode():
                return model(torch.from_numpy(images))
        return run

    timed = {"eager_baseline": eager(job.vit), "eager_atm": eager(atm), **timed}
    if graph is not None:
        with progress.step("exporting the unmerged baseline for the ONNX backends"):
            baseline = export_baseline(job.vit, job.batch[:2], job.opts.opset)
        timed["ort_baseline"] = ort_backend.OrtRunner(baseline, "baseline").run
        if "ort_cuda_portable" in runners:
            timed["ort_cuda_portable"] = ort_backend.OrtRunner(lowered, "portable", device="cuda").run
            timed["ort_cuda_baseline"] = ort_backend.OrtRunner(baseline, "baseline", device="cuda").run
        if "tensorrt" in runners:
            from .backends import tensorrt as trt_backend

            spec = trt_backend.job_engine_spec(job)
            with progress.step("building TensorRT engines for the benchmark"):
                timed["tensorrt_baseline"] = trt_backend.model_runner(baseline, spec)
                if job.bench_tokens:
                    timed["tensorrt"] = trt_backend.model_runner(graph, spec, job.opts.trt_plugin)
    latency: dict = {}
    for name, fn in timed.items():
        with progress.step(f"benchmark: {name} at batch sizes {list(job.opts.bench_batches)}"):
            for b in job.opts.bench_batches:
                images = take_batch(job.batch, b).numpy()
                latency.setdefault(name, {})[str(b)] = time_calls(lambda: fn(images), job.opts.bench_runs)
            progress.note(", ".join(f"b{b}: {v['p50']:.1f} ms" for b, v in latency[name].items()))
    largest = max(job.opts.bench_batches)
    info["speedup"] = speedups(latency, str(largest))
    info["flops_ratio"] = round(job.report["gflops"]["baseline"] / gflops, 3)
    info["speedup_over_flops_ratio"] = {n: round(v / info["flops_ratio"], 3) for n, v in info["speedup"].items()}
    info["merge_share"] = {"eager_atm": round(eager_merge_share(atm, take_batch(job.batch, largest)), 4)}
    if graph is not None:
        profiled = ort_backend.OrtRunner(lowered, "portable", profile=True)
        events = profiled.run_profiled(take_batch(job.batch, largest).numpy())
        info["merge_share"]["ort_portable"] = round(ort_merge_share(events), 4)
    return latency, info


#: Each merged backend against the unmerged model on the same runtime.
BASELINES = {"eager_atm": "eager_baseline", "ort_portable": "ort_baseline", "ort_plugin": "ort_baseline",
             "ort_cuda_portable": "ort_cuda_baseline", "tensorrt": "tensorrt_baseline"}


def speedups(latency: dict, batch: str) -> dict:
    """p50 speed-up of every merged backend over its runtime's unmerged baseline at ``batch``."""
    return {name: round(latency[base][batch]["p50"] / latency[name][batch]["p50"], 3)
            for name, base in BASELINES.items() if name in latency and base in latency}


def run_job(opts: JobOptions, progress: Progress | None = None) -> dict:
    """Run the whole job and write its artifacts. Returns the report; raises ParityError (after
    writing the artifacts and the report) when a backend disagrees with eager PyTorch."""
    progress = progress or Progress(enabled=False)
    writer = None
    try:
        entry = resolve_model(opts.model)
        config, _ = resolve_config(entry, opts.preset, opts.overrides)  # bad settings fail before any work
        if opts.export:
            from .export.onnx import check_opset

            check_opset(opts.opset)
            if config.per_image:
                raise UserError("the atm-per-image policy is for comparisons in PyTorch; exported models "
                                "merge batch-adaptively (use --policy atm, or --no-onnx)")
        if opts.bench_schedule and not opts.benchmark:
            raise UserError("--bench-schedule needs the benchmark (drop --no-benchmark)")
        if opts.export and opts.tensorrt:
            from .backends import tensorrt as trt_backend

            if trt_backend.unavailable_reason() is None:
                trt_backend.load_plugin(opts.trt_plugin)  # a missing plugin fails now, not after the export
        with deferred():  # a signal now is raised once ``writer`` is set, so its cleanup runs
            writer = ArtifactWriter(opts.output, force=opts.force)
        if writer.removed_stale:
            progress.note(f"removed {len(writer.removed_stale)} staging director"
                          f"{'y' if len(writer.removed_stale) == 1 else 'ies'} left in {opts.output} by killed runs")
        job = load(opts, progress)
        if opts.bench_schedule:
            from .bench import parse_schedule

            job.bench_tokens = parse_schedule(opts.bench_schedule, ViTDims.from_timm(job.vit), job.atm.class_token_head)
        run_eager(job, progress)
        report = job.report
        skipped: dict = {}
        if opts.export:
            export_onnx(job, writer, progress)
        runners = backends(job, skipped, writer)
        report["parity"] = run_parity(job, runners, progress)
        if opts.benchmark:
            report["latency_ms"], report["benchmark"] = run_benchmark(job, runners, progress)
        else:
            skipped["benchmark"] = "not requested (--no-benchmark)"
        report["skipped"] = skipped
        report["artifacts"] = [n for n in ("model.onnx", "model.plugin.onnx", "model.engine")
                               if (writer.staging / n).exists()] + ["report.json", "report.md"]
        writer.write_text("report.md", render_markdown(report))
        writer.write_json("report.json", report)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    writer.commit()
    failed = [name for name, r in report["parity"].items() if r["fails_run"]]
    if failed:
        raise ParityError(f"{', '.join(failed)} disagree with eager PyTorch; see {opts.output / 'report.md'}")
    return report
