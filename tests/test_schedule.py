"""Merge-count policies: thresholds, split layers, validation."""

from __future__ import annotations

import math

import pytest

from atm_export.errors import UserError
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
    ({"theta_min": -0.1}, "theta_min must be a similarity threshold in [0, 1]"),
    ({"beta": -1}, "beta"),
    ({"policy": "tome", "r": (-1,)}, "non-negative"),
    ({"policy": "tome"}, "needs r"),
    ({"policy": "tome", "r": (1, 2, 3)}, "one per block"),
    ({"policy": "bogus"}, "unknown policy"),
    ({"split_layer": 13}, "split_layer"),
])
def test_invalid_settings(kwargs, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        MergeConfig(**kwargs).validate(depth=12)
