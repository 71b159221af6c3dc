"""Run ``atm-export`` and pause at one phase, so that a test can signal it there.

    python tests/signal_child.py PHASE ARGS...

Prints ``PAUSED PHASE`` on stderr when the phase is reached, then waits (up to 30 s) for a
signal. The ``*_plugin`` phases pause inside the ONNX Runtime reference kernel, i.e. inside
``InferenceSession.run``, where a Python exception cannot be raised (the case that used to
abort the interpreter); the others pause in Python as the phase's work begins.

timm's ``test_vit`` is built with 2 blocks instead of 6, so that its export (and so every
later phase) is reached in seconds.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from atm_export import bench, cli, signals
from atm_export.backends import ort_custom_op
from atm_export.console import Console
from atm_export.jobs import common
from atm_export.report import markdown

PHASES = ("load", "export", "parity_portable", "parity_plugin", "bench_portable", "bench_plugin", "report")
STEP_TITLES = {"load": "loading ", "export": "lowering"}  # model.plugin.onnx is already staged at "lowering"
#: phase -> (the backend it runs, where it runs it)
BACKEND_PHASES = {"parity_portable": ("ort_portable", "parity"), "parity_plugin": ("ort_plugin", "parity"),
                  "bench_portable": ("ort_portable", "bench"), "bench_plugin": ("ort_plugin", "bench")}


def pause(phase: str) -> None:
    print(f"PAUSED {phase}", file=sys.stderr, flush=True)
    for _ in range(600):
        time.sleep(0.05)  # a signal raises Aborted here, unless it is deferred
        if signals._pending is not None:  # deferred: carry on, it is raised when the native call returns
            return


def main(phase: str, args: list[str]) -> int:
    state = {"armed": False, "done": False}
    backend, where = BACKEND_PHASES.get(phase, (None, None))

    def reached():
        if state["done"]:
            return
        if phase.endswith("_plugin"):
            state["armed"] = True  # pause at the next kernel call
        else:
            state["done"] = True
            pause(phase)

    step_of = Console.step

    @contextmanager
    def step(self, title):
        with step_of(self, title):
            if phase in STEP_TITLES and title.startswith(STEP_TITLES[phase]):
                reached()
            yield self

    check_backend = common.check_backend

    def checked(runner, *a, **k):
        if where == "parity" and runner.name == backend:
            reached()
        return check_backend(runner, *a, **k)

    time_runners = bench.time_runners

    def timed(runners, *a, **k):
        if where == "bench" and backend in runners:
            reached()
        return time_runners(runners, *a, **k)

    kernel = ort_custom_op._kernel

    def paused_kernel(*a, **k):
        if state["armed"] and not state["done"]:
            state["done"] = True
            pause(phase)
        return kernel(*a, **k)

    render = markdown.render_markdown

    def paused_render(*args, **kwargs):
        if phase == "report":
            pause(phase)
        return render(*args, **kwargs)

    import timm

    create = timm.create_model

    def two_blocks(name, *a, **k):
        return create(name, *a, **({**k, "depth": 2} if name == "test_vit" else k))

    timm.create_model = two_blocks
    Console.step = step
    common.check_backend = checked
    bench.time_runners = timed
    ort_custom_op._kernel = paused_kernel  # read when the kernel is registered, at the first session
    markdown.render_markdown = paused_render
    return cli.main(args)


if __name__ == "__main__":
    assert sys.argv[1] in PHASES, sys.argv[1]
    sys.exit(main(sys.argv[1], sys.argv[2:]))
