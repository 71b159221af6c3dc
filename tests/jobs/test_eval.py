"""`atm-export eval` end to end on the trained test model and generated images, as a user types it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from atm_export.cli import main
from atm_export.report.accuracy import EvalReport
from atm_export.report.model import load_section

pytestmark = pytest.mark.slow


def _eval(tmp_path, *args, name="out"):
    out = tmp_path / name
    code = main(["eval", "shapes_vit", "-q", "-o", str(out), *args])
    return code, out


def _plain_top1(vit, folder) -> float:
    """The unmerged model's top-1 computed without atm-export's data pipeline."""
    correct = total = 0
    for cls in sorted(p for p in folder.iterdir()):
        files = sorted(cls.glob("*.png"))
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                         for f in files]) / 255.0
        with torch.no_grad():
            predicted = vit((x - 0.5) / 0.5).argmax(1)
        correct += int((predicted == int(cls.name.split("_")[0])).sum())
        total += len(files)
    return 100.0 * correct / total


def test_eval_reports_every_figure_for_each_setting(tmp_path, shapes_data, shapes_vit):
    code, out = _eval(tmp_path, "--data", str(shapes_data["val"]), "--preset", "lossless,fast", "--policy", "atm",
                      "--batch-size", "64")
    assert code == 0
    report = load_section(EvalReport, json.loads((out / "eval.json").read_text()))
    names = [r.name for r in report.results]
    assert names == ["unmerged", "lossless + policy=atm", "fast + policy=atm"]
    base, lossless, fast = report.results
    assert base.top1 == pytest.approx(_plain_top1(shapes_vit, shapes_data["val"]))
    assert base.top1 >= 90.0 and base.agreement == 1.0 and base.top1_drop is None
    for r in (lossless, fast):
        assert r.batch_size == 64 and r.images == 320 and r.gflops < base.gflops and 0.9 <= r.agreement <= 1.0
        assert r.top1_drop == pytest.approx(base.top1 - r.top1, abs=1e-3) and r.top5 >= r.top1
        assert len(r.tokens) == 6 and r.tokens[0] == 65 and r.params["thresholds"]
    assert fast.gflops < lossless.gflops
    assert report.data["labelled"] and report.data["classes"] == 8 and report.batch_size == 64
    assert (out / "eval.png").is_file() and "![GFLOPs against accuracy](eval.png)" in (out / "eval.md").read_text()


def test_merging_off_agrees_exactly_and_one_setting_draws_no_plot(tmp_path, shapes_data):
    code, out = _eval(tmp_path, "--data", str(shapes_data["val"]), "--policy", "none", "--limit", "100")
    assert code == 0
    base, none = json.loads((out / "eval.json").read_text())["results"]
    assert none["name"] == "none" and none["agreement"] == 1.0 and none["top1"] == base["top1"]
    assert none["images"] == 100 and none["tokens"] == base["tokens"] and none["gflops"] < base["gflops"]
    assert not (out / "eval.png").exists()


def test_a_flat_folder_gives_agreement_without_accuracy(tmp_path, shapes_data):
    code, out = _eval(tmp_path, "--data", str(shapes_data["flat"]))
    assert code == 0
    base, lossless = json.loads((out / "eval.json").read_text())["results"]
    assert base["top1"] is None and lossless["top1"] is None and lossless["agreement"] > 0.5
    assert "top-1" not in (out / "eval.md").read_text()


def test_batch_size_changes_the_figures_and_is_recorded(tmp_path, shapes_data):
    figures = {}
    for batch in ("1", "160"):
        code, out = _eval(tmp_path, "--data", str(shapes_data["val"]), "--preset", "fast", "--batch-size", batch,
                          "--limit", "160", name=f"b{batch}")
        assert code == 0
        merged = json.loads((out / "eval.json").read_text())["results"][1]
        figures[batch] = (merged["batch_size"], merged["gflops"])
    assert figures["1"][0] == 1 and figures["160"][0] == 160
    assert figures["1"][1] != figures["160"][1]  # one merge count per batch: the batch matters


def test_an_exported_artifact_evaluates_like_eager(tmp_path, shapes_data):
    """Within close calls: a similarity within float rounding of a threshold may change a batch's
    merge count in one backend and not the other (docs/parity.md), so counts may differ by one."""
    art = tmp_path / "art"
    assert main(["shapes_vit", "-q", "--no-benchmark", "-o", str(art)]) == 0
    common = ["--data", str(shapes_data["val"]), "--batch-size", "32"]
    eager = json.loads(_eval(tmp_path, *common, name="e")[1].joinpath("eval.json").read_text())["results"][1]
    for backend in ("ort_portable", "ort_plugin", "openvino"):
        code, out = _eval(tmp_path, *common, "--backend", backend, "--artifacts", str(art), name=backend)
        assert code == 0
        merged = json.loads((out / "eval.json").read_text())["results"][1]
        assert merged["backend"] == backend and merged["params"] == eager["params"]
        assert merged["agreement"] == pytest.approx(eager["agreement"], abs=0.01)
        assert merged["top1"] == pytest.approx(eager["top1"], abs=1.0)
        assert merged["gflops"] == pytest.approx(eager["gflops"], rel=0.01)
        assert np.allclose(merged["tokens"], eager["tokens"], atol=0.2)


@pytest.mark.parametrize("case, message", [
    ("empty", "--data: no images"),
    ("classes", "has 3 class folders"),
    ("unreadable", "cannot read"),
    ("preset_file", "--preset-file"),
    ("backend_settings", "evaluates the artifacts as exported"),
])
def test_mistakes_are_one_line_errors(tmp_path, shapes_data, capsys, case, message):
    data = tmp_path / "data"
    data.mkdir()
    args = ["--data", str(data)]
    if case == "classes":
        for name in "abc":
            (data / name).mkdir()
            Image.new("RGB", (64, 64)).save(data / name / "x.png")
    if case == "unreadable":
        (data / "x.png").write_bytes(b"garbage")
    if case == "preset_file":
        bad = tmp_path / "p.toml"
        bad.write_text("[shapes_vit\nalpha = ")
        args = ["--data", str(shapes_data["flat"]), "--preset-file", str(bad)]
    if case == "backend_settings":
        args = ["--data", str(shapes_data["flat"]), "--backend", "ort_portable", "--alpha", "0.9"]
    code, out = _eval(tmp_path, *args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("atm-export: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_the_cli_offers_every_backend_that_can_evaluate_an_artifact():
    """The CLI spells the choices out (importing the backends would slow every command's start);
    they must stay those evaluate knows."""
    from atm_export.cli import eval_cmd
    from atm_export.jobs.evaluate import EAGER, EXPORTED_BACKENDS

    option = next(p for p in eval_cmd.params if p.name == "backend")
    assert list(option.type.choices) == [EAGER, *EXPORTED_BACKENDS]
