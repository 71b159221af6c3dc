"""Fixed token schedules: where they come from, what is refused, and that a replay follows them."""

from __future__ import annotations

import json

import pytest

from atm_export.errors import UserError
from atm_export.fixed_schedule import (checked_schedule, parse_schedule, replay_model, schedule_for_gflops,
                                       schedule_gflops)
from atm_export.flops import ViTDims
from atm_export.patch import patch_model
from atm_export.schedule import MergeConfig

# DeiT-T's shape: 196 patches + the class token, 12 blocks.
DIMS = ViTDims(depth=12, embed_dim=192, attn_dim=192, head_dim=64, mlp_hidden=768, num_patches=196, patch_macs=768,
               num_prefix=1, num_classes=1000, num_head_layers=1, has_fc_norm=False, has_final_norm=True)
TOKENS = [197, 180, 160, 140, 120, 100, 90, 80, 70, 60, 50, 40]


def test_a_list_is_read_and_rounded():
    assert parse_schedule(",".join(map(str, TOKENS)), DIMS, True) == TOKENS
    assert parse_schedule(",".join(f"{t}.2" for t in TOKENS), DIMS, True) == TOKENS


def test_a_gflops_target_is_met():
    tokens = parse_schedule("gflops:0.9", DIMS, True)
    assert schedule_gflops(DIMS, tokens, True) == pytest.approx(0.9, abs=0.03)
    assert tokens == schedule_for_gflops(DIMS, 0.9, True)


@pytest.mark.parametrize("content, spec_suffix", [
    ({"tokens": {"mean": [float(t) for t in TOKENS], "min": [], "max": []}}, ""),  # a report.json
    ({"tokens_per_layer": TOKENS}, ""),
    ({"results": [{"name": "unmerged", "tokens": [197] * 12}, {"name": "lossless", "tokens": TOKENS}]}, ""),
    ({"results": [{"name": "unmerged", "tokens": [197] * 12}, {"name": "fast", "tokens": [197] * 12},
                  {"name": "lossless", "tokens": TOKENS}]}, ":lossless"),  # an eval.json, one setting named
])
def test_json_files_are_read(tmp_path, content, spec_suffix):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(content))
    assert parse_schedule(f"{path}{spec_suffix}", DIMS, True) == TOKENS


@pytest.mark.parametrize("content, spec_suffix, message", [
    ({"results": [{"name": "a", "tokens": TOKENS}, {"name": "b", "tokens": TOKENS}]}, "", "holds 2 settings; name one"),
    ({"results": [{"name": "a", "tokens": TOKENS}]}, ":b", "has no setting 'b'"),
    ({"something": 1}, "", "records no token schedule"),
])
def test_json_files_without_one_schedule_are_refused(tmp_path, content, spec_suffix, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError, match=message):
        parse_schedule(f"{path}{spec_suffix}", DIMS, True, option="--static-schedule")


def test_unreadable_sources_name_the_option(tmp_path):
    with pytest.raises(UserError, match="--static-schedule .*cannot read"):
        parse_schedule(str(tmp_path / "missing.json"), DIMS, True, option="--static-schedule")
    with pytest.raises(UserError, match="--static-schedule 'a,b'"):
        parse_schedule("a,b", DIMS, True, option="--static-schedule")
    with pytest.raises(UserError, match="gflops:<number>"):
        parse_schedule("gflops:x", DIMS, True)


@pytest.mark.parametrize("tokens, message", [
    (TOKENS[:-1], "needs 12 counts starting at 197"),
    ([196, *TOKENS[1:]], "needs 12 counts starting at 197"),
    ([197, 90, *TOKENS[2:]], "at most half"),  # 197 -> 90 merges 107 of 196 patches
    ([197, 180, 185, *TOKENS[3:]], "at most half"),  # a schedule never grows
])
def test_impossible_schedules_are_refused(tokens, message):
    with pytest.raises(UserError, match=message):
        checked_schedule(tokens, DIMS, "--static-schedule")


def test_a_replay_follows_its_schedule_whatever_the_images(tiny_models, flat_images, noise_batch):
    vit = tiny_models["deit_tiny"]
    atm = patch_model(vit, MergeConfig())
    replay = replay_model(atm, TOKENS)
    for images in (flat_images, noise_batch):
        _, stats = replay.run(images)
        assert [int(t) for t in stats.tokens_per_layer] == TOKENS
    assert replay.config.resolved_split_layer(12) == atm.config.resolved_split_layer(12)
    assert replay.prop_attn == atm.prop_attn
