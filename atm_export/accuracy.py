"""Accuracy of a merged model against the unmerged one, batch by batch.

An *evaluator* turns a batch of images into :class:`Predictions` (logits, realised GFLOPs,
tokens entering each block). A :class:`Tally` sums what one setting did over the batches of an
evaluation: top-1 and top-5 against the labels (when there are labels), top-1 agreement with
the unmerged model's predictions (always), mean GFLOPs and tokens, and the seconds spent in
the model. Agreement compares predicted classes, so it needs no labels and measures exactly
what merging changed.

Batch-adaptive merging makes every figure depend on the batch size (one merge count per
batch), so results always carry the batch size they were measured at.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .flops import ViTDims, baseline_gflops, image_macs, run_gflops
from .schedule import r_from_tokens


@dataclass
class Predictions:
    """What a model gave on one batch: logits [B, K], GFLOPs (batch mean), tokens entering
    each block (batch mean, one per block)."""

    logits: torch.Tensor
    gflops: float
    tokens: list[float]


Evaluator = Callable[[torch.Tensor], Predictions]


def unmerged(vit) -> Evaluator:
    """The timm model itself, as it comes: the reference every merged setting is compared with."""
    dims = ViTDims.from_timm(vit)
    gflops, tokens = baseline_gflops(dims), [float(dims.num_tokens)] * dims.depth

    def run(images: torch.Tensor) -> Predictions:
        with torch.inference_mode():
            return Predictions(vit(images), gflops, tokens)

    return run


def eager(atm) -> Evaluator:
    """An ATMVisionTransformer in eager PyTorch."""

    def run(images: torch.Tensor) -> Predictions:
        with torch.inference_mode():
            logits, stats = atm.run(images)
        return Predictions(logits, run_gflops(atm, stats), list(stats.tokens_per_layer))

    return run


def exported(runner, atm) -> Evaluator:
    """An exported artifact behind an active backend runner (atm_export.backends); ``atm`` (the
    eager model of the same settings) gives the block structure for the GFLOPs."""
    dims = ViTDims.from_timm(atm.vit)
    merges = [step is not None for step in atm.steps]

    def run(images: torch.Tensor) -> Predictions:
        out = runner.run(images.numpy())
        tokens = out.tokens or [dims.num_tokens] * dims.depth
        r = r_from_tokens(tokens, atm.num_protected, atm.class_token_head)
        gflops = image_macs(dims, tokens, r, merges, atm.class_token_head) / 1e9
        return Predictions(torch.from_numpy(out.logits), gflops, [float(t) for t in tokens])

    return run


def top1(logits: torch.Tensor) -> torch.Tensor:
    """[B, K] -> [B] predicted classes."""
    return logits.argmax(dim=-1)


class Tally:
    """Running sums for one setting over the batches of an evaluation."""

    def __init__(self):
        self.images = 0
        self.correct1 = 0
        self.correct5 = 0
        self.labelled = 0
        self.agree = 0
        self.gflops_sum = 0.0
        self.tokens_sum: np.ndarray | None = None
        self.seconds = 0.0

    def add(self, pred: Predictions, labels: torch.Tensor | None, reference: torch.Tensor, seconds: float) -> None:
        """One batch: ``reference`` [B] is the unmerged model's predicted classes."""
        batch = pred.logits.shape[0]
        guess = top1(pred.logits)
        self.agree += int((guess == reference).sum())
        if labels is not None:
            k = min(5, pred.logits.shape[-1])
            best = pred.logits.topk(k, dim=-1).indices
            self.correct1 += int((guess == labels).sum())
            self.correct5 += int((best == labels[:, None]).any(dim=-1).sum())
            self.labelled += batch
        self.images += batch
        self.gflops_sum += pred.gflops * batch
        tokens = np.asarray(pred.tokens, dtype=np.float64) * batch
        self.tokens_sum = tokens if self.tokens_sum is None else self.tokens_sum + tokens
        self.seconds += seconds

    @property
    def top1(self) -> float | None:
        """Top-1 accuracy in percent, or None without labels."""
        return 100.0 * self.correct1 / self.labelled if self.labelled else None

    @property
    def top5(self) -> float | None:
        return 100.0 * self.correct5 / self.labelled if self.labelled else None

    @property
    def agreement(self) -> float:
        """Share of images whose predicted class is the unmerged model's (0..1)."""
        return self.agree / self.images if self.images else float("nan")

    @property
    def gflops(self) -> float:
        return self.gflops_sum / self.images if self.images else float("nan")

    @property
    def tokens(self) -> list[float]:
        return [] if self.tokens_sum is None else (self.tokens_sum / self.images).tolist()

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def timed(evaluator: Evaluator, images: torch.Tensor) -> tuple[Predictions, float]:
    """(predictions, seconds spent in the model)."""
    start = time.perf_counter()
    pred = evaluator(images)
    return pred, time.perf_counter() - start


def score_reference(tally: Tally, reference: Evaluator, images: torch.Tensor, labels: torch.Tensor | None
                    ) -> torch.Tensor:
    """Run the unmerged model (``reference``) on one batch and add it to ``tally``; returns its
    predicted classes [B], the reference for every setting's agreement on this batch."""
    pred, seconds = timed(reference, images)
    predicted = top1(pred.logits)
    tally.add(pred, labels, predicted, seconds)
    return predicted


def score_batch(tallies: dict[str, Tally], evaluators: dict[str, Evaluator], images: torch.Tensor,
                labels: torch.Tensor | None, reference: torch.Tensor) -> None:
    """Run every evaluator on one batch and add it to its tally (``reference``: the unmerged
    model's predicted classes [B])."""
    for name, evaluator in evaluators.items():
        pred, seconds = timed(evaluator, images)
        tallies[name].add(pred, labels, reference, seconds)
