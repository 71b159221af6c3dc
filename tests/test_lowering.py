"""One TokenMerge step in ONNX: the standard-op lowering and the ONNX Runtime reference kernel
against the PyTorch merge (atm_export.merge), on inputs that merge."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from atm_export import merge as M
from atm_export.backends.ort_custom_op import register, to_extensions_domain
from atm_export.export.lowering import MIN_OPSET, lower_model, single_node_model
from atm_export.ops import ONNX_DOMAIN, register_onnx_schema
from conftest import merging_inputs

CASES = [
    {"threshold": 0.8, "fixed_r": -1},
    {"threshold": 1.0, "fixed_r": -1},  # merges nothing
    {"threshold": -1.0, "fixed_r": -1},  # merges the maximum
    {"threshold": 1.0, "fixed_r": 5},
    {"threshold": 1.0, "fixed_r": 0},
]


def token_merge_model(opset=18, **attrs) -> onnx.ModelProto:
    register_onnx_schema()
    node = helper.make_node("TokenMerge", ["x", "size", "metric"], ["x_out", "size_out", "num_tokens"],
                            domain=ONNX_DOMAIN, name="TokenMerge_b1", **attrs)
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "one_merge",
        [helper.make_tensor_value_info("x", f, ["B", "N", "C"]), helper.make_tensor_value_info("size", f, ["B", "N"]),
         helper.make_tensor_value_info("metric", f, ["B", "N", "D"])],
        [helper.make_tensor_value_info("x_out", f, ["B", "M", "C"]), helper.make_tensor_value_info("size_out", f, ["B", "M"]),
         helper.make_tensor_value_info("num_tokens", TensorProto.INT64, [])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ONNX_DOMAIN, 1)],
                             ir_version=10)


def eager(x, size, metric, threshold, fixed_r, split_mode, num_protected):
    return M.token_merge(x, size, metric, threshold=None if fixed_r >= 0 else threshold,
                         r=fixed_r if fixed_r >= 0 else None, split_mode=["alternate", "size"][split_mode],
                         num_protected=num_protected)


def run_lowered(model, x, size, metric):
    lowered = lower_model(model)
    onnx.checker.check_model(lowered, full_check=True)
    session = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy(), "size": size.numpy(), "metric": metric.numpy()})


def run_reference_kernel(model, x, size, metric):
    options = ort.SessionOptions()
    options.register_custom_ops_library(register())
    session = ort.InferenceSession(to_extensions_domain(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy(), "size": size.numpy(), "metric": metric.numpy()})


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"thr{c['threshold']}-r{c['fixed_r']}")
@pytest.mark.parametrize("num_protected", [0, 1, 2])
@pytest.mark.parametrize("split_mode", [0, 1], ids=["alternate", "size"])
@pytest.mark.parametrize("runner", [run_lowered, run_reference_kernel], ids=["lowered", "ort-kernel"])
def test_matches_pytorch(runner, split_mode, num_protected, case):
    x, size, metric = merging_inputs(n=21, num_protected=num_protected)
    model = token_merge_model(split_mode=split_mode, num_protected=num_protected, **case)
    onnx.checker.check_model(model, full_check=True)
    x_out, size_out, num_tokens = runner(model, x, size, metric)
    expected = eager(x, size, metric, split_mode=split_mode, num_protected=num_protected, **case)
    assert int(num_tokens) == expected.x.shape[1]
    np.testing.assert_allclose(x_out, expected.x.numpy(), atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(size_out, expected.size.numpy())


def test_merging_happens_in_these_cases():
    x, size, metric = merging_inputs(n=21, num_protected=1)
    assert eager(x, size, metric, 0.8, -1, 0, 1).r > 0


def test_exact_ties_break_alike():
    """One-hot metrics: exact similarity ties. The lowering must pick the lower positions."""
    one = torch.eye(4)
    metric = torch.stack([one[3], one[0], one[0], one[0], one[0], one[0], one[1]]).unsqueeze(0)
    x = torch.arange(7.0).reshape(1, 7, 1)
    size = torch.ones(1, 7)
    model = token_merge_model(threshold=1.0, fixed_r=2, split_mode=0, num_protected=1)
    x_out, size_out, _ = run_lowered(model, x, size, metric)
    expected = M.token_merge(x, size, metric, r=2, num_protected=1)
    np.testing.assert_array_equal(x_out, expected.x.numpy())


def test_size_ties_sort_stably():
    """Equal sizes everywhere: the size-distinctive split must follow token order."""
    x, _, metric = merging_inputs(n=15, num_protected=1, seed=4)
    size = torch.ones(x.shape[:2])
    size[:, 5] = 3.0
    model = token_merge_model(threshold=0.5, fixed_r=-1, split_mode=1, num_protected=1)
    x_out, size_out, _ = run_lowered(model, x, size, metric)
    expected = M.token_merge(x, size, metric, threshold=0.5, split_mode="size", num_protected=1)
    np.testing.assert_allclose(x_out, expected.x.numpy(), atol=1e-6)
    np.testing.assert_array_equal(size_out, expected.size.numpy())


def test_one_unprotected_token_left():
    x, size, metric = merging_inputs(n=2, num_protected=1)
    x_out, _, num_tokens = run_lowered(token_merge_model(threshold=-1.0, num_protected=1), x, size, metric)
    assert int(num_tokens) == 2
    np.testing.assert_array_equal(x_out, x.numpy())


def test_choices_are_exposed_for_checks():
    x, size, metric = merging_inputs(n=21, num_protected=1)
    node = token_merge_model(threshold=0.8, split_mode=0, num_protected=1).graph.node[0]
    session = ort.InferenceSession(single_node_model(node).SerializeToString(), providers=["CPUExecutionProvider"])
    _, _, _, src, dst, unm = session.run(None, {"x": x.numpy(), "size": size.numpy(), "metric": metric.numpy()})
    plan = M.token_merge(x, size, metric, threshold=0.8, num_protected=1).plan
    np.testing.assert_array_equal(src, plan.src.numpy())
    np.testing.assert_array_equal(dst, plan.dst.numpy())
    np.testing.assert_array_equal(unm, plan.unm.numpy())


def test_old_opset_is_refused():
    with pytest.raises(ValueError, match="too old"):
        lower_model(token_merge_model(opset=MIN_OPSET - 1))
