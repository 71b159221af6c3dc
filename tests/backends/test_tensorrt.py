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


# The builder flags for a precision are chosen by what the bindings offer. These stand-ins list
# the members of tensorrt.BuilderFlag that matter, as TensorRT 10 and TensorRT 11 have them.
TRT10_FLAGS = SimpleNamespace(FP16="FP16", TF32="TF32", INT8="INT8")
TRT11_FLAGS = SimpleNamespace(TF32="TF32")  # strongly typed: no FP16 flag


@pytest.mark.parametrize("flags", [TRT10_FLAGS, TRT11_FLAGS], ids=["trt10", "trt11"])
def test_fp32_builds_turn_tf32_off(flags):
    set_flags, clear_flags, record = trt_backend.precision_flags(flags, "fp32")
    assert set_flags == [] and clear_flags == ["TF32"] and record["tf32"] is False


def test_fp16_uses_the_flag_where_it_exists_and_says_why_where_it_does_not():
    assert trt_backend.precision_flags(TRT10_FLAGS, "fp16")[0] == ["FP16"]
    with pytest.raises(UserError, match="strongly typed .*--trt-precision fp32"):
        trt_backend.precision_flags(TRT11_FLAGS, "fp16")
