"""Progress lines on stderr for the long steps of a run."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Progress:
    """``with progress.step("exporting ONNX"):`` prints the step, then its duration."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"  {message}", file=self.stream, flush=True)

    @contextmanager
    def step(self, title: str):
        start = time.perf_counter()
        if self.enabled:
            print(f"- {title} ...", file=self.stream, flush=True)
        yield self
        if self.enabled:
            print(f"  done in {time.perf_counter() - start:.1f} s", file=self.stream, flush=True)
