"""``atm-export doctor``: the no-GPU path as CI runs it, the environment probes on faked command
output, and a faked GPU machine where a check fails (exit 1, the check named)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from atm_export import plugin_lib
from atm_export.cli import main
from atm_export.jobs import doctor as D

STEPS = ["build-kernels", "build-plugin", "cuda-kernel-tests", "memcheck-alternate", "memcheck-size",
         "racecheck-alternate", "racecheck-size", "two-merge-engine", "fp32-parity", "fp16-parity", "static-benchmark"]
CHECK_FIELDS = {"name", "status", "detail", "command", "seconds", "log", "figures"}


def run_doctor_cli(out: Path, capsys) -> tuple[int, str, str]:
    code = main(["doctor", "-o", str(out)])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def read_checks(out: Path) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads((out / "doctor.json").read_text())["checks"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: doctor would run the GPU checks")
def test_without_a_gpu_it_says_what_it_would_run_and_exits_0(tmp_path, capsys):
    out = tmp_path / "doctor"
    code, stdout, _ = run_doctor_cli(out, capsys)
    assert code == 0, stdout
    for name in STEPS:
        line = next(line for line in stdout.splitlines() if line.strip().startswith(name + " "))
        assert "skipped" in line and "would run: " in line and " — cannot: no CUDA device" in line, line
    assert "compute-sanitizer --tool racecheck --error-exitcode 1" in stdout
    assert "no CUDA device here: 0 passed, 0 failed, 11 skipped" in stdout

    report = json.loads((out / "doctor.json").read_text())
    assert set(report) == {"created", "atm_export_version", "output", "environment", "checks"}
    env = report["environment"]
    assert env["cuda_device"] is False and env["torch"] == torch.__version__
    assert {f.name for f in dataclasses.fields(D.Environment)} == set(env)
    checks = report["checks"]
    assert [c["name"] for c in checks] == STEPS
    assert all(set(c) == CHECK_FIELDS and c["status"] == "skipped" and c["command"] for c in checks)
    assert "# atm-export doctor" in (out / "doctor.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["doctor.json", "doctor.md"], "nothing staged is left"
    assert run_doctor_cli(out, capsys)[0] == 0, "a second run replaces the report"


# ---------------------------------------------------------------------------------------------
# The probes, on faked command output.

def test_nvidia_smi_probe(monkeypatch):
    monkeypatch.setattr(D, "which", lambda program: f"/usr/bin/{program}")
    monkeypatch.setattr(D, "run_command", lambda cmd, **kw: D.Completed(0, "580.65.06, NVIDIA H100 80GB HBM3, 9.0\n"))
    assert D.probe_nvidia_smi() == ({"driver": "580.65.06", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
                                    None)
    broken = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    monkeypatch.setattr(D, "run_command", lambda cmd, **kw: D.Completed(9, broken))
    facts, why = D.probe_nvidia_smi()
    assert facts == {} and "exit 9" in why and broken in why
    monkeypatch.setattr(D, "which", lambda program: None)
    assert D.probe_nvidia_smi() == ({}, "nvidia-smi not on PATH (no NVIDIA driver?)")


def test_nvcc_and_compute_sanitizer_probes(tmp_path, monkeypatch):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.touch()
    monkeypatch.setattr(plugin_lib, "find_nvcc", lambda: str(nvcc))
    monkeypatch.setattr(D, "run_command", lambda cmd, **kw: D.Completed(
        0, "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.48\n"))
    assert D.probe_nvcc() == ("13.0", None)
    monkeypatch.setattr(D, "run_command", lambda cmd, **kw: D.Completed(0, "garbage"))
    assert D.probe_nvcc()[0] is None

    monkeypatch.setattr(D, "which", lambda program: None)
    assert D.find_compute_sanitizer() is None
    (nvcc.parent / "compute-sanitizer").touch()  # the toolkit's bin/, not on PATH
    assert D.find_compute_sanitizer() == str(nvcc.parent.resolve() / "compute-sanitizer")


def test_a_crashing_or_hanging_command_is_contained():
    assert D.run_command(["/nonexistent/program"]).returncode == 127
    done = D.run_command(["sleep", "5"], timeout=0.2)
    assert done.returncode == 124 and "timed out" in done.output


# ---------------------------------------------------------------------------------------------
# A faked GPU machine: every command answered by ``fake_commands``.

def gpu_environment(**changes) -> D.Environment:
    env = D.Environment(python="3.11", torch="2.13.0", torch_cuda="13.0", cuda_device=True, gpu="NVIDIA H100",
                        compute_capability="9.0", driver="580.65.06", nvcc="13.0", tensorrt=None,
                        tensorrt_reason="TensorRT not installed", tensorrt_fp16=False,
                        compute_sanitizer="/cuda/bin/compute-sanitizer", cmake="/usr/bin/cmake",
                        kernel_tests=str(Path(__file__).parents[1] / "plugins" / "test_cuda_kernels.py"),
                        static_schedule=True)
    return dataclasses.replace(env, **changes)


SANITIZER_CLEAN = "small merge ok\n========= ERROR SUMMARY: 0 errors\n"
SANITIZER_HAZARD = ("========= Invalid __global__ read of size 4 bytes\n=========     at mergeKernel+0x1c0\n"
                    "========= ERROR SUMMARY: 1 error\n")


def job_report(precision: str, parity: dict) -> dict:
    latency = {name: {"8": {"p50": ms}} for name, ms in (("tensorrt", 1.5), ("tensorrt_baseline", 2.5))}
    return {"status": "passed", "parity": {n: {"status": s} for n, s in parity.items()}, "skipped": {},
            "tensorrt": {"precision": precision, "tf32": False if precision == "fp32" else True},
            "benchmark": {"speedup_batch": 8, "latency": latency}}


def engine_result(tokens: list[int]) -> dict:
    return {"token_merge_nodes": ["token_merge_1", "token_merge_2"], "engine_bytes": 1000,
            "device_memory_bytes": 4096, "second_merge_workspace_bytes": 512,
            "tokens": {"1": {"engine": tokens, "eager": tokens}, "3": {"engine": tokens, "eager": tokens}},
            "log_lines": 100, "nodes_in_log": {"token_merge_1": 3, "token_merge_2": 3}, "log_lines_with_workspace": 1}


def fake_commands(failing: set[str] = frozenset(), tokens=(197, 103, 53)):
    """A command runner standing in for a GPU machine; ``failing``: checks whose command fails."""
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        text = " ".join(cmd)
        if "compute-sanitizer" in cmd[0]:
            name = f"{cmd[cmd.index('--tool') + 1]}-{cmd[-1]}"
            return D.Completed(1, SANITIZER_HAZARD) if name in failing else D.Completed(0, SANITIZER_CLEAN)
        if "two-merge-engine" in text:
            directory = Path(cmd[cmd.index("two-merge-engine") + 1])
            directory.mkdir(parents=True, exist_ok=True)
            (directory / D.ENGINE_RESULT).write_text(json.dumps(engine_result(list(tokens))))
            return D.Completed(0, "{}")
        if "-o" in cmd:  # the main job
            out = Path(cmd[cmd.index("-o") + 1])
            out.mkdir(parents=True, exist_ok=True)
            precision = cmd[cmd.index("--trt-precision") + 1]
            parity = {"tensorrt": "failed" if out.name in failing else "passed"}
            if "--static-schedule" in cmd:
                parity["tensorrt_static"] = "passed"
            (out / "report.json").write_text(json.dumps(job_report(precision, parity)))
            return D.Completed(0, "")
        if "pytest" in cmd:
            return D.Completed(1, "1 failed, 158 passed") if "cuda-kernel-tests" in failing else D.Completed(0, "159 passed")
        return D.Completed(0, "built")  # build-plugin

    run.calls = calls
    return run


def fake_gpu(monkeypatch, env: D.Environment, runner) -> None:
    monkeypatch.setattr(D, "probe_environment", lambda: env)
    monkeypatch.setattr(D, "run_command", runner)


def test_on_a_gpu_without_tensorrt_every_cuda_check_runs_and_passes(tmp_path, monkeypatch, capsys):
    runner = fake_commands()
    fake_gpu(monkeypatch, gpu_environment(), runner)
    code, stdout, stderr = run_doctor_cli(tmp_path / "d", capsys)
    assert code == 0, stderr
    checks = read_checks(tmp_path / "d")
    ran = ["build-kernels", "cuda-kernel-tests", "memcheck-alternate", "memcheck-size", "racecheck-alternate",
           "racecheck-size"]
    assert [n for n, c in checks.items() if c["status"] == "passed"] == ran
    assert all("cannot: TensorRT not installed" in c["detail"] for n, c in checks.items() if n not in ran)
    assert "ERROR SUMMARY: 0 errors" in checks["memcheck-size"]["detail"]
    assert len(runner.calls) == len(ran)
    assert Path(checks["memcheck-size"]["log"]).read_text().startswith("$ /cuda/bin/compute-sanitizer --tool memcheck")


@pytest.mark.parametrize("failing", ["memcheck-size", "racecheck-alternate", "cuda-kernel-tests"])
def test_a_failed_check_exits_1_and_is_named(tmp_path, monkeypatch, capsys, failing):
    fake_gpu(monkeypatch, gpu_environment(), fake_commands({failing}))
    code, _, stderr = run_doctor_cli(tmp_path / "d", capsys)
    assert code == 1
    assert stderr.strip().splitlines()[-1] == f"atm-export: doctor: failed: {failing}; see {tmp_path / 'd' / 'doctor.md'}"
    checks = read_checks(tmp_path / "d")
    assert [n for n, c in checks.items() if c["status"] == "failed"] == [failing]
    if failing.startswith("memcheck"):
        assert "Invalid __global__ read" in checks[failing]["detail"]


def test_a_sanitizer_run_whose_merge_did_not_finish_fails():
    assert D.judge_sanitizer(D.Completed(0, "========= ERROR SUMMARY: 0 errors"))[0] == "failed"
    assert D.judge_sanitizer(D.Completed(0, SANITIZER_CLEAN))[0] == "passed"


def test_a_failed_build_fails_and_its_dependents_say_why(tmp_path, monkeypatch, capsys):
    def runner(cmd, **kw):
        return D.Completed(2, "atm-export: error: cannot build the TokenMerge libraries: ...")

    fake_gpu(monkeypatch, gpu_environment(), runner)
    assert run_doctor_cli(tmp_path / "d", capsys)[0] == 1
    checks = read_checks(tmp_path / "d")
    assert checks["build-kernels"]["status"] == "failed" and "exit 2" in checks["build-kernels"]["detail"]
    assert checks["memcheck-size"]["status"] == "skipped" and "build-kernels failed" in checks["memcheck-size"]["detail"]


TRT = dict(tensorrt="10.8.0", tensorrt_reason=None, tensorrt_fp16=True)


def test_with_tensorrt_the_engine_and_job_checks_read_their_results(tmp_path, monkeypatch, capsys):
    runner = fake_commands()
    fake_gpu(monkeypatch, gpu_environment(**TRT), runner)
    code, stdout, stderr = run_doctor_cli(tmp_path / "d", capsys)
    assert code == 0, stderr
    checks = read_checks(tmp_path / "d")
    assert all(c["status"] == "passed" for c in checks.values()), checks
    assert checks["fp32-parity"]["figures"]["p50_ms"] == {"tensorrt": 1.5, "tensorrt_baseline": 2.5}
    assert "2 merges chained" in checks["two-merge-engine"]["detail"]
    static = next(c for c in runner.calls if "--static-schedule" in c)
    assert static[static.index("--static-schedule") + 1] == "sample"


@pytest.mark.parametrize(("env_changes", "failing", "tokens", "failed"), [
    ({}, {"fp16-parity"}, (197, 103, 53), "fp16-parity"),
    ({}, set(), (197, 103, 103), "two-merge-engine"),  # the second merge merged nothing
])
def test_tensorrt_check_failures_are_detected(tmp_path, monkeypatch, capsys, env_changes, failing, tokens, failed):
    fake_gpu(monkeypatch, gpu_environment(**TRT, **env_changes), fake_commands(failing, tokens))
    code, _, stderr = run_doctor_cli(tmp_path / "d", capsys)
    assert code == 1 and f"failed: {failed};" in stderr
    assert read_checks(tmp_path / "d")[failed]["status"] == "failed"


def test_without_fp16_or_static_schedule_those_runs_are_skipped(tmp_path, monkeypatch, capsys):
    fake_gpu(monkeypatch, gpu_environment(**{**TRT, "tensorrt_fp16": False}, static_schedule=False), fake_commands())
    assert run_doctor_cli(tmp_path / "d", capsys)[0] == 0
    checks = read_checks(tmp_path / "d")
    assert "neither strongly typed networks nor an FP16 builder flag" in checks["fp16-parity"]["detail"]
    assert "cannot: this atm-export has no --static-schedule" in checks["static-benchmark"]["detail"]


def test_job_report_reader():
    ok = job_report("fp32", {"tensorrt": "passed"})
    assert D.read_job_report(ok, parity=("tensorrt",), precision="fp32")[0] == "passed"
    tf32 = {**ok, "tensorrt": {"precision": "fp32", "tf32": True}}
    assert "TF32" in D.read_job_report(tf32, parity=("tensorrt",), precision="fp32")[1]
    skipped = {**ok, "parity": {}, "skipped": {"tensorrt": "no TensorRT engine was built"}}
    status, detail, _ = D.read_job_report(skipped, parity=("tensorrt",), precision="fp32")
    assert status == "failed" and "tensorrt not compared (no TensorRT engine was built)" in detail
    untimed = {**ok, "benchmark": None, "skipped": {"benchmark": "not requested (--no-benchmark)"}}
    assert D.read_job_report(untimed, parity=("tensorrt",), precision="fp32")[0] == "failed"


# ---------------------------------------------------------------------------------------------
# The sanitizer's payload, with the CPU executor standing in for the CUDA kernels.

@pytest.fixture
def kernels_on_the_cpu(monkeypatch):
    """token_merge_cuda answered by the CPU executor, .cuda() a no-op: the payload's logic runs here."""
    from atm_export import cuda_kernels

    if plugin_lib.find_nvcc() is None or plugin_lib.find_cmake() is None:
        pytest.skip("nvcc and cmake are needed to build the kernel library")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(cuda_kernels, "token_merge_cuda", cuda_kernels.token_merge_host)
    return cuda_kernels


@pytest.mark.parametrize("split_mode", D.SPLIT_MODES)
def test_small_merge_payload(kernels_on_the_cpu, monkeypatch, split_mode):
    assert D.small_merge(split_mode) == D.SMALL_MERGE_OK
    host = kernels_on_the_cpu.token_merge_host

    def off_by_one(x, size, metric, **kw):  # a kernel that scales its output wrongly
        out = host(x, size, metric, **kw)
        return out._replace(x=out.x * 1.0001)

    monkeypatch.setattr(kernels_on_the_cpu, "token_merge_cuda", off_by_one)
    with pytest.raises(SystemExit, match="disagree with the CPU executor"):
        D.small_merge(split_mode)
