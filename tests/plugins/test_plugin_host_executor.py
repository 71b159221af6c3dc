"""The TokenMerge kernels' block programs, run by their CPU executor, against atm_export.merge.

The CPU executor (atm_token_merge_host) runs the very step functions the CUDA kernels run, with
the same tiling and the same arithmetic order, so these tests check the kernels' algorithm in CI
without a GPU. tests/plugins/test_cuda_kernels.py checks the CUDA launches themselves.
"""

from __future__ import annotations

import pytest
import torch

from atm_export import cuda_kernels, plugin_lib
from atm_export import merge as M
from conftest import merging_inputs
from reference import as_multiset, reference_merge, sweep


@pytest.fixture(scope="session")
def kernels():
    """The kernel library, built with CMake on first use (incremental afterwards)."""
    if plugin_lib.find_nvcc() is None or plugin_lib.find_cmake() is None:
        pytest.skip("nvcc and cmake are needed to build the TokenMerge kernel library (see docs/tensorrt-plugin.md)")
    return cuda_kernels.load_library()


def assert_same_merge(out, ref, n, *, rtol=1e-5, atol=1e-5):
    """The kernel result equals the reference MergeStep: count, token order, sizes, values."""
    assert out.num_tokens == n - ref.r
    assert out.x.shape == ref.x.shape
    torch.testing.assert_close(out.size, ref.size, rtol=0, atol=0)  # sizes are small exact integers
    torch.testing.assert_close(out.x.float(), ref.x.float(), rtol=rtol, atol=atol)


def run_both(x, size, metric, **kw):
    return cuda_kernels.token_merge_host(x, size, metric, **kw), M.token_merge(x, size, metric, **kw)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2])
@pytest.mark.parametrize("n", [20, 21])
def test_threshold_merging_some_matches_reference(kernels, split_mode, num_protected, n):
    x, size, metric = merging_inputs(n=n, num_protected=num_protected)
    out, ref = run_both(x, size, metric, threshold=0.8, split_mode=split_mode, num_protected=num_protected)
    assert 0 < ref.r < M.max_merges(n - num_protected), "the inputs merge some, fewer than the cap"
    assert_same_merge(out, ref, n)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2])
def test_threshold_merging_nothing_still_reorders(kernels, split_mode, num_protected):
    x, size, metric = merging_inputs(n=21, num_protected=num_protected)
    out, ref = run_both(x, size, metric, threshold=1.0, split_mode=split_mode, num_protected=num_protected)
    assert ref.r == 0
    assert not torch.equal(ref.x, x), "r = 0 still puts the tokens in the contract's order"
    assert_same_merge(out, ref, 21)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2])
def test_threshold_merging_the_maximum(kernels, split_mode, num_protected):
    x, size, metric = merging_inputs(n=21, num_protected=num_protected)
    out, ref = run_both(x, size, metric, threshold=-2.0, split_mode=split_mode, num_protected=num_protected)
    assert ref.r == M.max_merges(21 - num_protected), "every A token is above: r is ToMe's cap floor(M/2)"
    assert_same_merge(out, ref, 21)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("r", [0, 1, 4, 100])
def test_fixed_r_matches_reference(kernels, split_mode, r):
    x, size, metric = merging_inputs(n=17, num_protected=1, seed=3)
    out, ref = run_both(x, size, metric, r=r, split_mode=split_mode, num_protected=1)
    assert ref.r == min(r, 8)  # floor(16 / 2)
    assert_same_merge(out, ref, 17)


def test_batch_adaptive_count_couples_the_images(kernels):
    """r = floor(mean of the per-image counts): images with more similar pairs give to the rest."""
    x, size, metric = merging_inputs(batch=4, n=31, num_protected=1, seed=7)
    metric[2] = torch.randn_like(metric[2])  # an image with (almost) nothing alike
    out, ref = run_both(x, size, metric, threshold=0.7)
    counts = ref.counts.tolist()
    assert len(set(counts)) > 1, f"per-image counts differ: {counts}"
    assert ref.r == sum(counts) // len(counts)
    assert_same_merge(out, ref, 31)


def exact_tie_inputs(batch=3, n=41, c=8, d=16, num_protected=1, seed=0):
    """Metrics of +-1 entries, scaled by powers of two, with exact copies and sign flips.

    Every cosine is an exact multiple of 1/d in float32 (no rounding anywhere), so repeated rows
    give exactly equal best matches (argmax ties) and exactly equal scores (ranking ties) on every
    backend: the tie-breaking rules decide the output.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, c, generator=g)
    size = torch.randint(1, 4, (batch, n), generator=g).float()
    signs = torch.randint(0, 2, (batch, n, d), generator=g).float() * 2 - 1
    first_a, first_b = M.alternate_starts(num_protected)
    a_pos, b_pos = range(first_a, n, 2), range(first_b, n, 2)  # the alternate split's A and B
    for bi in range(batch):
        signs[bi, b_pos[3] :: 12] = signs[bi, b_pos[0]]  # B tokens 3, 9, ... equal B token 0: argmax ties
        for k, t in enumerate(a_pos):
            if k % 2 == 1:
                signs[bi, t] = signs[bi, b_pos[k - 1]]  # exact copy of a B token: score exactly 1
            elif k > 0 and k % 4 == 0:
                flips = torch.randperm(d, generator=g)[: int(torch.randint(1, 3, (1,), generator=g))]
                signs[bi, t] = signs[bi, b_pos[k - 1]]
                signs[bi, t, flips] *= -1  # score exactly 1 - 2 * flips / d
    scale = 2.0 ** torch.randint(-2, 3, (batch, n, 1), generator=g).float()
    return x, size, signs * scale


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("policy", [{"threshold": 0.5}, {"threshold": 0.95}, {"r": 7}, {"r": 13}])
def test_exact_ties_follow_the_tie_breaking_rules(kernels, split_mode, policy):
    x, size, metric = exact_tie_inputs()
    split = M.split_tokens(size, 1, split_mode)
    score, _ = M.match(metric, split)
    assert any(len(set(row.tolist())) < len(row) for row in score), "the inputs contain exact score ties"
    ma, mb = split.select(metric / metric.norm(dim=-1, keepdim=True))
    sim = ma @ mb.transpose(1, 2)
    assert ((sim == sim.amax(-1, keepdim=True)).sum(-1) > 1).any(), "some best partners are tied"
    out, ref = run_both(x, size, metric, split_mode=split_mode, num_protected=1, **policy)
    assert ref.r > 0
    assert_same_merge(out, ref, x.shape[1])


def test_argmax_ties_pick_the_first_partner(kernels):
    """An A token identical to several B tokens merges into the first of them."""
    x, size, metric = exact_tie_inputs(batch=1, n=9, num_protected=1)
    # P = 1: A = positions 2, 4, 6, 8 and B = 1, 3, 5, 7. B positions 0, 2, 3 equal A token 2.
    metric[0, 1] = metric[0, 5] = metric[0, 7] = metric[0, 2]
    out, ref = run_both(x, size, metric, r=1, num_protected=1)
    assert ref.plan.src[0, 0].item() == 0 and ref.plan.dst[0, 0].item() == 0
    assert_same_merge(out, ref, 9)


@pytest.mark.parametrize(
    ("batch", "n", "c", "d", "num_protected"),
    [
        (2, 197, 24, 64, 1),  # DeiT token count: several 32-row tiles of A and B
        (2, 70, 20, 40, 2),  # D not a multiple of the 32-feature chunk; Na = 34 > one tile
        (1, 66, 6, 96, 0),  # C not a multiple of 4: the scalar merge path
    ],
)
@pytest.mark.parametrize("split_mode", ["alternate", "size"])
def test_multi_tile_shapes_match_reference(kernels, batch, n, c, d, num_protected, split_mode):
    x, size, metric = merging_inputs(batch=batch, n=n, c=c, d=d, num_protected=num_protected, seed=11)
    for policy in ({"threshold": 0.6}, {"r": (n - num_protected) // 3}):
        out, ref = run_both(x, size, metric, split_mode=split_mode, num_protected=num_protected, **policy)
        assert ref.r > 0
        assert_same_merge(out, ref, n)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2, 3])
def test_single_unprotected_token_has_nothing_to_merge_into(kernels, split_mode, num_protected):
    """N - P = 1: B is empty (alternate, P even) or A is (alternate with P odd, or the size split:
    no match blocks run, and the GPU path skips that launch)."""
    n = num_protected + 1
    x, size, metric = merging_inputs(batch=2, n=n, num_protected=0)
    na, nb = M.set_sizes(n, num_protected, split_mode)
    assert (na, nb) == ((1, 0) if split_mode == "alternate" and num_protected % 2 == 0 else (0, 1))
    for policy in ({"threshold": -5.0}, {"r": 3}):
        out, ref = run_both(x, size, metric, split_mode=split_mode, num_protected=num_protected, **policy)
        assert ref.r == 0 and out.num_tokens == n
        assert_same_merge(out, ref, n)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2, 5])
def test_every_r_up_to_the_cap_matches_the_tome_convention_reference(kernels, split_mode, num_protected):
    """The CPU executor against the independent plain-loop reference (tests/reference.py): random
    inputs, odd and even N (N = P + 1 and P + 2 included), every fixed r from 0 to past floor(M/2),
    and thresholds. r, the token count, the output in the op's order, and the output as a
    multiset of (size, *x) rows."""
    cases = 0
    for x, size, metric, kw, where in sweep(num_protected):
        n = x.shape[1]
        out = cuda_kernels.token_merge_host(x, size, metric, split_mode=split_mode, num_protected=num_protected, **kw)
        ref_x, ref_size, ref_r, _ = reference_merge(x.double().tolist(), size.double().tolist(),
                                                    metric.double().tolist(), split_mode=split_mode,
                                                    num_protected=num_protected, **kw)
        assert ref_r <= M.max_merges(n - num_protected), where
        assert out.num_tokens == n - ref_r, where
        ref_x, ref_size = torch.tensor(ref_x, dtype=torch.float64), torch.tensor(ref_size, dtype=torch.float64)
        torch.testing.assert_close(out.size.double(), ref_size, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")
        torch.testing.assert_close(out.x.double(), ref_x, atol=1e-5, rtol=1e-5, msg=lambda m: f"{where}: {m}")
        for bi in range(x.shape[0]):
            ours = as_multiset(out.x[bi].tolist(), out.size[bi].tolist())
            theirs = as_multiset(ref_x[bi].tolist(), ref_size[bi].tolist())
            torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{where}: {m}")
        cases += 1
    assert cases > 100


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("split_mode", ["alternate", "size"])
def test_half_precision_accumulates_in_float32(kernels, dtype, tol, split_mode):
    """Narrow x/metric: the contract's float32 math on the upcast values, rounded once at the end."""
    x, size, metric = merging_inputs(batch=3, n=33, c=16, num_protected=1)
    x, metric = x.to(dtype), metric.to(dtype)
    out = cuda_kernels.token_merge_host(x, size, metric, threshold=0.8, split_mode=split_mode)
    ref = M.token_merge(x.float(), size, metric.float(), threshold=0.8, split_mode=split_mode)
    assert out.x.dtype == dtype and out.size.dtype == torch.float32
    assert ref.r > 0
    assert_same_merge(out, ref, 33, rtol=tol, atol=tol)


def test_vector_and_scalar_merge_paths_agree_bitwise(kernels):
    """16-byte accesses when rows are aligned, element accesses when not: same bits."""
    x, size, metric = merging_inputs(batch=2, n=25, c=16, num_protected=1)
    aligned = cuda_kernels.token_merge_host(x, size, metric, threshold=0.7)
    storage = torch.empty(x.numel() + 1)
    shifted = storage[1:].view_as(x)  # data pointer 4 bytes past a 16-byte boundary
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    unaligned = cuda_kernels.token_merge_host(shifted, size, metric, threshold=0.7)
    assert aligned.num_tokens == unaligned.num_tokens < 25
    assert torch.equal(aligned.x, unaligned.x) and torch.equal(aligned.size, unaligned.size)


def test_results_are_deterministic(kernels):
    x, size, metric = merging_inputs(batch=3, n=41, c=12, num_protected=1, seed=5)
    first = cuda_kernels.token_merge_host(x, size, metric, threshold=0.6, split_mode="size")
    second = cuda_kernels.token_merge_host(x, size, metric, threshold=0.6, split_mode="size")
    assert torch.equal(first.x, second.x) and torch.equal(first.size, second.size)


def test_non_contiguous_inputs_are_accepted(kernels):
    x, size, metric = merging_inputs(batch=2, n=21, c=8, num_protected=1)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not xt.is_contiguous()
    out, ref = run_both(xt, size, metric, r=5)
    assert_same_merge(out, ref, 21)


def test_invalid_inputs_raise_with_the_reason(kernels):
    x, size, metric = merging_inputs(batch=1, n=5, num_protected=0)
    with pytest.raises(cuda_kernels.TokenMergeKernelError, match="must exceed num_protected"):
        cuda_kernels.token_merge_host(x, size, metric, threshold=0.5, num_protected=5)
    with pytest.raises(ValueError, match="exactly one"):
        cuda_kernels.token_merge_host(x, size, metric)
    with pytest.raises(TypeError, match="size must be float32"):
        cuda_kernels.token_merge_host(x, size.double(), metric, r=1)
    with pytest.raises(ValueError, match="cpu tensor"):
        cuda_kernels.token_merge_host(x.to("meta"), size, metric, r=1)


# ---- AdaMerge: salience weighting (scores and averages) and the intensity rule -------------------


def adamerge_inputs(batch=4, n=21, num_protected=1, seed=0):
    """merging_inputs with one image of unrelated tokens, so the images' redundancies differ."""
    x, size, metric = merging_inputs(batch=batch, n=n, c=8, d=32, num_protected=num_protected, seed=seed)
    metric[batch // 2] = torch.randn(metric[batch // 2].shape, generator=torch.Generator().manual_seed(seed + 1))
    return x, size, metric


def intensity_for(x, size, metric, *, split_mode, num_protected, weighting="salience"):
    """An intensity rule that the inputs' redundancies straddle: r_b differs between images, r > 0."""
    probe = M.token_merge(x, size, metric, intensity=M.Intensity(1, 0.0, 1.0), weighting=weighting,
                          split_mode=split_mode, num_protected=num_protected)
    rho = probe.redundancy.sort().values
    cap = M.max_merges(x.shape[1] - num_protected)
    spread = float(rho[-1] - rho[0])
    k = (len(rho) - 1) // 2
    middle = float(rho[k] + rho[k + 1]) / 2 if len(rho) > 1 else float(rho[0]) + 0.01  # between images
    return M.Intensity(r_max=max(2, cap), mean=middle, std=max(spread, 1e-3) / 2, scale=1.5)


def threshold_for(x, size, metric, *, split_mode, num_protected):
    """A threshold in the widest gap between the middle salience-weighted scores: some merge, and
    no score sits within rounding of it."""
    split = M.split_tokens(size, num_protected, split_mode)
    score = M.match_scores(metric, split, "salience")[0].flatten().sort().values
    middle = score[int(0.4 * len(score)):int(0.8 * len(score)) + 1]
    gap = int((middle[1:] - middle[:-1]).argmax())
    return float(middle[gap] + middle[gap + 1]) / 2


def salience_policy(rule, x, size, metric, split_mode, num_protected):
    cap = M.max_merges(x.shape[1] - num_protected)
    if rule == "fixed":
        return {"r": max(1, cap // 2)}
    if rule == "threshold":
        return {"threshold": threshold_for(x, size, metric, split_mode=split_mode, num_protected=num_protected)}
    return {"intensity": intensity_for(x, size, metric, split_mode=split_mode, num_protected=num_protected)}


#: Salience-weighted averages agree to about 1e-4, not 1e-5: a token's weight is size * (s + 1e-2),
#: and s = (c - min c) / spread carries the centralities' rounding (~1e-7) divided by the spread, so
#: near-minimal tokens' weights differ relatively by ~1e-7 / (spread * 1e-2) between backends.
SALIENCE_TOL = 1e-4


def assert_decisions_clear(ref, rule):
    """The reference's discrete choices are not within float rounding of flipping (else the
    comparison would test rounding, not the algorithm)."""
    if rule != "fixed":
        assert ref.margin is None or ref.margin > 1e-4, f"a count sits on its boundary: margin {ref.margin}"
    assert ref.tie_gap > 1e-5, f"a merge choice is within rounding of another: {ref.tie_gap}"


@pytest.mark.parametrize("rule", ["fixed", "threshold", "intensity"])
@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2])
@pytest.mark.parametrize("n", [21, 70, 200])  # 200: several 32-token tiles in every salience pass
def test_salience_weighting_matches_reference(kernels, rule, split_mode, num_protected, n):
    x, size, metric = adamerge_inputs(n=n, num_protected=num_protected, seed=n + num_protected)
    kw = dict(salience_policy(rule, x, size, metric, split_mode, num_protected), weighting="salience",
              split_mode=split_mode, num_protected=num_protected)
    ref = M.token_merge(x, size, metric, diagnostics=True, **kw)
    out = cuda_kernels.token_merge_host(x, size, metric, **kw)
    assert ref.r > 0, "the inputs merge"
    if rule == "intensity":
        assert len(set(ref.counts.tolist())) > 1, f"r_b differs between images: {ref.counts.tolist()}"
    assert_decisions_clear(ref, rule)
    assert_same_merge(out, ref, n, rtol=SALIENCE_TOL, atol=SALIENCE_TOL)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2])
@pytest.mark.parametrize("unprotected", [1, 2, 3, 4])
def test_salience_weighting_on_tiny_inputs(kernels, split_mode, num_protected, unprotected):
    """M = 1 .. 4: one token (nothing to normalise against, A or B empty) up to two pairs.

    With M = 2 both centralities are 1 up to rounding: the salience is rounding noise divided by
    SALIENCE_EPS (~1e-5), which moves the weights (floor 1e-2) by ~1e-3 relatively, hence the
    looser tolerance there."""
    n = num_protected + unprotected
    x, size, metric = merging_inputs(batch=2, n=n, num_protected=0, seed=unprotected)
    metric[:, -1] = metric[:, num_protected] + 0.05 * torch.randn_like(metric[:, -1])  # a near pair
    for policy in ({"r": 2}, {"threshold": -0.5}, {"intensity": M.Intensity(2, -1.0, 0.5)}):
        kw = dict(policy, weighting="salience", split_mode=split_mode, num_protected=num_protected)
        out, ref = run_both(x, size, metric, **kw)
        assert ref.r == min(M.max_merges(unprotected), 2 if "r" in policy else ref.r)
        tol = 2e-3 if unprotected == 2 else SALIENCE_TOL
        assert_same_merge(out, ref, n, rtol=tol, atol=tol)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
def test_intensity_rule_with_size_weighting(kernels, split_mode):
    """The intensity rule counts from ATM's plain cosine scores too (weighting = size)."""
    x, size, metric = adamerge_inputs(n=70, num_protected=1, seed=4)
    intensity = intensity_for(x, size, metric, split_mode=split_mode, num_protected=1, weighting="size")
    ref = M.token_merge(x, size, metric, intensity=intensity, split_mode=split_mode, diagnostics=True)
    out = cuda_kernels.token_merge_host(x, size, metric, intensity=intensity, split_mode=split_mode)
    assert ref.r > 0 and len(set(ref.counts.tolist())) > 1
    assert_decisions_clear(ref, "intensity")
    assert_same_merge(out, ref, 70)


@pytest.mark.parametrize("temperature", [0.2, 1.0, 4.0])
def test_salience_temperature(kernels, temperature):
    """Sharp (0.2) to flat (4) softmaxes. (Much sharper ones make every centrality ~1, and the
    salience, hence the ranking, rounding noise: see SALIENCE_TOL.)"""
    x, size, metric = adamerge_inputs(n=45, num_protected=1, seed=9)
    kw = dict(r=10, weighting="salience", salience_temperature=temperature, num_protected=1)
    ref = M.token_merge(x, size, metric, diagnostics=True, **kw)
    out = cuda_kernels.token_merge_host(x, size, metric, **kw)
    assert ref.tie_gap > 1e-5
    assert_same_merge(out, ref, 45, rtol=SALIENCE_TOL, atol=SALIENCE_TOL)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2])
def test_salience_weighting_matches_the_loop_reference(kernels, split_mode, num_protected):
    """Against tests/reference.py's AdaMerge restated with loops in float64 (independent of merge.py)."""
    from reference import reference_adamerge

    x, size, metric = adamerge_inputs(batch=3, n=33, num_protected=num_protected, seed=2)
    intensity = intensity_for(x, size, metric, split_mode=split_mode, num_protected=num_protected)
    threshold = threshold_for(x, size, metric, split_mode=split_mode, num_protected=num_protected)
    for kw in ({"r": 6}, {"threshold": threshold}, {"intensity": intensity}):
        out = cuda_kernels.token_merge_host(x, size, metric, weighting="salience", split_mode=split_mode,
                                            num_protected=num_protected, **kw)
        loop_kw = {**kw, "intensity": (intensity.r_max, intensity.mean, intensity.std, intensity.scale)} \
            if "intensity" in kw else kw
        ref_x, ref_size, ref_r, _, _ = reference_adamerge(x.double().tolist(), size.double().tolist(),
                                                          metric.double().tolist(), split_mode=split_mode,
                                                          num_protected=num_protected, **loop_kw)
        assert ref_r > 0
        assert out.num_tokens == 33 - ref_r, kw
        torch.testing.assert_close(out.size.double(), torch.tensor(ref_size, dtype=torch.float64), rtol=0, atol=0)
        torch.testing.assert_close(out.x.double(), torch.tensor(ref_x, dtype=torch.float64), atol=SALIENCE_TOL,
                                   rtol=SALIENCE_TOL)


def test_salience_vector_and_scalar_merge_paths_agree_bitwise(kernels):
    x, size, metric = adamerge_inputs(n=25, num_protected=1)
    kw = dict(threshold=0.2, weighting="salience")
    aligned = cuda_kernels.token_merge_host(x, size, metric, **kw)
    storage = torch.empty(x.numel() + 1)
    shifted = storage[1:].view_as(x)
    shifted.copy_(x)
    unaligned = cuda_kernels.token_merge_host(shifted, size, metric, **kw)
    again = cuda_kernels.token_merge_host(x, size, metric, **kw)
    assert aligned.num_tokens == unaligned.num_tokens < 25
    assert torch.equal(aligned.x, unaligned.x) and torch.equal(aligned.size, unaligned.size)
    assert torch.equal(aligned.x, again.x), "deterministic"


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_salience_weighting_in_half_precision(kernels, dtype, tol):
    x, size, metric = adamerge_inputs(n=33, num_protected=1, seed=6)
    x, metric = x.to(dtype), metric.to(dtype)
    kw = dict(r=8, weighting="salience")
    out = cuda_kernels.token_merge_host(x, size, metric, **kw)
    ref = M.token_merge(x.float(), size, metric.float(), diagnostics=True, **kw)
    assert ref.tie_gap > 1e-4
    assert_same_merge(out, ref, 33, rtol=tol, atol=tol)


def test_invalid_adamerge_arguments_raise(kernels):
    x, size, metric = merging_inputs(batch=1, n=9, num_protected=1)
    with pytest.raises(ValueError, match="exactly one"):
        cuda_kernels.token_merge_host(x, size, metric, r=2, intensity=M.Intensity(2, 0.0, 1.0))
    with pytest.raises(ValueError, match="unknown weighting"):
        cuda_kernels.token_merge_host(x, size, metric, r=2, weighting="attention")
    with pytest.raises(cuda_kernels.TokenMergeKernelError, match="salience_temperature must be > 0"):
        cuda_kernels.token_merge_host(x, size, metric, r=2, weighting="salience", salience_temperature=0.0)
    with pytest.raises(cuda_kernels.TokenMergeKernelError, match="redundancy_std must be > 0"):
        cuda_kernels.token_merge_host(x, size, metric, intensity=M.Intensity(2, 0.0, 0.0))
