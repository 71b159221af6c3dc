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
    with pytest.raises(UserError):
        with open_output(tmp_path / "a" / "b") as writer:
            writer.write_text("report.md", "x")
            raise UserError("a mistake")
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_failure_keeps_only_its_traceback_in_the_staging_directory(tmp_path):
    """No artifact of the failed run is left, but failure.log (the step and the traceback) is,
    in the hidden staging directory, until the next run in the same place removes it."""
    from atm_export.artifacts import FAILURE_LOG, STAGING_PREFIX
    from atm_export.console import Console

    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as info:
        with open_output(out) as writer, Console(verbosity=0).step("exporting the graphs"):
            writer.write_text("report.md", "x")
            writer.path("model.onnx").write_bytes(b"half")
            raise RuntimeError("boom")
    log = info.value.atm_log
    assert info.value.atm_step == "exporting the graphs"
    assert [p.name for p in out.iterdir()] == [log.parent.name] and log.parent.name.startswith(STAGING_PREFIX)
    assert sorted(p.name for p in log.parent.iterdir()) == [".lock", FAILURE_LOG]
    text = log.read_text()
    assert text.startswith("atm-export failed while exporting the graphs") and "Traceback" in text and "boom" in text
    with open_output(out) as writer:
        assert writer.removed_stale == [log.parent]
        writer.write_text("report.md", "y")
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]


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


def test_a_signal_while_the_output_is_set_up_leaves_nothing(tmp_path, monkeypatch):
    """SIGTERM arriving while the staging directory is being locked: the signal is deferred to
    the end of the set-up, and the set-up's directories must still be removed."""
    import os
    import signal

    from atm_export import artifacts, signals

    hold = artifacts._hold_lock

    def hold_then_signal(path):
        fd = hold(path)
        os.kill(os.getpid(), signal.SIGTERM)
        return fd

    monkeypatch.setattr(artifacts, "_hold_lock", hold_then_signal)
    with signals.installed():
        with pytest.raises(signals.Aborted):
            with open_output(tmp_path / "a" / "b"):
                pytest.fail("the run must not start")
    assert list(tmp_path.iterdir()) == []
