"""Token merging math for Adaptive Token Merging (ATM), as small pure tensor functions.

One merge step, exactly as docs/token-merge-op.md specifies it (the ONNX lowering, the ONNX
Runtime reference op and the CUDA kernels all follow the same contract):

1. ``split``: the first ``num_protected`` tokens (class / distillation tokens) are never
   merged. The other M tokens are split into a source set A (ceil(M/2) tokens) and a
   destination set B (floor(M/2) tokens), either alternately or by merging size.
2. ``match``: every token in A picks its most similar token in B (cosine similarity of the
   metric, i.e. the attention keys averaged over heads).
3. the caller decides ``r``, the number of pairs to merge (fixed, or from a threshold).
4. ``plan_merge``: the r best-matched tokens of A are merged into their partners in B.
5. ``merge_weighted`` applies the plan: size-weighted average (gather, scatter-add, divide).

Shapes: B = batch, N = tokens, C = channels, D = metric width, Na = |A|, Nb = |B|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALTERNATE = "alternate"
SIZE_DISTINCTIVE = "size"
SPLIT_MODES = (ALTERNATE, SIZE_DISTINCTIVE)

#: Guards the division in the cosine similarity against all-zero metric rows.
NORM_EPS = 1e-12


def set_sizes(num_unprotected: int) -> tuple[int, int]:
    """Sizes (Na, Nb) of the source and destination sets for M unprotected tokens."""
    return (num_unprotected + 1) // 2, num_unprotected // 2


def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along dim 1. t: [B, N] or [B, N, C]; index: [B, K] -> [B, K] or [B, K, C]."""
    if t.dim() == 2:
        return t.gather(1, index)
    return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


@dataclass
class Split:
    """Token indices (into the full token axis) of the source set A and destination set B.

    a, b: [B, Na] and [B, Nb] int64. For the alternate split they are the same for every
    image, and ``select`` uses strided views instead of gathers.
    """

    a: torch.Tensor
    b: torch.Tensor
    num_protected: int
    alternate: bool

    def select(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split t ([B, N] or [B, N, C]) into its A part and its B part."""
        p = self.num_protected
        if self.alternate:
            return t[:, p::2], t[:, p + 1 :: 2]
        return take(t, self.a), take(t, self.b)


def split_tokens(size: torch.Tensor, num_protected: int, mode: str) -> Split:
    """Split the unprotected tokens into A (sources) and B (destinations).

    size: [B, N] merging sizes (1 for an original token).
    ``alternate``: A = offsets 0, 2, 4, ... and B = offsets 1, 3, 5, ... after the protected
    tokens (ToMe's split). ``size``: tokens sorted by size ascending (ties: lower index
    first); A = the smaller ceil(M/2), B = the larger floor(M/2), both in that order, so two
    large tokens are never merged with each other (ATM's size-distinctive matching).
    """
    batch, n = size.shape
    m = n - num_protected
    na, _ = set_sizes(m)
    if mode == ALTERNATE:
        offsets = torch.arange(num_protected, n, device=size.device)
        a = offsets[0::2].expand(batch, -1)
        b = offsets[1::2].expand(batch, -1)
        return Split(a, b, num_protected, alternate=True)
    if mode == SIZE_DISTINCTIVE:
        order = torch.sort(size[:, num_protected:], dim=1, stable=True).indices + num_protected
        return Split(order[:, :na], order[:, na:], num_protected, alternate=False)
    raise ValueError(f"unknown split mode {mode!r}; expected one of {SPLIT_MODES}")


def match(metric: torch.Tensor, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Best partner in B for every token of A.

    metric: [B, N, D]. Returns score [B, Na] (cosine similarity, clamped to [-1, 1]) and
    dst [B, Na] (position in B of the best partner; the first one on ties).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    ma, mb = split.select(metric)
    if mb.shape[1] == 0:  # a single unprotected token is left: nothing to merge it into
        empty = ma.new_full(ma.shape[:2], -1.0)
        return empty, torch.zeros(ma.shape[:2], dtype=torch.int64, device=ma.device)
    sim = (ma @ mb.transpose(1, 2)).clamp_(-1.0, 1.0)
    score, dst = sim.max(dim=-1)
    return score, dst


def count_above(score: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per image, how many A tokens have a partner more similar than ``threshold``. -> [B]."""
    return (score > threshold).sum(dim=1)


def batch_adaptive_r(counts: torch.Tensor, num_a: int, num_b: int) -> int:
    """ATM's batch-adaptive merge count: floor of the batch mean of ``counts``, capped by |A|.

    Integer arithmetic (sum // batch), so every backend gets the same r from the same counts.
    """
    if num_b == 0:
        return 0
    return min(int(counts.sum().item()) // counts.shape[0], num_a)


def fixed_r(r: int, num_a: int, num_b: int) -> int:
    """A fixed merge count (ToMe, or a replayed schedule), capped by |A|."""
    return 0 if num_b == 0 else min(max(int(r), 0), num_a)


@dataclass
class MergePlan:
    """Which tokens merge where, for one merge step.

    src: [B, r] positions in A that are merged away; dst: [B, r] their partners' positions
    in B; unm: [B, Na - r] positions in A that stay, best-matched first.
    """

    split: Split
    src: torch.Tensor
    dst: torch.Tensor
    unm: torch.Tensor

    @property
    def r(self) -> int:
        return self.src.shape[1]


def plan_merge(split: Split, score: torch.Tensor, dst: torch.Tensor, r: int) -> MergePlan:
    """Merge the r best-matched A tokens of every image (ties: lower position first)."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    src = order[:, :r]
    return MergePlan(split, src, dst.gather(1, src), order[:, r:])


def merge_weighted(plan: MergePlan, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge. x: [B, N, C], size: [B, N] -> [B, N - r, C], [B, N - r].

    Output order: protected tokens, kept A tokens (best-matched first), B tokens.
    """
    p = plan.split.num_protected
    xa, xb = plan.split.select(x)
    sa, sb = plan.split.select(size)
    src_size = sa.gather(1, plan.src)
    size_b = sb.scatter_add(1, plan.dst, src_size)
    weighted_src = take(xa, plan.src) * src_size.unsqueeze(-1)
    dst_index = plan.dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    xb = (xb * sb.unsqueeze(-1)).scatter_add_(1, dst_index, weighted_src) / size_b.unsqueeze(-1)
    x_out = torch.cat([x[:, :p], take(xa, plan.unm), xb], dim=1)
    size_out = torch.cat([size[:, :p], sa.gather(1, plan.unm), size_b], dim=1)
    return x_out, size_out


def merge_summed(plan: MergePlan, t: torch.Tensor) -> torch.Tensor:
    """Apply a plan by summing instead of averaging (e.g. source maps). t: [B, N, K]."""
    p = plan.split.num_protected
    ta, tb = plan.split.select(t)
    dst_index = plan.dst.unsqueeze(-1).expand(-1, -1, t.shape[-1])
    tb = tb.scatter_add(1, dst_index, take(ta, plan.src))
    return torch.cat([t[:, :p], take(ta, plan.unm), tb], dim=1)


@dataclass
class MergeStep:
    """Outcome of one merge step, with what the report and the parity checks need."""

    x: torch.Tensor
    size: torch.Tensor
    r: int
    counts: torch.Tensor | None  # [B] pairs above the threshold (None for a fixed r)
    margin: float | None  # min |score - threshold| over the batch (None for a fixed r)
    plan: MergePlan


def token_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    *,
    threshold: float | None = None,
    r: int | None = None,
    split_mode: str = ALTERNATE,
    num_protected: int = 1,
) -> MergeStep:
    """One ATM merge step: the TokenMerge op of docs/token-merge-op.md.

    x: [B, N, C]; size: [B, N]; metric: [B, N, D]. Exactly one of ``threshold`` (batch-adaptive
    r) and ``r`` (fixed r) is given.
    """
    if (threshold is None) == (r is None):
        raise ValueError("give exactly one of threshold (adaptive) and r (fixed)")
    split = split_tokens(size, num_protected, split_mode)
    na, nb = split.a.shape[1], split.b.shape[1]
    score, dst = match(metric, split)
    counts = margin = None
    if threshold is not None:
        counts = count_above(score, threshold)
        n_merge = batch_adaptive_r(counts, na, nb)
        margin = float((score - threshold).abs().min()) if score.numel() else None
    else:
        n_merge = fixed_r(r, na, nb)
    plan = plan_merge(split, score, dst, n_merge)
    x_out, size_out = merge_weighted(plan, x, size)
    return MergeStep(x_out, size_out, n_merge, counts, margin, plan)
