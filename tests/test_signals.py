"""SIGINT and SIGTERM at every phase of a run, with a real subprocess and a real signal.

Each run must end with the one line ``atm-export: aborted``, exit 130 (SIGINT) or 143
(SIGTERM), no traceback, and nothing left in the output's parent directory. A run killed with
SIGKILL leaves its staging directory; the next run in the same place removes it, and only it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atm_export import signals
from atm_export.artifacts import STAGING_PREFIX, ArtifactWriter, remove_stale_staging

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("signal_child.py")
#: timm's small test ViT (6 blocks): a whole run takes seconds, every phase included.
RUN = ["test_vit", "--random-init", "--alpha", "0.99", "--beta", "0.04", "--theta-min", "0.88",
       "--batch-size", "2", "--parity-batches", "1", "--bench-batches", "1", "--bench-runs", "1", "--no-tensorrt",
       "--backends=-openvino"]  # the phases signalled are ONNX Runtime's; OpenVINO would only add time
PHASES = ["load", "export", "parity_portable", "parity_plugin", "bench_portable", "bench_plugin", "report"]


def start(phase: str, output: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(CHILD), phase, *RUN, "-o", str(output)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_pause(child: subprocess.Popen, phase: str, timeout: float = 240.0) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    for line in child.stderr:
        lines.append(line.rstrip("\n"))
        if line.startswith(f"PAUSED {phase}"):
            return lines
        if time.monotonic() > deadline:
            break
    child.kill()
    pytest.fail(f"the run never reached {phase}: {lines[-5:]}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", PHASES)
def test_a_signal_at_any_phase_aborts_cleanly(tmp_path, phase, signum):
    parent = tmp_path / "runs"
    parent.mkdir()
    child = start(phase, parent / "out")
    wait_for_pause(child, phase)
    child.send_signal(signum)
    _, rest = child.communicate(timeout=120)
    tail = rest.strip().splitlines()
    assert child.returncode == 128 + signum, (child.returncode, tail[-5:])
    assert tail and tail[-1] == "atm-export: aborted", tail[-5:]
    assert "Traceback" not in rest and "terminate called" not in rest, rest[-2000:]
    assert list(parent.iterdir()) == [], "the run must leave nothing behind"


def test_a_killed_run_leaves_staging_that_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    child = start("export", out)
    wait_for_pause(child, "export")
    child.kill()  # SIGKILL: no chance to clean up
    child.wait(timeout=60)
    stale = list(out.glob(STAGING_PREFIX + "*"))
    assert len(stale) == 1 and (stale[0] / "model.plugin.onnx").exists()
    done = subprocess.run([sys.executable, "-m", "atm_export.cli", *RUN, "--no-onnx", "--no-benchmark", "-o", str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "removed 1 staging directory left in" in done.stderr
    assert not list(out.glob(STAGING_PREFIX + "*"))
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "tokens.png"}


def test_only_the_staging_of_dead_runs_is_removed(tmp_path):
    live = ArtifactWriter(tmp_path / "out")  # holds its lock, as a running export would
    dead = Path(live.directory / f"{STAGING_PREFIX}dead")
    dead.mkdir()
    (dead / ".lock").touch()  # nobody holds it: its run is gone
    unlocked_young = live.directory / f"{STAGING_PREFIX}young"
    unlocked_young.mkdir()  # no lock yet: may be a run that is starting
    other = live.directory / ".atm-export-notes"
    other.mkdir()
    removed = remove_stale_staging(live.directory)
    assert removed == [dead]
    assert live.staging.is_dir() and unlocked_young.is_dir() and other.is_dir()
    old = time.time() - 3600
    os.utime(unlocked_young, (old, old))
    assert remove_stale_staging(live.directory) == [unlocked_young]
    live.abort()
    assert sorted(p.name for p in live.directory.iterdir()) == [".atm-export-notes"]


def test_a_deferred_signal_is_raised_when_the_block_ends_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(signals.Aborted) as info:
        with signals.installed():
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                reached.append("after the signal")  # native code would still be running here
                os.kill(os.getpid(), signal.SIGINT)  # a second signal while aborting is ignored
            reached.append("never")
    assert reached == ["after the signal"] and info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is before
