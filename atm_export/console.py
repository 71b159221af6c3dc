"""What a run prints on stderr: numbered steps with elapsed times, notes, warnings, progress.

Verbosity 0 (``-q``) prints nothing but errors; 1 the steps, their key figures and warnings;
2 (``-v``) also the details (every parity note, every timed measurement). Long steps show a
progress bar (tqdm) on a terminal, and plain lines where the output is a log or a pipe.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager


class Console:
    """``with console.step("exporting ONNX"):`` prints ``[3/8] exporting ONNX ...``, then its time."""

    def __init__(self, verbosity: int = 1, stream=None):
        self.verbosity = verbosity
        self.stream = stream or sys.stderr
        self.total: int | None = None
        self.done = 0
        self.started = time.perf_counter()

    @property
    def interactive(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def plan(self, total: int) -> None:
        """The number of steps the run will take (for the ``[n/total]`` numbering)."""
        self.total, self.done = total, 0

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def note(self, message: str, *, detail: bool = False) -> None:
        """A line under the current step; ``detail``: only with -v."""
        if self.verbosity >= (2 if detail else 1):
            self._print(f"      {message}")

    def warn(self, message: str) -> None:
        if self.verbosity >= 1:
            self._print(f"      warning: {message}")

    @contextmanager
    def step(self, title: str):
        self.done += 1
        number = f"[{self.done}/{self.total}]" if self.total else f"[{self.done}]"
        if self.verbosity >= 1:
            self._print(f"{number:>7} {title} ...")
        start = time.perf_counter()
        yield self
        if self.verbosity >= 1:
            self._print(f"        done in {time.perf_counter() - start:.1f} s (total {self.elapsed():.0f} s)")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @contextmanager
    def progress(self, total: int, unit: str):
        """A bar over ``total`` items on a terminal; yields ``advance(line, postfix)``, where
        ``line`` says what the item came to (printed as a plain line when not on a terminal, or
        with -v) and ``postfix`` is a short form of it shown beside the bar. The bar's clock
        keeps running while an item takes long (an export, a slow measurement)."""
        bar = None
        if self.verbosity >= 1 and self.interactive:
            from tqdm import tqdm

            bar = tqdm(total=total, unit=unit, file=self.stream, leave=False, dynamic_ncols=True)
            stop = threading.Event()

            def tick():
                while not stop.wait(0.5):
                    bar.refresh()

            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()

        def advance(line: str | None = None, postfix: str | None = None) -> None:
            if bar is not None:
                if postfix:
                    bar.set_postfix_str(postfix, refresh=False)
                bar.update(1)
                if line and self.verbosity >= 2:
                    bar.write(f"      {line}", file=self.stream)
            elif line:
                self.note(line)

        try:
            yield advance
        finally:
            if bar is not None:
                stop.set()
                ticker.join()
                bar.close()
