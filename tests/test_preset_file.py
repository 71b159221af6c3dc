"""Preset files: read in the registry's format, written by tune, one-line errors for broken ones."""

from __future__ import annotations

import pytest

from atm_export.errors import SettingsError, UserError
from atm_export.preset_file import file_default_preset, preset_file_text, read_preset_file, with_preset_file
from atm_export.registry import resolve_model
from atm_export.schedule import MergeConfig
from atm_export.settings import settings_for


@pytest.fixture
def entry():
    return resolve_model("deit_s")


def test_a_written_file_reads_back_as_the_same_settings(tmp_path, entry):
    config = MergeConfig(alpha=0.985, beta=0.035, theta_min=0.86, split_layer=7)
    path = tmp_path / "p.toml"
    path.write_text(preset_file_text(entry, "mine", config, {"gflops": 3.1, "agreement": 0.995, "top1": None},
                                     'made "by hand"', ["a comment"]))
    presets = read_preset_file(path, entry)
    assert list(presets) == ["mine"] and presets["mine"].config == config
    assert presets["mine"].gflops == 3.1 and presets["mine"].source == 'made "by hand"'


def test_the_file_joins_the_registry_presets_and_is_the_default(tmp_path, entry):
    path = tmp_path / "p.toml"
    path.write_text(preset_file_text(entry, "mine", MergeConfig(alpha=0.97, beta=0.03, theta_min=0.85), {}, "x"))
    assert set(with_preset_file(entry, path).presets) == {"lossless", "balanced", "fast", "mine"}
    assert file_default_preset(path, entry, None) == "mine"
    _, settings = settings_for("deit_s", None, {"beta": 0.04}, str(path))
    assert settings.preset.name == "mine" and settings.config.alpha == 0.97 and settings.config.beta == 0.04
    _, settings = settings_for("deit_s", "fast", {}, str(path))
    assert settings.preset.name == "fast"


def test_a_timm_name_table_matches_too(tmp_path, entry):
    path = tmp_path / "p.toml"
    path.write_text('["deit_small_patch16_224".presets.x]\nalpha = 0.99\nbeta = 0.02\ntheta_min = 0.87\n')
    assert read_preset_file(path, entry)["x"].config.theta_min == 0.87


@pytest.mark.parametrize("text, message", [
    ("[deit_s\nalpha =", "not valid TOML"),
    ("title = 'x'", "holds no model table"),
    ("[deit_b.presets.x]\nalpha = 0.99\nbeta = 0.02\ntheta_min = 0.87", "holds presets for deit_b, not for deit_s"),
    ("[deit_s]\ntimm_name = 'x'", "has no presets"),
    ("[deit_s.presets.x]\nalpha = 0.99\nbeta = 0.02", "lacks theta_min"),
    ("[deit_s.presets.x]\nalpha = 0.99\nbeta = 0.02\ntheta_min = 0.87\nthetamin = 1", "unknown field(s) thetamin"),
    ("[deit_s.presets.x]\nalpha = 1.5\nbeta = 0.02\ntheta_min = 0.87", "alpha must be a similarity threshold"),
    ("[deit_s.presets.x]\nalpha = 'high'\nbeta = 0.02\ntheta_min = 0.87", "alpha must be"),
])
def test_broken_files_are_one_line_errors(tmp_path, entry, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises((UserError, SettingsError)) as info:
        read_preset_file(path, entry)
    assert message in str(info.value) and "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_missing_file_and_an_ambiguous_one(tmp_path, entry):
    with pytest.raises(UserError, match="no such file"):
        read_preset_file(tmp_path / "nope.toml", entry)
    path = tmp_path / "two.toml"
    path.write_text("[deit_s.presets.a]\nalpha = 0.99\nbeta = 0.02\ntheta_min = 0.87\n"
                    "[deit_s.presets.b]\nalpha = 0.98\nbeta = 0.02\ntheta_min = 0.87\n")
    with pytest.raises(UserError, match="holds several presets .*choose one with --preset"):
        file_default_preset(path, entry, None)


def test_another_registered_models_table_does_not_match_by_timm_name(tmp_path):
    """shapes_vit and vit_t share timm's vit_tiny_patch16_224, not their presets."""
    path = tmp_path / "p.toml"
    path.write_text('[vit_t]\ntimm_name = "vit_tiny_patch16_224"\n[vit_t.presets.x]\nalpha = 0.99\nbeta = 0.02\ntheta_min = 0.87\n')
    assert "x" in read_preset_file(path, resolve_model("vit_t"))
    with pytest.raises(UserError, match="holds presets for vit_t, not for shapes_vit"):
        read_preset_file(path, resolve_model("shapes_vit"))
