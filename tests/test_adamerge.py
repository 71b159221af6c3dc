"""AdaMerge's merge step against the plain-loop reference (tests/reference.py), and its parts."""

from __future__ import annotations

import math

import pytest
import torch

from atm_export import merge as M
from conftest import merging_inputs
from reference import reference_adamerge, reference_salience


def run_both(x, size, metric, intensity=None, **kw):
    out = M.token_merge(x, size, metric, weighting="salience", intensity=intensity, **kw)
    ref = reference_adamerge(x.double().tolist(), size.double().tolist(), metric.double().tolist(),
                             intensity=None if intensity is None else
                             (intensity.r_max, intensity.mean, intensity.std, intensity.scale), **kw)
    return out, ref


def typical_intensity(x, size, metric, r_max=6, **kw) -> M.Intensity:
    """An intensity rule whose mean is the middle image's redundancy: the images' counts differ."""
    probe = M.token_merge(x, size, metric, weighting="salience", intensity=M.Intensity(0, 0.0, 1.0), **kw)
    rho = probe.redundancy.sort().values
    spread = float(rho[-1] - rho[0]) or 1.0
    return M.Intensity(r_max, float(rho[len(rho) // 2]) + 1e-3, spread / 2, 2.0)


@pytest.mark.parametrize("num_protected", [0, 1, 2])
@pytest.mark.parametrize("n", [3, 4, 20, 33])
def test_salience_matches_the_reference(num_protected, n):
    _, _, metric = merging_inputs(n=n, num_protected=num_protected, seed=n)
    for image in range(metric.shape[0]):
        ours = M.salience(metric[image : image + 1], num_protected, 0.5)[0].double()
        ref = torch.tensor(reference_salience(metric[image].double().tolist(), num_protected, 0.5), dtype=torch.float64)
        # float32 rounding of near-equal centralities, divided by the least spread (1e-2)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
        unprotected = ours[num_protected:]
        if len(unprotected) == 2:  # two tokens are always equally central (the affinity is symmetric)
            assert float(unprotected.max()) < 1e-4, "rounding noise is not blown up into salience"
        elif len(unprotected) > 2:
            assert float(unprotected.min()) == 0.0 and abs(float(unprotected.max()) - 1.0) < 1e-6


def test_salience_is_centrality_the_centre_of_a_cluster_is_most_salient():
    g = torch.Generator().manual_seed(0)
    d = 8
    centre = torch.randn(d, generator=g)
    members = [centre + 0.3 * torch.randn(d, generator=g) for _ in range(5)]
    metric = torch.stack([torch.randn(d, generator=g), *members[:2], centre, *members[2:],
                          torch.randn(d, generator=g)]).unsqueeze(0)
    s = M.salience(metric, 1, 0.1)[0]
    assert int(s[1:].argmax()) + 1 == 3, "every member is closer to the centre than to the others: a hub"


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2])
@pytest.mark.parametrize("n", [20, 21, 40])
def test_intensity_step_matches_the_reference(split_mode, num_protected, n):
    x, size, metric = merging_inputs(batch=4, n=n, num_protected=num_protected, seed=n + num_protected)
    kw = {"split_mode": split_mode, "num_protected": num_protected, "salience_temperature": 0.5}
    intensity = typical_intensity(x, size, metric, **kw)
    out, (ref_x, ref_size, ref_r, ref_counts, ref_rho) = run_both(x, size, metric, intensity=intensity, **kw)
    torch.testing.assert_close(out.redundancy.double(), torch.tensor(ref_rho, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert out.counts.tolist() == ref_counts
    assert len(set(ref_counts)) > 1, "the images are built to merge different numbers of pairs"
    assert out.r == ref_r > 0
    torch.testing.assert_close(out.x.double(), torch.tensor(ref_x, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.size.double(), torch.tensor(ref_size, dtype=torch.float64))


@pytest.mark.parametrize("split_mode", ["alternate", "size"])
@pytest.mark.parametrize("rule", [{"r": 0}, {"r": 3}, {"r": 100}, {"threshold": 0.3}, {"threshold": 0.0}])
def test_fixed_and_threshold_rules_with_salience_match_the_reference(split_mode, rule):
    x, size, metric = merging_inputs(batch=3, n=25, num_protected=1, seed=7)
    out, (ref_x, ref_size, ref_r, ref_counts, _) = run_both(x, size, metric, split_mode=split_mode, num_protected=1,
                                                            **rule)
    assert out.r == ref_r
    if "threshold" in rule:
        assert out.counts.tolist() == ref_counts and out.r > 0
    torch.testing.assert_close(out.x.double(), torch.tensor(ref_x, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.size.double(), torch.tensor(ref_size, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("num_protected", [0, 1, 2])
def test_tiny_sequences(n, num_protected):
    if n <= num_protected:
        pytest.skip("a model's input has at least one unprotected token")
    g = torch.Generator().manual_seed(10 * n + num_protected)
    x, size, metric = torch.randn(2, n, 3, generator=g), torch.ones(2, n), torch.randn(2, n, 4, generator=g)
    out, (ref_x, ref_size, ref_r, _, _) = run_both(x, size, metric, intensity=M.Intensity(4, -1.0, 0.1, 1.0),
                                                   num_protected=num_protected)
    assert out.r == ref_r == (n - num_protected) // 2
    # two unprotected tokens tie in centrality: float32 noise / SALIENCE_EPS moves their weights
    # by up to about 1 % (docs/token-merge-op.md, step 2b), so their average is compared loosely
    atol = 1e-2 if n - num_protected == 2 else 1e-5
    torch.testing.assert_close(out.x.double(), torch.tensor(ref_x, dtype=torch.float64).reshape(out.x.shape),
                               atol=atol, rtol=1e-5)


def test_merged_token_is_the_salience_weighted_average():
    x, size, metric = merging_inputs(batch=1, n=21, num_protected=1, seed=2)
    out = M.token_merge(x, size, metric, r=3, weighting="salience", num_protected=1)
    plan, s = out.plan, M.salience(metric, 1)
    w = size * (s + M.SALIENCE_FLOOR)
    slot = int(plan.dst_slot[0, 0])
    dst = int(plan.out_index[0, slot])
    group = [dst] + [int(t) for t, sl in zip(plan.src_token[0], plan.dst_slot[0]) if int(sl) == slot]
    expected = sum(w[0, t] * x[0, t] for t in group) / sum(w[0, t] for t in group)
    torch.testing.assert_close(out.x[0, slot], expected, atol=1e-5, rtol=1e-5)
    assert float(out.size[0, slot]) == sum(float(size[0, t]) for t in group), "sizes still add up"


def test_salience_changes_which_tokens_merge():
    x, size, metric = merging_inputs(batch=2, n=41, num_protected=1, seed=5)
    plain = M.token_merge(x, size, metric, r=6, num_protected=1)
    weighted = M.token_merge(x, size, metric, r=6, weighting="salience", num_protected=1)
    assert not torch.equal(plain.plan.src_token.sort().values, weighted.plan.src_token.sort().values)


def test_intensity_counts_follow_the_sigmoid():
    rule = M.Intensity(r_max=10, mean=0.5, std=0.1, scale=2.0)
    rho = torch.tensor([0.5, 0.6, 0.2, 0.8])
    expected = [math.floor(10 / (1 + math.exp(-2.0 * (v - 0.5) / 0.1))) for v in rho.tolist()]
    assert M.intensity_counts(rho, rule).tolist() == expected == [5, 8, 0, 9]
    # float32's sigmoid saturates to 1 far from the mean: the count is then r_max, never more
    assert M.intensity_counts(torch.tensor([50.0]), rule).tolist() == [10]


def test_intensity_margin_is_zero_on_a_step_and_positive_off_it():
    rule = M.Intensity(r_max=4, mean=0.5, std=0.1, scale=1.0)
    on_step = 0.5 + 0.1 * math.log(0.25 / 0.75)  # r_max * sigmoid = 1 exactly
    assert M.intensity_margin(torch.tensor([on_step]), rule) < 1e-7  # float32 rho
    assert M.intensity_margin(torch.tensor([0.5 + 0.01]), rule) == pytest.approx(0.01, abs=1e-7)  # the step at k = 2


def test_exactly_one_count_rule():
    x, size, metric = merging_inputs()
    with pytest.raises(ValueError, match="exactly one"):
        M.token_merge(x, size, metric, r=2, intensity=M.Intensity(2, 0.0, 1.0))
    with pytest.raises(ValueError, match="weighting"):
        M.token_merge(x, size, metric, r=2, weighting="attention")
