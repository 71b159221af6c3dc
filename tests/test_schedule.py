"""Merge-count policies: thresholds, split layers, validation."""

from __future__ import annotations

import math
import re

import pytest

from atm_export.errors import SettingsError, UserError
from atm_export.schedule import MergeConfig, r_from_tokens, replay_config


def test_threshold_formula_and_floor():
    cfg = MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88)
    assert cfg.threshold(1) == pytest.approx(0.99)
    assert cfg.threshold(2) == pytest.approx(0.99 - (math.exp(0.04) - 1))
    assert cfg.threshold(12) == pytest.approx(0.88)  # floored by theta_min


def test_atm_steps_split_layer_defaults_to_three_quarters():
    steps = MergeConfig().steps(12, merge_in_last_block=False)
    modes = [s.split_mode if s else None for s in steps]
    assert modes[:9] == ["alternate"] * 9
    assert modes[9:11] == ["size"] * 2
    assert steps[11] is None  # class-token models: no merge in the last block
    assert MergeConfig().steps(12, merge_in_last_block=True)[11].split_mode == "size"


def test_tome_steps_and_replay():
    steps = MergeConfig(policy="tome", r=(8,)).steps(4, merge_in_last_block=True)
    assert [s.r for s in steps] == [8, 8, 8, 8]
    assert all(s.split_mode == "alternate" for s in steps)
    steps = replay_config([5, 0, 3, 0]).steps(4, merge_in_last_block=True)
    assert [s.r if s else None for s in steps] == [5, None, 3, None]


def test_r_from_tokens():
    assert r_from_tokens([197, 150, 120, 120], 1, True) == [47, 30, 0, 0]
    with pytest.raises(UserError):
        r_from_tokens([197, 200], 1, True)


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 1.2}, "alpha must be a similarity threshold in [0, 1]"),
    ({"alpha": 1.5}, "alpha must be a similarity threshold in [0, 1], got 1.5"),
    ({"theta_min": -0.1}, "theta_min must be a similarity threshold in [0, 1]"),
    ({"alpha": float("nan")}, "alpha must be a similarity threshold"),
    ({"beta": -1}, "beta"),
    ({"policy": "tome", "r": (-1,)}, "non-negative"),
    ({"policy": "tome", "r": (1.5,)}, "non-negative integers"),
    ({"policy": "tome"}, "needs r"),
    ({"policy": "atm", "r": (8,)}, "only read by the tome policy"),
    ({"policy": "bogus"}, "unknown policy"),
    ({"split_layer": -1}, "split_layer must be in [0, depth]"),
    ({"prop_attn": "yes"}, "prop_attn"),
])
def test_invalid_settings_fail_when_built(kwargs, message):
    """A MergeConfig that cannot work is refused at construction, before any model is built."""
    with pytest.raises(SettingsError, match=re.escape(message)) as err:
        MergeConfig(**kwargs)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "tome", "r": (1, 2, 3)}, "r has 3 values; give one, or one per block (12)"),
    ({"split_layer": 13}, "split_layer must be in [0, 12], got 13"),
])
def test_depth_dependent_settings_fail_in_validate_and_steps(kwargs, message):
    config = MergeConfig(**kwargs)  # fine without a depth
    with pytest.raises(SettingsError, match=re.escape(message)):
        config.validate(depth=12)
    with pytest.raises(SettingsError):
        config.steps(12, merge_in_last_block=False)
    assert config.validate(depth=16 if "r" not in kwargs else 3) is config


def test_valid_settings_build_and_r_is_normalised():
    assert MergeConfig(alpha=1.0, beta=0.0, theta_min=0.0).validate(12).alpha == 1.0
    assert MergeConfig(policy="tome", r=8).r == (8,)
    assert MergeConfig(policy="tome", r=[4, 0]).r == (4, 0)
    assert MergeConfig(policy="none", alpha=5.0).steps(4, merge_in_last_block=True) == [None] * 4  # thresholds unused


def test_from_preset():
    from atm_export.registry import load_registry

    lossless = load_registry()["deit_s"].presets["lossless"].config
    assert MergeConfig.from_preset("deit_s") == lossless
    assert MergeConfig.from_preset("deit_small_patch16_224", "lossless", alpha=0.985) == MergeConfig(
        alpha=0.985, beta=lossless.beta, theta_min=lossless.theta_min)
    assert MergeConfig.from_preset("deit_s", "fast").theta_min == 0.845
    assert MergeConfig.from_preset("deit_s", policy="tome", r=8) == MergeConfig(policy="tome", r=(8,))
    with pytest.raises(SettingsError, match="has no preset 'turbo'; its presets: lossless, balanced, fast"):
        MergeConfig.from_preset("deit_s", "turbo")
    with pytest.raises(SettingsError, match="has no presets"):
        MergeConfig.from_preset("vit_base_patch16_384")
    assert MergeConfig.from_preset("vit_base_patch16_384", alpha=0.9, beta=0.01, theta_min=0.8).alpha == 0.9
