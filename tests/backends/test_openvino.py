"""The OpenVINO runner: the portable graph at fp32 against eager PyTorch, reduced precision
detected and judged as such, device and backend options."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from atm_export.backends import (FAMILIES, SELECTABLE, RuntimeOptions, follows, open_runner, precision_of,
                                 runtime_unavailable, select, unavailable)
from atm_export.backends import openvino as ovb
from atm_export.errors import UserError
from atm_export.export.bundle import Bundle
from atm_export.images import take_batch
from atm_export.parity import FAILED, PASSED, check_backend, reference_run, settling_checks

openvino = pytest.importorskip("openvino", reason="openvino not installed (pip install 'atm-export[openvino]')")
pytestmark = pytest.mark.slow




@pytest.fixture(scope="module")
def refs(bundle, flat_images):
    return [reference_run(bundle.atm, take_batch(flat_images, b)) for b in (1, 3, 8)]


def bf16_problem() -> str | None:
    return ovb.precision_problem(ovb.DEFAULT_DEVICE, "bf16")


def test_fp32_runs_the_adaptive_graph_as_eager_pytorch_does(bundle, refs):
    assert all(sum(r.stats.r_per_layer) > 0 for r in refs), "the flat images must make merging happen"
    checks = settling_checks(bundle.plugin, lambda plans: open_runner(bundle, "ort_plugin", replay=plans),
                             bundle.portable, openvino_step=ovb.run_step)
    with open_runner(bundle, "openvino") as runner:
        assert runner.precision == "fp32" and runner.run(refs[0].images).tokens == refs[0].tokens
        result = check_backend(runner, refs, "fp32", extra_checks=checks["openvino"])
    assert result["status"] == PASSED, result["notes"]
    assert result["token_counts_equal"] and result["max_error_ratio"] <= 1.0
    assert set(checks["openvino"]) == {"lowering", "replay of the shared graph"}


def test_the_fp32_hint_is_what_keeps_openvino_at_fp32(bundle, refs):
    """OpenVINO's CPU default is bf16 wherever the CPU has it: without the hint an "fp32" check
    would run bf16. The hint is always set, and where bf16 exists it visibly changes the logits."""
    assert ovb.compile_options("fp32", None)["INFERENCE_PRECISION_HINT"] == "f32"
    assert ovb.compile_options("bf16", 3) == {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY",
                                              "INFERENCE_NUM_THREADS": 3}
    if bf16_problem():
        pytest.skip(f"bf16 cannot run here: {bf16_problem()}")
    images = refs[1].images
    with open_runner(bundle, "openvino_baseline") as fp32, open_runner(bundle, "openvino_bf16_baseline") as bf16:
        a, b = fp32.run(images).logits, bf16.run(images).logits
    with torch.inference_mode():
        expected = bundle.vit(torch.from_numpy(images)).numpy()
    assert np.abs(a - expected).max() < 1e-4 < np.abs(b - expected).max() < 0.1


def test_bf16_is_judged_at_bf16_and_its_moved_decisions_are_listed(bundle, refs):
    if bf16_problem():
        pytest.skip(f"bf16 cannot run here: {bf16_problem()}")
    assert precision_of("openvino_bf16") == "bf16" and precision_of("openvino") == "fp32"
    with open_runner(bundle, "openvino_bf16") as runner:
        result = check_backend(runner, refs, "bf16", strict=True)
    assert result["precision"] == "bf16" and result["tolerance"]["atol"] == 5e-2
    assert result["status"] != FAILED and not result["fails_run"], result["notes"]
    for batch in result["batches"].values():
        moved = batch.get("moved_decisions", [])
        assert bool(moved) == (batch["token_counts_equal"] is False)
        assert all(m["tokens"] != m["reference_tokens"] and "margin" in m for m in moved)


def test_a_tampered_weight_in_model_onnx_fails_openvino_parity(bundle, refs):
    """The settling checks must not excuse a graph whose weights differ: the integrity check
    (model.onnx must be the lowering of model.plugin.onnx) fails it."""
    tampered = onnx.ModelProto()
    tampered.CopyFrom(bundle.portable)
    init = max(tampered.graph.initializer, key=lambda t: np.prod(t.dims))
    values = numpy_helper.to_array(init).copy()
    values.flat[: values.size // 2] *= 1.5
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    broken = Bundle(atm=bundle.atm, vit=bundle.vit, plugin=bundle.plugin, portable=tampered)
    checks = settling_checks(broken.plugin, lambda plans: open_runner(broken, "ort_plugin", replay=plans),
                             broken.portable, openvino_step=ovb.run_step)
    with open_runner(broken, "openvino") as runner:
        result = check_backend(runner, refs, "fp32", extra_checks=checks["openvino"])
    assert result["status"] == FAILED and result["fails_run"]


class _FakeCore:
    """Stands for openvino.Core on a machine whose CPU lists only FP32 and INT8."""

    available_devices = ["CPU"]

    def get_property(self, device, name):
        return {"OPTIMIZATION_CAPABILITIES": ["FP32", "INT8"], "FULL_DEVICE_NAME": "Some CPU"}[name]


def test_a_precision_the_device_lacks_is_skipped_with_the_reason(bundle, monkeypatch):
    monkeypatch.setattr(ovb, "_core", _FakeCore)
    reason = unavailable("openvino_bf16", bundle)
    assert "Some CPU" in reason and "no bf16 support" in reason and "FP32, INT8" in reason
    assert unavailable("openvino", bundle) is None
    with pytest.raises(ValueError, match="no bf16 support"):
        open_runner(bundle, "openvino_bf16_baseline")


def test_devices_openvino_lacks_are_named():
    assert "no device GPU.7" in ovb.device_problem("GPU.7")
    assert "no device NPU" in ovb.device_problem("HETERO:NPU,CPU")
    assert ovb.device_problem("CPU") is None and ovb.device_problem("AUTO") is None
    runtime = RuntimeOptions(openvino_device="GPU.7")
    assert "no device GPU.7" in runtime_unavailable("openvino", runtime)
    from atm_export.jobs.common import check_backend_options

    with pytest.raises(UserError, match="--openvino-device GPU.7: OpenVINO has no device GPU.7"):
        check_backend_options(None, runtime)
    with pytest.raises(UserError, match="--backends openvino: OpenVINO has no device GPU.7"):
        check_backend_options("openvino", runtime)


def test_threads_are_passed_to_openvino(bundle, refs):
    with open_runner(bundle, "openvino", runtime_options=RuntimeOptions(openvino_threads=1)) as runner:
        assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert runner.run(refs[0].images).tokens == refs[0].tokens


# ------------------------------------------------------------------ --backends

@pytest.mark.parametrize("spec, expected", [
    (None, SELECTABLE),
    ("all", SELECTABLE),
    ("openvino", FAMILIES["openvino"]),
    ("ort_portable,openvino_bf16", ("ort_portable", "openvino_bf16")),
    ("-openvino", tuple(n for n in SELECTABLE if n not in FAMILIES["openvino"])),
    ("ort,-ort_plugin", ("ort_portable", "ort_cuda_portable")),
    ("eager, tensorrt", ("eager_atm", "tensorrt")),
])
def test_backends_option_chooses_and_leaves_out(spec, expected):
    assert select(spec) == tuple(n for n in SELECTABLE if n in expected)


def test_unknown_backends_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'onnxruntime'.*openvino_bf16"):
        select("onnxruntime")


def test_baselines_and_static_models_follow_their_backends():
    chosen = select("openvino")
    assert follows("openvino_baseline", chosen) and follows("openvino_bf16_baseline", chosen)
    assert follows("openvino_static", chosen) and not follows("ort_portable_static", chosen)
    assert not follows("ort_baseline", chosen) and not follows("eager_baseline", chosen)
    assert follows("ort_baseline", select("ort_plugin"))


def test_openvino_per_node_timing_gives_the_merge_steps_share(bundle, refs):
    """OpenVINO keeps the ONNX node names, so the lowered merge steps (TokenMerge_b<block>/...)
    are found in its per-node timing."""
    from atm_export.bench import merge_shares, node_merge_share

    assert node_merge_share([("TokenMerge_b1/Gather", 1.0), ("node_MatMul", 3.0)]) == 0.25
    with open_runner(bundle, "openvino", profile=True) as runner:
        nodes = runner.run_profiled(refs[1].images)
    assert any(name.startswith("TokenMerge_b") for name, _ in nodes)
    assert 0.0 < node_merge_share(nodes) < 1.0
    shares = merge_shares(bundle, refs[1].images, ("openvino",))
    assert set(shares) == {"eager_atm", "openvino"} and 0.0 < shares["openvino"] < 1.0
