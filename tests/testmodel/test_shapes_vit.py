"""The generated data set and the test model trained on it: good enough to make agreement mean something."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from atm_export.testmodel import shapes
from atm_export.testmodel.train import HELD_OUT_SEED, WEIGHTS, held_out_top1


def test_images_are_reproducible_balanced_and_varied():
    a, labels = shapes.sample(32, seed=7)
    b, _ = shapes.sample(32, seed=7)
    c, _ = shapes.sample(32, seed=8)
    assert np.array_equal(shapes.as_arrays(a), shapes.as_arrays(b))
    assert not np.array_equal(shapes.as_arrays(a), shapes.as_arrays(c))
    assert np.bincount(labels).tolist() == [4] * len(shapes.CLASSES)
    assert a[0].size == (shapes.SIDE, shapes.SIDE) and a[0].mode == "RGB"


def test_flat_backgrounds_are_flat_and_textured_ones_are_not():
    """Half the backgrounds leave ATM much to merge, half little: look at the image corners."""
    images, _ = shapes.sample(200, seed=3)
    corners = shapes.as_arrays(images)[:, :6, :6].reshape(200, -1, 3).astype(float)
    spread = corners.std(axis=1).max(axis=1)
    flat = (spread < 1.0).mean()
    assert 0.15 < flat < 0.55  # a quarter are flat colour, and a gradient barely changes over 6 px


def test_write_folder_has_the_imagenet_layout_and_a_flat_form(tmp_path):
    shapes.write_folder(tmp_path / "val", per_class=2, seed=1)
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == list(shapes.FOLDERS)
    assert all(len(list((tmp_path / "val" / f).glob("*.png"))) == 2 for f in shapes.FOLDERS)
    shapes.write_folder(tmp_path / "flat", per_class=1, seed=1, labelled=False)
    assert len(list((tmp_path / "flat").glob("*.png"))) == len(shapes.CLASSES)


def test_the_committed_model_is_good_at_its_task(shapes_vit):
    """At least 95 % top-1 on freshly generated images (a seed neither training nor its own
    check used): a weak model's predictions flip under any perturbation."""
    assert held_out_top1(shapes_vit, 800, seed=HELD_OUT_SEED + 12345) >= 0.95


def test_the_committed_weights_and_their_record_agree():
    record = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert record["held_out_top1"] >= 0.95 and record["config"]["seed"] == 0


@pytest.mark.slow
def test_the_training_script_runs_and_learns(tmp_path):
    """One short run of the script as a user runs it: it trains, writes loadable weights and
    their record, and the loss falls."""
    from atm_export.registry import resolve_model
    from atm_export.weights import create_model

    out = tmp_path / "w.safetensors"
    subprocess.run([sys.executable, "-m", "atm_export.testmodel.train", "--steps", "30", "--batch-size", "32",
                    "--held-out", "64", "--output", str(out)], check=True, capture_output=True, timeout=600)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["config"]["steps"] == 30
    assert record["final_loss"] < record["first_loss"]
    model, info = create_model(resolve_model("shapes_vit"), weights=str(out))
    assert info.source == "file" and model.num_classes == len(shapes.CLASSES)
