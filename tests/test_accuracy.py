"""Accuracy bookkeeping against plain loops, and what merging does to agreement on the trained test model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atm_export import accuracy as A
from atm_export.data import batches, open_folder
from atm_export.patch import patch_model
from atm_export.schedule import MergeConfig


def test_tally_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    tally = A.Tally()
    rows = []
    for size in (7, 5, 9):
        logits = torch.from_numpy(rng.normal(size=(size, 10)).astype(np.float32))
        labels = torch.from_numpy(rng.integers(0, 10, size=size))
        reference = torch.from_numpy(rng.integers(0, 10, size=size))
        gflops, tokens = float(rng.uniform(1, 2)), [float(t) for t in rng.uniform(10, 20, size=3)]
        tally.add(A.Predictions(logits, gflops, tokens), labels, reference, seconds=0.5)
        for i in range(size):
            order = sorted(range(10), key=lambda k: -float(logits[i, k]))
            rows.append((order[0] == labels[i], labels[i] in order[:5], order[0] == reference[i], gflops, tokens))
    n = len(rows)
    assert tally.images == n
    assert tally.top1 == pytest.approx(100 * sum(r[0] for r in rows) / n)
    assert tally.top5 == pytest.approx(100 * sum(bool(r[1]) for r in rows) / n)
    assert tally.agreement == pytest.approx(sum(bool(r[2]) for r in rows) / n)
    assert tally.gflops == pytest.approx(sum(r[3] for r in rows) / n)
    assert tally.tokens == pytest.approx(np.mean([r[4] for r in rows], axis=0).tolist())
    assert tally.images_per_second == pytest.approx(n / 1.5)


def test_without_labels_only_agreement_is_counted():
    tally = A.Tally()
    tally.add(A.Predictions(torch.eye(3), 1.0, [3.0]), None, torch.tensor([0, 1, 0]), 0.1)
    assert tally.top1 is None and tally.top5 is None and tally.agreement == pytest.approx(2 / 3)


def _agreement(vit, folder, config, batch_size=64):
    atm = patch_model(vit, config)
    reference, merged = A.unmerged(vit), A.eager(atm)
    tally, base = A.Tally(), A.Tally()
    for images, labels in batches(folder, vit, batch_size):
        ref = reference(images)
        predicted = A.top1(ref.logits)
        base.add(ref, labels, predicted, 0.0)
        tally.add(merged(images), labels, predicted, 0.0)
    return base, tally


def test_merging_off_agrees_exactly(shapes_vit, shapes_data):
    folder = open_folder(shapes_data["val"], limit=192)
    base, tally = _agreement(shapes_vit, folder, MergeConfig(policy="none"))
    assert tally.agreement == 1.0 and tally.top1 == base.top1 and tally.tokens == base.tokens
    # the patched model's last block computes the class token only (exact): fewer GFLOPs, no merging
    assert 0.8 * base.gflops < tally.gflops < base.gflops


def test_agreement_and_gflops_fall_as_thresholds_are_lowered(shapes_vit, shapes_data):
    """On a trained model and images with flat regions: lower thresholds merge more, and more
    predictions change."""
    folder = open_folder(shapes_data["val"])
    figures = []
    for theta in (0.99, 0.9, 0.7, 0.4):
        _, tally = _agreement(shapes_vit, folder, MergeConfig(alpha=theta, beta=0.0, theta_min=theta))
        figures.append((tally.gflops, tally.agreement))
    gflops, agreement = zip(*figures)
    assert list(gflops) == sorted(gflops, reverse=True) and gflops[-1] < 0.6 * gflops[0]
    assert agreement[0] >= 0.99 and agreement[-1] < agreement[0] - 0.05
    assert list(agreement) == sorted(agreement, reverse=True)
