"""The command line, as a user runs it: reports, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atm_export.cli import main

# The core fields need no export: these runs skip ONNX (tests/jobs/test_check.py runs everything).
BASE = ["deit_t", "--random-init", "--quiet", "--no-onnx", "--no-benchmark"]


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_report_has_the_core_fields(tmp_path, capsys):
    code, out, _ = run_cli([*BASE, "--preset", "lossless", "-o", str(tmp_path / "o")], capsys)
    assert code == 0, out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    for key in ("schema_version", "status", "model", "settings", "weights", "flops", "tokens"):
        assert key in report
    assert report["model"]["name"] == "deit_t" and report["model"]["timm_name"] == "deit_tiny_patch16_224"
    params = report["settings"]["params"]
    assert params["alpha"] == 0.995 and len(params["thresholds"]) == 12
    assert report["weights"]["source"] == "random" and "RANDOM WEIGHTS" in report["warnings"][0]
    assert report["flops"]["baseline"] == pytest.approx(1.2556, abs=1e-4)
    assert report["flops"]["atm"] < report["flops"]["baseline"]
    assert len(report["tokens"]["mean"]) == 12 and report["tokens"]["mean"][0] == 197
    assert "RANDOM WEIGHTS" in (tmp_path / "o" / "report.md").read_text()
    leftovers = [p.name for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "no staging directory is left behind"


def test_user_images_and_explicit_settings(tmp_path, capsys):
    from atm_export.images import builtin_images

    images = tmp_path / "imgs"
    images.mkdir()
    for i, img in enumerate(builtin_images(3)):
        img.save(images / f"{i}.png")
    code, out, _ = run_cli([*BASE, "--images", str(images), "--policy", "tome", "--r", "4",
                            "-o", str(tmp_path / "o")], capsys)
    assert code == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["images"]["count"] == 3 and report["settings"]["preset"] is None
    assert report["tokens"]["mean"][:3] == [197, 193, 189]


def _report_settings(out_dir):
    """The report's settings section: preset, preset source, overrides, params."""
    report = json.loads((out_dir / "report.json").read_text())
    return report["settings"]


@pytest.mark.parametrize("args, params, overrides", [
    (["--alpha", "0.985"], {"alpha": 0.985, "beta": 0.025, "theta_min": 0.895, "split_layer": 9}, {"alpha": 0.985}),
    (["--split-layer", "6"], {"alpha": 0.995, "beta": 0.025, "theta_min": 0.895, "split_layer": 6}, {"split_layer": 6}),
    (["--preset", "fast", "--beta", "0.01"], {"alpha": 0.975, "beta": 0.01, "theta_min": 0.86}, {"beta": 0.01}),
])
def test_a_setting_overrides_one_field_of_the_preset(args, params, overrides, tmp_path, capsys):
    """Without --preset, a setting changes the lossless preset (deit_t: 0.995, 0.025, 0.895)."""
    code, out, err = run_cli([*BASE, *args, "-o", str(tmp_path / "o")], capsys)
    assert code == 0, err
    settings = _report_settings(tmp_path / "o")
    assert settings["preset"] == ("fast" if "fast" in args else "lossless")
    assert {k: settings["params"][k] for k in params} == params
    assert settings["overrides"] == overrides
    assert f"overrides: {', '.join(f'{k} = {v}' for k, v in overrides.items())}" in (tmp_path / "o" / "report.md").read_text()


def test_tome_records_no_preset(tmp_path, capsys):
    code, _, err = run_cli([*BASE, "--policy", "tome", "--r", "8", "-o", str(tmp_path / "o")], capsys)
    assert code == 0, err
    settings = _report_settings(tmp_path / "o")
    assert settings["preset"] is None and settings["params"]["policy"] == "tome" and settings["params"]["r"] == [8]
    if "overrides" in settings:
        assert settings["overrides"] == {"policy": "tome", "r": [8]}


def test_only_a_word_that_is_no_model_gets_the_command_hint(monkeypatch, capsys):
    """A model name close to a subcommand's name still goes to export; looking it up happens
    only for words close to a subcommand."""
    from atm_export import cli, registry

    exported, looked_up = [], []
    find_model = registry.find_model
    monkeypatch.setattr(registry, "find_model", lambda name: looked_up.append(name) or find_model(name))
    monkeypatch.setattr(cli.export_cmd, "callback", lambda model, **kw: exported.append(model))
    monkeypatch.setitem(cli.cli.commands, "deit_sx", cli.models_cmd)  # a command named like a model
    assert run_cli(["deit_s", "--random-init"], capsys)[0] == 0
    assert exported == ["deit_s"] and looked_up == ["deit_s"]
    code, _, err = run_cli(["deit_sy"], capsys)
    assert code == 2 and "did you mean 'deit_sx'?" in err
    looked_up.clear()
    assert run_cli(["models"], capsys)[0] == 0 and run_cli(["vit_t", "-q"], capsys)[0] == 0
    assert looked_up == []  # exact subcommands and words far from them: no lookup here


def test_existing_artifacts_need_force(tmp_path, capsys):
    out_dir = str(tmp_path / "o")
    assert run_cli([*BASE, "-o", out_dir], capsys)[0] == 0
    code, _, err = run_cli([*BASE, "-o", out_dir], capsys)
    assert code == 2 and "--force" in err
    assert run_cli([*BASE, "-o", out_dir, "--force"], capsys)[0] == 0


def _not_writable_dir(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere; a path under a file cannot be created by anyone
        blocker = tmp_path / "file"
        blocker.write_text("x")
        return str(blocker / "out")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return str(locked / "out")


@pytest.mark.parametrize("args, message", [
    (["deit_sm", "--random-init"], "did you mean deit_s"),
    (["resnet18", "--random-init", "--alpha", "0.9", "--beta", "0.04", "--theta-min", "0.88"], "not a supported ViT"),
    (["deit_t", "--random-init", "--preset", "turbo"], "has no preset 'turbo'"),
    (["deit_t", "--random-init", "--alpha", "1.5"], "alpha must be a similarity threshold in [0, 1]"),
    (["deit_t", "--random-init", "--theta-min", "-0.2"], "theta_min must be"),
    (["deit_t", "--random-init", "--policy", "tome", "--r", "-3"], "must not be negative"),
    (["deit_t", "--random-init", "--policy", "tome", "--r", "a,b"], "expected integers"),
    (["deit_t", "--random-init", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["deit_t", "--random-init", "--images", "/nonexistent-dir"], "not a directory"),
    (["deit_t", "--weights", "/nonexistent.pth"], "weights file not found"),
    (["deit_t", "--weights", "/nonexistent.pth", "--random-init"], "not both"),
    (["vit_base_patch16_384", "--random-init"], "has no presets"),
    (["vit_base_patch16_384", "--random-init", "--alpha", "0.9"], "give --beta, --theta-min too"),
    (["deit_t", "--random-init", "--r", "8"], "--r (a fixed merge count per block) needs --policy tome"),
    (["deit_t", "--random-init", "--policy", "atm", "--r", "8"], "needs --policy tome"),
    (["deit_t", "--random-init", "--policy", "tome", "--r", "8", "--alpha", "0.9"], "--alpha is an ATM threshold"),
    (["deit_t", "--random-init", "--policy", "none", "--theta-min", "0.9"], "which --policy none would ignore"),
    (["deit_t", "--random-init", "--policy", "tome"], "--policy tome needs --r"),
    (["deit_t", "--random-init", "--preset", "fast", "--policy", "tome", "--r", "8"], "drop --preset fast"),
    (["deit_t", "--random-init", "--split-layer", "13"], "split_layer must be in [0, 12], got 13"),
    (["chek", "/tmp/x"], "unknown command 'chek'; did you mean 'check'?"),
    (["modles"], "unknown command 'modles'; did you mean 'models'?"),
    (["deit_t", "--random-init", "--opset", "13"], "--opset 13 is too old"),
    (["deit_t", "--random-init", "--policy", "atm-per-image"], "atm-per-image"),
    (["deit_t", "--random-init", "--bench-batches", "0"], "batch sizes of at least 1"),
    (["deit_t", "--random-init", "--bench-schedule", "gflops:x"], "expected gflops:<number>"),
    (["deit_t", "--random-init", "--atol", "-1"], "--atol"),
    (["deit_t", "--random-init", "--visualize", "--visualize-blocks", "12"], "[12]: those blocks do not merge"),
    (["deit_t", "--random-init", "--visualize", "--policy", "none"], "merge in no block"),
    (["deit_t", "--random-init", "--backends", "ort,onnxruntime"], "unknown backend 'onnxruntime' in --backends"),
    (["deit_t", "--random-init", "--openvino-threads", "0"], "--openvino-threads"),
])
def test_bad_input_is_one_line_and_nonzero(args, message, tmp_path, capsys):
    code, _, err = run_cli([*args, "-q", "-o", str(tmp_path / "o")], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("atm-export: error:") and message in lines[0], err
    assert not (tmp_path / "o").exists(), "a failed run leaves no output directory behind"


def _float_image(path, values):
    """A single-channel float32 TIFF: the kind of file that can hold NaN or inf pixels."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.asarray(values, np.float32), mode="F").save(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_image_with_non_finite_pixels_is_refused_by_name(tmp_path, capsys, bad):
    import numpy as np

    from atm_export.images import builtin_images

    images = tmp_path / "imgs"
    images.mkdir()
    builtin_images(1)[0].save(images / "a.png")
    values = np.full((64, 64), 0.5)
    values[10:20, 10:20] = bad
    _float_image(images / "b_broken.tif", values)
    code, _, err = run_cli([*BASE, "--images", str(images), "-o", str(tmp_path / "o")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "b_broken.tif" in lines[0] and "non-finite" in lines[0], err
    assert not (tmp_path / "o").exists()


def test_non_finite_pixels_after_preprocessing_are_refused_by_name(tmp_path):
    """A broken data config (an infinite mean) turns every image into inf."""
    import timm

    from atm_export.errors import UserError
    from atm_export.images import builtin_images
    from atm_export.jobs.common import sample_batch

    images = tmp_path / "imgs"
    images.mkdir()
    for i, img in enumerate(builtin_images(2)):
        img.save(images / f"scene{i}.png")
    model = timm.create_model("test_vit", pretrained_cfg_overlay={"mean": (float("inf"),) * 3})
    with pytest.raises(UserError, match=r"scene0.png \(and 1 more\) yields non-finite pixel values"):
        sample_batch(model, str(images), 2)


def test_unwritable_output_directory(tmp_path, capsys):
    code, _, err = run_cli([*BASE, "-o", _not_writable_dir(tmp_path)], capsys)
    assert code == 2 and "cannot write to output directory" in err and len(err.strip().splitlines()) == 1


def test_console_script_exit_status(tmp_path):
    """The installed entry point (not just main()) returns the status and prints no traceback."""
    proc = subprocess.run([sys.executable, "-m", "atm_export.cli", "deit_sm"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "did you mean" in proc.stderr


def test_models_command_lists_presets(capsys):
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0 and "deit_s" in out and "lossless" in out


def test_build_plugin_without_tensorrt_names_the_fix(capsys):
    """Here nvcc and CMake exist but TensorRT does not: the kernels build, the plugin cannot."""
    import shutil

    if not (shutil.which("cmake") and (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists())):
        pytest.skip("nvcc or cmake not installed")
    code, out, _ = run_cli(["build-plugin", "--kernels-only"], capsys)
    assert code == 0 and "libatm_token_merge_kernels.so" in out
    from atm_export.backends.tensorrt import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("TensorRT is installed here: the plugin would build")
    code, _, err = run_cli(["build-plugin"], capsys)
    assert code == 2 and "TENSORRT_ROOT" in err and len(err.strip().splitlines()) == 1


def test_visualize_draws_merge_maps_after_the_chosen_blocks(tmp_path, capsys):
    from PIL import Image

    code, _, err = run_cli([*BASE, "--visualize", "--visualize-blocks", "2,9", "-o", str(tmp_path / "o")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["pictures"] == ["tokens.png", "merge_maps.png"]
    with Image.open(tmp_path / "o" / "merge_maps.png") as img:
        assert img.width > 300 and img.height > 8 * 100  # a row per sample image
    assert "![Merge maps](merge_maps.png)" in (tmp_path / "o" / "report.md").read_text()


def test_backends_that_cannot_run_here_are_a_mistake_when_asked_for_by_name(tmp_path, capsys):
    from atm_export.backends import runtime_unavailable

    reason = runtime_unavailable("tensorrt")
    if reason is None:
        pytest.skip("TensorRT runs here: asking for it is no mistake")
    code, _, err = run_cli(["deit_t", "--random-init", "--backends", "tensorrt", "-q", "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and err.strip() == f"atm-export: error: --backends tensorrt: {reason}"
    assert not (tmp_path / "o").exists()


def test_backends_option_leaves_backends_out_of_a_run(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run_cli(["deit_t", "--random-init", "-q", "--no-benchmark", "--parity-batches", "2",
                            "--backends=-openvino,-ort_plugin", "-o", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert set(report["parity"]) == {"eager_atm", "ort_portable"}
    assert report["skipped"]["openvino"] == report["skipped"]["ort_plugin"] == "left out by --backends"


def test_an_unexpected_failure_is_one_line_naming_the_step_and_its_traceback(tmp_path, capsys, monkeypatch):
    """A bug or a runtime's crash (not a user mistake): exit 1, one line with the step and where
    the full traceback is, and no artifact in the output directory."""
    import atm_export.export.onnx as onnx_export

    def crash(*args, **kwargs):
        raise RuntimeError("the exporter crashed\nsecond line")

    monkeypatch.setattr(onnx_export, "export_plugin_flavour", crash)
    out = tmp_path / "o"
    code, _, err = run_cli(["deit_t", "--random-init", "-q", "--no-benchmark", "-o", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("atm-export: failed while exporting model.plugin.onnx (one TokenMerge node per merge "
                               "step): RuntimeError: the exporter crashed (full traceback: ")
    log = Path(lines[0].rsplit("(full traceback: ", 1)[1].rstrip(")"))
    assert log.parent.parent == out and "Traceback" in log.read_text() and "second line" in log.read_text()
    assert [p.name for p in out.iterdir()] == [log.parent.name]  # the hidden staging directory only


def test_an_unexpected_failure_without_an_output_directory_saves_its_traceback_elsewhere(tmp_path, capsys, monkeypatch):
    import atm_export.jobs.check as check

    monkeypatch.setattr(check, "read_report", lambda directory: (_ for _ in ()).throw(OSError(5, "I/O error")))
    code, _, err = run_cli(["check", str(tmp_path)], capsys)
    assert code == 1 and err.count("\n") == 1 and "OSError: [Errno 5] I/O error (full traceback: " in err
    log = Path(err.strip().rsplit("(full traceback: ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()
    log.unlink()
