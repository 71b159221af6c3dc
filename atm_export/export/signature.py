"""What a deployed model takes and gives: its input/output signature and its preprocessing.

Both are written into report.json and into the metadata of every ONNX artifact
(``atm_export.signature`` and ``atm_export.preprocessing``), so that whoever serves a file
knows how to feed it without the run that made it.
"""

from __future__ import annotations

from .onnx import INPUT_NAME, OUTPUT_NAMES

BATCH = "batch"  # the symbolic batch dimension


def signature(vit, depth: int) -> dict:
    """Inputs and outputs of the merged graphs of a timm ViT (shapes with ``"batch"`` symbolic).

    tokens_per_layer has no batch dimension: batch-adaptive merging gives every image of a
    batch the same count.
    """
    _, height, width = input_size(vit)
    logits, tokens = OUTPUT_NAMES
    return {
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": [BATCH, 3, height, width]}],
        "outputs": [{"name": logits, "dtype": "float32", "shape": [BATCH, int(vit.num_classes)]},
                    {"name": tokens, "dtype": "int64", "shape": [int(depth)]}],
    }


def preprocessing(vit) -> dict:
    """timm's evaluation preprocessing for ``vit`` (what atm-export's own runs apply)."""
    cfg = _data_config(vit)
    return {
        "input_size": list(cfg["input_size"]),
        "interpolation": cfg["interpolation"],
        "crop_pct": cfg["crop_pct"],
        "crop_mode": cfg.get("crop_mode", "center"),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "steps": "RGB; resize the shorter side to input_size / crop_pct with this interpolation; "
                 "crop input_size (crop_mode); scale to [0, 1]; subtract mean, divide by std; NCHW float32",
    }


def input_size(vit) -> tuple[int, int, int]:
    """(channels, height, width) the model takes."""
    return tuple(int(v) for v in _data_config(vit)["input_size"])


def _data_config(vit) -> dict:
    from timm.data import resolve_data_config

    return resolve_data_config({}, model=vit)
