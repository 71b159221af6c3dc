"""The runner interface and its factory: every backend opened from one bundle, alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atm_export.backends import BASELINES, NAMES, open_runner, precision_of, unavailable
from atm_export.backends.base import Outputs
from atm_export.export.bundle import Bundle
from atm_export.images import take_batch
from atm_export.parity import reference_run
from conftest import make_model

pytestmark = pytest.mark.slow




def test_every_runnable_backend_returns_logits_and_token_counts(bundle, flat_images):
    images = take_batch(flat_images, 3).numpy()
    with torch.inference_mode():
        expected = bundle.atm(torch.from_numpy(images)).numpy()
    tokens = [int(t) for t in bundle.atm.last_stats.tokens_per_layer]
    opened = [n for n in NAMES if unavailable(n, bundle) is None]
    assert {"eager_atm", "eager_baseline", "ort_portable", "ort_plugin", "ort_baseline"} <= set(opened)
    for name in opened:
        with open_runner(bundle, name) as runner:
            out = runner.run(images)
            assert runner.name == name and runner.last_inference_time() > 0
        assert isinstance(out, Outputs) and out.logits.shape == expected.shape
        if precision_of(name) in ("bf16", "fp16"):  # judged at its precision in tests/backends/test_openvino.py
            assert np.isfinite(out.logits).all() and (out.tokens is None) == (name not in BASELINES), name
        elif name in BASELINES:  # a merged backend: ATM's outputs and counts
            assert out.tokens == tokens, name
            np.testing.assert_allclose(out.logits, expected, atol=1e-4, err_msg=name)
        else:
            assert out.tokens is None, name


def test_unavailable_backends_say_why(bundle):
    assert "TensorRT" in unavailable("tensorrt", bundle) or "CUDA" in unavailable("tensorrt", bundle)
    assert "not exported" in unavailable("ort_plugin", Bundle(atm=bundle.atm, vit=bundle.vit))
    with pytest.raises(ValueError, match="cannot be opened"):
        open_runner(Bundle(atm=bundle.atm, vit=bundle.vit), "ort_portable")


def test_a_runner_must_be_active():
    from polygraphy.exception import PolygraphyException

    runner = open_runner(Bundle(atm=None, vit=make_model("deit_tiny")), "eager_baseline")
    with pytest.raises(PolygraphyException):
        runner.run(np.zeros((1, 3, 224, 224), np.float32))


def test_replay_is_an_option_of_the_runner_and_records_decisions(bundle, flat_images):
    ref = reference_run(bundle.atm, take_batch(flat_images, 3))
    with open_runner(bundle, "ort_plugin", replay=[s.plan for s in ref.steps]) as runner:
        out = runner.run(ref.images)
    assert out.tokens == ref.tokens and len(out.decisions) == len(ref.steps)
    np.testing.assert_allclose(out.logits, ref.logits, atol=1e-4)
    with open_runner(bundle, "ort_plugin") as plain:  # another runner of the same graph replays nothing
        assert plain.run(ref.images).decisions is None
    with pytest.raises(ValueError, match="only the plugin flavour"):
        open_runner(bundle, "ort_portable", replay=[])


def test_a_kernel_error_surfaces_after_the_run_instead_of_aborting(bundle, flat_images):
    """Too few recorded plans: the kernel fails inside ONNX Runtime's C++; the runner raises it."""
    ref = reference_run(bundle.atm, take_batch(flat_images, 1))
    with open_runner(bundle, "ort_plugin", replay=[s.plan for s in ref.steps][:-1]) as runner:
        with pytest.raises(RuntimeError, match="more TokenMerge calls than recorded"):
            runner.run(ref.images)
        assert runner.run.__self__ is runner  # still usable afterwards


def test_profiled_runs_leave_no_trace_file(bundle, flat_images, tmp_path, monkeypatch):
    import glob
    import os
    import tempfile

    from atm_export.bench import ort_merge_share

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "atm_export_ort_*")))
    with open_runner(bundle, "ort_portable", profile=True) as runner:
        share = ort_merge_share(runner.run_profiled(take_batch(flat_images, 2).numpy()))
    assert 0.0 < share < 1.0
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "atm_export_ort_*"))) == before
