"""Time one TokenMerge step: the CUDA kernels vs eager PyTorch, on the same GPU.

    .venv/bin/python benchmarks/bench_merge_kernels.py                # DeiT-S shapes, batch 64
    .venv/bin/python benchmarks/bench_merge_kernels.py --profile      # + per-kernel times
    .venv/bin/python benchmarks/bench_merge_kernels.py --json out.json

Shapes: N = 197 tokens, C = 384 channels, D = 64 metric features, P = 1 (DeiT-S at 224 px).
Columns:
- kernels (graph): the 3-4 launches of one step captured in a CUDA graph, replayed; GPU time per
  step including the gaps between the launches (what TensorRT with CUDA graphs sees).
- kernels (stream): the same launches issued from Python in a loop (adds ctypes launch overhead
  if the CPU cannot keep ahead of the GPU).
- eager: atm_export.merge.token_merge (includes its host synchronisation for the adaptive r).
- % of block: kernels (graph) relative to one timm DeiT-S transformer block (eager PyTorch,
  graph-captured) at the same batch and dtype. A TensorRT block is faster than an eager one, so
  this ratio is a lower bound of the share under TensorRT.
Nothing is printed that was not measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atm_export import cuda_kernels  # noqa: E402
from atm_export.merge import alternate_starts, token_merge  # noqa: E402

N, C, D, P = 197, 384, 64, 1


def inputs(batch: int, dtype: torch.dtype, seed: int = 0):
    """Tokens where about a third of A has a near copy in B (ATM-like merge counts)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, N, C, generator=g)
    size = torch.randint(1, 4, (batch, N), generator=g).float()
    metric = torch.randn(batch, N, D, generator=g)
    first_a, first_b = alternate_starts(P)
    a_rows = torch.arange(first_a, N, 2)[::3]
    partners = (a_rows - first_a) + first_b  # the B token just before (P odd) or after (P even)
    metric[:, a_rows] = metric[:, partners] + 0.3 * torch.randn(batch, len(a_rows), D, generator=g)
    return x.to(dtype).cuda(), size.cuda(), metric.to(dtype).cuda()


def gpu_time_us(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / iters


def graph_time_us(fn, iters: int, warmup: int, steps_per_graph: int = 20) -> float:
    """Capture `steps_per_graph` calls in one CUDA graph; time its replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps_per_graph):
            fn()
    replays = max(1, iters // steps_per_graph)
    return gpu_time_us(graph.replay, replays, max(1, warmup // steps_per_graph)) / steps_per_graph


def kernel_step(x, size, metric, **policy):
    params = cuda_kernels.make_params(x, metric, num_protected=P, **policy)
    x_out, size_out = torch.empty_like(x), torch.empty_like(size)
    num_tokens = torch.empty((), dtype=torch.int64, device="cuda")
    workspace = torch.empty(cuda_kernels.workspace_size(params), dtype=torch.uint8, device="cuda")

    def step():
        cuda_kernels.launch(x, size, metric, x_out, size_out, num_tokens, workspace, params)

    return step, num_tokens


def block_time_us(batch: int, dtype: torch.dtype, iters: int, warmup: int) -> float | None:
    try:
        import timm
    except ImportError:
        return None
    block = timm.create_model("deit_small_patch16_224", pretrained=False).blocks[0].to("cuda", dtype).eval()
    x = torch.randn(batch, N, C, device="cuda", dtype=dtype)
    with torch.inference_mode():
        return graph_time_us(lambda: block(x), iters, warmup, steps_per_graph=5)


def profile_kernels(step, iters: int) -> list[tuple[str, float]]:
    """Average GPU time per kernel name (CUPTI via torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if device_us and event.count:
            rows.append((event.key, device_us / iters))
    return sorted(rows, key=lambda r: -r[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--dtype", choices=["float32", "float16", "both"], default="both")
    parser.add_argument("--profile", action="store_true", help="also print per-kernel GPU times")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2

    dtypes = [torch.float32, torch.float16] if args.dtype == "both" else [getattr(torch, args.dtype)]
    policies = {"threshold 0.5": {"threshold": 0.5}, "fixed r=16": {"r": 16}}
    print(f"GPU: {torch.cuda.get_device_name()}; B={args.batch} N={N} C={C} D={D} P={P}; {args.iters} iterations")
    header = f"{'policy':<14} {'split':<9} {'dtype':<8} {'r':>3} {'kernels(graph)':>15} {'kernels(stream)':>16} "
    header += f"{'eager':>9} {'speedup':>8} {'block':>9} {'% block':>8}"
    print(header)
    print("-" * len(header))
    results = []
    for dtype in dtypes:
        block_us = block_time_us(args.batch, dtype, args.iters, args.warmup)
        x, size, metric = inputs(args.batch, dtype)
        for name, policy in policies.items():
            for split in ("alternate", "size"):
                step, num_tokens = kernel_step(x, size, metric, split_mode=split, **policy)
                graph_us = graph_time_us(step, args.iters, args.warmup)
                stream_us = gpu_time_us(step, args.iters, args.warmup)
                r = N - int(num_tokens)

                def eager():
                    token_merge(x, size, metric, split_mode=split, num_protected=P, **policy)

                eager_us = gpu_time_us(eager, max(10, args.iters // 4), max(2, args.warmup // 4))
                share = f"{100.0 * graph_us / block_us:7.1f}%" if block_us else "    n/a"
                block_text = f"{block_us:8.1f}" if block_us else "     n/a"
                print(
                    f"{name:<14} {split:<9} {str(dtype).removeprefix('torch.'):<8} {r:>3} {graph_us:>13.1f}us "
                    f"{stream_us:>14.1f}us {eager_us:>7.1f}us {eager_us / graph_us:>7.1f}x {block_text}us {share}"
                )
                results.append(
                    dict(policy=name, split=split, dtype=str(dtype), r=r, kernels_graph_us=graph_us,
                         kernels_stream_us=stream_us, eager_us=eager_us, block_us=block_us)
                )  # fmt: skip
                if args.profile:
                    for kernel, us in profile_kernels(step, 50):
                        print(f"    {us:8.2f}us  {kernel[:100]}")
    if args.json:
        args.json.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), batch=args.batch, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
