"""Presets and overrides -> the settings of a run (atm_export.settings)."""

from __future__ import annotations

import json

import pytest

from atm_export.errors import SettingsError
from atm_export.registry import load_registry, resolve_model
from atm_export.schedule import MergeConfig
from atm_export.settings import resolve_settings

DEIT_S = load_registry()["deit_s"]
LOSSLESS = DEIT_S.presets["lossless"].config


@pytest.mark.parametrize("overrides", [{"alpha": 0.985}, {"split_layer": 6}, {"policy": "atm-per-image"},
                                       {"prop_attn": False}])
def test_a_setting_alone_keeps_the_default_presets_other_settings(overrides):
    settings = resolve_settings(DEIT_S, None, {**overrides, "beta": None, "r": None})  # None: not given
    assert settings.preset.name == "lossless"
    assert settings.overrides == overrides
    expected = {"policy": "atm", "alpha": LOSSLESS.alpha, "beta": LOSSLESS.beta, "theta_min": LOSSLESS.theta_min,
                "split_layer": None, "prop_attn": None, **overrides}
    assert {k: getattr(settings.config, k) for k in expected} == expected


def test_nothing_given_is_the_lossless_preset():
    settings = resolve_settings(DEIT_S, None, {})
    assert settings.config == LOSSLESS and settings.preset.name == "lossless" and settings.overrides == {}


def test_an_explicit_preset_with_an_override():
    settings = resolve_settings(DEIT_S, "fast", {"alpha": 0.97})
    fast = DEIT_S.presets["fast"].config
    assert settings.preset.name == "fast"
    assert (settings.config.alpha, settings.config.beta, settings.config.theta_min) == (0.97, fast.beta, fast.theta_min)


def test_tome_is_a_setting_of_its_own():
    settings = resolve_settings(DEIT_S, None, {"policy": "tome", "r": (8,), "alpha": None})
    assert settings.preset is None and settings.config == MergeConfig(policy="tome", r=(8,))
    d = settings.to_dict()
    assert d == {"preset": None, "preset_source": None, "overrides": {"policy": "tome", "r": [8]}}
    json.dumps(d)
    assert resolve_settings(DEIT_S, None, {"policy": "none"}).config.policy == "none"


def test_to_dict_names_the_preset_and_its_source():
    d = resolve_settings(resolve_model("deit_s_dist"), None, {"alpha": 0.985}).to_dict()
    assert d["preset"] == "lossless" and d["overrides"] == {"alpha": 0.985}
    assert "Table A2" in d["preset_source"]["source"] and d["preset_source"]["borrowed_from"] == "deit_s"


def test_a_model_without_presets_takes_complete_settings():
    entry = resolve_model("vit_base_patch16_384")
    settings = resolve_settings(entry, None, {"alpha": 0.9, "beta": 0.01, "theta_min": 0.8})
    assert settings.preset is None and settings.config.alpha == 0.9
    assert resolve_settings(entry, None, {"policy": "tome", "r": (4,)}).config.r == (4,)


@pytest.mark.parametrize("entry, preset, overrides, message", [
    (DEIT_S, None, {"r": (8,)}, "--r (a fixed merge count per block) needs --policy tome"),
    (DEIT_S, None, {"policy": "atm", "r": (8,)}, "needs --policy tome"),
    (DEIT_S, None, {"policy": "none", "r": (8,)}, "needs --policy tome"),
    (DEIT_S, None, {"policy": "tome", "r": (8,), "alpha": 0.9}, "--alpha is an ATM threshold, which --policy tome would ignore"),
    (DEIT_S, None, {"policy": "none", "beta": 0.1, "theta_min": 0.8}, "--beta, --theta-min are ATM thresholds"),
    (DEIT_S, None, {"policy": "tome"}, "--policy tome needs --r"),
    (DEIT_S, "fast", {"policy": "tome", "r": (8,)}, "uses no preset; drop --preset fast"),
    (DEIT_S, "turbo", {}, "deit_s has no preset 'turbo'; its presets: lossless, balanced, fast"),
    (DEIT_S, None, {"alpha": 1.5}, "alpha must be a similarity threshold in [0, 1], got 1.5"),
    (DEIT_S, None, {"policy": "bogus"}, "unknown policy 'bogus'"),
    (DEIT_S, None, {"alhpa": 0.9}, "unknown setting 'alhpa'"),
    ("vit_base_patch16_384", None, {}, "vit_base_patch16_384 has no presets; give the settings"),
    ("vit_base_patch16_384", None, {"alpha": 0.9}, "give --beta, --theta-min too"),
    ("vit_base_patch16_384", None, {"policy": "atm-per-image"}, "give --alpha, --beta, --theta-min too"),
    ("vit_base_patch16_384", "lossless", {}, "has no presets"),
])
def test_settings_that_cannot_work(entry, preset, overrides, message):
    entry = resolve_model(entry) if isinstance(entry, str) else entry
    with pytest.raises(SettingsError) as err:
        resolve_settings(entry, preset, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
