"""A run with ``--external-data`` (what a graph too large for one file gets by itself), end to
end: every graph with its side file, every backend reading them, the static-schedule models,
the benchmarks' baseline, the Triton repository, and ``check`` on the artifacts as they are,
tampered with, and with a side file missing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from atm_export.cli import main
from atm_export.export import external_data

pytestmark = pytest.mark.slow

GRAPHS = ["model.onnx", "model.plugin.onnx", "model.static.onnx", "model.static.plugin.onnx"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    out, triton = root / "out", root / "triton"
    code = main(["shapes_vit", "--external-data", "-q", "-o", str(out), "--parity-batches", "1",
                 "--bench-batches", "2", "--bench-runs", "1", "--bench-time", "0", "--static-schedule", "sample",
                 "--triton", str(triton), "--backends", "eager,ort,openvino"])
    assert code == 0
    return out, triton


def test_every_graph_is_written_with_its_side_file(run):
    out, _ = run
    report = json.loads((out / "report.json").read_text())
    for name in GRAPHS:
        assert name in report["artifacts"] and name + ".data" in report["artifacts"]
        graph = external_data.load(out / name)
        assert external_data.locations(graph) == [name + ".data"]  # each file its own: copy the pair, it works
    assert {p.name for p in out.iterdir()} == set(report["artifacts"])  # no baseline, no temporary graph
    assert report["status"] == "passed"
    for backend in ("ort_portable", "ort_plugin", "openvino", "ort_portable_static"):
        if backend.startswith("openvino") and backend in report["skipped"]:
            continue
        assert report["parity"][backend]["passed"], report["parity"][backend]["notes"]
    assert "2" in report["benchmark"]["latency"]["ort_baseline"]  # the baseline, read from its side file
    assert "model.plugin.onnx.data" in (out / "report.md").read_text()


def test_check_reads_side_files_and_catches_a_changed_weight(run, tmp_path):
    out, _ = run
    assert main(["check", str(out), "-q", "--backends", "ort"]) == 0
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    data = (copy / "model.onnx.data").read_bytes()
    spot = len(data) // 2
    (copy / "model.onnx.data").write_bytes(data[:spot] + bytes([data[spot] ^ 0x40]) + data[spot + 1:])
    assert main(["check", str(copy), "-q", "--backends", "ort"]) == 3


def test_check_names_a_missing_side_file(run, tmp_path, capsys):
    out, _ = run
    copy = tmp_path / "moved"
    shutil.copytree(out, copy)
    (copy / "model.plugin.onnx.data").unlink()
    assert main(["check", str(copy), "-q"]) == 2
    assert "model.plugin.onnx.data, which is not in" in capsys.readouterr().err


def test_triton_models_carry_their_side_files(run):
    import onnxruntime as ort

    from atm_export.serving.triton import check_repository

    out, triton = run
    assert check_repository(triton) == []
    version = triton / "atm_vit_onnx" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.onnx.data"]
    images = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    logits = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"images": images})[0]
              for path in (version / "model.onnx", out / "model.onnx")]
    np.testing.assert_array_equal(*logits)
    (version / "model.onnx.data").unlink()
    assert any("no side file model.onnx.data" in p for p in check_repository(triton))
    assert onnx.load(str(version / "model.onnx"), load_external_data=False).graph.node
