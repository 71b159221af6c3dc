"""Token merging math for Adaptive Token Merging (ATM) and AdaMerge, as small pure tensor functions.

One merge step, exactly as docs/token-merge-op.md specifies it (the ONNX lowering, the ONNX
Runtime reference op and the CUDA kernels all follow the same contract):

1. ``split``: the first ``num_protected`` tokens (class / distillation tokens) are never
   merged. The other M tokens are split into a source set A and a destination set B, either
   alternately by position in the whole sequence (ToMe's split) or by merging size.
2. ``match``: every token in A picks its most similar token in B (cosine similarity of the
   metric, i.e. the attention keys averaged over heads).
3. the caller decides ``r``, the number of pairs to merge (fixed, from a threshold, or from
   AdaMerge's redundancy ``intensity_counts``), at most ``max_merges(M)`` = floor(M/2), as
   ToMe caps it.
4. ``plan_merge``: the r best-matched tokens of A are merged into their partners in B.
5. ``merge_weighted`` applies the plan: size-weighted average (gather, scatter-add, divide).

AdaMerge (``weighting="salience"``) changes two things: the match scores are weighted by the
source token's salience (``salience``: min-max normalised column sums of softmax(X X^T / tau)
over the unprotected tokens), and the average weights every token by size * (salience + floor).
Its per-layer count comes from the batch's redundancy (``redundancy``, ``intensity_counts``).

Shapes: B = batch, N = tokens, C = channels, D = metric width, Na = |A|, Nb = |B|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALTERNATE = "alternate"
SIZE_DISTINCTIVE = "size"
SPLIT_MODES = (ALTERNATE, SIZE_DISTINCTIVE)

SIZE_WEIGHTS = "size"
SALIENCE_WEIGHTS = "salience"
WEIGHTINGS = (SIZE_WEIGHTS, SALIENCE_WEIGHTS)

#: Guards the division in the cosine similarity against all-zero metric rows.
NORM_EPS = 1e-12
#: The least spread of centralities normalised to the full [0, 1]. Centralities average exactly 1
#: (every softmax row sums to 1), so spreads under 1 % count as "equally salient": float rounding
#: in near-equal centralities (two tokens always tie) must not become salience differences.
SALIENCE_EPS = 1e-2
#: Added to the salience in merge weights: the least central token (salience 0) still counts.
SALIENCE_FLOOR = 1e-2


def alternate_starts(num_protected: int) -> tuple[int, int]:
    """First positions of A and B in the alternate split.

    ToMe splits the whole sequence: even positions are A, odd ones B. The protected tokens
    (at the front) belong to neither, so A starts at the first even position >= P and B at
    the first odd one. P = 1: A = 2, 4, 6, ... and B = 1, 3, 5, ...
    """
    odd = num_protected % 2
    return num_protected + odd, num_protected + 1 - odd


def set_sizes(num_tokens: int, num_protected: int, mode: str) -> tuple[int, int]:
    """Sizes (Na, Nb) of the source and destination sets for N tokens, P of them protected.

    Whatever the split, Na * Nb = floor(M/2) * ceil(M/2) for M = N - P unprotected tokens.
    """
    m = num_tokens - num_protected
    if mode == ALTERNATE:
        first_a, _ = alternate_starts(num_protected)
        na = max(0, (num_tokens - first_a + 1) // 2)
    else:
        na = m // 2
    return na, m - na


def max_merges(num_unprotected: int) -> int:
    """At most floor(M/2) pairs merge in one step (ToMe's cap), whichever the split."""
    return max(0, num_unprotected) // 2


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
        if self.alternate:
            first_a, first_b = alternate_starts(self.num_protected)
            return t[:, first_a::2], t[:, first_b::2]
        return take(t, self.a), take(t, self.b)


def split_tokens(size: torch.Tensor, num_protected: int, mode: str) -> Split:
    """Split the unprotected tokens into A (sources) and B (destinations).

    size: [B, N] merging sizes (1 for an original token).
    ``alternate`` (ToMe's split): A = the unprotected tokens at even positions of the whole
    sequence, B = those at odd positions (see ``alternate_starts``). ``size``: tokens sorted
    by size ascending (ties: lower position first); A = the smaller floor(M/2), B = the
    larger ceil(M/2), both in that order, so two large tokens are never merged with each
    other (ATM's size-distinctive matching).
    """
    batch, n = size.shape
    na, _ = set_sizes(n, num_protected, mode)
    if mode == ALTERNATE:
        first_a, first_b = alternate_starts(num_protected)
        a = torch.arange(first_a, n, 2, device=size.device).expand(batch, -1)
        b = torch.arange(first_b, n, 2, device=size.device).expand(batch, -1)
        return Split(a, b, num_protected, alternate=True)
    if mode == SIZE_DISTINCTIVE:
        order = torch.sort(size[:, num_protected:], dim=1, stable=True).indices + num_protected
        return Split(order[:, :na], order[:, na:], num_protected, alternate=False)
    raise ValueError(f"unknown split mode {mode!r}; expected one of {SPLIT_MODES}")


def match(metric: torch.Tensor, split: Split, runner_up: bool = False):
    """Best partner in B for every token of A.

    metric: [B, N, D]. Returns score [B, Na] (cosine similarity, clamped to [-1, 1]) and
    dst [B, Na] (position in B of the best partner; the first one on ties). With
    ``runner_up``, also the gap [B, Na] between the best and the second-best similarity
    (a diagnostic: a tiny gap is a choice that float rounding can flip).
    """
    ma, mb = split.select(unit_rows(metric))
    if mb.shape[1] == 0:  # a single unprotected token is left: nothing to merge it into
        empty = ma.new_full(ma.shape[:2], -1.0)
        dst = torch.zeros(ma.shape[:2], dtype=torch.int64, device=ma.device)
        return (empty, dst, torch.full_like(empty, float("inf"))) if runner_up else (empty, dst)
    sim = (ma @ mb.transpose(1, 2)).clamp_(-1.0, 1.0)
    score, dst = sim.max(dim=-1)
    if not runner_up:
        return score, dst
    if sim.shape[-1] < 2:
        return score, dst, torch.full_like(score, float("inf"))
    top2 = sim.topk(2, dim=-1).values
    return score, dst, top2[..., 0] - top2[..., 1]


def unit_rows(metric: torch.Tensor) -> torch.Tensor:
    """Every row scaled to unit length (all-zero rows stay zero). metric: [B, N, D]."""
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def salience(metric: torch.Tensor, num_protected: int, temperature: float = 1.0) -> torch.Tensor:
    """AdaMerge's token salience: feature-affinity centrality. metric: [B, N, D] -> [B, N].

    Over the M unprotected tokens u (unit rows of the metric): c = column sums of
    softmax(u u^T / temperature) (row-wise softmax), then min-max normalised per image to
    [0, 1]: s = (c - min c) / max(max c - min c, SALIENCE_EPS). Protected tokens get 1 (they
    never merge; the value is never read). The centralities average 1 (each softmax row sums
    to 1): a token others are closer to than to their own neighbours is a hub and scores high.
    """
    batch, n, _ = metric.shape
    p = min(num_protected, n)
    s = metric.new_ones((batch, n), dtype=torch.float32)
    if n - p == 0:
        return s
    u = unit_rows(metric[:, p:].float())
    centrality = torch.softmax((u @ u.transpose(1, 2)) / temperature, dim=-1).sum(dim=1)  # [B, M]
    lo = centrality.min(dim=1, keepdim=True).values
    hi = centrality.max(dim=1, keepdim=True).values
    s[:, p:] = (centrality - lo) / (hi - lo).clamp_min(SALIENCE_EPS)
    return s


def merge_weights(size: torch.Tensor, token_salience: torch.Tensor) -> torch.Tensor:
    """AdaMerge's averaging weights: size * (salience + SALIENCE_FLOOR). [B, N] -> [B, N]."""
    return size * (token_salience + SALIENCE_FLOOR)


@dataclass(frozen=True)
class Intensity:
    """AdaMerge's per-layer merge intensity from the input's redundancy.

    Per image, r_b = floor(r_max * sigmoid(scale * (rho_b - mean) / std)), rho_b being the
    mean match score of the image's A tokens (``redundancy``); mean and std are the layer's
    calibrated statistics of rho. The batch merges floor(mean_b r_b) pairs (as ATM's counts).
    """

    r_max: int
    mean: float
    std: float
    scale: float = 1.0


def redundancy(score: torch.Tensor) -> torch.Tensor:
    """Per image, the mean match score over the A tokens (0 when A is empty). score: [B, Na] -> [B]."""
    if score.shape[1] == 0:
        return score.new_zeros(score.shape[0])
    return score.mean(dim=1)


def intensity_fraction(rho: torch.Tensor, intensity: Intensity) -> torch.Tensor:
    """r_max * sigmoid(scale * (rho - mean) / std), in float32 (the count before the floor). [B]."""
    z = (rho.float() - intensity.mean) / intensity.std
    return intensity.r_max * torch.sigmoid(intensity.scale * z)


def intensity_counts(rho: torch.Tensor, intensity: Intensity) -> torch.Tensor:
    """Per image, the pairs AdaMerge would merge: floor(intensity_fraction). [B] -> [B] int64."""
    return intensity_fraction(rho, intensity).floor().to(torch.int64)


def intensity_margin(rho: torch.Tensor, intensity: Intensity) -> float:
    """Smallest distance of an image's redundancy to one that changes its count (a diagnostic).

    The count steps where r_max * sigmoid(...) = k for k = 1 .. r_max - 1, i.e. at
    rho_k = mean + std / scale * logit(k / r_max). In score units, like a threshold margin.
    """
    if intensity.r_max <= 1 or intensity.scale == 0 or rho.numel() == 0:
        return float("inf")
    k = torch.arange(1, intensity.r_max, dtype=torch.float64) / intensity.r_max
    steps = intensity.mean + intensity.std / intensity.scale * torch.log(k / (1 - k))
    return float((rho.double().unsqueeze(1) - steps).abs().min())


def count_above(score: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per image, how many A tokens have a partner more similar than ``threshold``. -> [B]."""
    return (score > threshold).sum(dim=1)


def batch_adaptive_r(counts: torch.Tensor, cap: int) -> int:
    """ATM's batch-adaptive merge count: floor of the batch mean of ``counts``, at most ``cap``.

    Integer arithmetic (sum // batch), so every backend gets the same r from the same counts.
    """
    return min(int(counts.sum().item()) // counts.shape[0], cap)


def fixed_r(r: int, cap: int) -> int:
    """A fixed merge count (ToMe, or a replayed schedule), at most ``cap``."""
    return min(max(int(r), 0), cap)


def tokens_after_fixed_r(num_tokens: int, r: int, num_protected: int) -> int:
    """The token count after a step that merges a fixed ``r``: N - min(r, floor((N - P) / 2)).

    Known from N alone, so a fixed-r step has a static output size wherever N is static.
    """
    return num_tokens - fixed_r(r, max_merges(num_tokens - num_protected))


@dataclass
class MergePlan:
    """Which tokens merge where, for one merge step, as indices into the input tokens.

    src: [B, r] positions in A that are merged away, best-matched first; dst: [B, r] their
    partners' positions in B; unm: [B, Na - r] positions in A that stay, in A's order.
    out_index: [B, N - r] the input token behind every output token (the output order);
    src_token / dst_slot: [B, r] each merged source's input token, and the output position of
    the partner it merges into.
    weight: [B, N] the averaging weight of every input token (AdaMerge's size * salience);
    None: the sizes themselves.
    """

    split: Split
    src: torch.Tensor
    dst: torch.Tensor
    unm: torch.Tensor
    out_index: torch.Tensor
    src_token: torch.Tensor
    dst_slot: torch.Tensor
    weight: torch.Tensor | None = None

    @property
    def r(self) -> int:
        return self.src.shape[1]


@dataclass
class Choices:
    """A merge step's decisions as input-token positions, whatever split made them.

    src: [B, r] the merged-away tokens (best-matched first); dst: [B, r] the token each one
    merges into; kept: [B, Na - r] the kept source tokens, in output order. Two runs (or two
    backends) can be compared on these even when their A and B are indexed differently.
    """

    src: torch.Tensor
    dst: torch.Tensor
    kept: torch.Tensor

    @classmethod
    def of(cls, plan: MergePlan) -> "Choices":
        return cls(plan.src_token, plan.split.b.gather(1, plan.dst), plan.split.a.gather(1, plan.unm))


def plan_merge(split: Split, score: torch.Tensor, dst: torch.Tensor, r: int) -> MergePlan:
    """Merge the r best-matched A tokens of every image (ties: lower position first).

    The kept A tokens stay in A's order: only which tokens merge depends on the scores, so
    near-equal scores cannot reorder the tokens that later blocks split.
    """
    batch = score.shape[0]
    p = split.num_protected
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    src = order[:, :r]
    unm = order[:, r:].sort(dim=1).values
    dst_src = dst.gather(1, src)
    protected = torch.arange(p, device=score.device).expand(batch, p)
    out_index = torch.cat([protected, split.a.gather(1, unm), split.b], dim=1)
    dst_slot = dst_src + (p + unm.shape[1])
    return MergePlan(split, src, dst_src, unm, out_index, split.a.gather(1, src), dst_slot)


def boundary_gap(score: torch.Tensor, r: int) -> float:
    """Smallest gap, over the batch, between the r-th and (r+1)-th best score (a diagnostic)."""
    if r <= 0 or r >= score.shape[1]:
        return float("inf")
    ranked = score.topk(r + 1, dim=1).values
    return float((ranked[:, r - 1] - ranked[:, r]).min())


def merge_weighted(plan: MergePlan, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted average merge. x: [B, N, C], size: [B, N] -> [B, N - r, C], [B, N - r].

    Output order: protected tokens, kept A tokens (in A's order), B tokens. One gather puts
    every token in its output place; then each partner b that receives sources i becomes
    x_b + sum_i w_i (x_i - x_b) / W'_b, the weighted average, touching only those rows. The
    weights w are the sizes (W' = size'_b, the summed size), or the plan's own weights (W' =
    w_b + sum_i w_i); the sizes are summed either way.
    """
    x_out = take(x, plan.out_index)
    size_out = size.gather(1, plan.out_index)
    if plan.r == 0:
        return x_out, size_out
    src_size = size.gather(1, plan.src_token)
    size_out.scatter_add_(1, plan.dst_slot, src_size)
    if plan.weight is None:
        src_weight, total = src_size, size_out
    else:
        src_weight = plan.weight.gather(1, plan.src_token)
        total = plan.weight.gather(1, plan.out_index).scatter_add_(1, plan.dst_slot, src_weight)
    weight = (src_weight / total.gather(1, plan.dst_slot)).unsqueeze(-1).to(x.dtype)
    delta = (take(x, plan.src_token) - take(x_out, plan.dst_slot)) * weight
    x_out.scatter_add_(1, plan.dst_slot.unsqueeze(-1).expand(-1, -1, x.shape[-1]), delta)
    return x_out, size_out


def merge_summed(plan: MergePlan, t: torch.Tensor) -> torch.Tensor:
    """Apply a plan by summing instead of averaging (e.g. source maps). t: [B, N, K]."""
    out = take(t, plan.out_index)
    if plan.r:
        out.scatter_add_(1, plan.dst_slot.unsqueeze(-1).expand(-1, -1, t.shape[-1]), take(t, plan.src_token))
    return out


@dataclass
class MergeStep:
    """Outcome of one merge step, with what the report and the parity checks need."""

    x: torch.Tensor
    size: torch.Tensor
    r: int
    counts: torch.Tensor | None  # [B] pairs above the threshold, or AdaMerge's r_b (None for a fixed r)
    margin: float | None  # how close the count came to another one, in score units (None for a fixed r)
    plan: MergePlan
    tie_gap: float | None = None  # with diagnostics: the closest call among the choices made
    redundancy: torch.Tensor | None = None  # [B] AdaMerge's rho_b (None for other counts)


def match_scores(metric: torch.Tensor, split: Split, weighting: str = SIZE_WEIGHTS, salience_temperature: float = 1.0,
                 runner_up: bool = False):
    """``match``, with AdaMerge's salience weighting when ``weighting`` is ``salience``.

    Returns (score [B, Na], dst [B, Na], token salience [B, N] or None[, partner gap]). The
    partner is the most similar B token either way; the weighted score is s_a * cos(a, b), the
    source token's salience times its best similarity (the ranking and the redundancy use it).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    found = match(metric, split, runner_up=runner_up)
    if weighting == SIZE_WEIGHTS:
        return (found[0], found[1], None, *found[2:])
    token_salience = salience(metric, split.num_protected, salience_temperature)
    source_salience, _ = split.select(token_salience)
    return (found[0] * source_salience.to(found[0].dtype), found[1], token_salience, *found[2:])


def token_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    *,
    threshold: float | None = None,
    r: int | None = None,
    intensity: Intensity | None = None,
    weighting: str = SIZE_WEIGHTS,
    salience_temperature: float = 1.0,
    split_mode: str = ALTERNATE,
    num_protected: int = 1,
    diagnostics: bool = False,
) -> MergeStep:
    """One merge step: the TokenMerge op of docs/token-merge-op.md.

    x: [B, N, C]; size: [B, N]; metric: [B, N, D]. Exactly one of ``threshold`` (ATM's
    batch-adaptive r), ``r`` (fixed r) and ``intensity`` (AdaMerge's r from the redundancy) is
    given. ``weighting="salience"``: AdaMerge's salience-weighted scores and average.
    ``diagnostics`` also measures ``tie_gap``: the smallest gap between a choice made (which
    tokens merge, and into which partner) and its runner-up.
    """
    if sum(v is not None for v in (threshold, r, intensity)) != 1:
        raise ValueError("give exactly one of threshold (adaptive), r (fixed) and intensity (AdaMerge)")
    split = split_tokens(size, num_protected, split_mode)
    cap = max_merges(x.shape[1] - num_protected)
    found = match_scores(metric, split, weighting, salience_temperature, runner_up=diagnostics)
    score, dst, token_salience = found[:3]
    counts = margin = rho = None
    if threshold is not None:
        counts = count_above(score, threshold)
        n_merge = batch_adaptive_r(counts, cap)
        margin = float((score.detach() - threshold).abs().min()) if score.numel() else None  # a statistic, not a graph
    elif intensity is not None:
        rho = redundancy(score)
        counts = intensity_counts(rho, intensity)
        n_merge = batch_adaptive_r(counts, cap)
        margin = intensity_margin(rho, intensity)
    else:
        n_merge = fixed_r(r, cap)
    plan = plan_merge(split, score, dst, n_merge)
    if token_salience is not None:
        plan.weight = merge_weights(size, token_salience)
    x_out, size_out = merge_weighted(plan, x, size)
    tie_gap = None
    if diagnostics:
        partner_gap = found[3]
        merged_gap = float(partner_gap.gather(1, plan.src).min()) if plan.src.numel() else float("inf")
        tie_gap = min(merged_gap, boundary_gap(score, n_merge))
    return MergeStep(x_out, size_out, n_merge, counts, margin, plan, tie_gap, rho)
