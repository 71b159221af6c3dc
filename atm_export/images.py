"""Sample images: a deterministic built-in set, or the user's own, preprocessed for the model.

The built-in scenes range from nearly flat (much merging) to cluttered and noisy (little
merging), so that a sample batch exercises ATM the way real photos do. Random images would
not: noise has no similar patches, and ATM rightly merges almost nothing in it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SIDE = 256
#: PIL modes whose pixels are numbers that can be NaN or infinite (e.g. float TIFFs).
FLOAT_MODES = ("F", "I", "I;16", "I;16B", "I;16L")
NON_FINITE_WHY = ("it would give NaN outputs and, through the batch-adaptive merge count, change the "
                  "token counts of every other image in its batch")


def _canvas(color) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (SIDE, SIDE), color)
    return img, ImageDraw.Draw(img)


def _add_noise(img: Image.Image, rng: np.random.Generator, box, amplitude: float) -> Image.Image:
    a = np.asarray(img, dtype=np.float32).copy()
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] += rng.normal(0.0, amplitude, size=(y1 - y0, x1 - x0, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _sky(rng):
    img, d = _canvas((110, 170, 235))
    d.ellipse((170, 30, 220, 80), fill=(250, 230, 120))
    return img


def _beach(rng):
    img, d = _canvas((120, 180, 240))
    d.rectangle((0, 150, SIDE, SIDE), fill=(225, 200, 150))
    d.rectangle((60, 190, 150, 215), fill=(200, 40, 40))
    return img


def _room(rng):
    img, d = _canvas((200, 190, 170))
    d.rectangle((0, 180, SIDE, SIDE), fill=(120, 80, 50))
    d.rectangle((30, 40, 110, 130), fill=(170, 210, 240))
    d.rectangle((150, 60, 230, 180), fill=(60, 60, 70))
    return img


def _checker(rng):
    img, d = _canvas((30, 30, 30))
    for i in range(4):
        for j in range(4):
            if (i + j) % 2:
                d.rectangle((i * 64, j * 64, i * 64 + 63, j * 64 + 63), fill=(230, 230, 230))
    return img


def _shapes(rng):
    img, d = _canvas((245, 245, 245))
    colors = [(220, 50, 50), (50, 160, 70), (40, 80, 200), (230, 180, 30), (140, 60, 160), (20, 20, 20)]
    for k, color in enumerate(colors):
        x, y = 20 + (k % 3) * 80, 30 + (k // 3) * 110
        if k % 2:
            d.ellipse((x, y, x + 60, y + 60), fill=color)
        else:
            d.polygon([(x, y + 60), (x + 30, y), (x + 60, y + 60)], fill=color)
    return img


def _field(rng):
    img, d = _canvas((80, 150, 60))
    d.rectangle((120, 100, 140, 200), fill=(100, 70, 40))
    d.ellipse((80, 40, 180, 130), fill=(40, 110, 40))
    return _add_noise(img, rng, (0, 0, SIDE, SIDE), 6.0)


def _stripes(rng):
    img, d = _canvas((250, 250, 250))
    for k in range(-SIDE, SIDE, 40):
        d.polygon([(k, 0), (k + 20, 0), (k + 20 + SIDE, SIDE), (k + SIDE, SIDE)], fill=(30, 90, 160))
    return img


def _clutter(rng):
    img, d = _canvas((128, 128, 128))
    for _ in range(60):
        x, y = rng.integers(0, SIDE - 20, size=2)
        w, h = rng.integers(8, 40, size=2)
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        d.rectangle((int(x), int(y), int(x + w), int(y + h)), fill=color)
    return _add_noise(img, rng, (0, 128, SIDE, SIDE), 40.0)


BUILTIN_SCENES = (_sky, _beach, _room, _checker, _shapes, _field, _stripes, _clutter)


def builtin_images(count: int = len(BUILTIN_SCENES)) -> list[Image.Image]:
    """``count`` deterministic scenes (the list repeats after its eight scenes)."""
    rng = np.random.default_rng(0)
    scenes = [scene(rng) for scene in BUILTIN_SCENES]
    return [scenes[i % len(scenes)] for i in range(count)]


def noise_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Uniform noise: patches share nothing, so ATM should merge (almost) nothing."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)) for _ in range(count)]


def load_images(directory: str | Path, limit: int | None = None) -> tuple[list[Image.Image], list[str]]:
    """The images in ``directory`` (sorted by name), at most ``limit`` of them, and their paths."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--images: {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    images = []
    for path in files[:limit]:
        try:
            with Image.open(path) as img:
                img.load()
                finite = img.mode not in FLOAT_MODES or bool(np.isfinite(np.asarray(img)).all())
                images.append(img.convert("RGB"))
        except Exception as exc:
            raise UserError(f"--images: cannot read {path}: {exc}") from None
        if not finite:  # PIL would silently turn NaN into black
            raise UserError(f"--images: {path} holds non-finite pixel values (NaN or inf); {NON_FINITE_WHY}")
    return images, [str(p) for p in files[:limit]]


def preprocess(images: list[Image.Image], model) -> torch.Tensor:
    """Resize, crop and normalise with the model's timm data config. -> [B, 3, H, W]."""
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    return torch.stack([transform(img) for img in images])


def require_finite(batch: torch.Tensor, names: list[str]) -> None:
    """Refuse images ([B, 3, H, W], one name each) whose preprocessed pixels are not all finite."""
    bad = [name for name, ok in zip(names, torch.isfinite(batch).flatten(1).all(1).tolist()) if not ok]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"{bad[0]}{more} yields non-finite pixel values after preprocessing; {NON_FINITE_WHY}")


def take_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """A batch of ``size`` images from ``batch``, cycling through it when it is smaller."""
    index = torch.arange(size) % batch.shape[0]
    return batch[index]
