"""The main command end to end, and `atm-export check` (the parity check for users' CI).

One full run (export, parity, benchmark with a replayed schedule) is shared by the tests; the
check command is then run on its artifacts as they are, tampered with, corrupt and foreign.
"""

from __future__ import annotations

import json
import shutil

import jsonschema
import numpy as np
import onnx
import pytest

from atm_export.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "deit_t"
    code = main(["deit_t", "--random-init", "-q", "-o", str(out), "--parity-batches", "1,3",
                 "--bench-batches", "2", "--bench-runs", "1", "--bench-time", "0", "--bench-schedule", "gflops:0.9"])
    assert code == 0
    return out


def test_the_run_writes_every_artifact_and_field(run_dir):
    from atm_export.backends.tensorrt import unavailable_reason
    from atm_export.report.model import json_schema, load_report

    pictures = ["tokens.png", "latency.png"]
    report = json.loads((run_dir / "report.json").read_text())
    jsonschema.validate(report, json_schema())
    load_report(report)
    engine = [] if unavailable_reason() else ["model.engine"]
    assert report["artifacts"] == ["model.onnx", "model.plugin.onnx", *engine, "report.json", "report.md", *pictures]
    assert {p.name for p in run_dir.iterdir()} == set(report["artifacts"])
    assert report["status"] == "passed" and report["schema_version"] == 1
    assert report["settings"]["preset"] == "lossless" and report["settings"]["overrides"] == {}
    merged = ["eager_atm", "ort_portable", "ort_plugin"] + (["tensorrt"] if engine else [])
    for backend in merged:
        entry = report["parity"][backend]
        assert entry["passed"], entry["notes"]
        assert set(entry["batches"]) == {"8", "1", "3"}
        assert entry["precision"] == "fp32"
        assert (entry["tolerance"]["atol"], entry["tolerance"]["rtol"]) == (1e-5, 1e-4)
        assert "atol + rtol * |b|" in entry["tolerance"]["rule"]
    if not engine:
        assert "TensorRT not installed" in report["skipped"]["tensorrt"] or "CUDA" in report["skipped"]["tensorrt"]
    openvino = [n for n in ("openvino", "openvino_bf16", "openvino_fp16") if n in report["parity"]]
    for name in ("openvino", "openvino_bf16", "openvino_fp16"):  # each joins, or is skipped with the reason
        assert (name in openvino) != (name in report["skipped"]), name
    assert "openvino" in openvino, report["skipped"].get("openvino")  # CI installs atm-export[openvino]
    assert report["parity"]["openvino"]["passed"] and report["parity"]["openvino"]["precision"] == "fp32"
    for name in openvino[1:]:  # reduced precision: judged at it, never failing the run
        entry = report["parity"][name]
        assert entry["precision"] == name.split("_")[1] and not entry["fails_run"], entry["notes"]
    steps = {s["title"].split(" (")[0]: s for s in report["steps"]}  # every step but the report's own
    assert "exporting model.plugin.onnx" in steps and "writing the report and its pictures" not in steps
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in steps.values())
    bench = report["benchmark"]
    for name in openvino:
        assert set(bench["latency"][name]) == set(bench["latency"][f"{name}_baseline"]) == {"2"}
        assert 0.0 < bench["merge_share"][name] < 1.0
        assert bench["speedup_over_flops_ratio"][name] > 0
    for backend in ("eager_baseline", "eager_atm", "ort_baseline", "ort_portable", "ort_plugin"):
        assert set(bench["latency"][backend]["2"]) == {"p50", "p90", "p99", "mean", "std", "spread", "throughput",
                                                      "runs", "noisy"}
    schedule = bench["schedule"]
    assert schedule["gflops"] == pytest.approx(0.9, abs=0.03) and len(schedule["tokens_per_layer"]) == 12
    assert 0.0 <= bench["merge_share"]["ort_portable"] < 1.0 and 0.0 < bench["merge_share"]["eager_atm"] < 1.0
    assert set(bench["speedup"]) == {"eager_atm", "ort_portable", "ort_plugin", *openvino}
    assert bench["flops_ratio"] == pytest.approx(report["flops"]["baseline"] / schedule["gflops"], rel=1e-3)


def test_report_md_renders_every_table_and_shows_its_pictures(run_dir):
    md = (run_dir / "report.md").read_text()
    for heading in ("## Parity against eager PyTorch", "## Latency", "## Legend", "## FLOPs and tokens"):
        assert heading in md
    assert "RANDOM WEIGHTS" in md and "![Tokens entering each block](tokens.png)" in md and "(latency.png)" in md
    lines = md.splitlines()
    tables = 0
    for i, line in enumerate(lines):  # every table: a header, a rule of as many cells, rows of as many cells
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            tables += 1
            width = line.count("|")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].count("|") == width, (line, lines[j])
                j += 1
            assert j == len(lines) or lines[j] == "", f"a table must end with a blank line: {lines[j]!r}"
    assert tables >= 3
    assert not any("e-0" in cell for line in lines if line.startswith("| eager") for cell in line.split("|")[5:6])


def test_check_passes_on_untouched_artifacts(run_dir, capsys):
    assert main(["check", str(run_dir), "-q"]) == 0
    out = capsys.readouterr().out
    assert "artifacts match their report; parity ort_portable passed, ort_plugin passed, openvino passed" in out
    assert main(["check", str(run_dir), "-q", "--strict-parity"]) == 0


def test_check_tolerances_come_from_its_options(run_dir, capsys):
    """Nothing is bit-exact across runtimes, so zero tolerances fail; generous ones pass (on ONNX
    Runtime alone: --backends chooses what check runs)."""
    assert main(["check", str(run_dir), "-q", "--backends", "ort", "--atol", "0", "--rtol", "0"]) == 3
    assert "disagree with eager PyTorch" in capsys.readouterr().err
    assert main(["check", str(run_dir), "-q", "--backends", "ort", "--atol", "1e-3", "--rtol", "1e-3"]) == 0
    assert "parity ort_portable passed, ort_plugin passed\n" in capsys.readouterr().out


def _copy(run_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run_dir, target)
    return target


# ---- mutations: each must make `check` exit 3 -----------------------------------------------

def _merge_nodes(model):
    return [n for n in model.graph.node if n.op_type == "TokenMerge"]


def _set_attribute(node, name, value):
    attr = next(a for a in node.attribute if a.name == name)
    attr.CopyFrom(onnx.helper.make_attribute(name, value))


def every_threshold(value):
    def tamper(model):
        for node in _merge_nodes(model):
            _set_attribute(node, "threshold", value)
    return tamper


def one_attribute(name, value, index=3):
    def tamper(model):
        _set_attribute(_merge_nodes(model)[index], name, value)
    return tamper


def head_weight(model):
    """Noise on the classifier's weight. (A constant added to every entry would change nothing:
    the features entering the head come out of a LayerNorm, so they sum to zero.)"""
    head = next(t for t in model.graph.initializer if "head" in t.name and "weight" in t.name)
    values = onnx.numpy_helper.to_array(head)
    values = values + np.random.default_rng(0).normal(0.0, 0.05, values.shape).astype(values.dtype)
    head.CopyFrom(onnx.numpy_helper.from_array(values, head.name))


def lowered_threshold(model):
    """The constant a lowered step compares its similarities with (block 2's), set to 0.5."""
    greater = next(n for n in model.graph.node if n.name.startswith("TokenMerge_b2/Greater"))
    const = next(t for t in model.graph.initializer if t.name == greater.input[1])
    const.CopyFrom(onnx.numpy_helper.from_array(np.array(0.5, np.float32), const.name))


@pytest.mark.parametrize("artifact, tamper, message", [
    ("model.plugin.onnx", every_threshold(0.5), "TokenMerge_b1: threshold is 0.5"),
    ("model.plugin.onnx", every_threshold(1.0), "TokenMerge_b1: threshold is 1"),  # merges nothing
    ("model.plugin.onnx", one_attribute("split_mode", 1), "TokenMerge_b4: split_mode is 1 (size)"),
    ("model.plugin.onnx", one_attribute("fixed_r", 3), "TokenMerge_b4: fixed_r is 3"),
    ("model.plugin.onnx", one_attribute("num_protected", 2), "TokenMerge_b4: num_protected is 2"),
    ("model.plugin.onnx", head_weight, "model.onnx is not model.plugin.onnx with its merge steps lowered"),
    ("model.onnx", head_weight, "model.onnx is not model.plugin.onnx with its merge steps lowered"),
    ("model.onnx", lowered_threshold, "model.onnx is not model.plugin.onnx with its merge steps lowered"),
], ids=["thresholds-0.5", "thresholds-1.0", "split", "r", "protected", "plugin-weight", "portable-weight",
        "portable-threshold"])
def test_check_fails_on_a_tampered_model(run_dir, tmp_path, capsys, artifact, tamper, message):
    copy = _copy(run_dir, tmp_path)
    model = onnx.load(str(copy / artifact))
    tamper(model)
    onnx.save(model, str(copy / artifact))
    code = main(["check", str(copy), "-q", "--strict-parity"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "check failed" in err[0] and message in err[0], err


def test_check_fails_on_the_same_weight_changed_in_both_files(run_dir, tmp_path, capsys):
    """Consistent tampering passes the structural checks; parity against eager catches it."""
    copy = _copy(run_dir, tmp_path)
    for artifact in ("model.plugin.onnx", "model.onnx"):
        model = onnx.load(str(copy / artifact))
        head_weight(model)
        onnx.save(model, str(copy / artifact))
    code = main(["check", str(copy), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "disagree with eager PyTorch" in err[0], err


def _edit_report(copy, edit):
    report = json.loads((copy / "report.json").read_text())
    edit(report)
    (copy / "report.json").write_text(json.dumps(report))


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["flops"].update(atm=r["flops"]["atm"] * 0.8), "flops.atm is"),
    (lambda r: r["flops"].update(reduction=0.5), "flops.reduction is"),
    (lambda r: r["tokens"].update(mean=[r["tokens"]["mean"][0]] + [t - 5 for t in r["tokens"]["mean"][1:]]),
     "report.json's tokens"),
    (lambda r: r["tokens"].update(merged=[v + 1 for v in r["tokens"]["merged"]]), "tokens.merged"),
    (lambda r: r["settings"]["params"].update(thresholds=[0.5] * 12), "params.thresholds"),
], ids=["gflops", "reduction", "tokens", "r", "report-thresholds"])
def test_check_fails_on_faked_report_figures(run_dir, tmp_path, capsys, edit, message):
    copy = _copy(run_dir, tmp_path)
    _edit_report(copy, edit)
    code = main(["check", str(copy), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and message in err[0], err


def test_a_report_that_breaks_its_schema_is_refused(run_dir, tmp_path, capsys):
    copy = _copy(run_dir, tmp_path)
    _edit_report(copy, lambda r: r.update(flops=1.0))
    assert main(["check", str(copy), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a report this atm-export can check" in err[0] and "report.flops" in err[0], err


def test_a_changed_setting_in_the_report_is_caught_by_the_graph(run_dir, tmp_path, capsys):
    """alpha edited in report.json (and the thresholds it gives, consistently): the graph's
    TokenMerge nodes still carry the old thresholds."""
    from atm_export.schedule import MergeConfig

    def edit(report):
        params = report["settings"]["params"]
        params["alpha"] = 0.95
        params["thresholds"] = MergeConfig(alpha=0.95, beta=params["beta"], theta_min=params["theta_min"]).to_dict(12)["thresholds"]

    copy = _copy(run_dir, tmp_path)
    _edit_report(copy, edit)
    assert main(["check", str(copy), "-q"]) == 3
    assert "TokenMerge_b1: threshold is" in capsys.readouterr().err


# ---- the numerical layers catch attribute tampering on their own ------------------------------

@pytest.fixture(scope="module")
def eager_reference(run_dir):
    from atm_export.jobs.check import config_from_report, read_report, rebuild_model
    from atm_export.jobs.common import sample_batch
    from atm_export.parity import reference_run
    from atm_export.patch import patch_model

    report = read_report(run_dir)
    vit = rebuild_model(report, None)
    atm = patch_model(vit, config_from_report(report.settings.params))
    batch, _ = sample_batch(vit, None, report.images["count"])
    return reference_run(atm, batch[:3])


@pytest.mark.parametrize("tamper", [every_threshold(0.5), every_threshold(1.0), one_attribute("split_mode", 1)],
                         ids=["thresholds-0.5", "thresholds-1.0", "split"])
def test_replay_reads_the_node_attributes(run_dir, eager_reference, tamper):
    """The replay re-applies eager's choices, so its logits match whatever the attributes say;
    it must still fail, because each node's own decision on eager's inputs is not eager's."""
    from atm_export.backends.ort import OrtRunner
    from atm_export.parity import FAILED, PASSED, replay_check

    def replaying(model):
        return lambda plans: OrtRunner(model, "ort_plugin", plugin=True, replay=plans)

    model = onnx.load(str(run_dir / "model.plugin.onnx"))
    assert replay_check(replaying(model), eager_reference)["status"] == PASSED
    tamper(model)
    result = replay_check(replaying(model), eager_reference)
    assert result["status"] == FAILED and "its attributes do not give eager's step" in result["note"], result


def test_lowering_check_catches_a_tampered_lowered_threshold(run_dir, eager_reference):
    from atm_export.parity import FAILED, PASSED, lowering_check

    plugin = onnx.load(str(run_dir / "model.plugin.onnx"))
    portable = onnx.load(str(run_dir / "model.onnx"))
    assert lowering_check(portable, plugin, eager_reference)["status"] == PASSED
    lowered_threshold(portable)
    result = lowering_check(portable, plugin, eager_reference)
    assert result["status"] == FAILED and 2 in result["choices_differ_in_blocks"], result


def _as_version_1(path):
    """What atm-export 0.1 wrote: no token_merge_version in the metadata."""
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != "atm_export.token_merge_version"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(path))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.onnx").write_bytes(b"\x00garbage" * 10), "is not a valid ONNX file"),
    (lambda d: onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(d / "model.onnx")),
     "was not written by atm-export"),
    (lambda d: (d / "report.json").unlink(), "no report.json"),
    (lambda d: (d / "model.plugin.onnx").unlink(), "is missing"),
    (lambda d: _as_version_1(d / "model.plugin.onnx"), "with TokenMerge version 1 (another split convention)"),
])
def test_check_refuses_corrupt_or_foreign_files(run_dir, tmp_path, capsys, damage, message):
    copy = _copy(run_dir, tmp_path)
    damage(copy)
    code = main(["check", str(copy), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
