"""The output directory: artifacts are staged and moved into place only when a run succeeds.

A run writes every file into a hidden staging directory inside the output directory. On
success each file is moved into place with an atomic rename (report.json last, so its
presence means a complete set); on failure the staging directory is deleted. A failed run
therefore leaves no half-written file and does not touch the previous run's artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

#: Files a run may write. An output directory holding any of them is not overwritten without --force.
ARTIFACT_NAMES = (
    "model.onnx",
    "model.plugin.onnx",
    "model.engine",
    "report.md",
    "report.json",
)


class ArtifactWriter:
    """Stage files for ``directory``; ``commit()`` moves them into place, ``abort()`` drops them."""

    def __init__(self, directory: str | Path, force: bool = False):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"--output {self.directory} exists and is not a directory")
        existing = [n for n in ARTIFACT_NAMES if (self.directory / n).exists()]
        if existing and not force:
            raise UserError(
                f"{self.directory} already holds artifacts of an earlier run ({', '.join(existing)}); "
                "pass --force to replace them, or choose another --output"
            )
        self._created = not self.directory.exists()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=".atm-export-staging-", dir=self.directory))
        except OSError as exc:
            raise UserError(f"cannot write to output directory {self.directory}: {exc.strerror or exc}") from None
        self.force = force
        self._staged: list[str] = []

    def path(self, name: str) -> Path:
        """Where to write artifact ``name`` now (inside the staging directory)."""
        if name not in ARTIFACT_NAMES:
            raise ValueError(f"not a known artifact name: {name}")
        if name not in self._staged:
            self._staged.append(name)
        return self.staging / name

    def final_path(self, name: str) -> Path:
        return self.directory / name

    def write_text(self, name: str, text: str) -> Path:
        path = self.path(name)
        path.write_text(text)
        return path

    def write_json(self, name: str, obj) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def commit(self) -> list[Path]:
        """Move the staged files into the output directory; report.json goes last."""
        order = sorted(self._staged, key=lambda n: n == "report.json")
        if self.force:
            for name in ARTIFACT_NAMES:  # an earlier run's files this run does not replace
                stale = self.directory / name
                if name not in self._staged and stale.exists():
                    stale.unlink()
        moved = []
        for name in order:
            src = self.staging / name
            if src.exists():
                os.replace(src, self.directory / name)
                moved.append(self.directory / name)
        shutil.rmtree(self.staging, ignore_errors=True)
        return moved

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._created:
            try:
                self.directory.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
