"""What a run prints: numbered steps, -q and -v, plain lines where there is no terminal."""

from __future__ import annotations

import io

from atm_export.console import Console


def run(verbosity):
    stream = io.StringIO()
    console = Console(verbosity, stream)
    console.plan(2)
    with console.step("first"):
        console.note("a figure")
        console.note("a detail", detail=True)
        with console.progress(2, unit="m") as advance:
            advance("m1: 1 ms")
            advance("m2: 2 ms")
    with console.step("second"):
        console.warn("careful")
    return stream.getvalue().splitlines()


def test_normal_output_numbers_the_steps_and_prints_plain_progress_lines():
    lines = run(1)
    assert lines[0].strip() == "[1/2] first ..." and "done in" in lines[-2] or "done in" in lines[-1]
    assert any("a figure" in line for line in lines) and not any("a detail" in line for line in lines)
    assert any("m1: 1 ms" in line for line in lines)  # not a terminal: plain lines, no bar
    assert any(line.strip() == "[2/2] second ..." for line in lines)
    assert any("warning: careful" in line for line in lines)


def test_quiet_prints_nothing_and_verbose_adds_details():
    assert run(0) == []
    assert any("a detail" in line for line in run(2))


def test_on_a_terminal_a_bar_replaces_the_plain_lines():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    console = Console(1, stream)
    with console.progress(2, unit="m") as advance:
        advance("m1: 1 ms")
        advance("m2: 2 ms")
    text = stream.getvalue()
    assert "/2 [" in text and "m1: 1 ms" not in text  # a bar (cleared when done); the lines only with -v


def test_each_step_records_its_time_and_its_own_peak_memory():
    import numpy as np

    from atm_export.resources import reset_peak

    console = Console(verbosity=1, stream=io.StringIO())
    with console.step("allocating"):
        block = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MB, touched
    del block
    with console.step("idle"):
        pass
    allocating, idle = console.records
    assert allocating.title == "allocating" and allocating.seconds >= 0 and allocating.peak_rss_mb >= 300
    if reset_peak():  # Linux: each step's peak is its own
        assert idle.peak_rss_mb < allocating.peak_rss_mb - 250
    assert "peak memory" in console.stream.getvalue()
