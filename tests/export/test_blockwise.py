"""The block-at-a-time export (atm_export.export.blockwise) against the whole-model trace and
against eager PyTorch, on the three model kinds, on images that merge."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from atm_export import MergeConfig, contract, patch_model
from atm_export.backends.ort import OrtRunner
from atm_export.export import onnx as export_onnx
from atm_export.export.blockwise import NotBlockwise, export_blockwise
from atm_export.export.onnx import export_plugin_flavour, portable_flavour

from conftest import TINY_MODELS, make_model

CONFIG = MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88)


def _outputs(model: onnx.ModelProto, images: np.ndarray, plugin: bool) -> tuple[np.ndarray, list[int]]:
    with OrtRunner(model if plugin else portable_flavour(model), "x", plugin=plugin) as runner:
        out = runner.infer({"images": images})
    return out["logits"], out["tokens_per_layer"].tolist()


def _merge_attributes(model: onnx.ModelProto) -> dict[str, dict]:
    return {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}
            for n in model.graph.node if n.op_type == "TokenMerge"}


def test_blockwise_gives_the_whole_model_export(bundle, flat_images):
    """The session bundle's plugin graph is blockwise; traced whole it gives the same outputs,
    the same TokenMerge nodes with the same attributes, the same weights and the same I/O."""
    atm = bundle.atm
    whole = export_plugin_flavour(atm, flat_images[:2], blockwise=False)
    assert _merge_attributes(bundle.plugin) == _merge_attributes(whole)
    assert [i.SerializeToString() for i in bundle.plugin.graph.input] == [i.SerializeToString() for i in whole.graph.input]
    assert [(o.name, o.type.SerializeToString()) for o in bundle.plugin.graph.output] == \
        [(o.name, o.type.SerializeToString()) for o in whole.graph.output]  # logits [batch, K], tokens [depth]
    weights = lambda m: sorted(t.name for t in m.graph.initializer if t.name.startswith("atm."))  # noqa: E731
    assert weights(bundle.plugin) == weights(whole)
    for batch in (1, 3, 8):
        images = flat_images[:batch].numpy()
        for plugin in (True, False):
            logits, tokens = _outputs(bundle.plugin, images, plugin)
            expected_logits, expected_tokens = _outputs(whole, images, plugin)
            assert tokens == expected_tokens
            np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("key", list(TINY_MODELS))
def test_every_model_kind_exports_blockwise_and_matches_eager(key, flat_images, monkeypatch):
    """No fallback to the whole-model trace (it is made to fail), and eager's logits and counts
    at batches 1 and 3: every block got its own weights and its own merge attributes."""
    atm = patch_model(make_model(key), CONFIG)

    def whole_trace(*args, **kwargs):
        raise AssertionError("fell back to the whole-model trace")

    monkeypatch.setattr(export_onnx, "_torch_export", whole_trace)
    model = export_plugin_flavour(atm, flat_images[:2])
    assert [n.name for n in model.graph.node if n.op_type == "TokenMerge"] == \
        [contract.node_name(i + 1) for i, s in enumerate(atm.steps) if s is not None]
    # batch 3 of the global-pool model holds a near tie between two partners, which the
    # whole-model export resolves the same way (1.2e-4 off eager's logits); a block with another
    # block's weights or thresholds is off by far more
    for batch, atol in ((1, 1e-5), (3, 1e-3)):
        logits, tokens = atm.forward_export(flat_images[:batch])
        got_logits, got_tokens = _outputs(model, flat_images[:batch].numpy(), True)
        assert got_tokens == tokens.tolist() and min(got_tokens) < got_tokens[0]  # it merged
        np.testing.assert_allclose(got_logits, logits.detach().numpy(), atol=atol, rtol=1e-4)


def test_a_model_merging_only_in_its_last_block_is_traced_whole(flat_images):
    atm = patch_model(make_model("vit_tiny_gap"), CONFIG)  # global pooling: its last block merges too
    atm.steps = [None] * (atm.depth - 1) + atm.steps[-1:]
    assert atm.steps[-1] is not None
    with pytest.raises(NotBlockwise, match="no merge step before the last block"):
        export_blockwise(atm, flat_images[:2], 18, None, False, 64)
    model = export_plugin_flavour(atm, flat_images[:2])
    assert [n.name for n in model.graph.node if n.op_type == "TokenMerge"] == [contract.node_name(atm.depth)]


def test_a_block_with_other_settings_is_traced_for_itself(flat_images, monkeypatch):
    """A middle block with 6 heads where the others have 3 (the same weight shapes): it is not
    given another block's graph (whose reshapes split 3 heads), so the export matches eager."""
    vit = make_model("deit_tiny")
    attn = vit.blocks[5].attn
    attn.num_heads, attn.head_dim, attn.scale = 6, 32, 32 ** -0.5
    atm = patch_model(vit, CONFIG)
    assert atm.steps[5] is not None and atm.steps[4] is not None  # block 4 would stand for it otherwise

    def whole_trace(*args, **kwargs):
        raise AssertionError("fell back to the whole-model trace")

    monkeypatch.setattr(export_onnx, "_torch_export", whole_trace)
    model = export_plugin_flavour(atm, flat_images[:2])
    with torch.no_grad():
        logits, tokens = atm.forward_export(flat_images[:3])
    got_logits, got_tokens = _outputs(model, flat_images[:3].numpy(), True)
    assert got_tokens == tokens.tolist()
    np.testing.assert_allclose(got_logits, logits.numpy(), atol=1e-4, rtol=1e-4)
