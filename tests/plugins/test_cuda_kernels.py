"""The TokenMerge CUDA kernels against eager PyTorch (atm_export.merge.token_merge) on a GPU.

Run on a machine with a CUDA device (nvcc and cmake build the library on first use):

    .venv/bin/python -m pytest tests/plugins/test_cuda_kernels.py -v

Inputs use metrics with exactly 64 (or 16) entries of +-1, the rest 0, scaled by powers of two:
norms are powers of two, so every cosine is an exact multiple of 1/64 (1/16) in float32 on both
sides (cuBLAS and our kernels), whatever the summation order, and the discrete choices
(best partner, count above threshold, which r merge) are decided by the contract's rules, ties
included, and not by rounding. Token values are random; they are compared with tolerances.
"""

from __future__ import annotations

import pytest
import torch

from atm_export import cuda_kernels, plugin_lib
from atm_export import merge as M
from conftest import merging_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SHAPES = [  # (B, N, C): DeiT-Ti/S/B widths, 224 px (N = 197) and 384 px (N = 577)
    (1, 197, 192),
    (7, 197, 384),
    (64, 197, 384),
    (64, 197, 768),
    (3, 577, 192),
    (64, 577, 768),
]
POLICIES = {
    "merge-nothing": {"threshold": 1.0},
    "merge-some": {"threshold": 0.7},  # not a multiple of 1/64: no score sits on it
    "merge-max": {"threshold": -2.0},
    "r0": {"r": 0},
    "r16": {"r": 16},
    "r-capped": {"r": 10_000},
}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="session")
def kernels():
    if plugin_lib.find_nvcc() is None or plugin_lib.find_cmake() is None:
        pytest.skip("nvcc and cmake are needed to build the TokenMerge kernel library (see docs/tensorrt-plugin.md)")
    return cuda_kernels.load_library()


def exact_inputs(batch, n, c, *, d=64, num_protected=1, dtype=torch.float32, seed=0):
    """x random; size in 1..4; metric: sparse sign vectors (64 nonzeros, 16 if d < 64), 40% of
    them copies of another token with a few signs flipped (similarity 1 - 2k/64), each token
    scaled by 2^-3 .. 2^3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, c, generator=g)
    size = torch.randint(1, 5, (batch, n), generator=g).float()
    support = 64 if d >= 64 else 16
    signs = torch.randint(0, 2, (batch, n, d), generator=g).float() * 2 - 1
    rank = torch.rand(batch, n, d, generator=g).argsort(-1).argsort(-1)
    signs = signs * (rank < support)  # exactly `support` nonzeros: norm sqrt(support)
    copy = torch.rand(batch, n, generator=g) < 0.4
    copy[:, :num_protected] = False
    partner = torch.randint(num_protected, n, (batch, n), generator=g)
    copied = signs.gather(1, partner[..., None].expand(-1, -1, d))
    flip = torch.rand(batch, n, d, generator=g) < torch.randint(0, 9, (batch, n, 1), generator=g) / d
    signs = torch.where(copy[..., None], torch.where(flip, -copied, copied), signs)
    metric = signs * 2.0 ** torch.randint(-3, 4, (batch, n, 1), generator=g).float()
    return x.to(dtype).cuda(), size.cuda(), metric.to(dtype).cuda()


def reference(x, size, metric, **kw):
    """The contract's float32 math: narrow inputs are upcast first (as the kernels do)."""
    return M.token_merge(x.float(), size, metric.float(), **kw)


def assert_matches(out, ref, n, dtype):
    assert out.num_tokens == n - ref.r
    assert out.x.dtype == dtype and out.x.shape == ref.x.shape
    torch.testing.assert_close(out.size, ref.size, rtol=0, atol=0)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.x.float(), ref.x.to(dtype).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize(("batch", "n", "c"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_mode", ["alternate", "size"])
def test_kernels_match_eager_pytorch(kernels, policy, batch, n, c, dtype, split_mode):
    kw = dict(POLICIES[policy], split_mode=split_mode, num_protected=1)
    x, size, metric = exact_inputs(batch, n, c, dtype=dtype, seed=batch + n + c)
    out = cuda_kernels.token_merge_cuda(x, size, metric, **kw)
    ref = reference(x, size, metric, **kw)
    cap = M.max_merges(n - 1)  # ToMe's floor(M/2)
    if policy == "merge-nothing":
        assert ref.r == 0
    elif policy == "merge-some":
        assert 0 < ref.r < cap
    elif policy in ("merge-max", "r-capped"):
        assert ref.r == cap
    assert_matches(out, ref, n, dtype)


@pytest.mark.parametrize("num_protected", [0, 2])
@pytest.mark.parametrize("d", [32, 100])  # a partial feature chunk; 100 = 3 chunks + 4
def test_other_protected_counts_and_metric_widths(kernels, num_protected, d):
    x, size, metric = exact_inputs(16, 198, 384, d=d, num_protected=num_protected, seed=d)
    for kw in ({"threshold": 0.6}, {"r": 40}):
        out = cuda_kernels.token_merge_cuda(x, size, metric, num_protected=num_protected, **kw)
        ref = reference(x, size, metric, num_protected=num_protected, **kw)
        assert ref.r > 0
        assert_matches(out, ref, 198, torch.float32)


def test_bfloat16(kernels):
    x, size, metric = exact_inputs(8, 197, 384, dtype=torch.bfloat16)
    out = cuda_kernels.token_merge_cuda(x, size, metric, threshold=0.7, split_mode="size")
    assert_matches(out, reference(x, size, metric, threshold=0.7, split_mode="size"), 197, torch.bfloat16)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("batch", "n", "c"), [(4, 197, 384), (2, 577, 192)])
def test_cuda_equals_the_cpu_executor_bitwise(kernels, split_mode, dtype, batch, n, c):
    """Generic (inexact) metrics: the GPU and the CPU run the same arithmetic in the same order."""
    x, size, metric = merging_inputs(batch=batch, n=n, c=c, d=64, num_protected=1, seed=n)
    x, metric = x.to(dtype), metric.to(dtype)
    for kw in ({"threshold": 0.5}, {"r": 30}):
        host = cuda_kernels.token_merge_host(x, size, metric, split_mode=split_mode, **kw)
        dev = cuda_kernels.token_merge_cuda(x.cuda(), size.cuda(), metric.cuda(), split_mode=split_mode, **kw)
        assert dev.num_tokens == host.num_tokens < n
        assert torch.equal(dev.x.cpu(), host.x) and torch.equal(dev.size.cpu(), host.size)


def test_unaligned_rows_take_the_scalar_path(kernels):
    x, size, metric = exact_inputs(8, 197, 384)
    storage = torch.empty(x.numel() + 1, device="cuda")
    shifted = storage[1:].view_as(x)
    shifted.copy_(x)
    aligned = cuda_kernels.token_merge_cuda(x, size, metric, threshold=0.7)
    unaligned = cuda_kernels.token_merge_cuda(shifted, size, metric, threshold=0.7)
    assert torch.equal(aligned.x, unaligned.x) and torch.equal(aligned.size, unaligned.size)


def preallocated(x, size, metric, **kw):
    params = cuda_kernels.make_params(x, metric, **kw)
    bufs = dict(
        x_out=torch.empty_like(x),
        size_out=torch.empty_like(size),
        num_tokens=torch.empty((), dtype=torch.int64, device="cuda"),
        workspace=torch.empty(cuda_kernels.workspace_size(params), dtype=torch.uint8, device="cuda"),
    )
    return params, bufs


def test_side_stream_and_cuda_graph_capture(kernels):
    """No host synchronisation or allocation inside: the launches can be captured and replayed."""
    x, size, metric = exact_inputs(64, 197, 384)
    expected = cuda_kernels.token_merge_cuda(x, size, metric, threshold=0.7)
    params, bufs = preallocated(x, size, metric, threshold=0.7)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_kernels.launch(x, size, metric, **bufs, params=params, stream=stream)
    torch.cuda.current_stream().wait_stream(stream)
    assert int(bufs["num_tokens"]) == expected.num_tokens

    for b in bufs.values():
        b.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_kernels.launch(x, size, metric, **bufs, params=params)
    graph.replay()
    torch.cuda.synchronize()
    k = int(bufs["num_tokens"])
    assert k == expected.num_tokens
    assert torch.equal(bufs["x_out"].reshape(-1)[: 64 * k * 384].view(64, k, 384), expected.x)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2, 3])
def test_single_unprotected_token_on_the_gpu(kernels, split_mode, num_protected):
    """N - P = 1: B empty (alternate, P even) or A empty (alternate with P odd, or the size split),
    where the match launch is skipped (a grid of 0 blocks is a launch error); r = 0 either way."""
    n = num_protected + 1
    x, size, metric = exact_inputs(3, n, 8, d=16, num_protected=0)
    for kw in ({"threshold": -2.0}, {"r": 4}):
        out = cuda_kernels.token_merge_cuda(x, size, metric, split_mode=split_mode, num_protected=num_protected, **kw)
        ref = reference(x, size, metric, split_mode=split_mode, num_protected=num_protected, **kw)
        assert ref.r == 0
        assert_matches(out, ref, n, torch.float32)


# ---- AdaMerge: salience weighting and the intensity rule on the GPU ------------------------------


def adamerge_policies(x, size, metric, split_mode):
    """A fixed r, a threshold and an intensity rule that the inputs' redundancies straddle."""
    probe = M.token_merge(x.float().cpu(), size.cpu(), metric.float().cpu(), intensity=M.Intensity(1, 0.0, 1.0),
                          weighting="salience", split_mode=split_mode)
    rho = probe.redundancy.sort().values
    k = (len(rho) - 1) // 2
    middle = float(rho[k] + rho[k + 1]) / 2 if len(rho) > 1 else float(rho[0])
    std = max(float(rho[-1] - rho[0]), 1e-3) / 2
    return [{"r": 16}, {"threshold": 0.3}, {"intensity": M.Intensity(24, middle, std, 1.5)}]


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("batch", "n", "c"), [(4, 197, 384), (2, 577, 192)])
def test_salience_cuda_equals_the_cpu_executor_bitwise(kernels, split_mode, dtype, batch, n, c):
    """AdaMerge's three salience launches and weighted merge: the GPU and the CPU run the same
    arithmetic in the same order (expDet, not expf), so every count and bit agrees."""
    x, size, metric = merging_inputs(batch=batch, n=n, c=c, d=64, num_protected=1, seed=n + 1)
    x, metric = x.to(dtype), metric.to(dtype)
    for kw in adamerge_policies(x, size, metric, split_mode):
        kw = dict(kw, weighting="salience", split_mode=split_mode)
        host = cuda_kernels.token_merge_host(x, size, metric, **kw)
        dev = cuda_kernels.token_merge_cuda(x.cuda(), size.cuda(), metric.cuda(), **kw)
        assert dev.num_tokens == host.num_tokens < n, kw
        assert torch.equal(dev.x.cpu(), host.x) and torch.equal(dev.size.cpu(), host.size), kw


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
def test_salience_kernels_match_eager_pytorch(kernels, split_mode):
    x, size, metric = merging_inputs(batch=8, n=197, c=384, d=64, num_protected=1, seed=3)
    x, size, metric = x.cuda(), size.cuda(), metric.cuda()
    for kw in adamerge_policies(x, size, metric, split_mode):
        kw = dict(kw, weighting="salience", split_mode=split_mode)
        out = cuda_kernels.token_merge_cuda(x, size, metric, **kw)
        ref = reference(x, size, metric, diagnostics=True, **kw)
        if ref.tie_gap < 1e-5 or (ref.margin is not None and ref.margin < 1e-4):
            continue  # a choice within rounding of another: not a test of the kernels
        assert out.num_tokens == 197 - ref.r
        torch.testing.assert_close(out.size, ref.size, rtol=0, atol=0)
        torch.testing.assert_close(out.x, ref.x, rtol=1e-4, atol=1e-4)
