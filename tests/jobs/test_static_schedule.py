"""Static-schedule exports (--static-schedule), the report's next steps, and the deployment
metadata (signature, preprocessing) of every artifact, on one run of the trained test model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import onnx
import pytest

from atm_export import contract
from atm_export.cli import main
from atm_export.export.onnx import read_metadata

pytestmark = pytest.mark.slow

STATIC_FILES = ("model.static.onnx", "model.static.plugin.onnx")
ONNX_FILES = ("model.onnx", "model.plugin.onnx", *STATIC_FILES)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "shapes vit"  # a space: the next steps must quote paths
    code = main(["shapes_vit", "-q", "-o", str(out), "--static-schedule", "sample", "--parity-batches", "1,3",
                 "--bench-batches", "2", "--bench-runs", "1", "--bench-time", "0", "--triton", str(out.parent / "triton")])
    assert code == 0
    return out


def test_the_run_writes_a_triton_repository_of_both_schedules(run_dir):
    from atm_export.backends.tensorrt import unavailable_reason
    from atm_export.serving.triton import check_repository

    report = report_of(run_dir)
    repo = Path(report["triton"]["path"])
    assert repo == (run_dir.parent / "triton").resolve() and check_repository(repo) == []
    served = {"atm_vit_onnx": "onnxruntime", "atm_vit_static_onnx": "onnxruntime",  # and Triton's OpenVINO backend
              "atm_vit_openvino": "openvino", "atm_vit_static_openvino": "openvino"}
    reason = unavailable_reason()
    if reason:
        assert report["triton"]["models"] == served
        assert report["skipped"]["triton atm_vit_trt"] == reason == report["skipped"]["triton atm_vit_static_trt"]
    assert report["triton"]["max_batch_size"] == 8  # the largest batch the run uses
    assert f"--model-repository={repo}" in (run_dir / "report.md").read_text()


def report_of(directory: Path) -> dict:
    return json.loads((directory / "report.json").read_text())


def test_the_static_models_follow_the_sample_schedule_and_pass_parity(run_dir):
    report = report_of(run_dir)
    static = report["static_schedule"]
    assert static["source"] == "sample"
    assert static["tokens_per_layer"] == [round(t) for t in report["tokens"]["mean"]]
    assert static["r_per_layer"] == [a - b for a, b in zip(static["tokens_per_layer"], static["tokens_per_layer"][1:])] + [0]
    assert sum(static["r_per_layer"]) > 0, "the sample images must make the schedule merge"
    assert static["gflops"] == pytest.approx(report["flops"]["atm"], abs=1e-4)  # the sample batch's own schedule
    for name in STATIC_FILES:
        assert name in report["artifacts"] and (run_dir / name).is_file()
    for backend in ("ort_portable_static", "ort_plugin_static", "openvino_static"):  # CI installs openvino
        entry = report["parity"][backend]
        assert entry["passed"] and entry["token_counts_equal"], entry["notes"]
        assert set(entry["batches"]) == {"8", "1", "3"}
    assert set(report["benchmark"]["latency"]) >= {"ort_portable_static", "ort_baseline", "openvino_static"}
    assert {"ort_portable_static", "openvino_static"} <= set(report["benchmark"]["speedup"])


def test_static_nodes_merge_the_fixed_r_of_their_block(run_dir):
    model = onnx.load(str(run_dir / "model.static.plugin.onnx"))
    r = report_of(run_dir)["static_schedule"]["r_per_layer"]
    nodes = [n for n in model.graph.node if contract.is_token_merge(n)]
    fixed = {contract.node_block(n.name): onnx.helper.get_attribute_value(
        next(a for a in n.attribute if a.name == "fixed_r")) for n in nodes}
    assert fixed == {block: r[block - 1] for block in fixed} and len(fixed) == sum(v > 0 for v in r)


def _float_dims(model: onnx.ModelProto) -> list[tuple[str, list]]:
    """(name, dims) of every float tensor shape the graph states, values and outputs."""
    out = []
    for value in [*model.graph.value_info, *model.graph.output]:
        t = value.type.tensor_type
        if t.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and t.HasField("shape"):
            out.append((value.name, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]))
    return out


def test_only_the_batch_dimension_is_symbolic_in_the_static_models(run_dir):
    from atm_export.ops import register_onnx_schema

    register_onnx_schema()
    portable = onnx.shape_inference.infer_shapes(onnx.load(str(run_dir / "model.static.onnx")), strict_mode=True)
    plugin = onnx.load(str(run_dir / "model.static.plugin.onnx"))
    for model in (portable, plugin):
        dims = _float_dims(model)
        assert len(dims) > 20
        for name, shape in dims:
            assert all((isinstance(d, int) and d > 0) or d == "batch" for d in shape), (name, shape)
    # The adaptive portable graph, by contrast, has data-dependent token dimensions.
    adaptive = onnx.shape_inference.infer_shapes(onnx.load(str(run_dir / "model.onnx")))
    assert any(d not in ("batch", 0) and not isinstance(d, int) for _, shape in _float_dims(adaptive) for d in shape)


def test_every_artifact_and_the_report_carry_signature_and_preprocessing(run_dir):
    report = report_of(run_dir)
    signature, prep = report["signature"], report["preprocessing"]
    assert signature["inputs"] == [{"name": "images", "dtype": "float32", "shape": ["batch", 3, 64, 64]}]
    assert signature["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch", 8]}
    assert signature["outputs"][1] == {"name": "tokens_per_layer", "dtype": "int64", "shape": [6]}
    assert prep["input_size"] == [3, 64, 64] and len(prep["mean"]) == 3 and prep["interpolation"]
    for name in ONNX_FILES:
        model = onnx.load(str(run_dir / name))
        meta = read_metadata(model)
        assert meta["signature"] == signature and meta["preprocessing"] == prep, name
        graph_inputs = [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input]
        assert graph_inputs == [("images", onnx.TensorProto.FLOAT)]
        assert [o.name for o in model.graph.output] == [o["name"] for o in signature["outputs"]]


def test_next_steps_name_files_that_exist(run_dir):
    md = (run_dir / "report.md").read_text()
    steps = md[md.index("## Next steps"):]
    for tool in ("trtexec --onnx=", "polygraphy run", "import tensorrt", "ort.InferenceSession", "atm-export check"):
        assert tool in steps
    quoted = f"'{run_dir.resolve()}'"
    assert quoted in steps, "a directory with a space is quoted for the shell"
    named = set(re.findall(r"/(model\.[a-z.]+\.onnx|model\.onnx)\b", steps))
    assert named >= {"model.onnx", "model.plugin.onnx"}
    for name in named:
        assert (run_dir / name).is_file(), name
    shapes = re.findall(r"--(?:min|opt|max)Shapes=images:(\S+)", steps)
    assert shapes == ["1x3x64x64", "8x3x64x64", "8x3x64x64"]
    assert "--policy tome --r " + ",".join(map(str, report_of(run_dir)["static_schedule"]["r_per_layer"])) in steps


def test_check_verifies_the_static_models(run_dir):
    assert main(["check", str(run_dir), "-q"]) == 0


def tampered(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def test_check_catches_a_tampered_static_node(run_dir, tmp_path, capsys):
    copy = tampered(run_dir, tmp_path)
    path = copy / "model.static.plugin.onnx"
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if contract.is_token_merge(n))
    attr = next(a for a in node.attribute if a.name == "fixed_r")
    attr.i += 1
    onnx.save(model, str(path))
    assert main(["check", str(copy), "-q"]) == 3
    assert "model.static.plugin.onnx" in capsys.readouterr().err


def test_check_catches_a_tampered_static_schedule(run_dir, tmp_path, capsys):
    copy = tampered(run_dir, tmp_path)
    report = report_of(copy)
    report["static_schedule"]["gflops"] += 0.01
    (copy / "report.json").write_text(json.dumps(report))
    assert main(["check", str(copy), "-q"]) == 3
    assert "static_schedule.gflops" in capsys.readouterr().err


def test_static_schedule_needs_the_export_and_a_possible_schedule(tmp_path, capsys):
    assert main(["shapes_vit", "--no-onnx", "--static-schedule", "sample", "-o", str(tmp_path / "a")]) == 2
    assert "--static-schedule exports ONNX" in capsys.readouterr().err
    assert main(["shapes_vit", "--static-schedule", "65,20,20,20,20,20", "-o", str(tmp_path / "b")]) == 2
    assert "--static-schedule: one block can merge at most half" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
