"""Peak resident memory of this process, per step of a run.

Linux keeps the process's high-water mark of resident memory (``VmHWM`` in /proc/self/status)
and resets it when "5" is written to /proc/self/clear_refs, so a step's peak is read by
resetting at its start and reading at its end. Elsewhere (or where /proc is not writable) the
peak is the process's lifetime maximum from ``getrusage``, which never goes down.
"""

from __future__ import annotations

import re
import resource
import sys

_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)


def reset_peak() -> bool:
    """Start a new high-water mark; False where the system cannot (the peak is then cumulative)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """The peak resident memory in bytes since the last ``reset_peak`` (or since the start)."""
    try:
        with open("/proc/self/status") as f:
            match = _HWM.search(f.read())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024  # bytes on macOS, KiB on Linux
