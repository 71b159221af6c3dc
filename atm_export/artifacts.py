"""The output directory: artifacts are staged and moved into place only when a run succeeds.

A run writes every file into a hidden staging directory inside the output directory. On
success each file is moved into place with an atomic rename (report.json last, so its
presence means a complete set); on failure or interruption the staging directory is deleted.
A failed run therefore leaves no half-written file and does not touch the previous run's
artifacts. An unexpected failure (not a user mistake nor a check's verdict) keeps the staging
directory with one file, ``failure.log`` (the step and the full traceback), and nothing else;
the exception carries its path (``atm_log``), and the next run in the same place removes it.

A run killed without a chance to clean up (SIGKILL, power loss) leaves its staging directory
behind. While a run is alive it holds an exclusive lock on a file in its staging directory;
the operating system drops the lock when the process dies, however it dies. The next run in
the same output directory removes the staging directories whose lock it can take, which are
exactly those of dead runs, and leaves a live run's alone.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError, failure_log_text, unexpected
from .signals import deferred

STAGING_PREFIX = ".atm-export-staging-"
LOCK_NAME = ".lock"
FAILURE_LOG = "failure.log"
UNLOCKED_GRACE_S = 60.0

#: The ONNX files a run may write; each may have a side file of weights (``NAME`` + this suffix,
#: ONNX's external-data form: atm_export.export.external_data).
SIDE_FILE_SUFFIX = ".data"
GRAPH_NAMES = (
    "model.onnx",
    "model.plugin.onnx",
    "model.static.onnx",
    "model.static.plugin.onnx",
    "model.fp16.plugin.onnx",
    "model.static.fp16.plugin.onnx",
)
#: Files a run may write. An output directory holding any of them is not overwritten without --force.
ARTIFACT_NAMES = (
    *(n for graph in GRAPH_NAMES for n in (graph, graph + SIDE_FILE_SUFFIX)),
    "model.engine",
    "model.static.engine",
    "tokens.png",
    "latency.png",
    "merge_maps.png",
    "report.md",
    "report.json",
)


class ArtifactWriter:
    """Stage files for ``directory``; ``commit()`` moves them into place, ``abort()`` drops them."""

    def __init__(self, directory: str | Path, force: bool = False, names: tuple[str, ...] = ARTIFACT_NAMES):
        self.directory = Path(directory)
        self.names = names
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"--output {self.directory} exists and is not a directory")
        existing = [n for n in names if (self.directory / n).exists()]
        if existing and not force:
            raise UserError(
                f"{self.directory} already holds artifacts of an earlier run ({', '.join(existing)}); "
                "pass --force to replace them, or choose another --output"
            )
        self.force = force
        self._staged: list[str] = []
        # the directories this run creates (deepest first): an aborted run removes them again
        self._created = [d for d in (self.directory, *self.directory.parents) if not d.exists()]
        try:
            with deferred():  # a signal is raised only once the staging directory is complete
                self.directory.mkdir(parents=True, exist_ok=True)
                self.removed_stale = remove_stale_staging(self.directory)
                self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.directory))
                self._lock = _hold_lock(self.staging / LOCK_NAME)
        except OSError as exc:
            self._undo()
            raise UserError(f"cannot write to output directory {self.directory}: {exc.strerror or exc}") from None
        except BaseException:  # e.g. the deferred signal: nobody else holds this writer yet
            self._undo()
            raise

    def path(self, name: str) -> Path:
        """Where to write artifact ``name`` now (inside the staging directory)."""
        if name not in self.names:
            raise ValueError(f"not a known artifact name: {name}")
        if name not in self._staged:
            self._staged.append(name)
        return self.staging / name

    def scratch(self, name: str) -> Path:
        """Where to write a working file that is never committed (e.g. the benchmarks' baseline
        graph); it goes with the staging directory."""
        if name in self.names or name in (LOCK_NAME, FAILURE_LOG):
            raise ValueError(f"{name} is an artifact's or the staging directory's own name")
        return self.staging / name

    def staged(self, name: str) -> bool:
        """Whether this run has written artifact ``name``."""
        return name in self._staged and (self.staging / name).exists()

    def write_text(self, name: str, text: str) -> Path:
        path = self.path(name)
        path.write_text(text)
        return path

    def commit(self) -> list[Path]:
        """Move the staged files into the output directory; report.json goes last."""
        order = sorted(self._staged, key=lambda n: n == "report.json")
        moved = []
        with deferred():  # once files start moving, finish: an interrupted commit would mix two runs
            if self.force:
                for name in self.names:  # an earlier run's files this run does not replace
                    stale = self.directory / name
                    if name not in self._staged and stale.exists():
                        stale.unlink()
            for name in order:
                src = self.staging / name
                if src.exists():
                    os.replace(src, self.directory / name)
                    moved.append(self.directory / name)
            self._remove_staging()
        return moved

    def abort(self) -> None:
        with deferred():
            self._remove_staging()
            self._remove_created()

    def keep_failure_log(self, exc: BaseException) -> Path:
        """Drop the staged files but keep the staging directory with ``failure.log`` (the step
        and the traceback of ``exc``), unlocked so that the next run removes it. Returns its path."""
        with deferred():
            try:
                for entry in self.staging.iterdir():
                    if entry.name != LOCK_NAME:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                log = self.staging / FAILURE_LOG
                log.write_text(failure_log_text(exc))
            finally:
                os.close(self._lock)
        return log

    def _remove_created(self) -> None:
        for directory in self._created:
            try:
                directory.rmdir()  # only if empty: never anything the run did not create
            except OSError:
                break

    def _remove_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        os.close(self._lock)

    def _undo(self) -> None:
        """Remove what a failed ``__init__`` created."""
        if hasattr(self, "_lock"):
            self.abort()
        elif hasattr(self, "staging"):
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        elif unexpected(exc):
            try:
                exc.atm_log = self.keep_failure_log(exc)
            except OSError:  # cannot even write the log: leave nothing, the caller saves it elsewhere
                shutil.rmtree(self.staging, ignore_errors=True)
                self._remove_created()
        else:
            self.abort()


@contextmanager
def open_output(directory: str | Path, force: bool = False, names: tuple[str, ...] = ARTIFACT_NAMES):
    """``with open_output(dir) as writer:`` stages the run's files; they are committed when the
    block ends normally and dropped when it raises (a signal included). ``names``: the files the
    run may write (the main job's artifacts by default)."""
    writer = None
    try:
        with deferred():  # a signal during the set-up is raised once ``writer`` is complete ...
            writer = ArtifactWriter(directory, force, names)
    except BaseException:
        if writer is not None:  # ... so that what it created can be removed here
            writer.abort()
        raise
    with writer:
        yield writer


def _hold_lock(path: Path) -> int:
    """Create ``path`` and hold an exclusive lock on it until the descriptor is closed."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove the staging directories in ``directory`` left by runs that no longer exist.

    A directory counts as stale when its lock file can be locked (its run is gone), or when it
    has none and is older than a minute (its run died between creating it and locking it; a
    younger one may be a live run about to lock). Returns what was removed.
    """
    removed = []
    for candidate in sorted(directory.glob(STAGING_PREFIX + "*")):
        if not candidate.is_dir() or candidate.is_symlink():
            continue
        try:
            fd = os.open(candidate / LOCK_NAME, os.O_RDWR)
        except FileNotFoundError:
            if time.time() - candidate.stat().st_mtime < UNLOCKED_GRACE_S:
                continue
            fd = None
        except OSError:
            continue  # not ours to judge
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run holds it
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def user_cache_dir() -> Path:
    """Where runs keep what later runs reuse (TensorRT's timing cache, the export's traces):
    ``$XDG_CACHE_HOME/atm-export``, by default ``~/.cache/atm-export``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atm-export"


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half a file.
    UserError (one line) when it cannot be written."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
