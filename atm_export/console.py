"""What a run prints on stderr: numbered steps with elapsed times, notes, warnings, progress.

Every step's wall time and peak resident memory are kept (``records``; the report's ``steps``).
Verbosity 0 (``-q``) prints nothing but errors; 1 the steps, their key figures and warnings;
2 (``-v``) also the details (every parity note, every timed measurement). Long steps show a
progress bar (tqdm) on a terminal, and plain lines where the output is a log or a pipe.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from .resources import peak_rss, reset_peak


@dataclass
class StepRecord:
    """One finished step: its title, wall time, and the peak resident memory while it ran."""

    title: str
    seconds: float
    peak_rss_mb: float


class Console:
    """``with console.step("exporting ONNX"):`` prints ``[3/8] exporting ONNX ...``, then its time."""

    def __init__(self, verbosity: int = 1, stream=None):
        self.verbosity = verbosity
        self.stream = stream or sys.stderr
        self.total: int | None = None
        self.done = 0
        self.started = time.perf_counter()
        self.records: list[StepRecord] = []

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
        reset_peak()
        start = time.perf_counter()
        try:
            yield self
        except Exception as exc:
            if not hasattr(exc, "atm_step"):  # the innermost step names the failure
                exc.atm_step = title
            raise
        record = StepRecord(title, round(time.perf_counter() - start, 2), round(peak_rss() / 2**20, 1))
        self.records.append(record)
        if self.verbosity >= 1:
            self._print(f"        done in {record.seconds:.1f} s (total {self.elapsed():.0f} s; peak memory "
                        f"{record.peak_rss_mb / 1024:.1f} GB)")

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
