"""A labelled image data set that atm-export generates itself: shapes, textures and layouts.

Hub weights and ImageNet cannot be had on every machine, so the accuracy tools (``eval``,
``tune``, the ``check`` gate) are tested on a small ViT trained on these images
(atm_export.testmodel.train). Each image is 64 x 64 and holds one of eight classes:

- single shapes: a disk, a square, a triangle, a ring (hollow disk), a plus-shaped cross;
- a texture: a square filled with stripes (against a solid square, texture is the only cue);
- layouts: two small disks side by side, or one above the other (the same two objects; only
  their arrangement tells the classes apart).

Half the backgrounds are flat (many near-identical patches: ATM merges them), half are
textured (noise, gradients: little to merge). Colours, sizes and positions are random, and
the foreground always contrasts with the background, so the task is unambiguous and a
trained model can be near perfect on it. It says nothing about ImageNet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIDE = 64
SUPERSAMPLE = 4  # drawn at 4x and reduced, for smooth edges
CLASSES = ("disk", "square", "triangle", "ring", "cross", "striped_square", "pair_side_by_side", "pair_stacked")
#: Class folder names: numbered so that timm's sorted folder order is the label order.
FOLDERS = tuple(f"{i}_{name}" for i, name in enumerate(CLASSES))
MIN_CONTRAST = 150  # L1 distance (0..765) between foreground and background colours


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3)


def _foreground(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    while True:
        c = _colour(rng)
        if np.abs(c.astype(int) - background.astype(int)).sum() >= MIN_CONTRAST:
            return tuple(int(v) for v in c)


def _background(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [S, S, 3] float at the supersampled size, mean colour [3]).

    Kinds, equally likely: flat, noise, a gradient, a gradient with noise. Made at the final
    resolution and enlarged, which is cheaper and looks the same once reduced again.
    """
    base = _colour(rng).astype(np.float32)
    kind = int(rng.integers(0, 4))
    pixels = np.broadcast_to(base, (SIDE, SIDE, 3)).astype(np.float32)
    if kind >= 2:  # a gradient towards a second colour, in a random direction
        other = _colour(rng).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / (t.max() - t.min())
        pixels = base + t[..., None] * 0.5 * (other - base)
    if kind % 2 == 1:
        pixels = pixels + rng.normal(0.0, rng.uniform(10, 30), size=(SIDE, SIDE, 3)).astype(np.float32)
    big = pixels.repeat(SUPERSAMPLE, axis=0).repeat(SUPERSAMPLE, axis=1)
    return big, pixels.reshape(-1, 3).mean(0)


def _box(rng: np.random.Generator, size: int, margin: int = 2) -> tuple[int, int, int, int]:
    x = int(rng.integers(margin, SIDE - size - margin + 1))
    y = int(rng.integers(margin, SIDE - size - margin + 1))
    k = SUPERSAMPLE
    return x * k, y * k, (x + size) * k, (y + size) * k


def _draw(label: int, d: ImageDraw.ImageDraw, rng: np.random.Generator, fg, bg_mean) -> None:
    k = SUPERSAMPLE
    name = CLASSES[label]
    if name in ("pair_side_by_side", "pair_stacked"):
        size = int(rng.integers(13, 20))
        gap = int(rng.integers(1, 6))
        span = 2 * size + gap
        x0, y0, _, _ = _box(rng, span)
        across = name == "pair_side_by_side"
        jitter = int(rng.integers(-1, 2)) * k
        for i in range(2):
            dx, dy = ((size + gap) * i * k, jitter * i) if across else (jitter * i, (size + gap) * i * k)
            left, top = x0 + dx, y0 + dy
            if across:
                top += (span - size) // 2 * k
            else:
                left += (span - size) // 2 * k
            d.ellipse((left, top, left + size * k, top + size * k), fill=fg)
        return
    size = int(rng.integers(22, 40))
    box = _box(rng, size)
    x0, y0, x1, y1 = box
    if name == "disk":
        d.ellipse(box, fill=fg)
    elif name == "square":
        d.rectangle(box, fill=fg)
    elif name == "triangle":
        d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fg)
    elif name == "ring":
        width = int(rng.integers(3, 6)) * k
        d.ellipse(box, fill=fg)
        d.ellipse((x0 + width, y0 + width, x1 - width, y1 - width), fill=tuple(int(v) for v in bg_mean))
    elif name == "cross":
        arm = max(size // 4, 5) * k // 2
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        d.rectangle((x0, cy - arm, x1, cy + arm), fill=fg)
        d.rectangle((cx - arm, y0, cx + arm, y1), fill=fg)
    elif name == "striped_square":
        d.rectangle(box, fill=fg)
        other = tuple(255 - v for v in fg)
        period = int(rng.integers(4, 7)) * k
        vertical = bool(rng.integers(0, 2))
        for offset in range(0, x1 - x0, period):
            if vertical:
                d.rectangle((x0 + offset, y0, min(x0 + offset + period // 2, x1), y1), fill=other)
            else:
                d.rectangle((x0, y0 + offset, x1, min(y0 + offset + period // 2, y1)), fill=other)


def render(label: int, rng: np.random.Generator) -> Image.Image:
    """One 64 x 64 RGB image of class ``label`` (index into CLASSES)."""
    pixels, mean = _background(rng)
    fg = _foreground(rng, mean)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    _draw(label, ImageDraw.Draw(img), rng, fg, mean)
    return img.resize((SIDE, SIDE), Image.Resampling.BOX)


def sample(count: int, seed: int | list[int]) -> tuple[list[Image.Image], list[int]]:
    """``count`` images with balanced labels (cycling through the classes), from ``seed``."""
    rng = np.random.default_rng(seed)
    labels = [i % len(CLASSES) for i in range(count)]
    return [render(label, rng) for label in labels], labels


def as_arrays(images: list[Image.Image]) -> np.ndarray:
    """Images -> uint8 [B, 64, 64, 3]."""
    return np.stack([np.asarray(img, dtype=np.uint8) for img in images])


def write_folder(directory: str | Path, per_class: int, seed: int, labelled: bool = True) -> Path:
    """Write ``per_class`` images of every class as PNG files: one subfolder per class (the
    ImageNet validation layout), or with ``labelled=False`` all in ``directory`` itself."""
    directory = Path(directory)
    images, labels = sample(per_class * len(CLASSES), seed)
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = directory / FOLDERS[label] if labelled else directory
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.png")
    return directory


def main(argv: list[str] | None = None) -> None:
    """``python -m atm_export.testmodel.shapes DIR --per-class N --seed S [--flat]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write generated shape images (one subfolder per class).")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1, help="training uses [0, step]; any single number is unseen")
    parser.add_argument("--flat", action="store_true", help="all images in DIRECTORY itself, without labels")
    args = parser.parse_args(argv)
    if args.directory.exists() and any(args.directory.iterdir()):
        parser.error(f"{args.directory} is not empty")
    write_folder(args.directory, args.per_class, args.seed, labelled=not args.flat)
    print(f"wrote {args.per_class * len(CLASSES)} images to {args.directory}")


if __name__ == "__main__":
    main()
