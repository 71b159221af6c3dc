"""ONNX's external-data form (weights in a side file): saving, the threshold that switches it on,
and every reader (the checker, the integrity check, ONNX Runtime, OpenVINO)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from atm_export.export import external_data
from atm_export.export.integrity import lowering_difference


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


@pytest.fixture()
def saved(bundle, tmp_path):
    """The session bundle's plugin and portable graphs saved in the external-data form (copies:
    saving gives the weights up), as the run saves them: the portable flavour lowered from the
    weightless plugin graph."""
    from atm_export.export.onnx import portable_flavour

    plugin = _copy(bundle.plugin)
    external_data.save(plugin, tmp_path / "model.plugin.onnx", True)
    portable = portable_flavour(plugin)
    assert external_data.locations(portable) == ["model.plugin.onnx.data"]  # derived graphs share the side file
    external_data.save(portable, tmp_path / "model.onnx", True, tmp_path)
    return plugin, portable


def test_saving_external_gives_the_weights_up_and_reloads_them(bundle, saved, tmp_path):
    plugin, portable = saved
    assert {p.name for p in tmp_path.iterdir()} == {"model.plugin.onnx", "model.plugin.onnx.data", "model.onnx",
                                                     "model.onnx.data"}
    assert external_data.is_weightless(plugin) and external_data.locations(portable) == ["model.onnx.data"]
    assert plugin.ByteSize() < bundle.plugin.ByteSize() / 10
    full = onnx.load(str(tmp_path / "model.plugin.onnx"))  # onnx's own reader finds the weights
    original = {t.name: onnx.numpy_helper.to_array(t) for t in bundle.plugin.graph.initializer}
    for tensor in full.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), original[tensor.name])
    embedded = {t.name: t for t in bundle.plugin.graph.initializer}
    for tensor in plugin.graph.initializer:  # by content, wherever the bytes lie
        assert external_data.tensor_bytes(tensor, tmp_path) == external_data.tensor_bytes(embedded[tensor.name], None)
    for tensor in full.graph.initializer:  # onnx.load sets data_location DEFAULT on what it read: the same weight
        assert external_data.tensor_bytes(tensor, None) == external_data.tensor_bytes(embedded[tensor.name], None)
    changed = onnx.TensorProto()
    changed.CopyFrom(embedded[full.graph.initializer[0].name])
    changed.raw_data = changed.raw_data[:-1] + bytes([changed.raw_data[-1] ^ 1])
    assert external_data.tensor_bytes(changed, None) != external_data.tensor_bytes(full.graph.initializer[0], None)
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    assert (tmp_path / "model.plugin.onnx.data").stat().st_mode == (tmp_path / "model.plugin.onnx").stat().st_mode


def test_the_integrity_check_compares_weights_in_side_files(saved, tmp_path):
    plugin, portable = saved
    assert lowering_difference(portable, plugin, weights_dir=tmp_path) is None
    name = max(portable.graph.initializer, key=lambda t: external_data.ExternalDataInfo(t).length
               if external_data.uses_external_data(t) else 0)
    info = external_data.ExternalDataInfo(name)
    with open(tmp_path / "model.onnx.data", "r+b") as f:  # one byte of one weight, in model.onnx's side file only
        f.seek(info.offset + 5)
        byte = f.read(1)
        f.seek(info.offset + 5)
        f.write(bytes([byte[0] ^ 0x40]))
    assert f"weight or constant {name.name} differs" in lowering_difference(portable, plugin, weights_dir=tmp_path)


def test_runtimes_read_weightless_graphs_from_their_directory(bundle, saved, tmp_path, flat_images):
    from atm_export.backends.ort import OrtRunner

    plugin, portable = saved
    images = flat_images[:3].numpy()
    with OrtRunner(bundle.portable, "embedded") as runner:
        expected = runner.infer({"images": images})["logits"]
    with OrtRunner(portable, "external", weights_dir=tmp_path) as runner:
        np.testing.assert_array_equal(runner.infer({"images": images})["logits"], expected)
    with OrtRunner(plugin, "external plugin", plugin=True, weights_dir=tmp_path) as runner:
        np.testing.assert_allclose(runner.infer({"images": images})["logits"], expected, atol=1e-5, rtol=1e-4)
    openvino = pytest.importorskip("openvino", reason="OpenVINO not installed (pip install atm-export[openvino])")
    assert openvino
    from atm_export.backends.openvino import OpenVinoRunner

    with OpenVinoRunner(portable, "external", weights_dir=tmp_path) as runner:
        np.testing.assert_allclose(runner.infer({"images": images})["logits"], expected, atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data", "model.plugin.onnx",
                                                           "model.plugin.onnx.data"]  # the temporary graph is gone


def test_a_read_only_directory_gets_a_temporary_copy(saved, tmp_path, monkeypatch):
    import tempfile

    plugin, _ = saved

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with external_data.readable_file(plugin, tmp_path) as path:
        assert path.parent != tmp_path and (path.parent / "model.plugin.onnx.data").is_file()
        onnx.checker.check_model(str(path), full_check=False)
    assert not path.parent.exists()


def test_missing_side_files_are_named(saved, tmp_path):
    plugin, _ = saved
    (tmp_path / "model.plugin.onnx.data").unlink()
    assert external_data.missing_side_files(plugin, tmp_path) == ["model.plugin.onnx.data"]
    with pytest.raises(FileNotFoundError, match="model.plugin.onnx.data not found"):
        with external_data.readable_file(plugin, tmp_path):
            pass
    with pytest.raises(ValueError, match="cannot be saved as one file"):
        external_data.save(plugin, tmp_path / "again.onnx", False, tmp_path)


def test_the_size_threshold_switches_the_form_on(bundle, tmp_path, monkeypatch):
    """A graph over THRESHOLD_BYTES is staged with a side file without --external-data; one at
    the threshold is one file. The estimate is the serialized size, to within a percent."""
    from atm_export.artifacts import ArtifactWriter
    from atm_export.jobs.export import save_checked

    size = external_data.serialized_bytes(bundle.plugin)
    assert size == pytest.approx(bundle.plugin.ByteSize(), rel=0.01)
    monkeypatch.setattr(external_data, "THRESHOLD_BYTES", size)
    assert not external_data.too_large(bundle.plugin)
    writer = ArtifactWriter(tmp_path / "at")
    save_checked(_copy(bundle.plugin), "plugin", writer, "model.plugin.onnx", external=False)
    assert not writer.staged("model.plugin.onnx.data")
    writer.abort()

    monkeypatch.setattr(external_data, "THRESHOLD_BYTES", size - 1)
    assert external_data.too_large(bundle.plugin)
    writer = ArtifactWriter(tmp_path / "over")
    graph = _copy(bundle.plugin)
    save_checked(graph, "plugin", writer, "model.plugin.onnx", external=False)
    assert writer.staged("model.plugin.onnx.data") and external_data.is_weightless(graph)
    writer.abort()
