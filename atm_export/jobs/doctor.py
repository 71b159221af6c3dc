"""``atm-export doctor``: what this machine has for GPU work, and the GPU checks run in one go.

The environment (driver, GPU, compute capability, CUDA, nvcc, TensorRT, compute-sanitizer,
cmake) is probed without failing on anything absent. Then each GPU check runs as a subprocess,
so that a crash (a bad kernel, a TensorRT abort) is contained and its command line can be
re-run by hand:

- build the kernel library and the TensorRT plugin for the native GPU (``build-plugin``),
- the CUDA kernel tests (tests/plugins/test_cuda_kernels.py, from the git checkout),
- compute-sanitizer memcheck and racecheck on a small merge, per split mode,
- a two-merge engine built with a verbose TensorRT log: the second merge consumes the first's
  size tensor; the engine runs at two batch sizes with the eager token counts,
- the main job on DeiT-Ti: fp32 parity (TF32 off), fp16 parity, and the adaptive, static and
  unmerged engines benchmarked.

Where a check cannot run, it is recorded as skipped with the command it would run and why not.
doctor.json and doctor.md go into the output directory through the staged writer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..artifacts import open_output
from ..console import Console

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
REPORT_NAMES = ("doctor.json", "doctor.md")
SPLIT_MODES = ("alternate", "size")
SANITIZER_TOOLS = ("memcheck", "racecheck")
#: Seconds a check may run: builds and pytest are quick on a GPU; the main job exports and benchmarks.
STEP_TIMEOUT = 900.0
JOB_TIMEOUT = 1800.0


@dataclass
class Check:
    """One check's outcome: ``command`` is what ran (or would run), ``log`` its captured output."""

    name: str
    status: str  # passed / failed / skipped
    detail: str
    command: str | None = None
    seconds: float = 0.0
    log: str | None = None
    figures: dict = field(default_factory=dict)  # what a check measured (parity, latency, token counts)


@dataclass(frozen=True)
class Completed:
    """A finished subprocess: its exit status and stdout and stderr together."""

    returncode: int
    output: str


def run_command(cmd: list[str], *, timeout: float = STEP_TIMEOUT, env: dict | None = None,
                cwd: str | Path | None = None) -> Completed:
    """Run ``cmd``; a missing program or a timeout becomes a failed Completed, never an exception."""
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                              timeout=timeout, env=env, cwd=cwd)
    except FileNotFoundError as exc:
        return Completed(127, f"{exc}")
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        return Completed(124, f"{partial}\ntimed out after {timeout:.0f} s")
    return Completed(proc.returncode, proc.stdout)


def which(program: str) -> str | None:
    return shutil.which(program)


# ---------------------------------------------------------------------------------------------
# The environment.

@dataclass
class Environment:
    """What the machine has; None where a fact could not be found, and ``notes`` says why."""

    python: str
    torch: str
    torch_cuda: str | None  # the CUDA runtime torch was built with (torch.version.cuda)
    cuda_device: bool  # torch.cuda.is_available()
    gpu: str | None
    compute_capability: str | None
    driver: str | None
    nvcc: str | None  # nvcc's release, e.g. "13.0"
    tensorrt: str | None  # the tensorrt package's version
    tensorrt_reason: str | None  # why the TensorRT checks cannot run (backends.tensorrt.unavailable_reason)
    tensorrt_fp16: bool  # atm-export can build fp16 engines here (strongly typed, or the FP16 flag)
    compute_sanitizer: str | None  # its path
    cmake: str | None
    kernel_tests: str | None  # tests/plugins/test_cuda_kernels.py of the checkout, with pytest importable
    static_schedule: bool  # the main command has --static-schedule
    notes: dict[str, str] = field(default_factory=dict)


def probe_nvidia_smi() -> tuple[dict, str | None]:
    """{'driver', 'gpu', 'compute_capability'} of the first GPU nvidia-smi lists, or ({}, why not)."""
    smi = which("nvidia-smi")
    if smi is None:
        return {}, "nvidia-smi not on PATH (no NVIDIA driver?)"
    done = run_command([smi, "--query-gpu=driver_version,name,compute_cap", "--format=csv,noheader"], timeout=30)
    lines = [line for line in done.output.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        return {}, f"nvidia-smi failed (exit {done.returncode}): {_last_line(done.output)}"
    fields = [f.strip() for f in lines[0].split(",")]
    if len(fields) < 3:
        return {}, f"nvidia-smi printed {lines[0]!r}, not driver, name, compute capability"
    return {"driver": fields[0], "gpu": ",".join(fields[1:-1]), "compute_capability": fields[-1]}, None


def probe_torch_cuda() -> dict:
    """torch's view: {'torch', 'torch_cuda', 'cuda_device', 'gpu', 'compute_capability'}."""
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_device": torch.cuda.is_available(),
            "gpu": None, "compute_capability": None}
    if info["cuda_device"]:
        major, minor = torch.cuda.get_device_capability()
        info.update(gpu=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}")
    return info


def probe_nvcc() -> tuple[str | None, str | None]:
    """(nvcc's release, why not found)."""
    from .. import plugin_lib

    nvcc = plugin_lib.find_nvcc()
    if nvcc is None:
        return None, "nvcc not found ($CUDACXX, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
    done = run_command([nvcc, "--version"], timeout=30)
    match = re.search(r"release (\S+?),", done.output)
    return (match.group(1), None) if match else (None, f"`{nvcc} --version` printed no release")


def probe_tensorrt() -> dict:
    """{'tensorrt': version or None, 'tensorrt_reason', 'tensorrt_fp16'}."""
    from ..backends.tensorrt import unavailable_reason

    reason = unavailable_reason()
    try:
        import tensorrt
    except Exception:  # not installed, or a broken install: unavailable_reason says which
        return {"tensorrt": None, "tensorrt_reason": reason, "tensorrt_fp16": False}
    return {"tensorrt": getattr(tensorrt, "__version__", "unknown"), "tensorrt_reason": reason,
            "tensorrt_fp16": _builds_fp16(tensorrt)}


def _builds_fp16(tensorrt) -> bool:
    """Whether atm-export can build fp16 engines with this TensorRT (backends.tensorrt.build_mode)."""
    from ..backends.tensorrt import build_mode
    from ..errors import UserError

    try:
        build_mode(tensorrt, "fp16")
    except UserError:
        return False
    return True


def find_compute_sanitizer() -> str | None:
    """compute-sanitizer on PATH, or beside nvcc (the CUDA toolkit's bin/)."""
    from .. import plugin_lib

    found = which("compute-sanitizer")
    nvcc = plugin_lib.find_nvcc()
    if found is None and nvcc is not None:
        beside = Path(nvcc).resolve().parent / "compute-sanitizer"
        found = str(beside) if beside.is_file() else None
    return found


def kernel_tests_path() -> Path | None:
    """The CUDA kernel tests, which ship with the git checkout only (and need pytest)."""
    path = Path(__file__).resolve().parents[2] / "tests" / "plugins" / "test_cuda_kernels.py"
    return path if path.is_file() and importlib.util.find_spec("pytest") else None


def has_static_schedule() -> bool:
    """Whether the main command takes --static-schedule (what `atm-export --help` would show)."""
    from ..cli import cli

    return any(p.name == "static_schedule" for p in cli.commands["export"].params)


def probe_environment() -> Environment:
    import platform

    from .. import plugin_lib

    notes: dict[str, str] = {}
    smi, why = probe_nvidia_smi()
    if why:
        notes["driver"] = why
    cuda = probe_torch_cuda()
    nvcc, why = probe_nvcc()
    if why:
        notes["nvcc"] = why
    trt = probe_tensorrt()
    if trt["tensorrt"] is None:
        notes["tensorrt"] = trt["tensorrt_reason"]
    tests = kernel_tests_path()
    return Environment(
        python=platform.python_version(), torch=cuda["torch"], torch_cuda=cuda["torch_cuda"],
        cuda_device=cuda["cuda_device"], gpu=cuda["gpu"] or smi.get("gpu"),
        compute_capability=cuda["compute_capability"] or smi.get("compute_capability"), driver=smi.get("driver"),
        nvcc=nvcc, **trt, compute_sanitizer=find_compute_sanitizer(), cmake=plugin_lib.find_cmake(),
        kernel_tests=str(tests) if tests else None, static_schedule=has_static_schedule(), notes=notes)


# ---------------------------------------------------------------------------------------------
# What each GPU check needs, and why it cannot run without it.

def missing(env: Environment, need: str, done: dict[str, Check]) -> str | None:
    """Why requirement ``need`` is not met, or None. A need that names a check is met when that
    check passed (the plugin build, before the checks that load the plugin)."""
    if need in done:  # a skipped check's own reasons are among the dependent's needs already
        return f"{need} failed" if done[need].status == FAILED else None
    reasons = {
        "gpu": None if env.cuda_device else "no CUDA device (torch.cuda.is_available() is False)",
        "build-tools": None if env.cmake and env.nvcc else "cmake and nvcc are needed to build the plugin",
        "tensorrt": _tensorrt_reason(env),
        "fp16": None if env.tensorrt is None or env.tensorrt_fp16 else "this TensorRT has neither strongly typed networks nor an FP16 builder flag",
        "compute-sanitizer": None if env.compute_sanitizer else "compute-sanitizer not found (CUDA toolkit's bin/)",
        "kernel-tests": None if env.kernel_tests else ("tests/plugins/test_cuda_kernels.py not found, or no pytest "
                                                       "(the tests ship with the git checkout, not the package)"),
        "static-schedule": None if env.static_schedule else "this atm-export has no --static-schedule",
    }
    return reasons[need]


def _tensorrt_reason(env: Environment) -> str | None:
    if env.tensorrt is None:
        return "TensorRT not installed"
    return env.tensorrt_reason if env.cuda_device else None  # without a GPU, "gpu" already says so


@dataclass(frozen=True)
class Step:
    """A GPU check: the command it runs, what it needs, and how its result is judged."""

    name: str
    title: str
    command: list[str]
    needs: tuple[str, ...]
    judge: Callable[[Completed], tuple[str, str, dict]]  # -> (status, detail, figures)
    timeout: float = STEP_TIMEOUT


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def judge_exit(done: Completed) -> tuple[str, str, dict]:
    """Passed on exit 0; else the last line of the output."""
    if done.returncode == 0:
        return PASSED, _last_line(done.output), {}
    return FAILED, f"exit {done.returncode}: {_last_line(done.output)}", {}


def judge_sanitizer(done: Completed) -> tuple[str, str, dict]:
    """compute-sanitizer ran with --error-exitcode 1: exit 0 and the small merge's own 'ok'."""
    summary = [line.strip("= ") for line in done.output.splitlines() if "SUMMARY" in line]
    if done.returncode == 0 and SMALL_MERGE_OK in done.output:
        return PASSED, "; ".join(summary) or SMALL_MERGE_OK, {}
    hazards = [line.strip("= ") for line in done.output.splitlines() if line.startswith("========= ")]
    return FAILED, f"exit {done.returncode}: {(hazards or [_last_line(done.output)])[0]}", {}


def judge_json(path: Path, read: Callable[[dict], tuple[str, str, dict]]) -> Callable[[Completed], tuple[str, str, dict]]:
    """A judge that reads the JSON file the command wrote (after it exited 0)."""

    def judge(done: Completed) -> tuple[str, str, dict]:
        if done.returncode != 0:
            return judge_exit(done)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return FAILED, f"exit 0 but {path} cannot be read: {exc}", {}
        return read(data)

    return judge


# ---------------------------------------------------------------------------------------------
# Reading the main job's report.json (atm_export/report/model.py).

ENGINE_BACKENDS = ("tensorrt", "tensorrt_static", "tensorrt_baseline")


def read_job_report(report: dict, *, parity: tuple[str, ...], precision: str) -> tuple[str, str, dict]:
    """Passed when every backend in ``parity`` was compared and passed (an inconclusive batch
    settled by the extra checks counts), the engine has the asked precision (fp32: TF32 off),
    and the engines were timed."""
    problems = []
    statuses = {name: (report.get("parity", {}).get(name) or {}).get("status") for name in parity}
    for name, status in statuses.items():
        if status is None:
            problems.append(f"{name} not compared ({report.get('skipped', {}).get(name, 'no parity entry')})")
        elif status != "passed":
            problems.append(f"{name} {status}")
    engine = report.get("tensorrt") or {}
    if engine.get("precision") != precision:
        problems.append(f"engine precision {engine.get('precision')!r}, expected {precision!r}")
    if precision == "fp32" and engine.get("tf32") is not False:
        problems.append("fp32 engine built with TF32 not recorded as off")
    latency = latency_figures(report)
    if not latency:
        problems.append("no engine was timed (" + report.get("skipped", {}).get("benchmark", "no benchmark") + ")")
    figures = {"parity": statuses, "p50_ms": latency, "status": report.get("status")}
    timed = ", ".join(f"{name} {ms:.3f} ms" for name, ms in latency.items())
    detail = "; ".join(problems) if problems else (
        f"parity {', '.join(f'{n} {s}' for n, s in statuses.items())}; p50 at batch "
        f"{figures_batch(report)}: {timed}")
    return (FAILED if problems else PASSED), detail, figures


def figures_batch(report: dict) -> int | None:
    return (report.get("benchmark") or {}).get("speedup_batch")


def latency_figures(report: dict) -> dict[str, float]:
    """Median milliseconds per batch of each engine, at the batch of the report's speed-ups."""
    bench = report.get("benchmark") or {}
    batch = str(bench.get("speedup_batch"))
    return {name: bench["latency"][name][batch]["p50"] for name in ENGINE_BACKENDS
            if batch in bench.get("latency", {}).get(name, {})}


# ---------------------------------------------------------------------------------------------
# The GPU checks.

def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def plan(env: Environment, work: Path) -> list[Step]:
    """Every GPU check, in order, with its command for this machine."""
    build = work / "plugin-build"
    plugin = str(build / "libatm_token_merge_plugin.so")
    steps = [
        Step("build-kernels", "building the CUDA kernel library for the native GPU",
             python_module("atm_export.cli", "build-plugin", "--kernels-only", "--cuda-arch", "native",
                           "--build-dir", str(build)), ("gpu", "build-tools"), judge_exit),
        Step("build-plugin", "building the TensorRT plugin for the native GPU",
             python_module("atm_export.cli", "build-plugin", "--cuda-arch", "native", "--build-dir", str(build)),
             ("gpu", "build-tools", "tensorrt"), judge_exit),
        Step("cuda-kernel-tests", "running the CUDA kernel tests",
             python_module("pytest", env.kernel_tests or "tests/plugins/test_cuda_kernels.py", "-q",
                           "-p", "no:cacheprovider"), ("gpu", "kernel-tests", "build-kernels"), judge_exit),
    ]
    for tool in SANITIZER_TOOLS:
        for split in SPLIT_MODES:
            steps.append(Step(f"{tool}-{split}", f"compute-sanitizer {tool} on a small merge ({split} split)",
                              [env.compute_sanitizer or "compute-sanitizer", "--tool", tool, "--error-exitcode", "1",
                               *python_module("atm_export.jobs.doctor", "small-merge", split)],
                              ("gpu", "compute-sanitizer", "build-kernels"), judge_sanitizer))
    engine_dir = work / "two-merge-engine"
    steps.append(Step("two-merge-engine", "building a two-merge engine with a verbose TensorRT log",
                      python_module("atm_export.jobs.doctor", "two-merge-engine", str(engine_dir), "--plugin", plugin),
                      ("gpu", "tensorrt", "build-plugin"),
                      judge_json(engine_dir / ENGINE_RESULT, read_engine_result)))
    for name, precision, extra, needs, parity in (
        ("fp32-parity", "fp32", (), (), ("tensorrt",)),
        ("fp16-parity", "fp16", (), ("fp16",), ("tensorrt",)),
        ("static-benchmark", "fp32", ("--static-schedule", "sample"), ("static-schedule",),
         ("tensorrt", "tensorrt_static")),
    ):
        out = work / "runs" / name
        steps.append(Step(name, f"the main job on DeiT-Ti ({precision}{', static schedule' if extra else ''})",
                          python_module("atm_export.cli", "deit_t", "--random-init", "--quiet", "--force",
                                        "--trt-precision", precision, "--trt-plugin", plugin, *extra, "-o", str(out)),
                          ("gpu", "tensorrt", "build-plugin", *needs),
                          judge_json(out / "report.json",
                                     lambda r, p=parity, q=precision: read_job_report(r, parity=p, precision=q)),
                          timeout=JOB_TIMEOUT))
    return steps


def step_env(work: Path) -> dict:
    """The subprocesses' environment: the plugin built into the doctor's work directory, for
    the native GPU; no caching allocator, so memcheck sees each buffer's own bounds."""
    return {**os.environ, "ATM_PLUGIN_BUILD_DIR": str(work / "plugin-build"), "ATM_CUDA_ARCHITECTURES": "native",
            "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}


def run_step(step: Step, env: Environment, done: dict[str, Check], work: Path, console: Console) -> Check:
    command = shlex.join(step.command)
    reasons = [r for r in (missing(env, need, done) for need in step.needs) if r]
    if reasons:
        return Check(step.name, SKIPPED, f"would run: {command} — cannot: {'; '.join(reasons)}", command)
    log = work / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with console.step(step.title):
        start = time.perf_counter()
        completed = run_command(step.command, timeout=step.timeout, env=step_env(work),
                                cwd=Path(env.kernel_tests).parents[2] if env.kernel_tests else None)
        seconds = time.perf_counter() - start
        log.write_text(f"$ {command}\n{completed.output}")
        status, detail, figures = step.judge(completed)
        console.note(f"{status}: {detail}")
    return Check(step.name, status, detail, command, round(seconds, 1), str(log), figures)


# ---------------------------------------------------------------------------------------------
# The run, and its report.

@dataclass
class DoctorReport:
    created: str
    atm_export_version: str
    output: str
    environment: Environment
    checks: list[Check]

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == FAILED]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_doctor(output: Path, console: Console | None = None) -> DoctorReport:
    """Probe the environment, run every GPU check this machine allows, write doctor.json and
    doctor.md into ``output`` (work files under ``output/work``)."""
    from .. import __version__
    from .common import created

    console = console or Console(verbosity=0)
    with open_output(output, force=True, names=REPORT_NAMES) as writer:
        with console.step("probing the environment"):
            env = probe_environment()
        work = output.resolve() / "work"
        done: dict[str, Check] = {}
        for step in plan(env, work):
            done[step.name] = run_step(step, env, done, work, console)
        report = DoctorReport(created(), __version__, str(output), env, list(done.values()))
        writer.path("doctor.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        writer.write_text("doctor.md", render_markdown(report))
    return report


ENVIRONMENT_ROWS = (  # (label, Environment field)
    ("NVIDIA driver", "driver"), ("GPU", "gpu"), ("compute capability", "compute_capability"),
    ("CUDA device (torch)", "cuda_device"), ("torch", "torch"), ("CUDA of torch", "torch_cuda"), ("nvcc", "nvcc"),
    ("TensorRT", "tensorrt"), ("compute-sanitizer", "compute_sanitizer"), ("cmake", "cmake"),
    ("CUDA kernel tests", "kernel_tests"), ("--static-schedule", "static_schedule"),
)


def environment_rows(env: Environment) -> list[tuple[str, str]]:
    def shown(name: str) -> str:
        value = getattr(env, name)
        if value is None:
            return "not found" + (f" ({env.notes[name]})" if name in env.notes else "")
        return "yes" if value is True else "no" if value is False else str(value)

    return [(label, shown(name)) for label, name in ENVIRONMENT_ROWS]


def table_lines(report: DoctorReport) -> list[str]:
    """The environment and the checks as aligned plain-text lines (for the terminal)."""
    lines = ["environment"] + [f"  {label:21s} {value}" for label, value in environment_rows(report.environment)]
    lines.append("checks")
    for c in report.checks:
        took = f" ({c.seconds:.1f} s)" if c.status != SKIPPED else ""
        lines.append(f"  {c.name:21s} {c.status:8s} {c.detail}{took}")
    return lines


def summary_line(report: DoctorReport) -> str:
    counts = {s: sum(c.status == s for c in report.checks) for s in (PASSED, FAILED, SKIPPED)}
    where = "no CUDA device here: " if not report.environment.cuda_device else ""
    return (f"wrote {Path(report.output) / 'doctor.json'} and doctor.md: {where}{counts[PASSED]} passed, "
            f"{counts[FAILED]} failed, {counts[SKIPPED]} skipped")


def render_markdown(report: DoctorReport) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# atm-export doctor ({report.created}, atm-export {report.atm_export_version})", "",
             "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {cell(value)} |" for label, value in environment_rows(report.environment)]
    lines += ["", "## Checks", "", "| check | status | detail | seconds |", "|---|---|---|---|"]
    for c in report.checks:
        lines.append(f"| {c.name} | {c.status} | {cell(c.detail)} | {c.seconds if c.status != SKIPPED else ''} |")
    lines += ["", "Each check's command and output: doctor.json (`command`, `log`); work files under work/.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# What the GPU checks run in their own processes: python -m atm_export.jobs.doctor ...

SMALL_MERGE_OK = "small merge ok"


def small_merge(split_mode: str) -> str:
    """One small merge per policy (threshold, fixed r) with the CUDA kernels, bitwise against the
    CPU executor. Inputs are made on the CPU and copied, so that under compute-sanitizer nearly
    every launch is one of ours."""
    import torch

    from .. import cuda_kernels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 17, 32, generator=g)
    size = torch.randint(1, 5, (2, 17), generator=g).float()
    metric = torch.randn(2, 17, 16, generator=g)
    for kw in ({"threshold": 0.0}, {"r": 4}):
        host = cuda_kernels.token_merge_host(x, size, metric, split_mode=split_mode, **kw)
        dev = cuda_kernels.token_merge_cuda(x.cuda(), size.cuda(), metric.cuda(), split_mode=split_mode, **kw)
        same = (dev.num_tokens == host.num_tokens < 17 and torch.equal(dev.x.cpu(), host.x)
                and torch.equal(dev.size.cpu(), host.size))
        if not same:
            raise SystemExit(f"small merge ({split_mode} split, {kw}): the CUDA kernels disagree with the CPU executor "
                             f"({dev.num_tokens} vs {host.num_tokens} tokens)")
    return SMALL_MERGE_OK


ENGINE_RESULT = "result.json"
ENGINE_LOG = "tensorrt-verbose.log"
ENGINE_BATCHES = (1, 3)


@contextmanager
def verbose_trt_log(path: Path):
    """A VERBOSE TensorRT logger that writes every message to ``path`` (for one build)."""
    import tensorrt as trt

    class FileLogger(trt.ILogger):
        def __init__(self, handle):
            trt.ILogger.__init__(self)
            self.handle = handle

        def log(self, severity, msg):
            self.handle.write(f"[{severity}] {msg}\n")

    with open(path, "w") as handle:
        yield FileLogger(handle)  # one object: TensorRT keeps a pointer to it


def two_merge_engine(directory: Path, plugin: str | None) -> dict:
    """A depth-3 DeiT-Ti (random weights) has two merge steps, the second (size split) on the
    first's data-dependent output. Export it, build its engine with a verbose log, run it at
    two batch sizes, and write what was found to ``directory/result.json``."""
    import onnx
    import timm
    import torch

    from .. import contract, cuda_kernels
    from ..backends import tensorrt as backend
    from ..export.onnx import export_plugin_flavour
    from ..images import builtin_images, preprocess
    from ..parity import reference_run
    from ..patch import patch_model
    from ..schedule import MergeConfig

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=3).eval()
    atm = patch_model(vit, MergeConfig(alpha=0.9, beta=0.04, theta_min=0.5, split_layer=1))
    images = preprocess(builtin_images(max(ENGINE_BATCHES)), vit)
    model = export_plugin_flavour(atm, images[:2])
    onnx_path = directory / "two_merges.plugin.onnx"
    onnx.save(model, str(onnx_path))
    nodes = [n.name for n in model.graph.node if contract.is_token_merge(n)]
    spec = backend.EngineSpec(min_batch=min(ENGINE_BATCHES), opt_batch=max(ENGINE_BATCHES), max_batch=max(ENGINE_BATCHES))
    with verbose_trt_log(directory / ENGINE_LOG) as logger:
        engine = backend.build_engine(onnx_path, spec, plugin, logger=logger)
    runs = {}
    with backend.EngineRunner(engine, "tensorrt", plugin=plugin) as runner:
        memory = getattr(runner.engine, "device_memory_size_v2", None) or runner.engine.device_memory_size
        for batch in ENGINE_BATCHES:
            ref = reference_run(atm, images[:batch])
            runs[str(batch)] = {"engine": runner.run(images[:batch].numpy()).tokens, "eager": ref.tokens}
    log = (directory / ENGINE_LOG).read_text()
    # the workspace the plugin asks for (same host logic) at the second merge's largest input:
    # the profile's max batch, N up to the first merge's input (its size tensor's upper bound)
    batch, n = max(ENGINE_BATCHES), runs[str(max(ENGINE_BATCHES))]["eager"][0]
    params = cuda_kernels.make_params(torch.empty(batch, n, vit.embed_dim),
                                      torch.empty(batch, n, vit.blocks[1].attn.head_dim), threshold=0.5, split_mode="size")
    result = {"token_merge_nodes": nodes, "engine_bytes": len(engine), "device_memory_bytes": int(memory),
              "second_merge_workspace_bytes": int(cuda_kernels.workspace_size(params)), "tokens": runs,
              "log_lines": log.count("\n"), "nodes_in_log": {n: log.count(n) for n in nodes},
              "log_lines_with_workspace": sum("workspace" in line.lower() for line in log.splitlines())}
    (directory / ENGINE_RESULT).write_text(json.dumps(result, indent=2) + "\n")
    return result


def read_engine_result(result: dict) -> tuple[str, str, dict]:
    """What the two-merge engine must show: two TokenMerge nodes, both named in the verbose log
    (the ONNX parser logs each node it parses at VERBOSE), non-zero device memory and plugin
    workspace, and at both batch sizes the eager token counts, each merge merging something (so
    the second merge ran on the count the first produced)."""
    problems = []
    nodes = result["token_merge_nodes"]
    if len(nodes) != 2:
        problems.append(f"{len(nodes)} TokenMerge nodes, expected 2")
    unlogged = [n for n, count in result["nodes_in_log"].items() if count == 0]
    if unlogged:
        problems.append(f"the verbose log never names {unlogged}")
    for key in ("device_memory_bytes", "second_merge_workspace_bytes"):
        if result[key] <= 0:
            problems.append(f"{key} is {result[key]}")
    for batch, run in result["tokens"].items():
        tokens = run["engine"] or []
        if tokens != run["eager"]:
            problems.append(f"batch {batch}: engine tokens {tokens}, eager {run['eager']}")
        elif not (len(tokens) >= 3 and tokens[0] > tokens[1] > tokens[2]):
            problems.append(f"batch {batch}: tokens {tokens} do not fall at both merges")
    detail = "; ".join(problems) or (
        "2 merges chained: tokens " + ", ".join(f"batch {b} {r['engine']}" for b, r in result["tokens"].items()) + "; "
        f"device memory {result['device_memory_bytes']} B, plugin workspace {result['second_merge_workspace_bytes']} B")
    return (FAILED if problems else PASSED), detail, result


def main(argv: list[str] | None = None) -> int:
    """``small-merge SPLIT`` or ``two-merge-engine DIR [--plugin LIB]``: the GPU checks' payloads."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m atm_export.jobs.doctor")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("small-merge").add_argument("split", choices=SPLIT_MODES)
    engine = sub.add_parser("two-merge-engine")
    engine.add_argument("directory", type=Path)
    engine.add_argument("--plugin")
    args = parser.parse_args(argv)
    if args.what == "small-merge":
        print(small_merge(args.split))
    else:
        print(json.dumps(two_merge_engine(args.directory, args.plugin)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
