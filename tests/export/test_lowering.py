"""One TokenMerge step in ONNX: the standard-op lowering and the ONNX Runtime reference kernel
against the PyTorch merge (atm_export.merge), on inputs that merge."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from atm_export import merge as M
from atm_export.backends.ort_custom_op import Replay, kernel_calls, register, to_extensions_domain
from atm_export.export.lowering import MIN_OPSET, lower_model, single_node_model
from conftest import merging_inputs, token_merge_model
from reference import as_multiset, reference_merge, sweep

CASES = [
    {"threshold": 0.8, "fixed_r": -1},
    {"threshold": 1.0, "fixed_r": -1},  # merges nothing
    {"threshold": -1.0, "fixed_r": -1},  # merges the maximum
    {"threshold": 1.0, "fixed_r": 5},
    {"threshold": 1.0, "fixed_r": 0},
]


def eager(x, size, metric, threshold, fixed_r, split_mode, num_protected):
    return M.token_merge(x, size, metric, threshold=None if fixed_r >= 0 else threshold,
                         r=fixed_r if fixed_r >= 0 else None, split_mode=["alternate", "size"][split_mode],
                         num_protected=num_protected)


def run_lowered(model, x, size, metric):
    lowered = lower_model(model)
    onnx.checker.check_model(lowered, full_check=True)
    session = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy(), "size": size.numpy(), "metric": metric.numpy()})


def run_reference_kernel(model, x, size, metric, replay=None):
    options = ort.SessionOptions()
    options.register_custom_ops_library(register())
    session = ort.InferenceSession(to_extensions_domain(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    with kernel_calls(replay):
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


@pytest.mark.parametrize("split_mode", [0, 1], ids=["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2, 5])
@pytest.mark.parametrize("runner", [run_lowered, run_reference_kernel], ids=["lowered", "ort-kernel"])
def test_tome_convention_reference_on_random_cases(runner, num_protected, split_mode):
    """The plain-loop reference's sweep (tests/reference.py): every r up to the cap, thresholds,
    odd and even N; outputs compared in order and as multisets of tokens."""
    for x, size, metric, kw, where in sweep(num_protected, seeds=2):
        attrs = {"fixed_r": kw["r"]} if "r" in kw else {"threshold": kw["threshold"]}
        model = token_merge_model(split_mode=split_mode, num_protected=num_protected, **attrs)
        x_out, size_out, num_tokens = runner(model, x, size, metric)
        ref_x, ref_size, ref_r, _ = reference_merge(x.double().tolist(), size.double().tolist(), metric.double().tolist(),
                                                    split_mode=["alternate", "size"][split_mode],
                                                    num_protected=num_protected, **kw)
        assert int(num_tokens) == x.shape[1] - ref_r, where
        np.testing.assert_allclose(x_out, np.array(ref_x), atol=1e-5, rtol=1e-5, err_msg=where)
        for bi in range(x.shape[0]):
            np.testing.assert_allclose(as_multiset(x_out[bi], size_out[bi]), as_multiset(ref_x[bi], ref_size[bi]),
                                       atol=1e-5, rtol=1e-5, err_msg=where)


def test_merging_happens_in_these_cases():
    x, size, metric = merging_inputs(n=21, num_protected=1)
    assert eager(x, size, metric, 0.8, -1, 0, 1).r > 0


def test_exact_ties_break_alike():
    """One-hot metrics: exact similarity ties. The lowering must pick the lower positions."""
    one = torch.eye(4)
    metric = torch.stack([one[3], one[0], one[0], one[0], one[0], one[1], one[0]]).unsqueeze(0)  # see test_merge
    x = torch.arange(7.0).reshape(1, 7, 1)
    size = torch.ones(1, 7)
    model = token_merge_model(threshold=1.0, fixed_r=2, split_mode=0, num_protected=1)
    x_out, size_out, _ = run_lowered(model, x, size, metric)
    expected = M.token_merge(x, size, metric, r=2, num_protected=1)
    # B1 receives A2 and A4: (1 + 2 + 4) / 3, summed in another order than eager's
    np.testing.assert_allclose(x_out, expected.x.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(size_out, expected.size.numpy())


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


@pytest.mark.parametrize("split_mode", [0, 1], ids=["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2])  # P odd leaves A empty, P even B (alternate split)
@pytest.mark.parametrize("runner", [run_lowered, run_reference_kernel], ids=["lowered", "ort-kernel"])
def test_one_unprotected_token_left(runner, num_protected, split_mode):
    n = num_protected + 1
    x, size, metric = merging_inputs(n=n, num_protected=num_protected)
    model = token_merge_model(threshold=-1.0, num_protected=num_protected, split_mode=split_mode)
    x_out, _, num_tokens = runner(model, x, size, metric)
    assert int(num_tokens) == n
    np.testing.assert_array_equal(x_out, x.numpy())


@pytest.mark.parametrize("split_mode", [0, 1], ids=["alternate", "size"])
def test_choices_are_exposed_for_checks(split_mode):
    """The step's choices come out as input-token positions, as merge.Choices states them."""
    x, size, metric = merging_inputs(n=21, num_protected=1)
    node = token_merge_model(threshold=0.8, split_mode=split_mode, num_protected=1).graph.node[0]
    session = ort.InferenceSession(single_node_model(node).SerializeToString(), providers=["CPUExecutionProvider"])
    _, _, _, src, dst, kept = session.run(None, {"x": x.numpy(), "size": size.numpy(), "metric": metric.numpy()})
    step = M.token_merge(x, size, metric, threshold=0.8, num_protected=1, split_mode=["alternate", "size"][split_mode])
    assert step.r > 0
    expected = M.Choices.of(step.plan)
    np.testing.assert_array_equal(src, expected.src.numpy())
    np.testing.assert_array_equal(dst, expected.dst.numpy())
    np.testing.assert_array_equal(kept, expected.kept.numpy())


def test_old_opset_is_refused():
    with pytest.raises(ValueError, match="too old"):
        lower_model(token_merge_model(opset=MIN_OPSET - 1))


def test_a_kernel_error_comes_back_as_a_python_exception():
    """An exception inside the Python kernel would abort the process if it crossed into ONNX
    Runtime's C++; the kernel holds it and the caller gets it after the run."""
    x, size, metric = merging_inputs(n=9)
    with pytest.raises(RuntimeError, match="more TokenMerge calls than recorded"):
        run_reference_kernel(token_merge_model(threshold=0.5), x, size, metric, replay=Replay([]))
    run_reference_kernel(token_merge_model(threshold=0.5), x, size, metric)  # the error went with its run
