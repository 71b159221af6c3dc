"""Benchmarks: timing statistics, speed-ups over each runtime's unmerged model, and merge-time
shares.

Random weights merge differently from trained ones, so benchmarks can replay a fixed per-block
token schedule (atm_export.fixed_schedule) instead of letting the weights decide. Latency is
measured, never asserted by tests.

Timing: after a warm-up, a measurement repeats the call until it has at least ``min_runs``
runs and has run for ``budget_s`` (at most ``max_runs``), so fast calls (small batches) get
many runs and a stable median. Every measurement reports its spread, (p90 - p10) / p50; one
above ``NOISY_SPREAD`` is flagged as noisy rather than stated as fact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .backends import BASELINES
from .contract import NODE_PREFIX
from .report.model import Benchmark, TimingStats

#: A measurement whose (p90 - p10) / p50 exceeds this is flagged as noisy.
NOISY_SPREAD = 0.25


@dataclass(frozen=True)
class TimingPlan:
    """How long to measure: at least ``min_runs`` timed runs and ``budget_s`` seconds, at most
    ``max_runs`` runs, after ``warmup`` untimed ones."""

    min_runs: int = 5
    budget_s: float = 2.0
    max_runs: int = 200
    warmup: int = 1


@dataclass
class Timing:
    """Wall-clock times of repeated calls on one batch, in milliseconds."""

    batch: int
    runs_ms: list[float]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.runs_ms, q))

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def spread(self) -> float:
        """(p90 - p10) / p50: how much the middle 80% of the runs vary, relative to the median."""
        return (self.percentile(90) - self.percentile(10)) / self.p50 if self.p50 > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return len(self.runs_ms) < 3 or self.spread > NOISY_SPREAD

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch / (self.p50 / 1e3) if self.p50 > 0 else float("inf")

    def summary(self) -> dict:
        return {"p50": self.p50, "p90": self.percentile(90), "p99": self.percentile(99),
                "mean": float(np.mean(self.runs_ms)), "std": float(np.std(self.runs_ms)),
                "spread": self.spread, "throughput": self.throughput, "runs": len(self.runs_ms),
                "noisy": self.noisy}


def measure(call: Callable[[], object], batch: int, plan: TimingPlan = TimingPlan()) -> Timing:
    """Time ``call`` (one batch of ``batch`` images) as ``plan`` says."""
    for _ in range(plan.warmup):
        call()
    runs: list[float] = []
    started = time.perf_counter()
    while len(runs) < plan.max_runs and (len(runs) < plan.min_runs or time.perf_counter() - started < plan.budget_s):
        start = time.perf_counter()
        call()
        runs.append((time.perf_counter() - start) * 1e3)
    return Timing(batch, runs)


def time_runners(runners: dict, inputs: dict[int, np.ndarray], plan: TimingPlan,
                 on_measured: Callable[[str, Timing], None] | None = None) -> dict[str, dict[int, Timing]]:
    """Every (active) runner on every batch of ``inputs`` (batch size -> images)."""
    latency: dict[str, dict[int, Timing]] = {}
    for name, runner in runners.items():
        for batch, images in inputs.items():
            timing = measure(lambda: runner.run(images), batch, plan)
            latency.setdefault(name, {})[batch] = timing
            if on_measured:
                on_measured(name, timing)
    return latency


def speedups(latency: dict[str, dict[int, Timing]], batch: int) -> dict[str, float]:
    """Median speed-up of every merged backend over its runtime's unmerged model at ``batch``."""
    return {name: latency[base][batch].p50 / latency[name][batch].p50
            for name, base in BASELINES.items() if batch in latency.get(name, {}) and batch in latency.get(base, {})}


def benchmark(bundle, names: list[str], inputs: dict[int, np.ndarray], plan: TimingPlan, *, flops_ratio: float,
              description: str, schedule: dict | None = None, runtime_options=None,
              on_measured: Callable[[str, Timing], None] | None = None) -> Benchmark:
    """Time every backend of ``names`` on ``bundle`` at every batch of ``inputs``, with the
    speed-ups over each runtime's unmerged model and the merge steps' share of the time.

    flops_ratio: baseline GFLOPs / GFLOPs of what the merged models run; description: what
    was timed, for the report; runtime_options: atm_export.backends.RuntimeOptions.
    """
    from .backends import RuntimeOptions, open_runner

    latency: dict[str, dict[int, Timing]] = {}
    for name in names:
        with open_runner(bundle, name, runtime_options=runtime_options or RuntimeOptions()) as runner:
            latency.update(time_runners({name: runner}, inputs, plan, on_measured))
    largest = max(inputs)
    speedup = speedups(latency, largest)
    return Benchmark(
        description=f"{description}, at least {plan.min_runs} timed runs and {plan.budget_s:g} s per measurement "
                    f"after a warm-up, {torch.get_num_threads()} threads",
        batches=sorted(inputs), threads=torch.get_num_threads(),
        plan={"min_runs": plan.min_runs, "budget_s": plan.budget_s, "max_runs": plan.max_runs},
        latency={n: {str(b): TimingStats(**t.summary()) for b, t in per.items()} for n, per in latency.items()},
        speedup=speedup, speedup_batch=largest, flops_ratio=flops_ratio,
        speedup_over_flops_ratio={n: v / flops_ratio for n, v in speedup.items()},
        merge_share=merge_shares(bundle, inputs[largest], names, runtime_options or RuntimeOptions()),
        noisy=[f"{n} at batch {b}" for n, per in latency.items() for b, t in per.items() if t.noisy],
        schedule=schedule)


#: The backends whose merge share is measured from a profiled run of the portable flavour.
PROFILED = ("ort_portable", "openvino", "openvino_bf16", "openvino_fp16")


def merge_shares(bundle, images: np.ndarray, names=PROFILED, runtime_options=None) -> dict[str, float]:
    """The merge steps' share of a forward pass: eager (timed in the model), and the portable
    flavour in ONNX Runtime (its profiler) and in OpenVINO (its per-node timing) for those of
    ``names`` the bundle can run."""
    from .backends import RuntimeOptions, open_runner, unavailable

    runtime_options = runtime_options or RuntimeOptions()
    shares = {"eager_atm": eager_merge_share(bundle.atm, torch.from_numpy(images))}
    for name in (n for n in PROFILED if n in names and not unavailable(n, bundle, runtime_options)):
        with open_runner(bundle, name, profile=True, runtime_options=runtime_options) as runner:
            profiled = runner.run_profiled(images)
        shares[name] = ort_merge_share(profiled) if name == "ort_portable" else node_merge_share(profiled)
    return shares


def eager_merge_share(atm, images: torch.Tensor) -> float:
    """Fraction of an eager forward pass spent inside the merge steps (a warm-up run first)."""
    with torch.inference_mode():
        atm(images)
        start = time.perf_counter()
        _, stats = atm.run(images, time_merges=True)
        total = time.perf_counter() - start
    return stats.merge_seconds / total if total > 0 else 0.0


def ort_merge_share(events: list[dict], prefix: str = NODE_PREFIX) -> float:
    """Fraction of ONNX Runtime node time spent in merge nodes (from profiler trace events)."""
    return node_merge_share([(e["name"], e["dur"]) for e in events
                             if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")], prefix)


def node_merge_share(nodes: list[tuple[str, float]], prefix: str = NODE_PREFIX) -> float:
    """Fraction of the time of ``nodes`` (name, duration) spent in the lowered merge steps,
    whose node names start with ``prefix`` (``TokenMerge_b<block>/...``)."""
    total = sum(t for _, t in nodes)
    merge = sum(t for name, t in nodes if name.startswith(prefix))
    return merge / total if total else 0.0
