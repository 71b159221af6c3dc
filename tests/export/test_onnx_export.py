"""ONNX export of whole models, both flavours, and parity against eager PyTorch.

Each model is exported once (about 45 s each on two cores): deit_tiny, a distilled DeiT and a
global-pool (MAE-style) model, on images that merge a lot, checked at batch sizes 1, 3 and 8.
"""

from __future__ import annotations

import onnx
import pytest
import torch

from atm_export import MergeConfig, contract, patch_model
from atm_export.backends import open_runner
from atm_export.export.bundle import Bundle
from atm_export.export.onnx import (check_model, custom_nodes, export_plugin_flavour, portable_flavour,
                                    read_metadata, with_fixed_schedule)
from atm_export.images import take_batch
from atm_export.parity import PASSED, check_backend, lowering_check, settling_checks, reference_run
from conftest import TINY_MODELS, make_model

pytestmark = pytest.mark.slow
CONFIG = MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88)


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def exported(request, flat_images):
    atm = patch_model(make_model(request.param), CONFIG)
    with torch.no_grad():
        atm(flat_images)
    kept = [t - r for t, r in zip(atm.last_stats.tokens_per_layer, atm.last_stats.r_per_layer)]
    plugin = export_plugin_flavour(atm, flat_images[:2], metadata={"model": request.param}, typical_tokens=kept)
    return request.param, atm, plugin, portable_flavour(plugin)


def test_flavours_pass_the_checker_with_their_custom_node_rules(exported):
    _, atm, plugin, portable = exported
    check_model(plugin, "plugin")
    check_model(portable, "portable")
    merges = [n for n in plugin.graph.node if contract.is_token_merge(n)]
    assert len(merges) == sum(step is not None for step in atm.steps)
    assert set(custom_nodes(plugin)) == {(contract.DOMAIN, contract.OP_TYPE)}
    assert custom_nodes(portable) == []
    assert read_metadata(plugin)["flavour"] == "plugin" and read_metadata(portable)["flavour"] == "portable"
    for node in merges:  # TensorRT's tuning value, and the cast of the plugin's INT32 count
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert 1 <= attrs["opt_num_tokens"] <= 198 and attrs["plugin_namespace"] == b"atm_export"
        assert attrs["max_num_tokens"] == atm.vit.patch_embed.num_patches + atm.num_protected
        cast = next(n for n in plugin.graph.node if list(n.input) == [node.output[2]])
        assert cast.op_type == "Cast" and onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.INT64


def test_batch_is_dynamic_and_outputs_are_named(exported):
    _, atm, plugin, _ = exported
    graph_input = plugin.graph.input[0]
    assert graph_input.name == "images" and graph_input.type.tensor_type.shape.dim[0].dim_param
    assert [o.name for o in plugin.graph.output] == ["logits", "tokens_per_layer"]
    assert plugin.graph.output[1].type.tensor_type.shape.dim[0].dim_value == atm.depth


def _extra_checks(bundle):
    return settling_checks(bundle.plugin, lambda plans: open_runner(bundle, "ort_plugin", replay=plans), bundle.portable)


def test_parity_at_batch_sizes_1_3_8(exported, flat_images):
    key, atm, plugin, portable = exported
    refs = [reference_run(atm, take_batch(flat_images, b)) for b in (1, 3, 8)]
    assert refs[-1].tokens[-1] < 0.6 * refs[-1].tokens[0], f"{key}: the inputs should merge a lot: {refs[-1].tokens}"
    bundle = Bundle(atm=atm, vit=atm.vit, plugin=plugin, portable=portable)
    extra = _extra_checks(bundle)
    assert set(extra) == {"ort_plugin", "ort_portable"}
    for name in ("ort_portable", "ort_plugin"):
        with open_runner(bundle, name) as runner:
            result = check_backend(runner, refs, extra_checks=extra[name])
        assert result["status"] == PASSED, (name, result["notes"])
        for batch in result["batches"].values():
            assert all(c["status"] == PASSED for c in batch["checks"].values()), batch
            if not batch.get("settled"):
                assert batch["max_abs_diff"] <= 1e-4 and batch["token_counts_equal"]


def test_a_fixed_schedule_replays_exactly(exported, flat_images):
    key, atm, plugin, _ = exported
    r = [0] * atm.depth
    for block in [i for i, s in enumerate(atm.steps) if s is not None][:3]:
        r[block] = 7
    replay = Bundle(atm=atm, vit=atm.vit, portable=portable_flavour(with_fixed_schedule(plugin, r)))
    with open_runner(replay, "ort_portable") as runner:
        tokens = runner.run(take_batch(flat_images, 3).numpy()).tokens
    expected = [atm.vit.patch_embed.num_patches + atm.num_protected]
    for block in range(atm.depth - 1):
        expected.append(expected[-1] - r[block])
    assert tokens == expected


def _parity_of_portable(portable, plugin, atm, images):
    refs = [reference_run(atm, take_batch(images, 3))]
    bundle = Bundle(atm=atm, vit=atm.vit, plugin=plugin, portable=portable)
    with open_runner(bundle, "ort_portable") as runner:
        return check_backend(runner, refs, extra_checks=_extra_checks(bundle)["ort_portable"])


def test_a_broken_merge_step_is_caught(exported, flat_images):
    """Mutation check: a lowering that merges into the worst partner must fail."""
    _, atm, plugin, portable = exported
    broken = onnx.ModelProto()
    broken.CopyFrom(portable)
    for node in broken.graph.node:
        if node.op_type == "ArgMax" and node.name.startswith("TokenMerge_b"):
            node.op_type = "ArgMin"
    result = _parity_of_portable(broken, plugin, atm, flat_images)
    assert result["status"] == "failed" and "merge steps lowered" in " ".join(result["notes"]), result["notes"]
    # the numerical layer on its own: each lowered step run on eager's inputs
    numerical = lowering_check(broken, plugin, reference_run(atm, take_batch(flat_images, 3)))
    assert numerical["status"] == "failed" and numerical["choices_differ_in_blocks"], numerical


def test_changed_weights_are_caught(exported, flat_images):
    _, atm, plugin, portable = exported
    changed = onnx.ModelProto()
    changed.CopyFrom(portable)
    weight = next(t for t in changed.graph.initializer if len(t.raw_data) > 1000)
    data = bytearray(weight.raw_data)
    data[:4] = b"\x00\x00\x80\x3f"  # one float becomes 1.0
    weight.raw_data = bytes(data)
    result = _parity_of_portable(changed, plugin, atm, flat_images)
    assert result["status"] == "failed" and "weight" in " ".join(result["notes"])
