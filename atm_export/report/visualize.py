"""ToMe-style merge maps: which image patches every token holds, painted over the image.

Shapes: B = images, H x W = pixels, gh x gw = patch grid (H and W multiples of it),
P = prefix tokens (class / distillation tokens, first in the sequence), N0 = P + gh * gw
input tokens, N = tokens at some point of the network.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from atm_export.report.plots import DPI, new_figure, save_png

#: Colour of the lines between patches held by different tokens.
EDGE_COLOUR = (20, 20, 20)

#: Share of the token's own colour in a region's fill (the rest is the region's mean colour).
TOKEN_ALPHA = 0.5

#: Side of one picture in the merge-map figure, in inches.
CELL_IN = 1.6


def denormalize(images: np.ndarray, mean, std) -> np.ndarray:
    """Preprocessed images back to displayable pixels.

    images: [B, 3, H, W] float, normalised per channel as (pixel / 255 - mean) / std;
    mean, std: 3 values in 0..1 units (timm's data config). -> [B, H, W, 3] uint8.
    """
    images = np.asarray(images, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(std, dtype=np.float64).reshape(1, 3, 1, 1)
    pixels = np.clip(np.rint((images * std + mean) * 255.0), 0, 255)
    return pixels.astype(np.uint8).transpose(0, 2, 3, 1)


def token_regions(sources: np.ndarray, num_prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """For every patch, the output token that holds it. -> [gh, gw] int.

    sources: [N, N0] for one image, 0/1 (any float or int dtype): row t marks the input tokens
    that output token t holds. The P prefix columns are ignored: they are not patches.
    """
    sources = np.asarray(sources)
    gh, gw = grid
    if sources.ndim != 2 or sources.shape[1] != num_prefix + gh * gw:
        raise ValueError(
            f"sources must be [N, {num_prefix} + {gh}*{gw}] for one image "
            f"({num_prefix} prefix tokens, a {gh}x{gw} patch grid); got shape {sources.shape}"
        )
    held = sources[:, num_prefix:] > 0.5  # [N, gh*gw]; > 0.5 tolerates float sums of 0/1
    owners = held.sum(axis=0)
    if (owners != 1).any():
        patch = int(np.flatnonzero(owners != 1)[0])
        raise ValueError(f"every patch must be held by exactly one token; patch {patch} is held by {owners[patch]}")
    return held.argmax(axis=0).reshape(gh, gw)


def token_colours(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A vivid colour per distinct label, in ascending label order. -> [T, 3] float 0..255.

    labels: [gh, gw]. A token's colour is keyed by the first patch (row-major) it holds,
    not by its index, so a token that lives on through several blocks tends to keep its
    colour from one map to the next. Deterministic for a given seed.
    """
    from matplotlib.colors import hsv_to_rgb

    rng = np.random.default_rng(seed)
    n = labels.size
    hsv = np.stack([rng.permutation(n) / n, rng.uniform(0.55, 1.0, n), rng.uniform(0.75, 1.0, n)], axis=1)
    palette = hsv_to_rgb(hsv) * 255.0  # [gh*gw, 3], one colour per patch
    _, first_patch = np.unique(labels.ravel(), return_index=True)
    return palette[first_patch]


def token_edges(per_pixel: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels on the boundary between different tokens. per_pixel: [H, W] labels -> [H, W] bool.

    The line lies on the upper / left side of each change of label, ``width`` pixels thick.
    """
    edge = np.zeros(per_pixel.shape, dtype=bool)
    for k in range(1, width + 1):
        edge[:, :-k] |= per_pixel[:, :-k] != per_pixel[:, k:]
        edge[:-k, :] |= per_pixel[:-k, :] != per_pixel[k:, :]
    return edge


def paint_tokens(image: np.ndarray, labels: np.ndarray, seed: int = 0, line: int = 1) -> np.ndarray:
    """Paint every token as the region of patches it holds, with lines between tokens.

    image: [H, W, 3] uint8; labels: [gh, gw] token per patch (``token_regions``), H and W
    multiples of gh and gw. Each region is filled with a blend of its mean image colour and
    its token's colour (``token_colours``), so that it shows both what the token averages
    and which patches belong together, also when they are far apart. -> [H, W, 3] uint8.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    height, width = image.shape[:2]
    gh, gw = labels.shape
    if height % gh or width % gw:
        raise ValueError(f"image of {height}x{width} pixels does not divide into a {gh}x{gw} patch grid")
    per_pixel = np.repeat(np.repeat(labels, height // gh, axis=0), width // gw, axis=1)  # [H, W]
    _, token = np.unique(per_pixel, return_inverse=True)  # compact ids, in ascending label order
    token = token.ravel()
    area = np.bincount(token).astype(np.float64)
    pixels = image.reshape(-1, 3).astype(np.float64)
    mean = np.stack([np.bincount(token, weights=pixels[:, c]) for c in range(3)], axis=1) / area[:, None]
    fill = (1.0 - TOKEN_ALPHA) * mean + TOKEN_ALPHA * token_colours(labels, seed)  # [T, 3]
    out = fill[token].reshape(height, width, 3)
    out[token_edges(per_pixel, line)] = EDGE_COLOUR
    return np.rint(out).astype(np.uint8)


def draw_merge_maps(
    images: np.ndarray,
    sources: dict[str, np.ndarray],
    num_prefix: int,
    grid: tuple[int, int],
    path,
    max_images: int = 8,
    seed: int = 0,
) -> Path:
    """One figure of merge maps: a row per image (at most max_images), the image first, then
    one map per entry of sources, in its order.

    images: [B, H, W, 3] uint8 (``denormalize`` preprocessed ones), H and W multiples of the
    grid. sources: column title (e.g. "after block 9") -> [B, N, N0] 0/1, N may differ
    between entries. num_prefix: P, the prefix tokens first in N0. grid: (gh, gw).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be [B, H, W, 3] uint8 (use denormalize on preprocessed images); "
            f"got shape {images.shape} and dtype {images.dtype}"
        )
    sources = {title: np.asarray(s) for title, s in sources.items()}
    for title, s in sources.items():
        if s.ndim != 3 or s.shape[0] < min(len(images), max_images):
            raise ValueError(f"sources[{title!r}] must be [B, N, N0] with a row per image; got shape {s.shape}")
    rows, cols = min(len(images), max_images), 1 + len(sources)
    if rows == 0:
        raise ValueError("no images to draw")
    # Lines 1 px wide vanish when the picture is shrunk to its cell: thicken them to match.
    line = max(1, math.ceil(images.shape[1] / (CELL_IN * DPI)))
    fig = new_figure(CELL_IN * cols, CELL_IN * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_ylabel(f"image {i}", fontsize="small")
        for j, s in enumerate(sources.values(), start=1):
            labels = token_regions(s[i], num_prefix, grid)
            axes[i, j].imshow(paint_tokens(images[i], labels, seed=seed, line=line))
            axes[i, j].set_xlabel(f"{len(np.unique(labels))} patch tokens", fontsize="x-small", labelpad=1)
    for j, title in enumerate(["image", *sources]):
        axes[0, j].set_title(title, fontsize="small")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return save_png(fig, path)
