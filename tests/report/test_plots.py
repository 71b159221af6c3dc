"""The report's charts: they write real PNGs, cope with edge cases, and style backends in pairs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atm_export.report.plots import latency_styles, plot_latency, plot_tokens

LATENCY = {
    "eager_baseline": {1: 4.0, 8: 20.0, 32: 70.0},
    "eager_atm": {1: 3.0, 8: 12.0, 32: 40.0},
    "ort_baseline": {1: 2.0, 8: 10.0, 32: 35.0},
    "ort_portable": {1: 1.8, 8: 7.0, 32: 22.0},
    "tensorrt": {1: 0.5, 8: 1.5, 32: 5.0},
}
BASELINES = {"eager_atm": "eager_baseline", "ort_portable": "ort_baseline"}


def open_png(path):
    """The PNG at path as an RGB array, after checking it is a real, reasonably sized picture."""
    assert path.stat().st_size > 1000
    assert path.stat().st_size < 400_000
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert 300 <= img.width <= 2000 and 200 <= img.height <= 2000
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10  # something was drawn, not a blank canvas
    return pixels


def test_plot_tokens_writes_png(tmp_path):
    out = plot_tokens([197.0, 150.5, 120.25, 99.0], [197, 140, 110, 90], [197, 160, 130, 105], tmp_path / "t.png")
    assert out == tmp_path / "t.png"
    open_png(out)
    assert not list(tmp_path.glob("*.part"))  # the temporary file was moved over, not left behind


@pytest.mark.parametrize("mean,lo,hi", [([197.0], [197], [197]), ([197.0], [150], [197]), ([5.0, 5.0], [5, 5], [5, 5])])
def test_plot_tokens_edge_cases(tmp_path, mean, lo, hi):
    open_png(plot_tokens(mean, lo, hi, tmp_path / "t.png"))


def test_plot_tokens_rejects_bad_lengths(tmp_path):
    with pytest.raises(ValueError, match="one entry per block"):
        plot_tokens([1.0, 2.0], [1], [1, 2], tmp_path / "t.png")
    with pytest.raises(ValueError, match="empty"):
        plot_tokens([], [], [], tmp_path / "t.png")


def test_plot_latency_writes_png(tmp_path):
    open_png(plot_latency(LATENCY, BASELINES, tmp_path / "l.png"))


def test_plot_latency_single_batch_and_string_keys(tmp_path):
    open_png(plot_latency({"eager_atm": {"8": 12.0}, "eager_baseline": {"8": 20.0}}, BASELINES, tmp_path / "l.png"))


def test_plot_latency_orphan_baseline(tmp_path):
    open_png(plot_latency({"ort_baseline": {1: 2.0, 4: 6.0}}, BASELINES, tmp_path / "l.png"))


def test_plot_latency_empty_raises(tmp_path):
    with pytest.raises(ValueError, match="no latency"):
        plot_latency({}, BASELINES, tmp_path / "l.png")
    with pytest.raises(ValueError, match="no latency"):
        plot_latency({"eager_atm": {}}, BASELINES, tmp_path / "l.png")
    assert not (tmp_path / "l.png").exists()


def test_latency_styles_pair_merged_with_baseline():
    styles = latency_styles(list(LATENCY), BASELINES)
    assert styles["eager_atm"][0] == styles["eager_baseline"][0]
    assert styles["ort_portable"][0] == styles["ort_baseline"][0]
    groups = {styles["eager_atm"][0], styles["ort_portable"][0], styles["tensorrt"][0]}
    assert len(groups) == 3  # pairs and loners each get their own colour
    assert [styles[n][1] for n in LATENCY] == [True, False, True, False, False]  # baselines dashed


def test_latency_styles_orphan_baseline_gets_own_colour():
    styles = latency_styles(["ort_baseline", "tensorrt"], BASELINES)
    assert styles["ort_baseline"][1] is True
    assert styles["ort_baseline"][0] != styles["tensorrt"][0]
