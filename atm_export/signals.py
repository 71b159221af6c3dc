"""SIGINT and SIGTERM as a clean abort: one exception that unwinds the run and its cleanup.

By default Python turns SIGINT into KeyboardInterrupt wherever the main thread happens to be,
and SIGTERM kills the process outright. Both are wrong for a tool that stages its artifacts:

- SIGTERM would skip the cleanup, leaving a staging directory behind;
- an exception raised inside a Python callback that C++ called (the ONNX Runtime reference
  kernel runs inside ``InferenceSession.run``) cannot cross back into C++: the process aborts
  (exit 134) without any cleanup.

So :func:`installed` makes both signals raise :class:`Aborted`, and :func:`deferred` marks a
stretch of code during which a signal is only recorded and raised when the stretch ends: calls
into native code that calls back into Python, and the cleanup itself.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Aborted(BaseException):
    """The run was interrupted by a signal. A BaseException, like KeyboardInterrupt, so that
    ``except Exception`` clauses do not swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


_depth = 0
_pending: int | None = None
_aborting = False  # once Aborted is raised, further signals must not interrupt the cleanup


def _abort(signum: int):
    global _aborting
    _aborting = True
    return Aborted(signum)


def _handler(signum, frame) -> None:
    global _pending
    if _aborting:
        return
    if _depth > 0:
        if _pending is None:
            _pending = signum
        return
    raise _abort(signum)


@contextmanager
def installed():
    """Within this block SIGINT and SIGTERM raise :class:`Aborted` (main thread only, as Python
    requires); the previous handlers come back when it ends.

    The first signal aborts the run; later ones are ignored, so that the cleanup the first
    one started always finishes.
    """
    global _depth, _pending, _aborting
    _depth, _pending, _aborting = 0, None, False
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handler) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def deferred():
    """Within this block a signal is recorded, and raised as :class:`Aborted` when it ends."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise _abort(signum)
