"""The merge math against the plain-loop reference (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch

from atm_export import merge as M
from conftest import merging_inputs
from reference import reference_merge


def run_both(x, size, metric, **kw):
    out = M.token_merge(x, size, metric, **kw)
    ref_x, ref_size, ref_r, ref_counts = reference_merge(
        x.double().tolist(), size.double().tolist(), metric.double().tolist(), **kw
    )
    return out, torch.tensor(ref_x, dtype=torch.float64), torch.tensor(ref_size, dtype=torch.float64), ref_r, ref_counts


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2])
@pytest.mark.parametrize("n", [20, 21])
def test_threshold_merge_matches_reference(split_mode, num_protected, n):
    x, size, metric = merging_inputs(n=n, num_protected=num_protected)
    out, ref_x, ref_size, ref_r, ref_counts = run_both(
        x, size, metric, threshold=0.8, split_mode=split_mode, num_protected=num_protected
    )
    assert out.r == ref_r
    assert out.r > 0, "the inputs are built so that merging happens"
    assert out.counts.tolist() == ref_counts
    assert out.x.shape == (x.shape[0], n - out.r, x.shape[2])
    torch.testing.assert_close(out.x.double(), ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.size.double(), ref_size)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("r", [0, 1, 4, 100])
def test_fixed_r_matches_reference(split_mode, r):
    x, size, metric = merging_inputs(n=17, num_protected=1, seed=3)
    out, ref_x, ref_size, ref_r, _ = run_both(x, size, metric, r=r, split_mode=split_mode, num_protected=1)
    assert out.r == ref_r == min(r, 8)
    torch.testing.assert_close(out.x.double(), ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.size.double(), ref_size)


def test_protected_tokens_stay_in_front_unchanged():
    x, size, metric = merging_inputs(n=21, num_protected=2)
    out = M.token_merge(x, size, metric, r=10, num_protected=2)
    assert out.r == 10
    torch.testing.assert_close(out.x[:, :2], x[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(out.size[:, :2], size[:, :2], rtol=0, atol=0)


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
def test_sizes_are_conserved(split_mode):
    x, size, metric = merging_inputs(n=31, num_protected=1, seed=5)
    out = M.token_merge(x, size, metric, threshold=0.5, split_mode=split_mode, num_protected=1)
    assert out.r > 0
    torch.testing.assert_close(out.size.sum(1), size.sum(1))


def test_merged_token_is_the_exact_weighted_average():
    """Every output token equals sum(size * x) / sum(size) over the input tokens it holds."""
    x, size, metric = merging_inputs(n=25, num_protected=1, seed=7)
    n = x.shape[1]
    sources = torch.eye(n).expand(x.shape[0], n, n)
    out = M.token_merge(x, size, metric, threshold=0.7, split_mode="size", num_protected=1)
    held = M.merge_summed(out.plan, sources)  # [B, N - r, N]: which inputs each output holds
    assert out.r > 0
    assert torch.all(held.sum(1) == 1), "each input token ends up in exactly one output token"
    weights = held * size.unsqueeze(1)
    expected = (weights @ x) / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(out.x, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.size, weights.sum(-1))


def test_size_distinctive_split_never_merges_two_large_tokens():
    size = torch.tensor([[1.0] + [1, 9, 1, 9, 1, 9, 1, 9, 1, 9, 1, 9]] * 2)
    split = M.split_tokens(size, 1, "size")
    assert torch.all(size.gather(1, split.a) == 1)  # the small half merges into the large half
    assert torch.all(size.gather(1, split.b) == 9)


def test_ties_pick_the_lower_position():
    """Exact ties (one-hot metrics): the first B partner, and lower A positions first."""
    d = 4
    # tokens: protected, then A0 B0 A1 B1 A2 B2; A0, A1 and A2 all equal B0 and B1.
    one = torch.eye(d)
    metric = torch.stack([one[3], one[0], one[0], one[0], one[0], one[0], one[1]]).unsqueeze(0)
    x = torch.arange(7.0).reshape(1, 7, 1)
    size = torch.ones(1, 7)
    out = M.token_merge(x, size, metric, r=2, num_protected=1)
    assert out.plan.src.tolist() == [[0, 1]]  # A0 and A1 (score 1, ties) before A2 (also 1)
    assert out.plan.dst.tolist() == [[0, 0]]  # both pick B0, the first of the tied partners
    ref_x, _, _, _ = reference_merge(x.tolist(), size.tolist(), metric.tolist(), r=2, num_protected=1)
    torch.testing.assert_close(out.x.double(), torch.tensor(ref_x, dtype=torch.float64))


def test_batch_adaptive_r_is_floor_of_batch_mean():
    counts = torch.tensor([3, 4, 4])
    assert M.batch_adaptive_r(counts, num_a=10, num_b=10) == 3  # floor(11 / 3)
    assert M.batch_adaptive_r(counts, num_a=2, num_b=10) == 2  # capped by |A|
    assert M.batch_adaptive_r(counts, num_a=2, num_b=0) == 0  # nothing to merge into


def test_threshold_one_merges_nothing_even_for_identical_tokens():
    x, size, metric = merging_inputs(n=11, num_protected=1)
    metric[:] = metric[:, :1]  # every token identical: similarity 1 (clamped)
    out = M.token_merge(x, size, metric, threshold=1.0, num_protected=1)
    assert out.r == 0 and out.x.shape == x.shape


def test_single_unprotected_token_is_left_alone():
    x, size, metric = merging_inputs(n=2, num_protected=1)
    out = M.token_merge(x, size, metric, threshold=0.0, num_protected=1)
    assert out.r == 0
    torch.testing.assert_close(out.x, x)


def test_exactly_one_of_threshold_and_r():
    x, size, metric = merging_inputs(n=5)
    with pytest.raises(ValueError):
        M.token_merge(x, size, metric)
    with pytest.raises(ValueError):
        M.token_merge(x, size, metric, threshold=0.5, r=1)
