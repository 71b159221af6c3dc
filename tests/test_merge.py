"""The merge math against the plain-loop reference (tests/reference.py, ToMe's convention)."""

from __future__ import annotations

import pytest
import torch

from atm_export import merge as M
from conftest import merging_inputs
from reference import as_multiset, reference_merge, sweep


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
    assert out.r == ref_r == min(r, 8)  # floor(16 / 2)
    torch.testing.assert_close(out.x.double(), ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.size.double(), ref_size)


def test_protected_tokens_stay_in_front_unchanged():
    x, size, metric = merging_inputs(n=21, num_protected=2)
    out = M.token_merge(x, size, metric, r=10, num_protected=2)
    assert out.r == 9  # floor(19 / 2)
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
    # P = 1: A = positions 2, 4, 6 and B = 1, 3, 5. A2, A4 and A6 all equal B1 and B3.
    one = torch.eye(d)
    metric = torch.stack([one[3], one[0], one[0], one[0], one[0], one[1], one[0]]).unsqueeze(0)
    x = torch.arange(7.0).reshape(1, 7, 1)
    size = torch.ones(1, 7)
    out = M.token_merge(x, size, metric, r=2, num_protected=1)
    assert out.plan.src.tolist() == [[0, 1]]  # A0 and A1 (score 1, ties) before A2 (also 1)
    assert out.plan.dst.tolist() == [[0, 0]]  # both pick B0, the first of the tied partners
    assert out.plan.src_token.tolist() == [[2, 4]]
    ref_x, _, _, _ = reference_merge(x.tolist(), size.tolist(), metric.tolist(), r=2, num_protected=1)
    torch.testing.assert_close(out.x.double(), torch.tensor(ref_x, dtype=torch.float64))


@pytest.mark.parametrize("num_protected, a, b", [
    (0, [0, 2, 4, 6], [1, 3, 5]),
    (1, [2, 4, 6], [1, 3, 5]),  # the class token is position 0: A starts at 2, B at 1
    (2, [2, 4, 6], [3, 5]),  # class and distillation tokens
    (5, [6], [5]),
])
def test_alternate_split_is_even_and_odd_positions_of_the_whole_sequence(num_protected, a, b):
    split = M.split_tokens(torch.ones(2, 7), num_protected, "alternate")
    assert split.a[0].tolist() == a and split.b[0].tolist() == b
    assert M.set_sizes(7, num_protected, "alternate") == (len(a), len(b))
    first_a, first_b = split.select(torch.arange(7).expand(2, 7))
    assert first_a[0].tolist() == a and first_b[0].tolist() == b


def test_size_split_sources_are_the_smaller_floor_half():
    size = torch.tensor([[9.0, 3, 1, 2, 2, 1, 5, 1]])  # P = 1, M = 7: A = the 3 smallest
    split = M.split_tokens(size, 1, "size")
    assert split.a.tolist() == [[2, 5, 7]] and split.b.tolist() == [[3, 4, 1, 6]]  # ties by position
    assert M.set_sizes(8, 1, "size") == (3, 4)


def test_batch_adaptive_r_is_floor_of_batch_mean():
    counts = torch.tensor([3, 4, 4])
    assert M.batch_adaptive_r(counts, cap=10) == 3  # floor(11 / 3)
    assert M.batch_adaptive_r(counts, cap=2) == 2  # at most floor(M / 2)
    assert M.max_merges(9) == 4 and M.max_merges(1) == 0 and M.max_merges(0) == 0


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
def test_at_most_floor_half_merge_when_m_is_odd(split_mode):
    """M = 9: ToMe merges at most 4 pairs, even when all 9 tokens are alike."""
    x, size, metric = merging_inputs(n=10, num_protected=1)
    metric[:] = metric[:, 1:2]
    out = M.token_merge(x, size, metric, threshold=-1.0, split_mode=split_mode, num_protected=1)
    assert out.r == 4 and out.x.shape[1] == 6
    assert M.token_merge(x, size, metric, r=5, split_mode=split_mode, num_protected=1).r == 4


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2, 5])
def test_every_r_up_to_the_cap_matches_the_tome_convention_reference(split_mode, num_protected):
    """Random inputs, odd and even N, every r from 0 to past floor(M/2), and thresholds: the
    output is the reference's as a multiset of tokens, and in the op's order."""
    cases = 0
    for x, size, metric, kw, where in sweep(num_protected):
        out = M.token_merge(x, size, metric, split_mode=split_mode, num_protected=num_protected, **kw)
        ref_x, ref_size, ref_r, _ = reference_merge(x.double().tolist(), size.double().tolist(),
                                                    metric.double().tolist(), split_mode=split_mode,
                                                    num_protected=num_protected, **kw)
        assert out.r == ref_r <= (x.shape[1] - num_protected) // 2, where
        for bi in range(x.shape[0]):
            ours = as_multiset(out.x[bi].tolist(), out.size[bi].tolist())
            torch.testing.assert_close(torch.tensor(ours), torch.tensor(as_multiset(ref_x[bi], ref_size[bi])),
                                       atol=1e-5, rtol=1e-5, msg=lambda m: f"{where}: {m}")
        torch.testing.assert_close(out.x.double(), torch.tensor(ref_x, dtype=torch.float64), atol=1e-5, rtol=1e-5)
        cases += 1
    assert cases > 100


def test_threshold_one_merges_nothing_even_for_identical_tokens():
    x, size, metric = merging_inputs(n=11, num_protected=1)
    metric[:] = metric[:, :1]  # every token identical: similarity 1 (clamped)
    out = M.token_merge(x, size, metric, threshold=1.0, num_protected=1)
    assert out.r == 0 and out.x.shape == x.shape


@pytest.mark.parametrize("num_protected", [0, 1, 2])
@pytest.mark.parametrize("split_mode", ["alternate", "size"])
def test_single_unprotected_token_is_left_alone(num_protected, split_mode):
    x, size, metric = merging_inputs(n=num_protected + 1, num_protected=num_protected)
    out = M.token_merge(x, size, metric, threshold=-1.0, split_mode=split_mode, num_protected=num_protected)
    assert out.r == 0
    torch.testing.assert_close(out.x, x)


def test_exactly_one_of_threshold_and_r():
    x, size, metric = merging_inputs(n=5)
    with pytest.raises(ValueError):
        M.token_merge(x, size, metric)
    with pytest.raises(ValueError):
        M.token_merge(x, size, metric, threshold=0.5, r=1)
