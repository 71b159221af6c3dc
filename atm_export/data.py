"""Image folders for ``eval``, ``tune`` and the ``check`` accuracy gate, read with timm's pipeline.

A folder is either labelled, with one subfolder per class (the ImageNet validation layout
timm reads: classes in sorted order are the model's class indices), or flat: images directly
in it, without labels. Images are found by timm's folder reader and preprocessed with timm's
eval transform for the model's pretrained data config (input size, interpolation, crop, mean,
std), batched by a torch DataLoader.

Two things differ from timm's own ``ImageDataset`` on purpose:

- an image that cannot be read is an error naming the file; timm would silently put the next
  image (and its label) in its place, which would count that image twice;
- the images are evaluated in a fixed shuffled order (seed 0), not sorted by class: with
  batch-adaptive merging a batch's images share one merge count, and a batch of one class is
  not what a deployed model sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .images import IMAGE_SUFFIXES, require_finite

ORDER_SEED = 0


@dataclass(frozen=True)
class ImageFolder:
    """The images of a folder, in evaluation order, with their labels when the folder has classes.

    files: paths; labels: class index per file (None for a flat folder); classes: the class
    folder names in label order (empty for a flat folder).
    """

    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...] | None
    classes: tuple[str, ...]

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices) -> "ImageFolder":
        """The images at ``indices`` (positions in this folder's order), in that order."""
        indices = list(indices)
        labels = None if self.labels is None else tuple(self.labels[i] for i in indices)
        return ImageFolder(self.root, tuple(self.files[i] for i in indices), labels, self.classes)

    def split(self, fraction: float) -> tuple["ImageFolder", "ImageFolder"]:
        """(the first 1 - fraction of the images, the rest): e.g. calibration and held-out images."""
        cut = len(self) - max(1, int(round(len(self) * fraction)))
        if cut < 1:
            raise UserError(f"{self.root} has {len(self)} images: too few to hold some out")
        return self.subset(range(cut)), self.subset(range(cut, len(self)))

    def to_dict(self) -> dict:
        return {"path": str(self.root), "images": len(self), "labelled": self.labelled,
                "classes": len(self.classes), "order": f"shuffled with seed {ORDER_SEED}"}


def open_folder(path: str | Path, num_classes: int | None = None, option: str = "--data",
                limit: int | None = None) -> ImageFolder:
    """The images under ``path`` in evaluation order, at most ``limit`` of them.

    num_classes: the model's classifier size; a labelled folder must have that many classes.
    Raises UserError (one line naming ``option``) for a missing or empty folder, or classes
    that do not match the model's head.
    """
    from timm.data.readers.reader_image_folder import find_images_and_targets

    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{option}: {root} is not a directory")
    try:
        found, class_to_idx = find_images_and_targets(str(root), types=IMAGE_SUFFIXES)
    except OSError as exc:
        raise UserError(f"{option}: cannot read {root}: {exc.strerror or exc}") from None
    if not found:
        raise UserError(f"{option}: no images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its subfolders")
    classes = tuple(class_to_idx)
    flat = classes == ("",)
    if not flat and "" in class_to_idx:
        raise UserError(f"{option}: {root} holds images both directly and in class subfolders; "
                        "put every image in its class's subfolder, or all of them in one flat folder")
    if not flat and num_classes is not None and len(classes) != num_classes:
        raise UserError(f"{option}: {root} has {len(classes)} class folders ({_sample(classes)}), but the model's "
                        f"head has {num_classes} classes; the class folders, sorted, must be the model's classes")
    order = np.random.default_rng(ORDER_SEED).permutation(len(found))[:limit]
    files = tuple(found[i][0] for i in order)
    labels = None if flat else tuple(int(found[i][1]) for i in order)
    return ImageFolder(root.resolve(), files, labels, () if flat else classes)


def _sample(names: tuple[str, ...]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


class _Images(torch.utils.data.Dataset):
    """(image tensor, label or -1, error or "") per file; errors are raised by the loader's
    user, so that they name the file even when a worker process read it."""

    def __init__(self, folder: ImageFolder, transform):
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        path = self.folder.files[index]
        label = -1 if self.folder.labels is None else self.folder.labels[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
            return self.transform(img), label, ""
        except Exception as exc:  # PIL raises several types for broken files
            return torch.zeros(0), label, f"cannot read {path}: {type(exc).__name__}: {exc}"


def data_config(model) -> dict:
    """The model's timm data config: input_size, interpolation, mean, std, crop_pct, crop_mode."""
    from timm.data import resolve_data_config

    return resolve_data_config({}, model=model)


def batches(folder: ImageFolder, model, batch_size: int, workers: int = 0, option: str = "--data"):
    """Yield (images [B, 3, H, W] float32, labels [B] int64 or None) in the folder's order.

    Raises UserError naming the file when an image cannot be read.
    """
    from timm.data import create_transform

    transform = create_transform(**data_config(model))
    loader = torch.utils.data.DataLoader(_Images(folder, transform), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_collate)
    start = 0
    for images, labels, errors in loader:
        if errors:
            raise UserError(f"{option}: {errors[0]}")
        require_finite(images, list(folder.files[start:start + len(images)]))
        start += len(images)
        yield images, labels if folder.labelled else None


def _collate(items):
    errors = [e for _, _, e in items if e]
    if errors:
        return None, None, errors
    return torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items]), []
