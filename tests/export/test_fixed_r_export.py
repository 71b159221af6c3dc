"""Fixed-r (ToMe-style) exports: every token dimension is static, only the batch is symbolic.

A fixed r on a static N gives a static output count (merge.tokens_after_fixed_r): the custom op's
fake says so to torch.export, the plugin declares it as a plain dimension (no size tensor), and
the lowering folds it into constants. One export of deit_tiny (about 15 s on two cores).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from atm_export import contract, patch_model
from atm_export.export.integrity import lowering_difference, merge_node_differences
from atm_export.export.onnx import export_plugin_flavour, portable_flavour, set_int_attribute
from atm_export.merge import tokens_after_fixed_r
from atm_export.ops import register_onnx_schema
from atm_export.schedule import replay_config
from conftest import make_model

pytestmark = pytest.mark.slow
R_PER_BLOCK = [8, 0, 16, 4, 30, 8, 8, 2, 1, 50, 3, 0]
TYPICAL = [150.4] * len(R_PER_BLOCK)


@pytest.fixture(scope="module")
def fixed(flat_images):
    atm = patch_model(make_model("deit_tiny"), replay_config(R_PER_BLOCK, split_layer=6))  # both splits
    assert {step.split_mode for step in atm.steps if step is not None} == {"alternate", "size"}
    plugin = export_plugin_flavour(atm, flat_images[:2], typical_tokens=TYPICAL)
    return atm, plugin, portable_flavour(plugin)


def _symbolic_dims(model: onnx.ModelProto, infos) -> dict[str, list]:
    """Float activations (not weights) -> the dims that are not ints (names, or None: unknown shape)."""
    weights = {t.name for t in model.graph.initializer}
    out = {}
    for info in infos:
        t = info.type.tensor_type
        if t.elem_type != onnx.TensorProto.FLOAT or info.name in weights:
            continue
        if not t.HasField("shape"):
            out[info.name] = [None]
            continue
        out[info.name] = [d.dim_param or None for d in t.shape.dim if not d.HasField("dim_value")]
    return out


def _expected_tokens(atm) -> list[int]:
    """Tokens entering each block, from the Python rule (class-token model: P tokens leave the last block)."""
    n = atm.vit.patch_embed.num_patches + atm.num_protected
    tokens = []
    for step in atm.steps:
        tokens.append(n)
        if step is not None:
            n = tokens_after_fixed_r(n, step.r, atm.num_protected)
    return tokens


def test_nodes_carry_a_fixed_r_and_the_tensorrt_hints(fixed):
    atm, plugin, _ = fixed
    nodes = [n for n in plugin.graph.node if contract.is_token_merge(n)]
    assert nodes
    for node in nodes:
        attrs = contract.Attributes.from_values({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
        assert attrs.fixed_r == R_PER_BLOCK[contract.node_block(node.name) - 1]
        assert attrs.max_num_tokens == 197, "the model's input token count, on every node"
        assert attrs.opt_num_tokens == 150, "typical_tokens, rounded, from the op's own translation"


def test_plugin_flavour_value_info_has_static_token_dims(fixed):
    """torch's exporter writes value_info for every tensor (TokenMerge has no ONNX shape inference)."""
    atm, plugin, _ = fixed
    symbolic = _symbolic_dims(plugin, plugin.graph.value_info)
    assert len(symbolic) > 100
    assert {name: dims for name, dims in symbolic.items() if dims != ["batch"] and dims} == {}
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in plugin.graph.value_info}
    tokens = _expected_tokens(atm)
    for node in (n for n in plugin.graph.node if contract.is_token_merge(n)):
        block = contract.node_block(node.name)
        assert shapes[node.input[0]][:2] == ["batch", tokens[block - 1]]
        assert shapes[node.output[0]][:2] == ["batch", tokens[block]], f"{node.name}: N - min(r, floor(M / 2))"
    assert [d.dim_value for d in plugin.graph.output[1].type.tensor_type.shape.dim] == [atm.depth]


def test_lowered_graph_infers_static_token_dims(fixed):
    """Strict shape inference (no data propagation) gives every float tensor of the lowering static
    token dims: N's consequences are constants, and no Expand takes a computed shape."""
    _, _, portable = fixed
    inferred = onnx.shape_inference.infer_shapes(portable, strict_mode=True)
    symbolic = _symbolic_dims(inferred, [*inferred.graph.value_info, *inferred.graph.output])
    lowered = [name for name in symbolic if contract.node_block(name.partition("/")[0])]
    assert len(lowered) > 100, "the lowered steps' own tensors are inferred"
    assert {name: dims for name, dims in symbolic.items() if dims != ["batch"] and dims} == {}
    weights = {t.name for t in portable.graph.initializer}
    top_k = [n for n in portable.graph.node if n.op_type == "TopK"]
    assert top_k and all(n.input[1] in weights for n in top_k), "every TopK's K is a constant"


def test_fixed_r_exports_pass_the_integrity_checks(fixed):
    atm, plugin, portable = fixed
    assert merge_node_differences(plugin, atm.steps, atm.num_protected) == []
    assert lowering_difference(portable, plugin) is None
    broken = onnx.ModelProto()
    broken.CopyFrom(plugin)
    node = next(n for n in broken.graph.node if contract.is_token_merge(n))
    set_int_attribute(node, "max_num_tokens", 100)
    problems = merge_node_differences(broken, atm.steps, atm.num_protected)
    assert any("below its input's 197 tokens" in p for p in problems)
    assert any("differs between the nodes" in p for p in problems)


def test_lowered_fixed_r_graph_matches_eager(fixed, flat_images):
    atm, _, portable = fixed
    register_onnx_schema()
    session = ort.InferenceSession(portable.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = flat_images[:3]
    logits, tokens = session.run(None, {"images": batch.numpy()})
    with torch.no_grad():
        expected, stats = atm.run(batch)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)
    assert tokens.tolist() == [int(t) for t in stats.tokens_per_layer] == _expected_tokens(atm)
