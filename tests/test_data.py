"""Image folders for eval, tune and the gate: layouts, order, and one-line errors for bad folders."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from atm_export.data import ImageFolder, batches, open_folder
from atm_export.errors import UserError
from atm_export.testmodel.shapes import CLASSES, FOLDERS


def test_a_labelled_folder_gives_sorted_classes_as_labels(shapes_data):
    folder = open_folder(shapes_data["val"], num_classes=len(CLASSES))
    assert folder.labelled and folder.classes == FOLDERS and len(folder) == 40 * len(CLASSES)
    for path, label in zip(folder.files, folder.labels):
        assert path.split("/")[-2] == FOLDERS[label]


def test_the_order_is_a_fixed_shuffle_and_limit_takes_its_start(shapes_data):
    a = open_folder(shapes_data["val"])
    b = open_folder(shapes_data["val"], limit=50)
    assert a.files[:50] == b.files and len(b) == 50
    assert len(set(a.labels[:40])) > 4  # not sorted by class: a batch mixes classes
    assert sorted(a.files) == sorted(open_folder(shapes_data["val"]).files)


def test_a_flat_folder_has_no_labels(shapes_data):
    folder = open_folder(shapes_data["flat"], num_classes=len(CLASSES))
    assert not folder.labelled and folder.classes == () and len(folder) == len(CLASSES) * 4


def test_split_holds_out_the_end(shapes_data):
    folder = open_folder(shapes_data["val"])
    calib, held = folder.split(0.25)
    assert len(held) == 80 and calib.files + held.files == folder.files


def test_batches_use_the_models_timm_transform(shapes_data, shapes_vit):
    """Independent of timm's transform: 64-px PNGs with crop 1.0 are the pixels, normalised."""
    folder = open_folder(shapes_data["val"], limit=5)
    images, labels = next(batches(folder, shapes_vit, batch_size=5))
    expected = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                            for f in folder.files]) / 255.0
    assert torch.allclose(images, (expected - 0.5) / 0.5, atol=1e-6)
    assert labels.tolist() == list(folder.labels)


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a directory"),
    ("empty", "no images"),
    ("classes", "has 3 class folders (a, b, c), but the model's head has 8 classes"),
    ("mixed", "both directly and in class subfolders"),
])
def test_bad_folders_are_one_line_errors(tmp_path, case, message):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    image = Image.new("RGB", (64, 64))
    if case == "classes":
        for name in "abc":
            (root / name).mkdir()
            image.save(root / name / "x.png")
    if case == "mixed":
        (root / "a").mkdir()
        image.save(root / "a" / "x.png")
        image.save(root / "y.png")
    if case == "empty":
        (root / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=re.escape(message)) as info:
        open_folder(root, num_classes=8)
    assert "\n" not in str(info.value)


def test_an_unreadable_image_is_an_error_naming_it_not_skipped(shapes_data, shapes_vit, tmp_path):
    """timm's own dataset would put the next image in its place (counting that one twice)."""
    import shutil

    root = tmp_path / "val"
    shutil.copytree(shapes_data["val"], root)
    broken = root / FOLDERS[3] / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    folder = open_folder(root, num_classes=8)
    with pytest.raises(UserError, match="cannot read .*broken.png"):
        for _ in batches(folder, shapes_vit, batch_size=64):
            pass


def test_subset_keeps_labels_with_their_files():
    folder = ImageFolder(root=None, files=("a", "b", "c"), labels=(0, 1, 2), classes=("x", "y", "z"))
    part = folder.subset([2, 0])
    assert part.files == ("c", "a") and part.labels == (2, 0)
