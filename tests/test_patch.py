"""Patching timm ViTs: reproduces timm without merging, merges on flat images, not on noise."""

from __future__ import annotations

import pytest
import torch

from atm_export import MergeConfig, patch_model
from atm_export.errors import UserError
from conftest import TINY_MODELS, make_model

NO_MERGE = {
    "policy none": MergeConfig(policy="none"),
    "threshold 1": MergeConfig(alpha=1.0, theta_min=1.0),
    "r 0": MergeConfig(policy="tome", r=(0,)),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused-sdpa", "explicit-attn"])
@pytest.mark.parametrize("config", list(NO_MERGE.values()), ids=list(NO_MERGE))
@pytest.mark.parametrize("key", list(TINY_MODELS))
def test_without_merging_reproduces_timm(key, config, fused, flat_images):
    vit = make_model(key)
    for blk in vit.blocks:
        blk.attn.fused_attn = fused
    atm = patch_model(vit, config)
    with torch.no_grad():
        expected = vit(flat_images[:4])
        got = atm(flat_images[:4])
    assert atm.last_stats.r_per_layer == [0.0] * 12
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_global_pool_without_class_token():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg").eval()
    atm = patch_model(vit, MergeConfig(policy="none"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(atm(x), vit(x), atol=1e-5, rtol=0)
    assert atm.num_protected == 0


@pytest.mark.parametrize("key", list(TINY_MODELS))
def test_flat_images_merge_and_noise_does_not(key, tiny_models, flat_images, noise_batch):
    atm = patch_model(tiny_models[key], MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88))
    with torch.no_grad():
        atm(flat_images)
    flat_tokens = atm.last_stats.tokens_per_layer
    with torch.no_grad():
        atm(noise_batch)
    noise_tokens = atm.last_stats.tokens_per_layer
    n0 = flat_tokens[0]
    assert flat_tokens[-1] < 0.5 * n0, f"flat scenes should merge a lot: {flat_tokens}"
    assert noise_tokens[-1] >= 0.95 * n0, f"noise should merge almost nothing: {noise_tokens}"
    assert all(a >= b for a, b in zip(flat_tokens, flat_tokens[1:])), "token counts never grow"


def test_batch_adaptive_r_is_floor_of_batch_mean(tiny_models, flat_images):
    atm = patch_model(tiny_models["deit_tiny"], MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88))
    with torch.no_grad():
        atm(flat_images)
    stats = atm.last_stats
    differing = 0
    for i, counts in enumerate(stats.counts_per_layer):
        if counts is None:
            continue
        cap = (int(stats.tokens_per_layer[i]) - atm.num_protected) // 2
        assert stats.r_per_layer[i] == min(sum(counts) // len(counts), cap)
        differing += len(set(counts)) > 1
    assert differing > 0, "images should disagree somewhere, or the mean is not exercised"


def test_same_input_same_counts(tiny_models, flat_images):
    atm = patch_model(tiny_models["deit_tiny"], MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88))
    with torch.no_grad():
        first = atm(flat_images)
        counts = atm.last_stats.tokens_per_layer
        second = atm(flat_images)
    assert atm.last_stats.tokens_per_layer == counts
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_per_image_mode_runs_each_image_alone(tiny_models, flat_images):
    vit = tiny_models["deit_tiny"]
    cfg = dict(alpha=0.99, beta=0.04, theta_min=0.88)
    per_image = patch_model(vit, MergeConfig(policy="atm-per-image", **cfg))
    single = patch_model(vit, MergeConfig(**cfg))
    with torch.no_grad():
        logits = per_image(flat_images[:3])
        alone = [single(flat_images[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(logits, torch.cat(alone), atol=1e-5, rtol=0)
    tokens = per_image.last_stats.per_image_tokens
    assert len(tokens) == 3 and len({tuple(t) for t in tokens}) > 1, "images merge differently"
    assert per_image.last_stats.tokens_per_layer[3] == pytest.approx(sum(t[3] for t in tokens) / 3)


def test_source_tracking_covers_every_patch(tiny_models, flat_images):
    atm = patch_model(tiny_models["deit_tiny"], MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88), trace_source=True)
    with torch.no_grad():
        atm(flat_images[:2])
    sources = atm.last_stats.sources
    assert sources.shape[1] == atm.last_stats.tokens_per_layer[-1]
    assert torch.all(sources.sum(1) == 1), "every input token is held by exactly one token"


def test_tome_policy_merges_fixed_r(tiny_models, flat_images):
    atm = patch_model(tiny_models["deit_tiny"], MergeConfig(policy="tome", r=(8,)))
    with torch.no_grad():
        atm(flat_images[:2])
    assert atm.last_stats.tokens_per_layer == [197.0 - 8 * i for i in range(12)]


@pytest.mark.parametrize("name, kwargs, reason", [
    ("resnet18", {}, "not a timm VisionTransformer"),
    ("vit_base_patch16_siglip_224", {}, "attention-pool"),
    ("vit_tiny_patch16_224", {"global_pool": "max"}, "global_pool='max'"),
])
def test_unsupported_models_are_refused(name, kwargs, reason):
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(UserError, match=reason):
        patch_model(model, MergeConfig())


def test_non_finite_images_are_refused_unless_allowed(tiny_models, flat_images):
    """One NaN image would make its logits NaN and, through the batch-adaptive count, move every
    other image's token counts: the patched model refuses it by default."""
    from atm_export.errors import NonFiniteInputError

    batch = flat_images[:4].clone()
    batch[2, 0, 5, 5] = float("nan")
    atm = patch_model(tiny_models["deit_tiny"], MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88))
    with pytest.raises(NonFiniteInputError, match=r"image\(s\) \[2\]"):
        atm(batch)
    with pytest.raises(NonFiniteInputError):
        atm.forward_export(batch)
    allowed = patch_model(tiny_models["deit_tiny"], MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88),
                          check_finite=False)
    with torch.no_grad():
        logits = allowed(batch)
    assert torch.isnan(logits[2]).all() and torch.isfinite(logits[[0, 1, 3]]).all()
