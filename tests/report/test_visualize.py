"""Merge maps: patch labels from source maps, the painting of token regions, and the figure."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atm_export.report.visualize import EDGE_COLOUR, denormalize, draw_merge_maps, paint_tokens, token_regions

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PATCH = 8  # pixels per patch side in the synthetic images
# 2x3 grid with one prefix token: patches 0, 1 and 4 are one token, the others alone.
MERGED = [[0, 0, 1], [2, 0, 3]]


def synthetic_sources(cls_row: int = 0) -> np.ndarray:
    """[N=5, N0=7] sources for MERGED, the class token held by row cls_row; rows in an order
    that is not the patches' order, so that the labels are not just positions."""
    patch_rows = [r for r in range(5) if r != cls_row]
    holders = {0: patch_rows[2], 1: patch_rows[2], 2: patch_rows[0], 3: patch_rows[3], 4: patch_rows[2], 5: patch_rows[1]}
    sources = np.zeros((5, 7), dtype=np.float32)
    sources[cls_row, 0] = 1
    for patch, row in holders.items():
        sources[row, 1 + patch] = 1
    return sources


def test_token_regions_labels_patches():
    assert token_regions(synthetic_sources(), 1, (2, 3)).tolist() == [[3, 3, 1], [4, 3, 2]]


def test_token_regions_ignores_prefix_column():
    # The class token held by row 2: no patch may get label 2, however the prefix column reads.
    assert token_regions(synthetic_sources(cls_row=2), 1, (2, 3)).tolist() == [[3, 3, 0], [4, 3, 1]]


def test_token_regions_without_prefix():
    sources = synthetic_sources()[1:, 1:]  # drop the class token's row and column
    assert token_regions(sources, 0, (2, 3)).tolist() == [[2, 2, 0], [3, 2, 1]]


def test_token_regions_rejects_bad_sources():
    sources = synthetic_sources()
    with pytest.raises(ValueError, match="shape"):
        token_regions(sources, 1, (3, 3))
    sources[0, 3] = 1  # patch 2 now held by two tokens
    with pytest.raises(ValueError, match="patch 2"):
        token_regions(sources, 1, (2, 3))


def test_denormalize_round_trip():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    normalised = ((pixels / 255.0 - MEAN) / STD).astype(np.float32).transpose(0, 3, 1, 2)  # [B, 3, H, W]
    back = denormalize(normalised, MEAN, STD)
    assert back.dtype == np.uint8 and back.shape == pixels.shape
    assert np.abs(back.astype(int) - pixels.astype(int)).max() <= 1


def test_denormalize_clips():
    out = denormalize(np.array([-100.0, 100.0, 0.0]).reshape(1, 3, 1, 1), MEAN, STD)
    assert out.reshape(3).tolist() == [0, 255, round(0.406 * 255)]


def flat_image(value: int = 128) -> np.ndarray:
    return np.full((2 * PATCH, 3 * PATCH, 3), value, dtype=np.uint8)


def interior(painted, row, col):
    """The painted pixel at the centre of a patch, away from every boundary."""
    return tuple(painted[row * PATCH + PATCH // 2, col * PATCH + PATCH // 2])


def test_paint_tokens_regions_and_boundaries():
    painted = paint_tokens(flat_image(), np.array(MERGED), seed=0)
    assert painted.shape == (2 * PATCH, 3 * PATCH, 3) and painted.dtype == np.uint8
    merged = interior(painted, 0, 0)
    # The merged token is one colour over all its patches, across the seams between them.
    assert interior(painted, 0, 1) == merged and interior(painted, 1, 1) == merged
    assert tuple(painted[PATCH // 2, PATCH - 1]) == merged  # seam between patches 0 and 1: no line
    block = painted[1 : PATCH - 1, 0 : PATCH - 1].reshape(-1, 3)  # patch 0 less its right column
    assert (block == merged).all()
    # Different tokens differ, also single-patch ones, and a line runs between them.
    singles = [interior(painted, 0, 2), interior(painted, 1, 0), interior(painted, 1, 2)]
    assert len({merged, *singles}) == 4
    assert tuple(painted[PATCH // 2, 2 * PATCH - 1]) == EDGE_COLOUR  # patch 1 | patch 2
    assert tuple(painted[PATCH - 1, PATCH // 2]) == EDGE_COLOUR  # patch 0 above patch 3
    assert tuple(painted[PATCH // 2, 2 * PATCH]) != EDGE_COLOUR  # patch 2's own side is filled


def test_paint_tokens_line_width():
    thick = paint_tokens(flat_image(), np.array(MERGED), line=2)
    assert tuple(thick[PATCH // 2, 2 * PATCH - 2]) == EDGE_COLOUR
    assert tuple(thick[PATCH // 2, 2 * PATCH - 3]) != EDGE_COLOUR


def test_paint_tokens_blends_the_image_and_is_seeded():
    labels = np.array(MERGED)
    dark, light = paint_tokens(flat_image(0), labels), paint_tokens(flat_image(255), labels)
    assert (light[4, 4].astype(int) > dark[4, 4].astype(int) + 100).all()  # the image shows through
    assert (paint_tokens(flat_image(), labels, seed=3) == paint_tokens(flat_image(), labels, seed=3)).all()
    assert interior(paint_tokens(flat_image(), labels, seed=3), 0, 0) != interior(paint_tokens(flat_image(), labels, seed=4), 0, 0)


def test_paint_tokens_rejects_mismatched_grid():
    with pytest.raises(ValueError, match="patch grid"):
        paint_tokens(np.zeros((17, 24, 3), np.uint8), np.array(MERGED))


def test_draw_merge_maps_figure(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 2 * PATCH, 3 * PATCH, 3), dtype=np.uint8)
    identity = np.broadcast_to(np.eye(7, dtype=np.float32), (3, 7, 7))
    merged = np.broadcast_to(synthetic_sources(), (3, 5, 7))
    sources = {"input": identity, "after block 9": merged}
    two = draw_merge_maps(images, sources, 1, (2, 3), tmp_path / "two.png", max_images=2)
    three = draw_merge_maps(images, sources, 1, (2, 3), tmp_path / "three.png")
    assert two == tmp_path / "two.png"
    with Image.open(two) as a, Image.open(three) as b:
        assert a.format == b.format == "PNG"
        assert a.width == b.width > 300  # an image column and two maps
        assert b.height > a.height  # a row per image, at most max_images
    assert three.stat().st_size < 300_000


def test_draw_merge_maps_rejects_float_images(tmp_path):
    with pytest.raises(ValueError, match="denormalize"):
        draw_merge_maps(np.zeros((1, 16, 24, 3), np.float32), {}, 1, (2, 3), tmp_path / "m.png")
