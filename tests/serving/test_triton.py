"""The Triton model repository: the batched-output transform, configs parsed into Triton's own
ModelConfig protobuf (tritonclient's compiled schema), the served ONNX model against model.onnx,
the OpenVINO model run by the openvino package as the backend would, and the consistency check
catching broken configs. Triton itself is not run here."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from atm_export import MergeConfig, patch_model
from atm_export.artifacts import STAGING_PREFIX
from atm_export.backends import tensorrt as trt_backend
from atm_export.errors import UserError
from atm_export.export.onnx import check_model, export_plugin_flavour, portable_flavour
from atm_export.images import builtin_images, noise_images, preprocess
from atm_export.serving import triton

pytestmark = pytest.mark.slow
REASON = trt_backend.unavailable_reason()
SPEC = trt_backend.EngineSpec(min_batch=2, opt_batch=4, max_batch=8)
BATCHING = triton.Batching(preferred_batch_sizes=(2, 4), max_queue_delay_us=500, instances=2)
#: The OpenVINO models written by the ov_repository fixture, with their precision.
OV_MODELS = {triton.OPENVINO_MODEL: "fp32", "atm_vit_openvino_bf16": "bf16"}
#: The OpenVINO property each parameter written here becomes in Triton's OpenVINO backend
#: (github.com/triton-inference-server/openvino_backend src/openvino.cc, ParseParameterHelper).
OV_PROPERTIES = {"NUM_STREAMS": lambda value: ("NUM_STREAMS", int(value)),
                 "HINT_BF16": lambda value: ("INFERENCE_PRECISION_HINT", "bf16")}


@pytest.fixture(scope="module")
def exported(shapes_vit):
    """The small test ViT (depth 6, 64 px) with settings that merge a lot, in both flavours."""
    atm = patch_model(shapes_vit, MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88))
    images = preprocess(builtin_images(8), shapes_vit)
    plugin = export_plugin_flavour(atm, images[:2])
    return SimpleNamespace(atm=atm, images=images.numpy(), noise=preprocess(noise_images(3), shapes_vit).numpy(),
                           plugin=plugin, portable=portable_flavour(plugin))


def _flavours(exported):
    return [triton.Flavour(triton.ONNX_MODEL, exported.portable), triton.Flavour(triton.TRT_MODEL, exported.plugin, SPEC)]


def _openvino_flavours(exported, models=OV_MODELS):
    return [triton.Flavour(name, exported.portable, openvino=True, precision=p) for name, p in models.items()]


@pytest.fixture(scope="module")
def ov_repository(exported, tmp_path_factory):
    """The ONNX Runtime model and the OpenVINO models side by side, with dynamic batching asked for."""
    dest = tmp_path_factory.mktemp("serve_ov") / "triton"
    flavours = _flavours(exported)[:1] + _openvino_flavours(exported)
    return triton.write_repository(dest, flavours, max_batch_size=8, batching=BATCHING)


@pytest.fixture(scope="module")
def repository(exported, tmp_path_factory):
    dest = tmp_path_factory.mktemp("serve") / "triton"
    return triton.write_repository(dest, _flavours(exported), max_batch_size=8, batching=BATCHING)


def _run(model: onnx.ModelProto | str, images: np.ndarray) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"images": images})


def _parse_text(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def _parse(path) -> mc.ModelConfig:
    return _parse_text(path.read_text())


def test_batched_outputs_repeat_the_token_vector_per_row(exported):
    depth = exported.atm.depth
    for flavour, model in (("portable", exported.portable), ("plugin", exported.plugin)):
        batched = triton.with_batched_outputs(model)
        check_model(batched, flavour)  # onnx.checker (full) and the flavour's custom-node rule
        tokens = next(o for o in batched.graph.output if o.name == "tokens_per_layer")
        assert triton.tensor_dims(tokens) == [-1, depth]
        assert triton.with_batched_outputs(batched) == batched  # already batched: unchanged
    batched = triton.with_batched_outputs(exported.portable)
    for b in (1, 3):
        logits, tokens = _run(exported.portable, exported.images[:b])
        logits_b, tokens_b = _run(batched, exported.images[:b])
        assert tokens.shape == (depth,) and tokens_b.shape == (b, depth) and tokens_b.dtype == np.int64
        assert all((row == tokens).all() for row in tokens_b)
        np.testing.assert_array_equal(logits_b, logits)
    assert tokens[-1] < tokens[0], "the inputs should merge"


def test_every_config_parses_into_triton_model_config(repository, exported):
    root = repository.path
    assert repository.models == {triton.ONNX_MODEL: "onnxruntime", **({triton.TRT_MODEL: "tensorrt"} if REASON is None else {})}
    depth = exported.atm.depth
    configs = {p.parent.name: _parse(p) for p in root.glob("*/config.pbtxt")}
    assert set(configs) == set(repository.models)
    for name, config in configs.items():
        assert config.name == name and config.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        assert [(g.count, mc.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
            (2, "KIND_AUTO" if repository.models[name] == "onnxruntime" else "KIND_GPU")]
        (image,) = config.input
        assert (image.name, mc.DataType.Name(image.data_type), list(image.dims)) == ("images", "TYPE_FP32", [3, 64, 64])
        assert [(o.name, mc.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == [
            ("logits", "TYPE_FP32", [8]), ("tokens_per_layer", "TYPE_INT64", [depth])]
    onnx_config = configs[triton.ONNX_MODEL]
    assert (onnx_config.backend, onnx_config.platform, onnx_config.max_batch_size) == ("onnxruntime", "", 8)
    assert (root / triton.ONNX_MODEL / "1" / "model.onnx").is_file()
    assert triton.check_repository(root) == []
    assert not list(root.parent.glob(STAGING_PREFIX + "*"))


def test_tensorrt_config_is_a_plan_with_the_engine_profile(exported):
    """The config of a TensorRT model, generated without a plan (none can be built here)."""
    graph = triton.with_batched_outputs(exported.plugin)
    config = _parse_text(triton.config_text(triton.model_config(triton.TRT_MODEL, graph, "tensorrt", SPEC.max_batch,
                                                                triton.Batching(dynamic=False))))
    assert (config.platform, config.backend, config.max_batch_size) == ("tensorrt_plan", "", 8)
    assert config.default_model_filename == "model.plan" and config.WhichOneof("scheduling_choice") is None
    assert [list(o.dims) for o in config.output] == [[8], [exported.atm.depth]]
    assert triton.io_problems(config, graph) == []


def test_tensorrt_model_is_left_out_with_the_reason(repository):
    if REASON is None:
        pytest.skip("TensorRT is available here: the plan is built (see the test below)")
    assert repository.skipped == {triton.TRT_MODEL: REASON} and REASON.startswith("TensorRT not installed")
    assert not (repository.path / triton.TRT_MODEL).exists() and not (repository.path / triton.PLUGIN_FILE).exists()
    readme = (repository.path / triton.README).read_text()
    assert "LD_PRELOAD" not in readme and "--model-repository=/models" in readme


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_tensorrt_plan_is_built_from_the_batched_plugin_graph(repository, exported):
    model_dir = repository.path / triton.TRT_MODEL
    assert (model_dir / "1" / "model.plan").stat().st_size > 0 and (repository.path / triton.PLUGIN_FILE).is_file()
    assert _parse(model_dir / "config.pbtxt").max_batch_size == SPEC.max_batch
    graphs = {triton.TRT_MODEL: triton.with_batched_outputs(exported.plugin)}
    assert triton.check_repository(repository.path, graphs) == []
    assert f"LD_PRELOAD=/models/{triton.PLUGIN_FILE}" in (repository.path / triton.README).read_text()


def test_the_served_onnx_model_matches_model_onnx_at_batches_1_and_3(repository, exported):
    served = repository.path / triton.ONNX_MODEL / "1" / "model.onnx"
    for b in (1, 3):
        logits, tokens = _run(exported.portable, exported.images[:b])
        served_logits, served_tokens = _run(served, exported.images[:b])
        np.testing.assert_allclose(served_logits, logits, rtol=0, atol=1e-6)
        assert served_tokens.tolist() == [tokens.tolist()] * b


def test_requests_batched_together_change_each_others_merge_counts(repository, exported):
    """What docs/serving.md warns about: one image's token counts and logits depend on the
    images it is batched with (here: three noise images, which merge little)."""
    served = repository.path / triton.ONNX_MODEL / "1" / "model.onnx"
    alone_logits, alone_tokens = _run(served, exported.images[:1])
    logits, tokens = _run(served, np.concatenate([exported.images[:1], exported.noise]))
    assert tokens[0].tolist() != alone_tokens[0].tolist()
    assert np.abs(logits[0] - alone_logits[0]).max() > 1e-3


def _rewrite(path, edit) -> None:
    config = _parse(path)
    edit(config)
    path.write_text(triton.config_text(config))


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.output[1].dims.__setitem__(0, 7), "tokens_per_layer: config dims [7]"),
    (lambda c: setattr(c.output[0], "data_type", mc.TYPE_FP16), "logits: config type TYPE_FP16"),
    (lambda c: c.input[0].dims.append(1), "images: config dims [3, 64, 64, 1]"),
    (lambda c: setattr(c, "name", "other"), "config name 'other'"),
    (lambda c: c.dynamic_batching.preferred_batch_size.append(16), "preferred batch sizes [16]"),
], ids=["dim", "type", "rank", "name", "preferred"])
def test_a_broken_config_is_caught(exported, tmp_path, edit, expected):
    result = triton.write_repository(tmp_path / "triton", _flavours(exported)[:1], max_batch_size=8, batching=BATCHING)
    _rewrite(result.path / triton.ONNX_MODEL / "config.pbtxt", edit)
    problems = triton.check_repository(result.path)
    assert any(p.startswith(f"{triton.ONNX_MODEL}: ") and expected in p for p in problems), problems


def test_an_unbatched_graph_and_an_unparsable_config_are_caught(exported, tmp_path):
    result = triton.write_repository(tmp_path / "triton", _flavours(exported)[:1], max_batch_size=8, batching=BATCHING)
    model_dir = result.path / triton.ONNX_MODEL
    onnx.save(exported.portable, str(model_dir / "1" / "model.onnx"))  # tokens_per_layer [depth], as exported
    problems = triton.check_repository(result.path)
    assert any("tokens_per_layer [6] does not lead with the batch dimension" in p for p in problems), problems
    (model_dir / "config.pbtxt").write_text('name: "atm_vit_onnx"\nmax_batch_sise: 8\n')
    assert "is not a valid ModelConfig" in triton.check_repository(result.path)[0]


def test_rewriting_replaces_only_a_repository_of_ours(exported, tmp_path):
    flavours = _flavours(exported)[:1]
    dest = tmp_path / "triton"
    triton.write_repository(dest, flavours, max_batch_size=4)
    (dest / triton.ONNX_MODEL / "stale.txt").write_text("from the earlier run")
    with pytest.raises(UserError, match="pass --force"):
        triton.write_repository(dest, flavours, max_batch_size=4)
    result = triton.write_repository(dest, flavours, max_batch_size=2, batching=triton.Batching(dynamic=False), force=True)
    assert not (dest / triton.ONNX_MODEL / "stale.txt").exists()
    assert _parse(dest / triton.ONNX_MODEL / "config.pbtxt").max_batch_size == 2
    assert result.path == dest and sorted(p.name for p in tmp_path.iterdir()) == ["triton"]  # no staging left
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "notes.txt").write_text("not a repository")
    with pytest.raises(UserError, match="not a repository atm-export wrote"):
        triton.write_repository(other, flavours, max_batch_size=4, force=True)
    assert (other / "notes.txt").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch_size": 0}, "dynamic batching needs max_batch_size > 0"),
    ({"max_batch_size": 4, "batching": triton.Batching(preferred_batch_sizes=(8,))}, "preferred batch sizes [8]"),
], ids=["no-batch-dim", "preferred-too-big"])
def test_settings_triton_would_refuse_are_refused(exported, tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        triton.write_repository(tmp_path / "triton", _flavours(exported)[:1], **kwargs)
    assert not (tmp_path / "triton").exists()


@pytest.mark.parametrize("openvino, backend", [(False, "ONNX Runtime"), (True, "OpenVINO")], ids=["ort", "openvino"])
def test_the_plugin_graph_is_refused_for_onnx_runtime_and_openvino(exported, tmp_path, openvino, backend):
    with pytest.raises(UserError, match=f"TokenMerge nodes, which Triton's {backend} backend cannot run"):
        flavour = triton.Flavour("plugin_graph", exported.plugin, openvino=openvino)
        triton.write_repository(tmp_path / "triton", [flavour], max_batch_size=4)
    assert not any(tmp_path.iterdir())


def test_a_runs_bundle_gives_one_model_per_flavour(exported):
    static = SimpleNamespace(portable=exported.portable, plugin=exported.plugin)
    bundle = SimpleNamespace(portable=exported.portable, plugin=exported.plugin, static=static)
    named = [(f.name, f.runtime) for f in triton.bundle_flavours(bundle, SPEC)]
    assert named == [("atm_vit_onnx", "onnxruntime"), ("atm_vit_trt", "tensorrt"),
                     ("atm_vit_static_onnx", "onnxruntime"), ("atm_vit_static_trt", "tensorrt")]
    with_openvino = triton.bundle_flavours(bundle, SPEC, openvino=True, precision="bf16")
    assert [(f.name, f.runtime, f.precision) for f in with_openvino if f.openvino] == [
        ("atm_vit_openvino", "openvino", "bf16"), ("atm_vit_static_openvino", "openvino", "bf16")]
    assert [f for f in with_openvino if not f.openvino] == triton.bundle_flavours(bundle, SPEC)
    bundle.static = None  # no static-schedule export; no engine spec (--no-tensorrt)
    assert [f.name for f in triton.bundle_flavours(bundle, None)] == [triton.ONNX_MODEL]


def test_a_flavour_is_openvino_or_tensorrt_and_only_openvino_takes_a_precision(exported):
    with pytest.raises(ValueError, match="exclude each other"):
        triton.Flavour("both", exported.portable, SPEC, openvino=True)
    with pytest.raises(UserError, match="precision 'fp16': an OpenVINO model takes one of"):
        triton.Flavour("fp16", exported.portable, openvino=True, precision="fp16")
    with pytest.raises(UserError, match="precision 'bf16': .* other models fp32"):
        triton.Flavour("ort_bf16", exported.portable, precision="bf16")


# ---------------------------------------------------------------- the OpenVINO model

def test_openvino_models_serve_the_portable_graph_unbatched_on_the_cpu(ov_repository, exported):
    root, depth = ov_repository.path, exported.atm.depth
    assert ov_repository.models == {triton.ONNX_MODEL: "onnxruntime", **{name: "openvino" for name in OV_MODELS}}
    for name, precision in OV_MODELS.items():
        config = _parse(root / name / "config.pbtxt")
        assert (config.backend, config.platform, config.default_model_filename) == ("openvino", "", "model.onnx")
        # Triton does not batch it (see triton.RUNTIMES): no batcher, and the batch dimension in dims
        assert config.max_batch_size == 0 and config.WhichOneof("scheduling_choice") is None
        assert [(g.count, mc.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(2, "KIND_CPU")]
        bf16 = {"HINT_BF16": "YES"} if precision == "bf16" else {}
        assert {key: value.string_value for key, value in config.parameters.items()} == {"NUM_STREAMS": "2", **bf16}
        assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in (*config.input, *config.output)] == [
            ("images", "TYPE_FP32", [-1, 3, 64, 64]), ("logits", "TYPE_FP32", [-1, 8]),
            ("tokens_per_layer", "TYPE_INT64", [-1, depth])]
        assert onnx.load(str(root / name / "1" / "model.onnx")) == triton.with_batched_outputs(exported.portable)
    onnx_config = _parse(root / triton.ONNX_MODEL / "config.pbtxt")  # the repository's batching is left to it
    assert onnx_config.max_batch_size == 8 and list(onnx_config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert triton.check_repository(root) == []
    readme = (root / triton.README).read_text()
    assert f"`{triton.OPENVINO_MODEL}`: backend `openvino`" in readme
    assert "need no GPU" in readme and "cannot pin f32" in readme


def _compile_like_the_backend(ov, model_dir, **extra):
    """The model's file compiled on the CPU with the properties its config's parameters give."""
    config = _parse(model_dir / "config.pbtxt")
    properties = dict(OV_PROPERTIES[key](value.string_value) for key, value in config.parameters.items())
    core = ov.Core()
    return core.compile_model(core.read_model(str(model_dir / "1" / config.default_model_filename)), "CPU",
                              {**properties, **extra})


@pytest.mark.parametrize("name", list(OV_MODELS))
def test_openvino_runs_the_served_model_with_its_parameters(ov_repository, exported, name):
    ov = pytest.importorskip("openvino", reason="openvino not installed")
    compiled = _compile_like_the_backend(ov, ov_repository.path / name)
    out = compiled({"images": exported.images[:3]})
    logits, tokens = out[compiled.output("logits")], out[compiled.output("tokens_per_layer")]
    assert logits.shape == (3, 8) and tokens.shape == (3, exported.atm.depth) and tokens.dtype == np.int64
    assert all((row == tokens[0]).all() for row in tokens)
    if OV_MODELS[name] == "bf16" and "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16


def test_openvino_at_f32_matches_model_onnx_at_batches_1_and_3(ov_repository, exported):
    """The graph is what model.onnx computes: OpenVINO with f32 pinned (which the backend cannot
    ask for, docs/serving.md) gives ONNX Runtime's token counts and logits."""
    ov = pytest.importorskip("openvino", reason="openvino not installed")
    compiled = _compile_like_the_backend(ov, ov_repository.path / triton.OPENVINO_MODEL, INFERENCE_PRECISION_HINT="f32")
    for b in (1, 3):
        logits, tokens = _run(exported.portable, exported.images[:b])
        out = compiled({"images": exported.images[:b]})
        np.testing.assert_allclose(out[compiled.output("logits")], logits, rtol=0, atol=1e-5)
        assert out[compiled.output("tokens_per_layer")].tolist() == [tokens.tolist()] * b


def test_openvino_batch_padding_would_change_the_merge_counts(ov_repository, exported):
    """Why Triton does not batch the OpenVINO model: with max_batch_size > 0 the backend fixes the
    batch (ov::set_batch), refuses a smaller one, or pads it with zero images (ENABLE_BATCH_PADDING),
    which join ATM's batch-wide merge counts."""
    ov = pytest.importorskip("openvino", reason="openvino not installed")
    core = ov.Core()
    model = core.read_model(str(ov_repository.path / triton.OPENVINO_MODEL / "1" / "model.onnx"))
    layout = ov.preprocess.PrePostProcessor(model)
    layout.input("images").tensor().set_layout(ov.Layout("N..."))  # as the backend does for max_batch_size > 0
    model = layout.build()
    ov.set_batch(model, 4)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = exported.images[:3]
    with pytest.raises(RuntimeError):
        compiled({"images": images})
    padded = compiled({"images": np.concatenate([images, np.zeros_like(images[:1])])})
    _, tokens = _run(exported.portable, images)
    assert padded[compiled.output("tokens_per_layer")][0].tolist() != tokens.tolist()


def _write_openvino(exported, tmp_path):
    flavours = _openvino_flavours(exported, {triton.OPENVINO_MODEL: "fp32"})
    return triton.write_repository(tmp_path / "triton", flavours, max_batch_size=8, batching=BATCHING)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: setattr(c, "backend", "openvinoo"), "unknown platform/backend 'openvinoo'"),
    (lambda c: c.output[1].dims.__setitem__(1, 7), "tokens_per_layer: config dims [-1, 7], graph [-1, 6]"),
    (lambda c: setattr(c, "max_batch_size", 8), "max_batch_size 8: Triton's OpenVINO backend would fix the batch"),
    (lambda c: c.ClearField("default_model_filename"), "no model file 1/model.xml"),
    (lambda c: setattr(c.parameters["HINT_BF16"], "string_value", "NO"), "HINT_BF16: the OpenVINO backend accepts yes"),
    (lambda c: setattr(c.parameters["NUM_STREAM"], "string_value", "2"), "parameter NUM_STREAM is not one"),
    (lambda c: c.dynamic_batching.SetInParent(), "dynamic batching needs max_batch_size > 0"),
], ids=["backend", "dim", "batched", "filename", "bf16-value", "unknown-key", "batcher"])
def test_a_broken_openvino_config_is_caught(exported, tmp_path, edit, expected):
    result = _write_openvino(exported, tmp_path)
    _rewrite(result.path / triton.OPENVINO_MODEL / "config.pbtxt", edit)
    problems = triton.check_repository(result.path)
    assert any(p.startswith(f"{triton.OPENVINO_MODEL}: ") and expected in p for p in problems), problems


def test_a_token_merge_graph_in_the_openvino_model_is_caught(exported, tmp_path):
    result = _write_openvino(exported, tmp_path)
    served = result.path / triton.OPENVINO_MODEL / "1" / "model.onnx"
    onnx.save(triton.with_batched_outputs(exported.plugin), str(served))
    problems = triton.check_repository(result.path)
    assert any("TokenMerge nodes, which Triton's OpenVINO backend cannot run" in p for p in problems), problems
