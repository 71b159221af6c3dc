"""The fp16-typed export (--trt-precision fp16): what strongly typed TensorRT builds take their
precision from. Its numbers are checked by the TensorRT parity (skipped without TensorRT)."""

from __future__ import annotations

import onnx
import pytest
import torch

from atm_export import contract
from atm_export.export.onnx import check_model, export_baseline, export_plugin_flavour, read_metadata
from atm_export.patch import patch_model
from atm_export.schedule import MergeConfig

pytestmark = pytest.mark.slow
FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in values}


def test_the_fp16_plugin_graph_is_typed_float16_inside_and_float32_at_its_edges(shapes_vit, flat_images):
    atm = patch_model(shapes_vit, MergeConfig.from_preset("shapes_vit"))
    images = torch.nn.functional.interpolate(flat_images[:2], size=64)
    model = export_plugin_flavour(atm, images, half=True)
    check_model(model, "plugin")
    assert read_metadata(model)["dtype"] == "float16"
    weights = [i.data_type for i in model.graph.initializer if i.data_type in (FLOAT, HALF) and len(i.dims)]
    assert weights and all(t == HALF for t in weights), "every weight is float16 (merge sizes stay float32 scalars)"
    types = value_types(model)
    assert types["images"] == FLOAT and types["logits"] == FLOAT
    nodes = [n for n in model.graph.node if contract.is_token_merge(n)]
    assert nodes
    for node in nodes:
        x, size, metric = node.input
        assert (types[x], types[size], types[metric]) == (HALF, FLOAT, HALF), node.name
    # The caller's model stays float32 (the fp16 graph is made from a copy).
    assert next(shapes_vit.parameters()).dtype == torch.float32
    assert atm(images).dtype == torch.float32


def test_the_fp16_baseline_is_typed_float16_too(shapes_vit):
    model = export_baseline(shapes_vit, torch.zeros(2, 3, 64, 64), half=True)
    floats = {i.data_type for i in model.graph.initializer if i.data_type in (FLOAT, HALF)}
    assert floats == {HALF}
    assert value_types(model)["images"] == FLOAT
    assert next(shapes_vit.parameters()).dtype == torch.float32
