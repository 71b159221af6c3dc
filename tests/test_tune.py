"""The tune search: its grid, successive halving against an exhaustive search, the front, the choice."""

from __future__ import annotations

import math

import pytest

from atm_export import accuracy as A
from atm_export import tune as T
from atm_export.errors import UserError


def test_the_grid_spans_the_papers_ranges_without_duplicates():
    pool = T.candidates(depth=12, merge_in_last_block=False)
    alphas = {c.config.alpha for c in pool}
    assert min(alphas) == 0.945 and max(alphas) == 1.0
    assert {c.config.theta_min for c in pool} == set(T.THETA_MINS)
    keys = set()
    for c in pool:
        steps = c.config.steps(12, False)
        keys.add((tuple(None if s is None else (s.split_mode, round(s.threshold, 9)) for s in steps)))
    assert len(keys) == len(pool)
    # theta_min above alpha clamps every threshold: those settings collapse into one per theta_min
    assert len(pool) < len(T.ALPHAS) * len(T.BETAS) * len(T.THETA_MINS) * 3


def test_rung_sizes_grow_to_every_batch():
    assert T.rung_sizes(1) == [1]
    assert T.rung_sizes(10) == [1, 3, 9, 10]
    assert T.rung_sizes(9) == [1, 3, 9]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one target"),
    ({"target_gflops": 1.0, "min_agreement": 0.99}, "exactly one target"),
    ({"target_gflops": -1.0}, "must be positive"),
    ({"min_agreement": 1.5}, "must be in"),
])
def test_targets_are_checked(kwargs, message):
    with pytest.raises(UserError, match=message):
        T.Target(**kwargs)


def _landscape(c: T.Candidate, batch: int, images: int = 100) -> A.Tally:
    """A synthetic model: lower thresholds save GFLOPs and cost agreement, with per-batch noise."""
    cfg = c.config
    level = (cfg.alpha + cfg.theta_min) / 2 - cfg.beta  # higher: merges less
    gflops = 1.0 + 3.0 * (level - 0.75)
    noise = math.sin(1000 * level + batch) * 0.004
    agreement = min(1.0, max(0.0, 1.0 - 0.6 * max(0.0, 0.97 - level) + noise))
    agreeing = round(agreement * images)
    return gflops, agreeing


def _run(c: T.Candidate, batch: int) -> None:
    gflops, agreeing = _landscape(c, batch)
    tally = c.tally
    tally.images += 100
    tally.agree += agreeing
    tally.gflops_sum += gflops * 100


@pytest.mark.parametrize("target", [T.Target(min_agreement=0.98), T.Target(target_gflops=1.3)])
def test_successive_halving_finds_the_exhaustive_choice_for_less(target):
    batches = 9
    exhaustive = T.candidates(12, False)
    for c in exhaustive:
        for b in range(batches):
            _run(c, b)
        c.batches = batches
    best = T.choose(exhaustive, target)
    assert best is not None

    pool = T.candidates(12, False)
    rounds = T.successive_halving(pool, batches, _run, target)
    chosen = T.choose(T.finished(pool, batches), target)
    assert chosen.name == best.name
    assert sum(c.batches for c in pool) < 0.4 * len(pool) * batches  # under half the exhaustive cost
    assert [r["batches"] for r in rounds] == [1, 3, 9]


def test_the_front_is_what_no_candidate_beats():
    pool = T.candidates(12, False)[:60]
    for c in pool:
        _run(c, 0)
        c.batches = 1
    front = T.pareto_front(pool, "agreement")
    for f in front:
        assert not any(o.tally.gflops < f.tally.gflops and o.tally.agreement >= f.tally.agreement
                       or o.tally.gflops <= f.tally.gflops and o.tally.agreement > f.tally.agreement for o in pool)
    assert [f.tally.gflops for f in front] == sorted(f.tally.gflops for f in front)


def test_an_unreachable_target_chooses_nothing():
    pool = T.candidates(12, False)[:10]
    for c in pool:
        _run(c, 0)
        c.batches = 1
    assert T.choose(pool, T.Target(target_gflops=0.001)) is None
