"""The staged output directory: commit, abort, force, and what a failed run leaves (nothing)."""

from __future__ import annotations

import pytest

from atm_export.artifacts import ArtifactWriter, open_output
from atm_export.errors import UserError


def test_files_appear_only_on_commit_report_json_last(tmp_path):
    out = tmp_path / "a" / "b"
    with open_output(out) as writer:
        writer.write_text("report.md", "x")
        writer.path("model.onnx").write_bytes(b"onnx")
        assert writer.staged("report.md") and not writer.staged("report.json")
        assert not (out / "report.md").exists()
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.md"]


def test_a_failed_run_leaves_nothing_not_even_the_directories_it_made(tmp_path):
    with pytest.raises(RuntimeError):
        with open_output(tmp_path / "a" / "b") as writer:
            writer.write_text("report.md", "x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_earlier_artifacts_need_force_and_force_removes_the_stale_ones(tmp_path):
    with open_output(tmp_path) as writer:
        writer.write_text("report.md", "old")
        writer.path("model.engine").write_bytes(b"e")
    with pytest.raises(UserError, match="--force"):
        ArtifactWriter(tmp_path)
    with open_output(tmp_path, force=True) as writer:
        writer.write_text("report.md", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # the old engine is not left behind
    assert (tmp_path / "report.md").read_text() == "new"


def test_unknown_artifact_names_are_refused(tmp_path):
    with open_output(tmp_path) as writer:
        with pytest.raises(ValueError):
            writer.path("notes.txt")
