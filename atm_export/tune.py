"""Threshold tuning: search ATM's settings for a target, by successive halving on growing subsets.

The search space is the paper's sweep ranges (alpha 0.945..1.000, beta 0.015..0.050, theta_min
0.800..0.945) on a grid, times a few split layers. Settings that give the same threshold in
every block and the same split are one candidate.

Every candidate starts on the first batch of the calibration images; each round keeps the
1/eta candidates most promising for the target and runs them on more batches (the next
round's subset holds the previous one: each candidate's tally grows, nothing is re-run), until
the survivors have seen every calibration image. What a candidate is judged by:

- ``target_gflops G``: the best metric (agreement, or top-1) at or under G GFLOPs;
- ``min_agreement A``: the fewest GFLOPs at agreement A or more.

Judged on a small subset, a figure is noisy, so a candidate within a margin of the target
(two standard errors of a proportion, or 2 % of G) counts as meeting it until more images
decide; the best of those meeting it exactly, and the safest, also go on. The caller caches the decoded calibration batches and the unmerged model's predictions,
so each candidate costs one merged forward pass per batch it sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .accuracy import Tally
from .errors import UserError
from .schedule import MergeConfig

#: The paper's sweep ranges (ATM, Table A2), as grids.
ALPHAS = (0.945, 0.96, 0.975, 0.985, 0.995, 1.0)
BETAS = (0.015, 0.025, 0.035, 0.05)
THETA_MINS = (0.8, 0.845, 0.875, 0.9, 0.92, 0.945)
ETA = 3


@dataclass(frozen=True)
class Target:
    """What tune looks for: exactly one of target_gflops and min_agreement.

    metric: what "best" means under a GFLOPs target: ``agreement`` with the unmerged model
    (needs no labels) or ``top1`` (needs labels).
    """

    target_gflops: float | None = None
    min_agreement: float | None = None
    metric: str = "agreement"

    def __post_init__(self):
        if (self.target_gflops is None) == (self.min_agreement is None):
            raise UserError("give exactly one target: --target-gflops G or --min-agreement A")
        if self.target_gflops is not None and not self.target_gflops > 0:
            raise UserError(f"--target-gflops must be positive, got {self.target_gflops}")
        if self.min_agreement is not None and not 0.0 < self.min_agreement <= 1.0:
            raise UserError(f"--min-agreement must be in (0, 1], got {self.min_agreement}")
        if self.metric not in ("agreement", "top1"):
            raise UserError(f"--metric must be agreement or top1, got {self.metric!r}")

    def to_dict(self) -> dict:
        return {k: v for k, v in {"target_gflops": self.target_gflops, "min_agreement": self.min_agreement,
                                  "metric": self.metric}.items() if v is not None}

    def describe(self) -> str:
        if self.target_gflops is not None:
            return f"best {self.metric} at or under {self.target_gflops} GFLOPs"
        return f"fewest GFLOPs at agreement {self.min_agreement} or more"


@dataclass
class Candidate:
    """One setting of the search and what it has seen so far."""

    config: MergeConfig
    tally: Tally = field(default_factory=Tally)
    batches: int = 0  # calibration batches it has run on (always the first ones)

    @property
    def name(self) -> str:
        c = self.config
        split = "" if c.split_layer is None else f" split {c.split_layer}"
        return f"{c.alpha:g}/{c.beta:g}/{c.theta_min:g}{split}"


def candidates(depth: int, merge_in_last_block: bool, alphas=ALPHAS, betas=BETAS, theta_mins=THETA_MINS,
               split_layers: tuple[int | None, ...] | None = None) -> list[Candidate]:
    """Every distinct setting of the grid (same thresholds in every merging block and same
    split: one candidate). split_layers: None means the default and two others (half the
    depth, and the whole depth: never size-distinctive)."""
    if split_layers is None:
        split_layers = (None, depth // 2, depth)
    seen, out = set(), []
    for split in split_layers:
        for alpha in alphas:
            for beta in betas:
                for theta_min in theta_mins:
                    config = MergeConfig(alpha=alpha, beta=beta, theta_min=theta_min, split_layer=split).validate(depth)
                    steps = config.steps(depth, merge_in_last_block)
                    key = tuple((s.split_mode, round(s.threshold, 9)) if s else None for s in steps)
                    if key not in seen:
                        seen.add(key)
                        out.append(Candidate(config))
    return out


def metric_value(tally: Tally, metric: str) -> float:
    if metric == "top1":
        if tally.top1 is None:
            raise UserError("--metric top1 needs labelled calibration images (one subfolder per class)")
        return tally.top1 / 100.0
    return tally.agreement


def _margin(target: Target, images: int) -> tuple[float, float]:
    """(agreement margin, GFLOPs margin as a fraction) for a figure measured on ``images``."""
    if target.min_agreement is not None:
        a = min(target.min_agreement, 1.0 - 1.0 / max(images, 1))
        return 2.0 * math.sqrt(a * (1.0 - a) / images) + 1.0 / images, 0.0
    return 0.0, 0.02


def promise(c: Candidate, target: Target, final: bool = False) -> tuple:
    """Sort key, best first: candidates meeting the target (within the margin of their subset,
    or exactly when ``final``) by their objective, then the others by how close they come."""
    value = metric_value(c.tally, target.metric)
    agreement_margin, gflops_margin = (0.0, 0.0) if final else _margin(target, c.tally.images)
    if target.min_agreement is not None:
        meets = c.tally.agreement >= target.min_agreement - agreement_margin
        return (not meets, c.tally.gflops if meets else -c.tally.agreement, -c.tally.agreement)
    meets = c.tally.gflops <= target.target_gflops * (1.0 + gflops_margin)
    return (not meets, -value if meets else c.tally.gflops, c.tally.gflops)


def rung_sizes(total_batches: int, eta: int = ETA) -> list[int]:
    """Batches seen after each round: 1, eta, eta^2, ... and finally all of them."""
    sizes, size = [], 1
    while size < total_batches:
        sizes.append(size)
        size *= eta
    return sizes + [total_batches]


def successive_halving(pool: list[Candidate], total_batches: int, run: Callable[[Candidate, int], None],
                       target: Target, eta: int = ETA, on_round: Callable[[int, int, int], None] | None = None
                       ) -> list[dict]:
    """Run the search; ``run(candidate, batch_index)`` adds one calibration batch to a
    candidate's tally. Returns one dict per round (batches, images, candidates run). After it,
    the candidates that reached the last round have seen every batch."""
    alive = list(pool)
    rounds = []
    sizes = rung_sizes(total_batches, eta)
    for i, size in enumerate(sizes):
        for c in alive:
            while c.batches < size:
                run(c, c.batches)
                c.batches += 1
        rounds.append({"batches": size, "images": alive[0].tally.images if alive else 0, "candidates": len(alive)})
        if on_round:
            on_round(i, len(sizes), len(alive))
        if i < len(sizes) - 1:
            alive = survivors(alive, target, eta)
    return rounds


def survivors(alive: list[Candidate], target: Target, eta: int) -> list[Candidate]:
    """The 1/eta most promising candidates, judged within the noise margin of their subset;
    plus the best of those that meet the target exactly, and the safest (highest agreement, or
    fewest GFLOPs). Without these, a round could keep only candidates that merely come close,
    and the last round would find none that meets the target."""
    keep = max(math.ceil(len(alive) / eta), min(3, len(alive)))
    extra = max(1, keep // 3)
    hopeful = sorted(alive, key=lambda c: promise(c, target))[:keep]
    exact = sorted(alive, key=lambda c: promise(c, target, final=True))[:extra]
    if target.min_agreement is not None:
        safest = sorted(alive, key=lambda c: (-c.tally.agreement, -c.tally.gflops))[:extra]  # ties: merging least
    else:
        safest = sorted(alive, key=lambda c: (c.tally.gflops, -metric_value(c.tally, target.metric)))[:extra]
    return list({id(c): c for c in hopeful + exact + safest}.values())


def finished(pool: list[Candidate], total_batches: int) -> list[Candidate]:
    return [c for c in pool if c.batches == total_batches]


def pareto_front(pool: list[Candidate], metric: str) -> list[Candidate]:
    """The candidates no other beats on both GFLOPs (fewer) and the metric (higher), fewest GFLOPs first."""
    ordered = sorted(pool, key=lambda c: (c.tally.gflops, -metric_value(c.tally, metric)))
    front, best = [], -math.inf
    for c in ordered:
        value = metric_value(c.tally, metric)
        if value > best:
            front.append(c)
            best = value
    return front


def choose(pool: list[Candidate], target: Target) -> Candidate | None:
    """The finished candidate that best meets the target exactly, or None if none meets it."""
    ranked = sorted(pool, key=lambda c: promise(c, target, final=True))
    if not ranked or promise(ranked[0], target, final=True)[0]:
        return None
    return ranked[0]
