"""Latency benchmarks: wall-clock percentiles, merge-time shares, and fixed token schedules.

Random weights merge differently from trained ones, so benchmarks can replay a fixed per-block
token schedule (``schedule_for_gflops`` builds one for a FLOPs target) instead of letting the
weights decide. Latency is measured, never asserted by tests.
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable

import numpy as np
import torch

from .errors import UserError
from .flops import ViTDims, image_macs
from .merge import max_merges
from .ops import NODE_PREFIX


def time_calls(fn: Callable[[], object], runs: int, warmup: int = 1) -> dict:
    """p50 / p90 / mean of ``runs`` timed calls, in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)),
            "mean": float(np.mean(times)), "runs": len(times)}


def schedule_gflops(dims: ViTDims, tokens: list[int], prefix_last: bool) -> float:
    """GFLOPs of one image following ``tokens`` (tokens entering each block)."""
    r = [tokens[i] - tokens[i + 1] for i in range(len(tokens) - 1)] + [0]
    merges = [v > 0 for v in r]
    return image_macs(dims, tokens, r, merges, prefix_last) / 1e9


def schedule_for_gflops(dims: ViTDims, target: float, prefix_last: bool = True) -> list[int]:
    """Tokens entering each block, shrinking geometrically (most merging early, like ATM's
    layer-dependent thresholds) so that the model costs about ``target`` GFLOPs."""
    p, m0 = dims.num_prefix, dims.num_patches

    def tokens_for(decay: float) -> list[int]:
        out, m = [], m0
        for _ in range(dims.depth):
            out.append(p + m)
            m = m - min(max_merges(m), round(m * (1.0 - math.exp(-decay))))
        return out

    lo, hi = 0.0, 5.0
    if schedule_gflops(dims, tokens_for(hi), prefix_last) > target:
        raise UserError(f"{target} GFLOPs is below what merging can reach for this model")
    for _ in range(60):  # bisection on the decay rate
        mid = (lo + hi) / 2
        if schedule_gflops(dims, tokens_for(mid), prefix_last) > target:
            lo = mid
        else:
            hi = mid
    return tokens_for(hi)


def parse_schedule(spec: str, dims: ViTDims, prefix_last: bool) -> list[int]:
    """``gflops:3.2``, a JSON file with ``tokens_per_layer`` (e.g. a report.json), or ``197,150,...``."""
    if spec.startswith("gflops:"):
        try:
            target = float(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--bench-schedule {spec!r}: expected gflops:<number>") from None
        return schedule_for_gflops(dims, target, prefix_last)
    if spec.endswith(".json"):
        try:
            tokens = json.loads(open(spec).read())["tokens_per_layer"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            raise UserError(f"--bench-schedule {spec}: cannot read tokens_per_layer ({exc})") from None
    else:
        try:
            tokens = [int(float(v)) for v in spec.split(",")]
        except ValueError:
            raise UserError(f"--bench-schedule {spec!r}: expected comma-separated token counts") from None
    tokens = [int(round(t)) for t in tokens]
    if len(tokens) != dims.depth or tokens[0] != dims.num_tokens:
        raise UserError(f"--bench-schedule needs {dims.depth} counts starting at {dims.num_tokens}, got {tokens}")
    for a, b in zip(tokens, tokens[1:]):
        if not a - max_merges(a - dims.num_prefix) <= b <= a:
            raise UserError(f"--bench-schedule: one block can merge at most half its unprotected tokens ({a} -> {b})")
    return tokens


def eager_merge_share(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Fraction of an eager forward pass spent inside the merge steps (``atm.merge`` ranges)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with torch.inference_mode():
        model(images)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("forward"):
                model(images)
    events = {e.key: e for e in prof.key_averages()}
    total = events["forward"].cpu_time_total
    merge = events["atm.merge"].cpu_time_total if "atm.merge" in events else 0.0
    return merge / total if total else 0.0


def ort_merge_share(events: list[dict], prefix: str = NODE_PREFIX) -> float:
    """Fraction of ONNX Runtime node time spent in merge nodes (from profiler trace events)."""
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    total = sum(e["dur"] for e in nodes)
    merge = sum(e["dur"] for e in nodes if e["name"].startswith(prefix))
    return merge / total if total else 0.0
