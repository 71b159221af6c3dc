"""The typed report: report.json round trip, its schema, and the strict loader that enforces it."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from atm_export.report.model import (SCHEMA_VERSION, BackendParity, Benchmark, Flops, ModelInfo, ParityBatch, Report,
                                     ReportSchemaError, SettingsInfo, TimingStats, Tokens, json_schema, load_report)


def sample_report() -> Report:
    batch = ParityBatch(status="passed", max_abs_diff=1e-6, error_ratio=0.05, top1_agreement=1.0,
                        token_counts_equal=True, tokens=[197, 150], reference_tokens=[197, 150],
                        min_decision_margin=float("inf"), checks={"replay": {"status": "passed"}})
    parity = BackendParity(status="passed", passed=True, fails_run=False, precision="fp32",
                           tolerance={"atol": 1e-5, "rtol": 1e-4, "rule": "r"}, max_abs_diff=1e-6, max_error_ratio=0.05,
                           top1_agreement=1.0, token_counts_equal=True, settled_batches=[], batches={"8": batch}, notes=[])
    timing = TimingStats(p50=10.0, p90=11.0, p99=12.0, mean=10.5, std=0.5, spread=0.1, throughput=800.0, runs=20,
                         noisy=False)
    bench = Benchmark(description="d", batches=[8], threads=2, plan={"min_runs": 5}, latency={"eager_atm": {"8": timing}},
                      speedup={"eager_atm": 1.4}, speedup_batch=8, flops_ratio=1.45,
                      speedup_over_flops_ratio={"eager_atm": 0.97}, merge_share={"eager_atm": 0.04}, noisy=[])
    return Report(schema_version=SCHEMA_VERSION, status="passed", atm_export_version="0.2.0", created="now",
                  model=ModelInfo("deit_s", "deit_small_patch16_224", {}, "DeiT-S"),
                  settings=SettingsInfo("lossless", {"source": "paper"}, {"alpha": 0.985}, {"alpha": 0.985}),
                  weights={"source": "random"}, images={"source": "builtin", "count": 8},
                  flops=Flops(4.6, 3.2, 0.3, "fvcore"), tokens=Tokens([197.0, 150.0], [197, 150], [197, 150], [47.0, 0.0]),
                  parity={"eager_atm": parity}, benchmark=bench)


def test_report_json_round_trips_and_follows_its_json_schema():
    report = sample_report()
    data = json.loads(json.dumps(report.to_dict()))  # as written to and read from report.json
    jsonschema.validate(data, json_schema())
    assert data["parity"]["eager_atm"]["batches"]["8"]["min_decision_margin"] is None  # inf has no JSON form
    again = load_report(data)
    assert again.parity["eager_atm"].batches["8"].checks == {"replay": {"status": "passed"}}
    assert again.benchmark.latency["eager_atm"]["8"].p50 == 10.0
    assert again.settings.overrides == {"alpha": 0.985}


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.pop("flops"), "missing field 'flops'"),
    (lambda d: d.update(extra=1), "unknown field"),
    (lambda d: d["tokens"].update(min=["a"]), "report.tokens.min[0]"),
    (lambda d: d["parity"]["eager_atm"].update(passed="yes"), "report.parity.eager_atm.passed"),
    (lambda d: d["benchmark"]["latency"]["eager_atm"]["8"].pop("p99"), "missing field 'p99'"),
    (lambda d: d.update(schema_version=0), "schema version 0"),
])
def test_a_report_that_breaks_the_schema_is_refused_by_both(damage, message):
    data = json.loads(json.dumps(sample_report().to_dict()))
    broken = copy.deepcopy(data)
    damage(broken)
    with pytest.raises(ReportSchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_report(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json_schema())


def test_overall_status():
    report = sample_report()
    assert report.overall_status() == "passed"
    report.parity["eager_atm"].status = "inconclusive"
    assert report.overall_status() == "inconclusive"
    report.parity["eager_atm"].fails_run = True
    assert report.overall_status() == "failed"
