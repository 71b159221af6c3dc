"""The trace cache in a run: kept under $XDG_CACHE_HOME by default, reused by the next export of
the same model (the run says so), never read or written with ``--trace-cache none``, and the
artifacts the same byte for byte whichever way the graph was made."""

from __future__ import annotations

from atm_export.cli import main

RUN = ["shapes_vit", "--no-benchmark", "--backends", "eager,ort", "--parity-batches", "1"]
REUSED = "traced blocks reused from the trace cache"


def test_the_next_export_reuses_the_trace_and_writes_the_same_graphs(tmp_path, monkeypatch, capsys):
    home = tmp_path / "cache-home"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    assert main(RUN + ["-o", str(tmp_path / "none"), "--trace-cache", "none"]) == 0
    assert not (home / "atm-export").exists()  # (other libraries keep their caches there too)
    assert main(RUN + ["-o", str(tmp_path / "first")]) == 0
    [entry] = (home / "atm-export" / "traces").iterdir()
    assert REUSED not in capsys.readouterr().err
    assert main(RUN + ["-o", str(tmp_path / "second")]) == 0
    assert REUSED in capsys.readouterr().err  # the progress notes
    assert list((home / "atm-export" / "traces").iterdir()) == [entry]
    for name in ("model.plugin.onnx", "model.onnx"):
        made = {(tmp_path / run / name).read_bytes() for run in ("none", "first", "second")}
        assert len(made) == 1, name


def test_an_unwritable_cache_is_a_warning_not_a_failure(tmp_path, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    assert main(RUN + ["-o", str(tmp_path / "out"), "--trace-cache", str(blocked)]) == 0
    out = capsys.readouterr()
    assert "the trace cache cannot keep this trace" in out.err
    assert (tmp_path / "out" / "model.plugin.onnx").exists()
