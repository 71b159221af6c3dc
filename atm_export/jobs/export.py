"""The main job: model -> ATM -> ONNX bundle -> parity -> benchmarks -> report -> artifacts.

``run_job`` reads as the steps of a run (README, "What a run does and writes"). Each step is a
function below it; none prints except through the Console, and every file goes through the
staged output directory (atm_export.artifacts), so a failed or interrupted run leaves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts import ArtifactWriter, open_output
from ..backends import SELECTABLE, select, unavailable
from ..console import Console
from ..errors import ParityError, UserError
from ..calibration import calibrated_settings
from ..export.bundle import Bundle
from ..images import take_batch
from ..parity import Reference, reference_run
from ..patch import patch_model
from ..registry import ModelEntry
from ..report.model import Flops, Report
from ..settings import Settings, settings_for
from ..weights import create_model
from .benchmark import run_benchmark
from .common import Model, RuntimeChoices, check_backend_options, check_parity, check_static_parity, deployment_info, run_flops, run_params, sample_batch
from .outputs import build_report, merge_map_blocks, write_report


@dataclass
class JobOptions(RuntimeChoices):
    model: str
    output: Path
    preset: str | None = None
    overrides: dict = field(default_factory=dict)  # MergeConfig fields given on the command line
    preset_file: str | None = None  # presets of one's own (atm_export.preset_file)
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
    bench_runs: int = 5  # at least this many timed runs per measurement ...
    bench_time: float = 2.0  # ... and at least this many seconds
    bench_schedule: str | None = None
    static_schedule: str | None = None  # also export fixed-r models: "sample", gflops:G, a JSON file, or counts
    triton: str | None = None  # write a Triton model repository there
    triton_max_batch: int | None = None  # Triton's max_batch_size for ONNX Runtime models (default: the engine's)
    tensorrt: bool = True
    trt_precision: str = "fp32"
    trt_min_batch: int | None = None  # the engine's batch range; None: from the batches this run uses
    trt_opt_batch: int | None = None
    trt_max_batch: int | None = None
    trt_timing_cache: str | None = None  # None: the default file; "none": no timing cache
    trace_cache: str | None = None  # blockwise traces kept for later exports; None: the default directory; "none": off
    visualize: bool = False
    visualize_blocks: tuple[int, ...] | None = None  # default: the split layer and the last merge
    backends: str | None = None  # --backends: which backends run (atm_export.backends.select); None: all
    external_data: bool = False  # weights in side files for every graph, not only those too large for one file

    def selected(self) -> tuple[str, ...]:
        """The merged backends this run may use (--backends, less tensorrt under --no-tensorrt)."""
        return tuple(n for n in select(self.backends) if self.tensorrt or n != "tensorrt")


def run_job(opts: JobOptions, console: Console | None = None) -> Report:
    """Run the whole job and write its artifacts. Returns the report; raises ParityError (after
    writing the artifacts and the report) when a backend disagrees with eager PyTorch."""
    console = console or Console(verbosity=0)
    entry, settings, engines = check_options(opts)
    static = opts.export and bool(opts.static_schedule)
    console.plan(2 + 2 * opts.export + 2 * static + engines + 1 + opts.benchmark + bool(opts.triton) + 1)
    with open_output(opts.output, opts.force) as writer:
        if writer.removed_stale:
            console.note(f"removed {len(writer.removed_stale)} staging director"
                         f"{'y' if len(writer.removed_stale) == 1 else 'ies'} left in {opts.output} by killed runs")
        model = load(opts, entry, settings, console)
        sample_ref, flops = run_sample(model, console)
        stats = sample_ref.stats
        skipped: dict[str, str] = {}
        bundle = export(model, stats, opts, writer, skipped, console, engines)
        names = compared_backends(bundle, opts, skipped)
        batches = parity_batches(model.batch, opts)
        refs = [sample_ref] + [reference_run(model.atm, b) for b in batches[1:]]
        parity_options = dict(strict=opts.strict_parity, atol=opts.atol, rtol=opts.rtol,
                              precisions={"tensorrt": opts.trt_precision}, runtime_options=opts.runtime_options())
        parity = check_parity(bundle, names, refs, console, **parity_options)
        if bundle.static is not None:
            parity.update(check_static_parity(bundle.static, batches, console,
                                              selected=opts.selected(), **parity_options))
        benchmark = run_benchmark(bundle, model, flops, opts, console) if opts.benchmark else None
        if not opts.benchmark:
            skipped["benchmark"] = "not requested (--no-benchmark)"
        serving = write_triton(bundle, opts, skipped, console) if opts.triton else None
        report = build_report(model, stats, flops, parity, benchmark, bundle, skipped, static_info(bundle, model, opts),
                              serving)
        write_report(report, model, opts, writer, console)
    if report.status == "failed":
        failed = [name for name, p in report.parity.items() if p.fails_run]
        raise ParityError(f"{', '.join(failed)} disagree with eager PyTorch; see {opts.output / 'report.md'}")
    return report


# ---------------------------------------------------------------------------------------------
# The steps.

def default_output(model: str, preset: str | None, overrides: dict, preset_file: str | None = None) -> Path:
    """atm-out/MODEL-PRESET for a preset as it is, atm-out/MODEL for settings of one's own."""
    _, settings = settings_for(model, preset, overrides, preset_file)
    own = settings.preset is None or settings.overrides
    return Path("atm-out") / (model if own else f"{model}-{settings.preset.name}")


def check_options(opts: JobOptions) -> tuple[ModelEntry, Settings, bool]:
    """Every mistake in the options, before any work. Also returns whether TensorRT engines
    will be built (TensorRT and a GPU present, and asked for)."""
    from ..backends.tensorrt import unavailable_reason
    from ..export.onnx import check_opset

    entry, settings = settings_for(opts.model, opts.preset, opts.overrides, opts.preset_file)
    if opts.export:
        check_opset(opts.opset)
        if settings.config.per_image:
            raise UserError("the atm-per-image policy is for comparisons in PyTorch; exported models "
                            "merge batch-adaptively (use --policy atm, or --no-onnx)")
    if opts.static_schedule and not opts.export:
        raise UserError("--static-schedule exports ONNX: drop --no-onnx")
    if opts.triton:
        from ..serving.triton import check_destination

        if not opts.export:
            raise UserError("--triton serves the exported models: drop --no-onnx")
        if opts.triton_max_batch is not None and opts.triton_max_batch < 1:
            raise UserError(f"--triton-max-batch must be at least 1, got {opts.triton_max_batch}")
        check_destination(Path(opts.triton).resolve(), opts.force)
    if opts.bench_schedule and not opts.benchmark:
        raise UserError("--bench-schedule needs the benchmark (drop --no-benchmark)")
    if opts.bench_runs < 1 or opts.bench_time < 0:
        raise UserError("--bench-runs must be at least 1 and --bench-time not negative")
    if opts.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {opts.batch_size}")
    check_backend_options(opts.backends, opts.runtime_options())
    if opts.export and opts.tensorrt:
        engine_batches(opts)  # a bad batch range fails now, even where no engine can be built here
    engines = opts.export and opts.tensorrt and unavailable_reason() is None
    if engines:
        from ..backends.tensorrt import load_plugin

        import tensorrt

        from ..backends.tensorrt import build_mode

        load_plugin(opts.trt_plugin)  # a missing plugin fails now, not after the export
        build_mode(tensorrt, opts.trt_precision)  # so does a precision this TensorRT cannot build
    return entry, settings, engines


def load(opts: JobOptions, entry: ModelEntry, settings: Settings, console: Console) -> Model:
    name = entry.display_name + (f" ({entry.timm_name})" if entry.timm_name != entry.display_name else "")
    with console.step(f"loading {name} and the sample images"):
        vit, weights = create_model(entry, opts.weights, opts.random_init)
        if weights.random:
            console.warn("random weights (--random-init): outputs do not reflect a trained model")
        batch, images = sample_batch(vit, opts.images, opts.batch_size)
        settings = calibrated_settings(settings, vit, batch, "the sample images", console)
        atm = patch_model(vit, settings.config)
        if opts.visualize:
            merge_map_blocks(atm, opts.visualize_blocks)  # wrong blocks fail now, not at the end
        static = static_schedule(opts.static_schedule, atm) if opts.static_schedule != SAMPLE else None
    return Model(entry, settings, atm, weights, batch, images, static_tokens=static)


#: ``--static-schedule sample``: the sample run's own token counts.
SAMPLE = "sample"


def static_schedule(spec: str | None, atm, stats=None) -> list[int] | None:
    """Tokens entering each block of the static-schedule models: the sample run's (``stats``)
    for ``sample``, else from ``spec`` as --bench-schedule reads it (UserError when impossible)."""
    from ..fixed_schedule import checked_schedule, parse_schedule
    from ..flops import ViTDims

    if not spec:
        return None
    dims = ViTDims.from_timm(atm.vit)
    if spec == SAMPLE:
        return checked_schedule(stats.tokens_per_layer, dims, "--static-schedule")
    return parse_schedule(spec, dims, atm.class_token_head, option="--static-schedule")


def run_sample(model: Model, console: Console) -> tuple[Reference, Flops]:
    """Eager ATM on the sample batch, with its decisions recorded: the parity reference of the
    sample batch (its ``stats`` give the report's token counts) and its GFLOPs."""
    with console.step(f"running ATM on the {model.images['count']} sample images"):
        sample_ref = reference_run(model.atm, model.batch)
        stats = sample_ref.stats
        flops = run_flops(model.atm, stats)
        console.note(f"GFLOPs {flops.baseline:.2f} -> {flops.atm:.2f}; tokens entering each block "
                     f"{[round(t, 1) for t in stats.tokens_per_layer]}")
    return sample_ref, flops


def export(model: Model, stats, opts: JobOptions, writer: ArtifactWriter, skipped: dict, console: Console,
           engines: bool) -> Bundle:
    """Every graph of the run, once: the plugin flavour, its lowering, and (for the benchmarks)
    the unmerged baseline; the TensorRT engine where TensorRT and a GPU are present."""
    from ..export.onnx import export_baseline, export_plugin_flavour, portable_flavour

    bundle = Bundle(atm=model.atm, vit=model.atm.vit, directory=writer.staging)
    if not opts.export:
        skipped["onnx"] = "not requested (--no-onnx)"
        return bundle
    example = model.batch[:2]
    metadata = {"model": model.entry.display_name, "timm_name": model.entry.timm_name,
                "params": run_params(model.settings.config, model.atm), "preset": model.settings.to_dict()["preset"],
                "weights": model.weights.to_dict(), **deployment_info(model)}
    cache = trace_cache(opts)
    with console.step("exporting model.plugin.onnx (one TokenMerge node per merge step)"):
        with console.progress(1 + opts.benchmark, unit="graph") as advance:  # the fp16 graph counts with its flavour
            kept = [t - r for t, r in zip(stats.tokens_per_layer, stats.r_per_layer)]
            bundle.plugin = export_plugin_flavour(model.atm, example, opts.opset, metadata, typical_tokens=kept,
                                                  trace_cache=cache)
            save_checked(bundle.plugin, "plugin", writer, "model.plugin.onnx", opts.external_data)
            if opts.trt_precision == "fp16":
                save_fp16(model.atm, example, opts, metadata, writer, "model.fp16.plugin.onnx", kept, cache)
            advance()
            if opts.benchmark:
                bundle.baseline = export_baseline(model.atm.vit, example, opts.opset)
                save_baseline(bundle, writer, opts.external_data)
                advance("and the unmerged baseline, for the benchmarks")
        report_trace_cache(cache, console)
    with console.step("lowering the merge steps to standard ops: model.onnx"):
        bundle.portable = portable_flavour(bundle.plugin)
        save_checked(bundle.portable, "portable", writer, "model.onnx", opts.external_data)
    side_files = side_files_written(writer)
    if side_files:
        console.note(f"weights in side files (ONNX external data): {', '.join(side_files)}")
    if opts.static_schedule:
        export_static(bundle, model, stats, opts, writer, metadata, console)
    if engines:
        build_engines(bundle, model, opts, writer, console)
    return bundle


def export_static(bundle: Bundle, model: Model, stats, opts: JobOptions, writer: ArtifactWriter, metadata: dict,
                  console: Console) -> None:
    """model.static.plugin.onnx and model.static.onnx: every merge step merges a fixed r, so every
    token count is a static dimension and only the batch stays dynamic (bundle.static, with the
    eager model that replays the same schedule)."""
    from ..export.onnx import export_plugin_flavour, portable_flavour
    from ..fixed_schedule import replay_model

    tokens = model.static_tokens or static_schedule(opts.static_schedule, model.atm, stats)
    with console.step(f"exporting the static-schedule models (tokens entering each block {tokens})"):
        replaying = replay_model(model.atm, tokens)
        static_meta = {**metadata, "params": run_params(replaying.config, replaying),
                       "static_schedule": {"tokens_per_layer": tokens, "source": opts.static_schedule}}
        static = Bundle(atm=replaying, vit=model.atm.vit, schedule=tokens, directory=writer.staging)
        static.plugin = export_plugin_flavour(replaying, model.batch[:2], opts.opset, static_meta)
        save_checked(static.plugin, "plugin", writer, "model.static.plugin.onnx", opts.external_data)
        static.portable = portable_flavour(static.plugin)
        save_checked(static.portable, "portable", writer, "model.static.onnx", opts.external_data)
        if opts.trt_precision == "fp16":
            save_fp16(replaying, model.batch[:2], opts, static_meta, writer, "model.static.fp16.plugin.onnx")
    bundle.static = static


def save_fp16(atm, example: torch.Tensor, opts: JobOptions, metadata: dict, writer: ArtifactWriter, name: str,
              typical_tokens: list[float] | None = None, cache=None) -> None:
    """The fp16-typed plugin graph of ``atm`` (what --trt-precision fp16 engines are built from)."""
    from ..export.onnx import export_plugin_flavour

    graph = export_plugin_flavour(atm, example, opts.opset, metadata, typical_tokens=typical_tokens, half=True,
                                  trace_cache=cache)
    save_checked(graph, "plugin", writer, name, opts.external_data)


#: ``--trace-cache none``: trace every export.
NO_TRACE_CACHE = "none"


def trace_cache(opts: JobOptions):
    """The trace cache of this run's exports (export/trace_cache.py), or None (--trace-cache none)."""
    from ..export.trace_cache import TraceCache, default_directory

    if opts.trace_cache == NO_TRACE_CACHE:
        return None
    return TraceCache(Path(opts.trace_cache) if opts.trace_cache else default_directory())


def report_trace_cache(cache, console: Console) -> None:
    """Say where the export's trace came from, and why the cache could not keep it."""
    if cache is None:
        return
    if cache.hits:
        console.note(f"traced blocks reused from the trace cache ({cache.directory}); --trace-cache none traces anew")
    if cache.unused:
        console.note(f"the trace cache does not follow this model ({cache.unused}): traced, not kept")
    for error in cache.write_errors:
        console.warn(f"the trace cache cannot keep this trace ({error}); later exports will trace again")


def save_checked(graph, flavour: str, writer: ArtifactWriter, name: str, external: bool) -> None:
    """Stage ``graph`` as ``name`` and check the file as an atm-export file of ``flavour``.

    Its weights go to a side file when ``external`` (--external-data), when the graph is too
    large for one file, or when it is weightless already (derived from a graph saved so); the
    graph is then weightless, its weights in the staging directory (the bundle's ``directory``).
    """
    from ..export import external_data
    from ..export.onnx import check_model

    external = external or external_data.is_weightless(graph) or external_data.too_large(graph)
    path = writer.path(name)
    if external:
        writer.path(external_data.side_file(name))  # staged with its graph, committed with it
    external_data.save(graph, path, external, writer.staging)
    check_model(graph, flavour, path)


def save_baseline(bundle: Bundle, writer: ArtifactWriter, external: bool) -> None:
    """Keep the unmerged baseline (never an artifact) in the staging directory, weightless,
    when it is too large to hold as one graph or --external-data asks."""
    from ..export import external_data

    if external or external_data.too_large(bundle.baseline):
        external_data.save(bundle.baseline, writer.scratch("baseline.onnx"), True)


def side_files_written(writer: ArtifactWriter) -> list[str]:
    from ..artifacts import SIDE_FILE_SUFFIX

    return [n for n in writer.names if n.endswith(SIDE_FILE_SUFFIX) and writer.staged(n)]


def static_info(bundle: Bundle, model: Model, opts: JobOptions) -> dict | None:
    """What report.json says of the static-schedule models."""
    from ..fixed_schedule import schedule_gflops
    from ..flops import ViTDims
    from ..schedule import r_from_tokens

    static = bundle.static
    if static is None:
        return None
    atm = model.atm
    return {"source": opts.static_schedule, "tokens_per_layer": static.schedule,
            "r_per_layer": r_from_tokens(static.schedule, atm.num_protected, atm.class_token_head),
            "gflops": round(schedule_gflops(ViTDims.from_timm(atm.vit), static.schedule, atm.class_token_head), 4)}


def engine_batches(opts: JobOptions) -> tuple[int, int, int]:
    """The engine's optimisation profile (min, opt, max batch): ``--trt-*-batch`` where given;
    otherwise 1, the sample batch, and the largest batch this run runs on the engine. UserError
    when the range is empty or leaves out a batch the run's parity or benchmark needs."""
    needed = [opts.batch_size, *opts.parity_batches, *(opts.bench_batches if opts.benchmark else ())]
    low = 1 if opts.trt_min_batch is None else opts.trt_min_batch
    high = max(needed) if opts.trt_max_batch is None else opts.trt_max_batch
    opt = opts.trt_opt_batch if opts.trt_opt_batch is not None else min(max(opts.batch_size, low), high)
    if not 1 <= low <= opt <= high:
        raise UserError(f"the TensorRT batch range needs 1 <= --trt-min-batch <= --trt-opt-batch <= --trt-max-batch; "
                        f"got {low}, {opt}, {high}")
    outside = sorted({b for b in needed if not low <= b <= high})
    if outside:
        raise UserError(f"this run checks and benchmarks the engine at batch sizes {outside}, outside --trt-min-batch "
                        f"{low} .. --trt-max-batch {high}; widen the range, or change --batch-size, --parity-batches "
                        "or --bench-batches")
    return low, opt, high


#: ``--trt-timing-cache none``: build without a timing cache.
NO_TIMING_CACHE = "none"


def engine_spec(opts: JobOptions):
    """The EngineSpec of every engine the run builds (batch range and precision)."""
    from ..backends.tensorrt import EngineSpec, default_timing_cache

    low, opt, high = engine_batches(opts)
    cache = opts.trt_timing_cache
    cache = str(default_timing_cache()) if cache is None else (None if cache == NO_TIMING_CACHE else cache)
    return EngineSpec(min_batch=low, opt_batch=opt, max_batch=high, precision=opts.trt_precision, timing_cache=cache)


def build_engines(bundle: Bundle, model: Model, opts: JobOptions, writer: ArtifactWriter, console: Console) -> None:
    from ..backends import tensorrt as trt

    spec = engine_spec(opts)
    with console.step(f"building the TensorRT engine ({spec.precision}, batch {spec.min_batch}..{spec.max_batch})"):
        # fp16 engines are built from the fp16-typed graphs (strongly typed builds take their types).
        fp16 = ".fp16" if spec.precision == "fp16" else ""
        bundle.engine = trt.build_engine(writer.path(f"model{fp16}.plugin.onnx"), spec, opts.trt_plugin)
        writer.path("model.engine").write_bytes(bundle.engine)
        if bundle.static is not None:
            bundle.static.engine = trt.build_engine(writer.path(f"model.static{fp16}.plugin.onnx"), spec, opts.trt_plugin)
            writer.path("model.static.engine").write_bytes(bundle.static.engine)
        if bundle.baseline is not None:
            from ..export.onnx import export_baseline

            baseline = export_baseline(model.atm.vit, model.batch[:2], opts.opset, half=True) if fp16 else bundle.baseline
            bundle.engine_baseline = trt.build_engine_from_model(baseline, spec, weights_dir=bundle.directory)
        import tensorrt

        flags = trt.build_mode(tensorrt, spec.precision).record
        bundle.engine_info = {**trt.device_info(), "precision": spec.precision, **flags,
                              "profile": {"min": spec.min_batch, "opt": spec.opt_batch, "max": spec.max_batch},
                              "timing_cache": spec.timing_cache,
                              "plugin_library": str(trt.load_plugin(opts.trt_plugin))}
        if bundle.static is not None:
            bundle.static.engine_info = bundle.engine_info


def write_triton(bundle: Bundle, opts: JobOptions, skipped: dict, console: Console) -> dict:
    """The Triton model repository of the run's models (docs/serving.md); what it holds, for the
    report. Models that cannot be made here (a TensorRT plan without TensorRT) go to ``skipped``."""
    from ..serving import triton

    spec = engine_spec(opts) if opts.tensorrt else None
    max_batch = opts.triton_max_batch or engine_batches(opts)[2]
    with console.step(f"writing the Triton model repository {opts.triton}"):
        openvino = "openvino" in opts.selected()  # Triton's OpenVINO backend serves model.onnx; nothing to install here
        repo = triton.write_repository(opts.triton, triton.bundle_flavours(bundle, spec, openvino=openvino),
                                       max_batch_size=max_batch,
                                       plugin_library=opts.trt_plugin, force=opts.force)
        for name, reason in repo.skipped.items():
            skipped[f"triton {name}"] = reason
        console.note(f"models: {', '.join(f'{n} ({r})' for n, r in repo.models.items())}")
    return {"path": str(repo.path), "models": repo.models, "max_batch_size": max_batch}


def compared_backends(bundle: Bundle, opts: JobOptions, skipped: dict) -> list[str]:
    """The merged backends this run compares with eager PyTorch; the others go to ``skipped``
    with the reason (those that need ONNX are covered by skipped["onnx"] under --no-onnx)."""
    names, selected = [], opts.selected()
    for name in SELECTABLE:
        if name == "tensorrt" and not opts.tensorrt:
            reason = "not requested (--no-tensorrt)"
        elif name not in selected:
            reason = "left out by --backends"
        else:
            reason = unavailable(name, bundle, opts.runtime_options())
        if reason is None:
            names.append(name)
        elif opts.export or name == "tensorrt":
            skipped[name] = reason
    return names


def parity_batches(batch: torch.Tensor, opts: JobOptions) -> list[torch.Tensor]:
    """The sample batch, then the other requested batch sizes (cycling the sample images)."""
    sizes = [batch.shape[0]] + [b for b in opts.parity_batches if b != batch.shape[0]]
    return [take_batch(batch, b) for b in dict.fromkeys(sizes)]
