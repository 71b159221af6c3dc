"""The TensorRT engine's batch range: from the run's batches by default, or --trt-*-batch, checked before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from atm_export.cli import main
from atm_export.errors import UserError
from atm_export.jobs.export import JobOptions, engine_batches


def _opts(**kw) -> JobOptions:
    return JobOptions(model="deit_t", output=Path("unused"), **kw)


def test_the_default_range_covers_every_batch_the_run_uses():
    assert engine_batches(_opts()) == (1, 8, 32)  # sample 8, parity 1 and 3, benchmark 1, 8, 32
    assert engine_batches(_opts(benchmark=False)) == (1, 8, 8)
    assert engine_batches(_opts(batch_size=4, parity_batches=(2,), bench_batches=(16,))) == (1, 4, 16)


def test_given_bounds_are_used_independently_of_the_benchmark():
    assert engine_batches(_opts(trt_max_batch=64)) == (1, 8, 64)
    assert engine_batches(_opts(trt_opt_batch=16, trt_max_batch=128)) == (1, 16, 128)
    assert engine_batches(_opts(trt_min_batch=1, trt_opt_batch=1, benchmark=False, batch_size=1,
                                parity_batches=(1,))) == (1, 1, 1)


@pytest.mark.parametrize("kw, message", [
    ({"trt_min_batch": 9, "trt_opt_batch": 4}, "1 <= --trt-min-batch <= --trt-opt-batch <= --trt-max-batch"),
    ({"trt_max_batch": 16}, "at batch sizes [32], outside"),
    ({"trt_min_batch": 2, "benchmark": False}, "at batch sizes [1], outside"),
])
def test_a_range_that_cannot_work_is_refused(kw, message):
    with pytest.raises(UserError) as info:
        engine_batches(_opts(**kw))
    assert message in str(info.value)


def test_the_command_refuses_a_bad_range_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["deit_t", "--random-init", "-o", str(out), "--trt-max-batch", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "outside --trt-min-batch 1 .. --trt-max-batch 4" in err and "\n" not in err
    assert not out.exists()
    assert main(["deit_t", "--random-init", "-o", str(out), "--trt-max-batch", "4", "--no-tensorrt", "--no-onnx",
                 "--no-benchmark", "-q"]) == 0  # no engine: the range is not checked
