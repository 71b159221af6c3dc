"""The model registry (models/registry.toml)."""

from __future__ import annotations

import re

import pytest

from atm_export.errors import SettingsError, UserError
from atm_export.registry import find_model, load_registry, registered_model, resolve_model

PAPER_MODELS = ["deit_t", "deit_s", "deit_b", "mae_b"]


def test_every_model_has_lossless_and_two_faster_presets():
    for short, entry in load_registry().items():
        assert "lossless" in entry.presets, short
        faster = [p for name, p in entry.presets.items() if name != "lossless"]
        assert len(faster) >= 2, short


@pytest.mark.parametrize("short", PAPER_MODELS)
def test_presets_cite_their_table_row(short):
    entry = load_registry()[short]
    for preset in entry.presets.values():
        cfg = preset.config
        assert "Table A2" in preset.source
        row = re.search(r"\(([\d.]+), ([\d.]+), ([\d.]+)\)", preset.source)
        assert row, preset.source
        assert tuple(float(v) for v in row.groups()) == (cfg.alpha, cfg.beta, cfg.theta_min)
        assert f"{preset.gflops:.2f} GFLOPs" in preset.source and f"{preset.top1:.2f} top-1" in preset.source
    lossless, others = entry.presets["lossless"], [p for n, p in entry.presets.items() if n != "lossless"]
    assert all(p.gflops < lossless.gflops for p in others), "faster presets save more FLOPs"


def test_borrowed_presets_say_so():
    entry = load_registry()["deit_s_dist"]
    assert entry.presets["lossless"].borrowed_from == "deit_s"
    assert "not evaluate" in entry.presets["lossless"].to_dict()["note"]


def test_names_resolve():
    assert resolve_model("deit_s").timm_name == "deit_small_patch16_224"
    assert resolve_model("deit_small_patch16_224").short_name == "deit_s"
    assert resolve_model("vit_base_patch16_384").presets == {}  # any timm model, no presets


def test_unknown_name_suggests_close_names():
    with pytest.raises(UserError, match="did you mean deit_s"):
        resolve_model("deit_sm")


def test_find_model_is_none_for_names_that_are_no_model():
    assert find_model("chek") is None
    assert find_model("deit_s").short_name == "deit_s"
    assert find_model("vit_base_patch16_224.mae").short_name == "mae_b"
    assert find_model("vit_base_patch16_384").presets == {}
    assert registered_model("vit_base_patch16_384") is None  # timm knows it; the registry does not


def test_preset_lookup_errors_are_settings_errors():
    with pytest.raises(SettingsError, match="deit_t has no preset 'turbo'; its presets: lossless, balanced, fast"):
        load_registry()["deit_t"].preset("turbo")
    with pytest.raises(SettingsError, match="has no presets; give the settings instead"):
        resolve_model("vit_base_patch16_384").preset("lossless")
