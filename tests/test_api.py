"""The Python API: atm_export.patch and MergeConfig.from_preset (docs/api.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import atm_export
from atm_export import MergeConfig, SettingsError
from atm_export.registry import load_registry


def _create(name, **kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture(scope="module")
def deit_t():
    return _create("deit_tiny_patch16_224")


@pytest.fixture(scope="module")
def test_vit():
    return _create("test_vit")  # a tiny timm ViT the registry does not hold


def test_patch_uses_the_models_lossless_preset(deit_t):
    atm = atm_export.patch(deit_t, preset="lossless")
    assert isinstance(atm, atm_export.ATMVisionTransformer)
    assert atm.config == load_registry()["deit_t"].presets["lossless"].config
    assert atm_export.patch(deit_t).config == atm.config  # lossless is the default
    assert atm.vit is deit_t  # shares the timm model's parameters
    assert atm_export.patch(deit_t, "fast").config == load_registry()["deit_t"].presets["fast"].config


def test_patch_with_overrides(deit_t):
    lossless = load_registry()["deit_t"].presets["lossless"].config
    config = atm_export.patch(deit_t, alpha=0.985).config
    assert (config.alpha, config.beta, config.theta_min) == (0.985, lossless.beta, lossless.theta_min)
    assert atm_export.patch(deit_t, policy="tome", r=8).config == MergeConfig(policy="tome", r=(8,))
    with pytest.raises(SettingsError, match="needs --policy tome"):
        atm_export.patch(deit_t, r=8)
    with pytest.raises(SettingsError, match="alpha must be a similarity threshold"):
        atm_export.patch(deit_t, alpha=1.5)


def test_patch_with_a_config(test_vit):
    config = MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88)
    assert atm_export.patch(test_vit, config=config).config is config
    with pytest.raises(SettingsError, match="not both"):
        atm_export.patch(test_vit, config=config, alpha=0.9)
    with pytest.raises(SettingsError, match="not both"):
        atm_export.patch(test_vit, "fast", config=config)


def test_a_model_without_presets_needs_settings(test_vit):
    with pytest.raises(SettingsError, match=re.escape("test_vit has no presets in atm-export's registry; pass config=")):
        atm_export.patch(test_vit)
    atm = atm_export.patch(test_vit, alpha=0.99, beta=0.04, theta_min=0.88)
    assert atm.config == MergeConfig(alpha=0.99, beta=0.04, theta_min=0.88)


def test_patch_takes_a_model_not_a_name():
    with pytest.raises(TypeError, match="MergeConfig.from_preset"):
        atm_export.patch("deit_t")


def test_the_patched_model_runs_and_reports_stats(deit_t):
    atm = atm_export.patch(deit_t)
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        logits = atm(images)
    assert logits.shape == (2, 1000)
    assert len(atm.last_stats.tokens_per_layer) == 12 and atm.last_stats.tokens_per_layer[0] == 197


def test_the_docs_example_runs():
    """The example in docs/api.md (the first python block) runs as written."""
    text = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(example, "docs/api.md", "exec"), {})
