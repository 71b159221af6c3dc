"""Benchmark statistics and speed-ups (pure functions; no time is asserted)."""

from __future__ import annotations

import pytest

from atm_export.bench import NOISY_SPREAD, Timing, TimingPlan, measure, speedups


def test_timing_statistics():
    t = Timing(batch=8, runs_ms=[10.0] * 8 + [12.0, 30.0])
    s = t.summary()
    assert s["p50"] == 10.0 and s["runs"] == 10 and s["p99"] > s["p90"] >= 10.0
    assert s["throughput"] == pytest.approx(800.0)  # 8 images in 10 ms
    assert t.spread == pytest.approx((t.percentile(90) - t.percentile(10)) / 10.0)


def test_a_large_spread_or_too_few_runs_is_noisy():
    assert not Timing(1, [10.0, 10.1, 9.9, 10.0, 10.05]).noisy
    assert Timing(1, [10.0, 20.0, 5.0, 15.0, 30.0]).spread > NOISY_SPREAD
    assert Timing(1, [10.0, 20.0, 5.0, 15.0, 30.0]).noisy
    assert Timing(1, [10.0, 10.0]).noisy  # two runs say nothing about spread


def test_measure_runs_at_least_min_runs_and_the_budget():
    calls = []
    t = measure(lambda: calls.append(1), batch=1, plan=TimingPlan(min_runs=7, budget_s=0.0, warmup=2))
    assert len(t.runs_ms) == 7 and len(calls) == 9  # the warm-up is not timed
    t = measure(lambda: None, batch=1, plan=TimingPlan(min_runs=1, budget_s=0.05, max_runs=50))
    assert 1 < len(t.runs_ms) <= 50  # fast calls get many runs within the budget, up to the cap


def test_speedups_pair_each_merged_backend_with_its_runtime_baseline():
    lat = {"eager_atm": {8: Timing(8, [50.0])}, "eager_baseline": {8: Timing(8, [100.0])},
           "ort_portable": {8: Timing(8, [40.0])}, "ort_baseline": {8: Timing(8, [60.0])},
           "ort_plugin": {8: Timing(8, [120.0])}}
    assert speedups(lat, 8) == {"eager_atm": 2.0, "ort_portable": 1.5, "ort_plugin": 0.5}
    assert speedups(lat, 1) == {}
