"""Train the test model: a small timm ViT on the generated shapes (atm_export.testmodel.shapes).

    python -m atm_export.testmodel.train                 # the committed weights (about 25 min on 2 cores)
    python -m atm_export.testmodel.train --steps 20 --output /tmp/w.safetensors   # a quick try

Everything is seeded, so a run with the defaults reproduces ``shapes_vit.safetensors`` beside
this file (on the same torch build). Training images are generated fresh for every step, so
the model never sees an image twice and held-out accuracy measures the task, not memory.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import shapes

HERE = Path(__file__).parent
WEIGHTS = HERE / "shapes_vit.safetensors"
#: The registry's entry for the model (models/registry.toml, ``shapes_vit``).
MODEL_NAME = "shapes_vit"
HELD_OUT_SEED = 1_000_000  # training draws its images from the seeds [seed, step] instead


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 100
    seed: int = 0
    held_out: int = 1024


def build_model() -> torch.nn.Module:
    """The test model as the registry defines it, with random weights."""
    from ..registry import resolve_model
    from ..weights import create_model

    model, _ = create_model(resolve_model(MODEL_NAME), random_init=True)
    return model


def to_batch(images, model) -> torch.Tensor:
    """Generated images -> [B, 3, 64, 64], normalised as the model's timm data config says.

    For 64-px images with crop_pct 1.0, timm's eval transform is exactly this (resize and crop
    change nothing), so training sees what ``eval`` will feed the model.
    """
    cfg = model.pretrained_cfg
    x = torch.from_numpy(shapes.as_arrays(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def held_out_top1(model: torch.nn.Module, count: int, seed: int = HELD_OUT_SEED, batch_size: int = 256) -> float:
    """Top-1 accuracy on ``count`` freshly generated images that training never draws."""
    images, labels = shapes.sample(count, seed)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, count, batch_size):
            logits = model(to_batch(images[start:start + batch_size], model))
            correct += int((logits.argmax(1) == torch.tensor(labels[start:start + batch_size])).sum())
    return correct / count


def train(config: TrainConfig, output: Path, log=print) -> dict:
    """Train from ``config.seed``; write the weights to ``output`` (safetensors) and their
    metrics beside it (``.json``); return the metrics."""
    from safetensors.torch import save_file

    model = build_model()
    torch.manual_seed(config.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=config.lr)
    start = time.time()
    losses = []
    for step in range(config.steps):
        lr = config.lr * min(1.0, (step + 1) / config.warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        images, labels = shapes.sample(config.batch_size, seed=[config.seed, step])
        flip = np.random.default_rng(step).random(len(images)) < 0.5  # mirror images: every class survives it
        images = [img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if f else img for img, f in zip(images, flip)]
        loss = F.cross_entropy(model(to_batch(images, model)), torch.tensor(labels), label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == config.steps - 1:
            log(f"step {step:5d}  loss {np.mean(losses[-50:]):.4f}  lr {lr:.2e}  {time.time() - start:.0f} s")
    top1 = held_out_top1(model, config.held_out)
    metrics = {"config": asdict(config), "held_out_top1": top1, "held_out_images": config.held_out,
               "final_loss": float(np.mean(losses[-50:])), "first_loss": losses[0],
               "train_seconds": round(time.time() - start, 1), "torch": torch.__version__}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(output))
    output.with_suffix(".json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"held-out top-1 {top1:.4f} on {config.held_out} images; wrote {output}")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--held-out", type=int, default=defaults.held_out)
    parser.add_argument("--output", type=Path, default=WEIGHTS)
    args = parser.parse_args(argv)
    train(TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, held_out=args.held_out),
          args.output)


if __name__ == "__main__":
    main()
