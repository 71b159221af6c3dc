"""`atm-export tune`, its preset file in the main command, eval and check, and the accuracy gate of `check`."""

from __future__ import annotations

import json
import tomllib

import pytest

from atm_export.cli import main
from atm_export.report.accuracy import GateResult, TuneReport
from atm_export.report.model import load_section

pytestmark = pytest.mark.slow

# A grid smaller than the default, to keep CI short; it still spans the paper's ranges.
GRID = ["--alphas", "0.975,1.0", "--betas", "0.015,0.05", "--theta-mins", "0.8,0.945", "--split-layers", "3,4,6"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, shapes_data):
    out = tmp_path_factory.mktemp("tune") / "tuned.toml"
    code = main(["tune", "shapes_vit", "-q", "--data", str(shapes_data["calib"]), "--holdout-data", str(shapes_data["val"]),
                 "--min-agreement", "0.98", "--batch-size", "32", "-o", str(out), *GRID])
    assert code == 0
    return out


def test_tune_meets_its_target_on_held_out_images_with_fewer_gflops(tuned):
    report = load_section(TuneReport, json.loads(tuned.with_suffix(".json").read_text()))
    assert report.chosen is not None and report.chosen.agreement >= 0.98
    held, base = report.chosen_held_out, report.unmerged_held_out
    assert held.images == 320 and held.agreement >= 0.98 and report.met_on_held_out
    # merging happened: fewer tokens, and fewer GFLOPs than the class-token-only last block alone saves
    assert held.tokens[-1] < 50 and held.gflops < 0.8 * base.gflops
    assert report.rungs[0]["candidates"] > report.rungs[-1]["candidates"]
    assert report.rungs[-1]["images"] == 480
    assert [r.gflops for r in report.front] == sorted(r.gflops for r in report.front)
    assert tuned.with_suffix(".png").is_file()


def test_the_preset_file_is_in_the_registry_format(tuned):
    data = tomllib.loads(tuned.read_text())
    preset = data["shapes_vit"]["presets"]["tuned"]
    assert data["shapes_vit"]["timm_name"] == "vit_tiny_patch16_224"
    assert {"alpha", "beta", "theta_min", "split_layer", "gflops", "agreement", "source"} <= set(preset)
    assert "held-out 320 images" in preset["source"]


def test_a_target_gflops_is_met_with_the_best_agreement(tmp_path, shapes_data):
    out = tmp_path / "g.toml"
    assert main(["tune", "shapes_vit", "-q", "--data", str(shapes_data["calib"]), "--target-gflops", "0.06",
                 "--batch-size", "32", "-o", str(out), *GRID]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["chosen"]["gflops"] <= 0.06
    better = [r for r in report["front"] if r["gflops"] <= 0.06 and r["agreement"] > report["chosen"]["agreement"]]
    assert not better
    assert report["held_out"]["images"] == 96  # 20 % of --data, never seen by the search


def test_an_unreachable_target_exits_3_and_writes_no_preset(tmp_path, shapes_data, capsys):
    out = tmp_path / "none.toml"
    code = main(["tune", "shapes_vit", "-q", "--data", str(shapes_data["calib"]), "--target-gflops", "0.001",
                 "--batch-size", "64", "-o", str(out), *GRID])
    assert code == 3 and "no setting meets the target" in capsys.readouterr().err
    assert not out.exists() and out.with_suffix(".json").is_file()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tuned):
    out = tmp_path_factory.mktemp("art") / "tuned"
    assert main(["shapes_vit", "-q", "--preset-file", str(tuned), "--no-benchmark", "-o", str(out)]) == 0
    return out


def test_the_main_command_eval_and_check_take_the_preset_file(tmp_path, tuned, exported, shapes_data):
    preset = tomllib.loads(tuned.read_text())["shapes_vit"]["presets"]["tuned"]
    report = json.loads((exported / "report.json").read_text())
    assert report["settings"]["preset"] == "tuned" and report["settings"]["params"]["alpha"] == preset["alpha"]
    assert main(["eval", "shapes_vit", "-q", "--data", str(shapes_data["flat"]), "--preset-file", str(tuned),
                 "-o", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["results"][1]["name"] == "tuned"
    assert main(["check", str(exported), "-q", "--preset-file", str(tuned)]) == 0


def test_check_refuses_artifacts_made_with_another_preset(tmp_path, tuned, capsys):
    other = tmp_path / "lossless"
    assert main(["shapes_vit", "-q", "--no-benchmark", "-o", str(other)]) == 0
    assert main(["check", str(other), "-q", "--preset-file", str(tuned)]) == 3
    assert "the artifacts were made with" in capsys.readouterr().err


def test_the_gate_passes_and_writes_its_figures(exported, shapes_data, tmp_path):
    gate_file = tmp_path / "gate.json"
    code = main(["check", str(exported), "-q", "--data", str(shapes_data["val"]), "--min-agreement", "0.97",
                 "--max-top1-drop", "1.5", "--gate-output", str(gate_file)])
    assert code == 0
    gate = load_section(GateResult, json.loads(gate_file.read_text()))
    assert gate.status == "passed" and gate.merged.agreement >= 0.97 and gate.merged.images == 320
    assert gate.merged.gflops < gate.unmerged.gflops


def test_the_gate_fails_when_merging_costs_too_much(tmp_path, shapes_data, capsys):
    """Artifacts made with thresholds far below the paper's: the gate must catch the loss."""
    art = tmp_path / "aggressive"
    assert main(["shapes_vit", "-q", "--no-benchmark", "-o", str(art), "--alpha", "0.5", "--beta", "0.0",
                 "--theta-min", "0.5"]) == 0
    code = main(["check", str(art), "-q", "--data", str(shapes_data["val"]), "--min-agreement", "0.98"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and err.startswith("atm-export: accuracy: agreement") and "\n" not in err
    gate = json.loads((art / "accuracy_gate.json").read_text())
    assert gate["status"] == "failed" and gate["failures"]
    code = main(["check", str(art), "-q", "--data", str(shapes_data["val"]), "--max-top1-drop", "0.5"])
    assert code == 3 and "top-1 drops" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--min-agreement", "0.9"], "add --data"),
    (["--data", "FLAT", "--max-top1-drop", "1"], "needs labelled images"),
    (["--data", "FLAT"], "needs a limit"),
    (["--preset", "tuned"], "--preset needs --preset-file"),
])
def test_gate_mistakes_are_one_line_errors(exported, shapes_data, capsys, args, message):
    args = [str(shapes_data["flat"]) if a == "FLAT" else a for a in args]
    assert main(["check", str(exported), "-q", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
