"""AdaMerge's calibration: the per-layer statistics of the redundancy on sample images.

AdaMerge merges ``floor(r_max * sigmoid(scale * (rho - mean_l) / std_l))`` pairs per image in
block l, where rho is the image's redundancy there (its mean match score, atm_export.merge.
redundancy). mean_l and std_l say what is typical for that layer, so they are measured: over
the calibration images, with the earlier blocks merging as they will when deployed (their
statistics already calibrated). Block l's redundancy depends on what the earlier blocks
merged, so the blocks are calibrated one after another, one pass over the images each; a pass
merges nothing from block l on (r_max 0 there), which leaves rho at block l unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from .errors import UserError
from .schedule import ADAMERGE, MergeConfig, merging_blocks

#: Smallest spread kept: images that are alike in a block would otherwise divide by zero.
MIN_STD = 1e-6


def _figure(value: float) -> float:
    """Eight significant digits: what a preset file records, so a re-read preset is the same."""
    return float(f"{value:.8g}")


def calibrate(vit: nn.Module, config: MergeConfig, batches: Sequence[torch.Tensor], source: str) -> MergeConfig:
    """``config`` (policy adamerge) with redundancy_mean/std measured on ``batches`` of images.

    batches: preprocessed image batches [B, 3, H, W] (at least two images in all); batch-adaptive
    merging makes the statistics depend on how images share batches, as deployment does.
    source: where the images came from, recorded as the config's calibration_source.
    """
    from .patch import patch_model

    if config.policy != ADAMERGE:
        raise ValueError(f"only the adamerge policy is calibrated, not {config.policy!r}")
    images = sum(int(b.shape[0]) for b in batches)
    if images < 2:
        raise UserError(f"calibration needs at least 2 images to measure a spread, got {images}")
    depth = len(vit.blocks)
    # class-token models keep only the class token after the last block's attention: no merge there
    blocks = range(merging_blocks(depth, merge_in_last_block=vit.global_pool != "token"))
    r_max = config.r_max * depth if len(config.r_max) == 1 else config.r_max
    means: list[float] = []
    stds: list[float] = []
    for block in blocks:  # blocks 0 .. len - 1: block's statistics follow the earlier ones'
        pending = len(blocks) - block
        trial = dataclasses.replace(
            config, r_max=tuple(r if i < block else 0 for i, r in enumerate(r_max)),
            redundancy_mean=(*means, *(0.0,) * pending), redundancy_std=(*stds, *(1.0,) * pending))
        model = patch_model(vit, trial)
        rho = []
        with torch.inference_mode():
            for batch in batches:
                _, stats = model.run(batch)
                rho.extend(stats.redundancy_per_layer[block])
        values = torch.tensor(rho, dtype=torch.float64)
        means.append(_figure(float(values.mean())))
        stds.append(_figure(max(float(values.std(unbiased=False)), MIN_STD)))
    return dataclasses.replace(config, redundancy_mean=tuple(means), redundancy_std=tuple(stds),
                               calibration_source=source)


def calibrated_settings(settings, vit: nn.Module, batch: torch.Tensor, what: str, console=None):
    """``settings`` as they are, or, for AdaMerge without statistics, calibrated on ``batch``
    (``what``: the images' description) with a warning that says so and how to do better."""
    if settings.config.calibrated:
        return settings
    n = int(batch.shape[0])
    config = calibrate(vit, settings.config, [batch], source=f"{what} ({n} images; no AdaMerge preset given)")
    if console is not None:
        console.warn(f"AdaMerge's per-layer statistics were calibrated on {what} ({n} images), not on your data: "
                     "for deployment run `atm-export calibrate MODEL --data DIR -o F.toml` and pass --preset-file F.toml")
    return dataclasses.replace(settings, config=config)
