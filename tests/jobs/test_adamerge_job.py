"""AdaMerge end to end on the trained test model: calibrate, export with parity, check, eval,
and the settings' rules (one-line errors, exit 2)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tomllib

import onnx
import pytest
import torch

from atm_export.calibration import calibrate
from atm_export.cli import main
from atm_export.patch import patch_model
from atm_export.schedule import MergeConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def preset_file(shapes_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("calibrate") / "ada.toml"
    code = main(["calibrate", "shapes_vit", "--data", str(shapes_data["calib"]), "--limit", "96", "--batch-size", "32",
                 "--r-max", "12", "-q", "-o", str(path)])
    assert code == 0
    return path


@pytest.fixture(scope="module")
def run_dir(preset_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("adamerge") / "run"
    code = main(["shapes_vit", "--preset-file", str(preset_file), "-q", "-o", str(out), "--parity-batches", "1,3",
                 "--no-benchmark"])
    assert code == 0
    return out


def report_of(directory) -> dict:
    return json.loads((directory / "report.json").read_text())


def test_calibrate_writes_an_adamerge_preset_with_one_statistic_per_merging_block(preset_file):
    table = tomllib.loads(preset_file.read_text())["shapes_vit"]["presets"]["calibrated"]
    assert table["policy"] == "adamerge" and table["r_max"] == 12
    assert len(table["redundancy_mean"]) == len(table["redundancy_std"]) == 5  # 6 blocks, none in the last
    assert all(s > 0 for s in table["redundancy_std"])
    assert "96 images" in table["source"]


def test_calibration_standardises_each_block_on_its_images(shapes_vit, shapes_data):
    """Recomputing each block's redundancy with the calibrated model gives back the statistics:
    z-scores of mean 0 and spread 1 over the calibration images, block after block."""
    from atm_export.data import batches, open_folder

    folder = open_folder(shapes_data["calib"], limit=64)
    images = [b for b, _ in batches(folder, shapes_vit, 32)]
    config = calibrate(shapes_vit, MergeConfig(policy="adamerge", r_max=10), images, "test")
    model = patch_model(shapes_vit, config)
    rho = [[] for _ in range(5)]
    with torch.inference_mode():
        for batch in images:
            stats = model.run(batch)[1]
            for block in range(5):
                rho[block].extend(stats.redundancy_per_layer[block])
    for block in range(5):
        values = torch.tensor(rho[block], dtype=torch.float64)
        assert float(values.mean()) == pytest.approx(config.redundancy_mean[block], abs=1e-5)
        assert float(values.std(unbiased=False)) == pytest.approx(config.redundancy_std[block], rel=1e-4)
    assert sum(stats.r_per_layer) > 0, "the calibrated model merges"


def test_the_run_passes_parity_on_every_backend_and_names_policy_and_calibration(run_dir, preset_file):
    report = report_of(run_dir)
    params = report["settings"]["params"]
    assert params["policy"] == "adamerge" and params["r_max"] == [12]
    assert str(preset_file) in params["calibration_source"] and "atm-export calibrate" in params["calibration_source"]
    assert report["tokens"]["merged"][0] > 0, "the sample images make AdaMerge merge"
    parity = report["parity"]
    assert {"eager_atm", "ort_portable", "ort_plugin"} <= set(parity)
    assert all(parity[name]["status"] == "passed" for name in ("eager_atm", "ort_portable", "ort_plugin")), parity
    assert "policy: AdaMerge; calibration:" in (run_dir / "report.md").read_text()
    plugin = onnx.load(str(run_dir / "model.plugin.onnx"))
    node = next(n for n in plugin.graph.node if n.op_type == "TokenMerge")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["weighting"] == 1 and attrs["r_max"] == 12 and attrs["fixed_r"] == -1


def test_check_passes_and_catches_a_tampered_statistic(run_dir, tmp_path, capsys):
    assert main(["check", str(run_dir), "-q"]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    model = onnx.load(str(copy / "model.plugin.onnx"))
    node = [n for n in model.graph.node if n.op_type == "TokenMerge"][2]
    attr = next(a for a in node.attribute if a.name == "redundancy_mean")
    attr.CopyFrom(onnx.helper.make_attribute("redundancy_mean", attr.f + 0.2))
    onnx.save(model, str(copy / "model.plugin.onnx"))
    capsys.readouterr()
    assert main(["check", str(copy), "-q"]) == 3
    err = capsys.readouterr().err
    assert "TokenMerge_b3: redundancy_mean" in err, err


def test_check_preset_file_confirms_the_calibration(run_dir, preset_file, tmp_path):
    assert main(["check", str(run_dir), "-q", "--preset-file", str(preset_file)]) == 0
    other = tmp_path / "other.toml"
    table = tomllib.loads(preset_file.read_text())["shapes_vit"]["presets"]["calibrated"]
    other.write_text(preset_file.read_text().replace(repr(table["redundancy_std"][0]), repr(table["redundancy_std"][0] * 2)))
    assert main(["check", str(run_dir), "-q", "--preset-file", str(other)]) == 3


def test_without_a_preset_file_the_sample_images_calibrate_and_the_run_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["shapes_vit", "--policy", "adamerge", "--r-max", "8", "-o", str(out), "--no-benchmark",
                 "--parity-batches", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "calibrated on the sample images (8 images), not on your data" in captured.out + captured.err
    params = report_of(out)["settings"]["params"]
    assert params["calibration_source"].startswith("the sample images (8 images")
    assert params["r_max"] == [8] and len(params["redundancy_mean"]) == 5


def test_eval_reads_the_preset_file(preset_file, shapes_data, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "shapes_vit", "--data", str(shapes_data["val"]), "--preset-file", str(preset_file),
                 "--limit", "64", "-q", "-o", str(out)]) == 0
    results = json.loads((out / "eval.json").read_text())["results"]
    assert results[1]["params"]["policy"] == "adamerge" and results[1]["gflops"] < results[0]["gflops"]


@pytest.mark.parametrize("args, message", [
    (["--policy", "adamerge", "--preset", "lossless"], "preset lossless holds ATM thresholds"),
    (["--policy", "adamerge", "--alpha", "0.9"], "--alpha is not an AdaMerge setting"),
    (["--policy", "adamerge", "--r", "4"], "--r is not an AdaMerge setting"),
    (["--r-max", "4"], "--r-max applies only to AdaMerge"),
    (["--policy", "tome", "--r", "4", "--r-max", "4"], "only apply to the adamerge policy"),
    (["--policy", "adamerge", "--salience-temperature", "0"], "--salience-temperature"),
], ids=["atm-preset", "threshold", "r", "r-max-alone", "r-max-with-tome", "temperature"])
def test_settings_mistakes_are_one_line_errors(args, message, tmp_path, capsys):
    code = main(["shapes_vit", *args, "-o", str(tmp_path / "x"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_an_atm_preset_file_does_not_pass_for_adamerge(tmp_path, capsys):
    atm = tmp_path / "atm.toml"
    atm.write_text('[shapes_vit]\ntimm_name = "vit_tiny_patch16_224"\n\n[shapes_vit.presets.mine]\n'
                   'alpha = 0.99\nbeta = 0.02\ntheta_min = 0.9\n')
    code = main(["shapes_vit", "--policy", "adamerge", "--preset-file", str(atm), "-q", "-o", str(tmp_path / "x")])
    assert code == 2 and "holds ATM thresholds" in capsys.readouterr().err


def test_calibrate_refuses_too_few_images(shapes_data, tmp_path, capsys):
    code = main(["calibrate", "shapes_vit", "--data", str(shapes_data["flat"]), "--limit", "2", "--batch-size", "1",
                 "-q", "-o", str(tmp_path / "a.toml")])
    assert code == 0  # two images are enough to measure a spread
    code = main(["calibrate", "shapes_vit", "--data", str(shapes_data["flat"]), "--limit", "1", "-q",
                 "-o", str(tmp_path / "b.toml")])
    assert code == 2 and not (tmp_path / "b.toml").exists()


def test_a_config_round_trips_through_the_preset_file(tmp_path):
    from atm_export.preset_file import preset_file_text, read_preset_file
    from atm_export.registry import resolve_model

    entry = resolve_model("shapes_vit")
    config = MergeConfig(policy="adamerge", r_max=(4, 5, 6, 7, 8, 9), intensity_scale=1.5, salience_temperature=0.5,
                         redundancy_mean=(0.1, 0.2, 0.3, 0.4, 0.5), redundancy_std=(0.01, 0.02, 0.03, 0.04, 0.05))
    path = tmp_path / "p.toml"
    path.write_text(preset_file_text(entry, "mine", config, {}, "a test"))
    read = read_preset_file(path, entry)["mine"].config
    assert dataclasses.replace(read, calibration_source=None) == config
    assert read.calibration_source == f"{path} [mine]: a test"
