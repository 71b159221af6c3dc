"""FLOPs accounting: the paper's baselines, and agreement with PyTorch's own FLOP counter."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from atm_export import MergeConfig, patch_model
from atm_export.flops import LAYERNORM_MACS_PER_ELEMENT, ViTDims, baseline_gflops, run_gflops


@pytest.mark.parametrize("name, expected", [
    ("deit_tiny_patch16_224", 1.26),
    ("deit_small_patch16_224", 4.60),
    ("deit_base_patch16_224", 17.57),
])
def test_paper_baselines(name, expected):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    assert round(baseline_gflops(ViTDims.from_timm(model)), 2) == expected


def _layernorm_macs(atm, stats, image=0):
    """LayerNorm multiply-adds the run made (the FLOP counter does not count LayerNorm)."""
    d = ViTDims.from_timm(atm.vit)
    total = 0
    for i, (n_in, r) in enumerate(zip(stats.per_image_tokens[image], stats.per_image_r[image])):
        n_out = d.num_prefix if (atm.class_token_head and i == d.depth - 1) else n_in - r
        total += n_in + n_out
    total += n_out if d.has_final_norm else 0
    total += 1 if d.has_fc_norm else 0
    return LAYERNORM_MACS_PER_ELEMENT * d.embed_dim * total


@pytest.mark.parametrize("key", ["deit_tiny", "deit_tiny_distilled", "vit_tiny_gap"])
def test_counts_match_torch_flop_counter_on_a_merged_run(key, tiny_models, flat_images):
    """Our analytic count from the token counts equals what PyTorch counts while the model runs."""
    vit = tiny_models[key]
    atm = patch_model(vit, MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():  # explicit attention: the counter has formulas for matmuls, not every SDPA kernel
        _, stats = atm.run(flat_images[:2], explicit_attention=True)
    assert stats.tokens_per_layer[-1] < stats.tokens_per_layer[0], "the run should merge"
    counted_macs = counter.get_total_flops() / 2 / 2  # FLOPs -> MACs, per image
    ours = run_gflops(atm, stats) * 1e9 - _layernorm_macs(atm, stats)
    assert ours == pytest.approx(counted_macs, rel=1e-9)
