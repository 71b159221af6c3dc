"""The TensorRT backend. Without TensorRT (these machines) only its own logic runs; the engine
build and run are tested where TensorRT and a GPU exist, and skipped elsewhere with the reason."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from atm_export.backends import tensorrt as trt_backend
from atm_export.errors import UserError
from conftest import token_merge_model

REASON = trt_backend.unavailable_reason()


def test_the_reason_names_what_is_missing():
    if REASON is None:
        pytest.skip("TensorRT and a GPU are present here")
    assert "TensorRT" in REASON or "CUDA" in REASON


def test_token_merge_nodes_are_recognised(tmp_path):
    import onnx

    from atm_export.export.lowering import lower_model

    plugin = token_merge_model(threshold=0.9, split_mode=0, num_protected=1)
    onnx.save(plugin, str(tmp_path / "plugin.onnx"))
    onnx.save(lower_model(plugin), str(tmp_path / "portable.onnx"))
    assert trt_backend.has_token_merge_nodes(tmp_path / "plugin.onnx")
    assert not trt_backend.has_token_merge_nodes(tmp_path / "portable.onnx")


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_engine_without_token_merge_nodes_is_refused(tmp_path):
    import onnx

    from atm_export.export.lowering import lower_model

    onnx.save(lower_model(token_merge_model(threshold=0.9)), str(tmp_path / "portable.onnx"))
    with pytest.raises(UserError, match="no TokenMerge nodes"):
        trt_backend.build_engine(tmp_path / "portable.onnx", trt_backend.EngineSpec(1, 2, 4))


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_engine_matches_eager_pytorch(tmp_path, flat_images):
    """Build an engine of deit_tiny's plugin flavour and check parity at batches 1, 3 and 8."""
    import onnx

    from atm_export import MergeConfig, patch_model, plugin_lib
    from atm_export.export.onnx import export_plugin_flavour
    from atm_export.images import take_batch
    from atm_export.parity import INCONCLUSIVE, PASSED, check_backend, reference_run
    from conftest import make_model

    atm = patch_model(make_model("deit_tiny"), MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88))
    plugin = export_plugin_flavour(atm, flat_images[:2])
    path = tmp_path / "model.plugin.onnx"
    onnx.save(plugin, str(path))
    library = plugin_lib.plugin_library()  # builds it (incrementally) with the TensorRT found here
    engine = trt_backend.build_engine(path, trt_backend.EngineSpec(1, 8, 8), library)
    refs = [reference_run(atm, take_batch(flat_images, b)) for b in (1, 3, 8)]
    with trt_backend.EngineRunner(engine, "tensorrt", plugin=library) as runner:
        result = check_backend(runner, refs)
        assert result["status"] in (PASSED, INCONCLUSIVE), result["notes"]
        assert any(b["status"] == PASSED for b in result["batches"].values())
        with pytest.raises(UserError, match="outside the engine's optimization profile"):
            runner.run(take_batch(flat_images, 9).numpy())


# The build of a precision is chosen by what the bindings offer. These stand-ins list the
# members of tensorrt.BuilderFlag and NetworkDefinitionCreationFlag that matter, as TensorRT 8,
# 10 and 11 have them.
TRT8 = SimpleNamespace(BuilderFlag=SimpleNamespace(FP16="FP16", TF32="TF32"),
                       NetworkDefinitionCreationFlag=SimpleNamespace())
TRT10 = SimpleNamespace(BuilderFlag=SimpleNamespace(FP16="FP16", TF32="TF32", INT8="INT8"),
                        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED="STRONGLY_TYPED"))
TRT11 = SimpleNamespace(BuilderFlag=SimpleNamespace(TF32="TF32"),  # always strongly typed: no FP16 flag
                        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED="STRONGLY_TYPED"))


@pytest.mark.parametrize("trt", [TRT8, TRT10, TRT11], ids=["trt8", "trt10", "trt11"])
def test_fp32_builds_turn_tf32_off(trt):
    mode = trt_backend.build_mode(trt, "fp32")
    assert mode.set_flags == [] and mode.clear_flags == ["TF32"] and mode.network_flags == []
    assert mode.record["tf32"] is False


@pytest.mark.parametrize("trt", [TRT10, TRT11], ids=["trt10", "trt11"])
def test_fp16_is_a_strongly_typed_build_of_the_fp16_graph_where_tensorrt_has_strong_typing(trt):
    mode = trt_backend.build_mode(trt, "fp16")
    assert mode.network_flags == ["STRONGLY_TYPED"] and mode.set_flags == [] and mode.record["strongly_typed"]


def test_fp16_uses_the_builder_flag_only_where_strong_typing_is_missing():
    assert trt_backend.build_mode(TRT8, "fp16").set_flags == ["FP16"]
    neither = SimpleNamespace(BuilderFlag=SimpleNamespace(), NetworkDefinitionCreationFlag=SimpleNamespace())
    with pytest.raises(UserError, match="--trt-precision fp32"):
        trt_backend.build_mode(neither, "fp16")


class FakeCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return self.data + b"+timed"


class FakeConfig:
    """The builder config's timing-cache calls; ``accepts``: whether set_timing_cache takes a
    cache made from these bytes (TensorRT refuses one from another GPU or version)."""

    def __init__(self, accepts=lambda data: True):
        self.accepts, self.cache = accepts, None

    def create_timing_cache(self, data):
        return FakeCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        if not self.accepts(cache.data):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


def test_the_timing_cache_is_read_before_and_written_after_a_build(tmp_path):
    path = tmp_path / "cache" / "trt.timing-cache"
    config = FakeConfig()
    trt_backend._attach_timing_cache(config, str(path))
    assert config.cache.data == b""  # no file yet: a fresh cache
    trt_backend._save_timing_cache(config, str(path))
    assert path.read_bytes() == b"+timed"
    config = FakeConfig()
    trt_backend._attach_timing_cache(config, str(path))
    assert config.cache.data == b"+timed", "the next build starts from what the last one timed"
    assert not list(path.parent.glob(".*.part"))


def test_a_timing_cache_from_another_gpu_is_replaced_not_used(tmp_path):
    path = tmp_path / "trt.timing-cache"
    path.write_bytes(b"other gpu")
    config = FakeConfig(accepts=lambda data: data != b"other gpu")
    trt_backend._attach_timing_cache(config, str(path))
    assert config.cache.data == b""


def test_no_timing_cache_means_none_is_read_or_written(tmp_path):
    from atm_export.jobs.export import JobOptions, engine_spec

    assert engine_spec(JobOptions(model="deit_t", output=tmp_path, trt_timing_cache="none")).timing_cache is None
    default = engine_spec(JobOptions(model="deit_t", output=tmp_path)).timing_cache
    assert default == str(trt_backend.default_timing_cache()) and default.endswith("tensorrt.timing-cache")
    config = FakeConfig()
    trt_backend._save_timing_cache(config, None)
    assert not list(tmp_path.iterdir())
