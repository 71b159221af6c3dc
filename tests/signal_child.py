"""Run ``atm-export`` and pause at one phase, so that a test can signal it there.

    python tests/signal_child.py PHASE ARGS...

Prints ``PAUSED PHASE`` on stderr when the phase is reached, then waits (up to 30 s) for a
signal. Most phases pause as their progress step begins; the ``*_plugin`` phases pause inside
the ONNX Runtime reference kernel, i.e. inside ``InferenceSession.run``, where a Python
exception cannot be raised (the case that used to abort the interpreter).

timm's ``test_vit`` is built with 2 blocks instead of 6, so that its export (and so every
later phase) is reached in seconds.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from atm_export import cli, pipeline, progress, signals
from atm_export.backends import ort_custom_op

#: phase -> the progress step it starts with (None: paused elsewhere, see below)
STEPS = {
    "load": "loading ",
    "export": "lowering to standard ops",  # model.plugin.onnx is already staged then
    "parity_portable": "parity: ort_portable",
    "parity_plugin": "parity: ort_plugin",
    "bench_portable": "benchmark: ort_portable",
    "bench_plugin": "benchmark: ort_plugin",
    "report": None,
}
IN_KERNEL = ("parity_plugin", "bench_plugin")


def pause(phase: str) -> None:
    print(f"PAUSED {phase}", file=sys.stderr, flush=True)
    for _ in range(600):
        time.sleep(0.05)  # a signal raises Aborted here, unless it is deferred
        if signals._pending is not None:  # deferred: carry on, it is raised when the native call returns
            return


def main(phase: str, args: list[str]) -> int:
    state = {"armed": False, "done": False}
    step_of = progress.Progress.step

    @contextmanager
    def step(self, title):
        with step_of(self, title):
            if STEPS[phase] and title.startswith(STEPS[phase]) and not state["done"]:
                if phase in IN_KERNEL:
                    state["armed"] = True
                else:
                    state["done"] = True
                    pause(phase)
            yield self

    kernel = ort_custom_op._kernel

    def paused_kernel(*a, **k):
        if state["armed"] and not state["done"]:
            state["done"] = True
            pause(phase)
        return kernel(*a, **k)

    render = pipeline.render_markdown

    def paused_render(report):
        if phase == "report":
            pause(phase)
        return render(report)

    import timm

    create = timm.create_model

    def two_blocks(name, *a, **k):
        return create(name, *a, **({**k, "depth": 2} if name == "test_vit" else k))

    timm.create_model = two_blocks
    progress.Progress.step = step
    ort_custom_op._kernel = paused_kernel  # read when the kernel is registered, at the first session
    pipeline.render_markdown = paused_render
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
