"""The main job's benchmark step: which models are timed, on what, and what the console shows."""

from __future__ import annotations

from ..backends import BASELINES, NAMES, follows, unavailable
from ..console import Console
from ..export.bundle import Bundle
from ..images import take_batch
from ..report.model import Benchmark, Flops
from .common import Model


def run_benchmark(bundle: Bundle, model: Model, flops: Flops, opts, console: Console) -> Benchmark:
    """Latency of every backend and of the unmerged models at the benchmark batch sizes.

    Without ``--bench-schedule`` the merged models merge the sample images as they would (cycled
    to each batch size); with it, they replay one fixed token schedule (Bundle.with_schedule).
    """
    from ..bench import NOISY_SPREAD, TimingPlan, benchmark
    from ..fixed_schedule import parse_schedule, schedule_gflops
    from ..flops import ViTDims

    timed, schedule, gflops = bundle, None, flops.atm
    description = "the sample images' own merging (cycled to each batch size)"
    if opts.bench_schedule:
        dims = ViTDims.from_timm(model.atm.vit)
        tokens = parse_schedule(opts.bench_schedule, dims, model.atm.class_token_head)
        timed = bundle.with_schedule(tokens)
        gflops = schedule_gflops(dims, tokens, model.atm.class_token_head)
        schedule = {"tokens_per_layer": tokens, "gflops": round(gflops, 4), "source": opts.bench_schedule}
        description = f"a fixed token schedule {tokens} ({gflops:.2f} GFLOPs)"
        if bundle.engine is not None:
            from ..backends import tensorrt as trt
            from .export import engine_spec

            timed.engine = trt.build_engine_from_model(timed.plugin, engine_spec(opts), opts.trt_plugin,
                                                        weights_dir=timed.directory)
    selected, runtime = opts.selected(), opts.runtime_options()
    names = [n for n in NAMES if follows(n, selected) and not unavailable(n, timed, runtime)]
    inputs = {b: take_batch(model.batch, b).numpy() for b in opts.bench_batches}
    with console.step(f"benchmark: {len(names)} backends at batch sizes {list(opts.bench_batches)}"):
        with console.progress(len(names) * len(inputs), unit="measurement") as advance:
            result = benchmark(timed, names, inputs, TimingPlan(min_runs=opts.bench_runs, budget_s=opts.bench_time),
                               flops_ratio=flops.baseline / gflops, description=description,
                               schedule=schedule, runtime_options=runtime,
                               on_measured=lambda name, t: advance(f"{name} b{t.batch}: {t.p50:.1f} ms (p90 "
                                                                   f"{t.percentile(90):.1f}, {len(t.runs_ms)} runs)"))
        for name, value in result.speedup.items():
            console.note(f"{name}: {value:.2f}x over {BASELINES[name]} at batch {result.speedup_batch}")
        if result.noisy:
            console.warn(f"noisy measurements (spread above {NOISY_SPREAD:g}, or too few runs): "
                         f"{', '.join(result.noisy)}; repeat on a quiet machine or with a larger --bench-time")
    return result
