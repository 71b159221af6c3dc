"""The main command end to end, and `atm-export check` (the parity check for users' CI).

One full run (export, parity, benchmark with a replayed schedule) is shared by the tests; the
check command is then run on its artifacts as they are, tampered with, corrupt and foreign.
"""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from atm_export.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "deit_t"
    code = main(["deit_t", "--random-init", "-q", "-o", str(out), "--parity-batches", "1,3",
                 "--bench-batches", "2", "--bench-runs", "1", "--bench-schedule", "gflops:0.9"])
    assert code == 0
    return out


def test_the_run_writes_every_artifact_and_field(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert names == {"model.onnx", "model.plugin.onnx", "report.json", "report.md"}
    report = json.loads((run_dir / "report.json").read_text())
    assert report["artifacts"] == ["model.onnx", "model.plugin.onnx", "report.json", "report.md"]
    for backend in ("eager_atm", "ort_portable", "ort_plugin"):
        entry = report["parity"][backend]
        assert {"max_abs_diff", "top1_agreement", "token_counts_equal", "passed"} <= set(entry)
        assert entry["passed"], entry["notes"]
        assert set(entry["batches"]) == {"8", "1", "3"}
    assert "TensorRT not installed" in report["skipped"]["tensorrt"]
    for backend in ("eager_baseline", "eager_atm", "ort_baseline", "ort_portable", "ort_plugin"):
        assert set(report["latency_ms"][backend]["2"]) >= {"p50", "p90"}
    schedule = report["benchmark"]["schedule"]
    assert schedule["gflops"] == pytest.approx(0.9, abs=0.03) and len(schedule["tokens_per_layer"]) == 12
    assert 0.0 <= report["benchmark"]["merge_share"]["ort_portable"] < 1.0
    assert set(report["benchmark"]["speedup"]) == {"eager_atm", "ort_portable", "ort_plugin"}
    assert report["benchmark"]["flops_ratio"] == pytest.approx(report["gflops"]["baseline"] / schedule["gflops"], rel=1e-3)
    md = (run_dir / "report.md").read_text()
    assert "## Parity against eager PyTorch" in md and "## Latency (ms)" in md and "RANDOM WEIGHTS" in md


def test_check_passes_on_untouched_artifacts(run_dir, capsys):
    assert main(["check", str(run_dir), "-q"]) == 0
    assert "parity passed" in capsys.readouterr().out


def _copy(run_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run_dir, target)
    return target


def test_check_fails_on_a_tampered_model(run_dir, tmp_path, capsys):
    copy = _copy(run_dir, tmp_path)
    model = onnx.load(str(copy / "model.plugin.onnx"))
    head = next(t for t in model.graph.initializer if "head" in t.name and "weight" in t.name)
    values = onnx.numpy_helper.to_array(head).copy()
    values[:, :] += 0.05
    head.CopyFrom(onnx.numpy_helper.from_array(values, head.name))
    onnx.save(model, str(copy / "model.plugin.onnx"))
    code = main(["check", str(copy), "-q"])
    err = capsys.readouterr().err
    assert code == 3 and "disagree with eager PyTorch" in err


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.onnx").write_bytes(b"\x00garbage" * 10), "is not a valid ONNX file"),
    (lambda d: onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(d / "model.onnx")),
     "was not written by atm-export"),
    (lambda d: (d / "report.json").unlink(), "no report.json"),
    (lambda d: (d / "model.plugin.onnx").unlink(), "is missing"),
])
def test_check_refuses_corrupt_or_foreign_files(run_dir, tmp_path, capsys, damage, message):
    copy = _copy(run_dir, tmp_path)
    damage(copy)
    code = main(["check", str(copy), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
