"""A plain-loop reference of one TokenMerge step, written for clarity, following ToMe's convention.

Python loops over images, tokens and pairs, float64 arithmetic, and its own way of splitting:
independent of the tensor code in atm_export.merge, so that the two can check each other.

How it splits (ToMe's bipartite matching, restated, not copied):
- alternate: the *whole* sequence is split by position, even positions are sources (A), odd
  positions destinations (B). Protected tokens stay in the lists but can never be chosen:
  their row (as a source) and column (as a destination) score minus infinity.
- size-distinctive: the unprotected tokens sorted by (size, position); the floor(M/2)
  smallest are A, the rest B.
Every image merges the same r <= floor(M/2) pairs, M being the number of unprotected tokens.
"""

from __future__ import annotations

import math

NEG_INF = -math.inf


def _cosine(u, v) -> float:
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    dot = sum(a * b for a, b in zip(u, v))
    return max(-1.0, min(1.0, dot / (max(nu, 1e-12) * max(nv, 1e-12))))


def _split(n: int, p: int, sizes, split_mode: str) -> tuple[list[int], list[int]]:
    if split_mode == "alternate":
        return list(range(0, n, 2)), list(range(1, n, 2))
    order = sorted(range(p, n), key=lambda t: (sizes[t], t))
    half = (n - p) // 2
    return order[:half], order[half:]


def _best_partners(metric, a_idx, b_idx, p):
    """Per source: (best similarity, index into b_idx); -inf for a protected source or no partner."""
    scores, partners = [], []
    for a in a_idx:
        best, best_j = NEG_INF, 0
        for j, b in enumerate(b_idx):
            s = NEG_INF if a < p or b < p else _cosine(metric[a], metric[b])
            if s > best:  # strict: the first partner wins a tie
                best, best_j = s, j
        scores.append(best)
        partners.append(best_j)
    return scores, partners


def reference_merge(x, size, metric, *, threshold=None, r=None, split_mode="alternate", num_protected=1):
    """x: [B][N][C], size: [B][N], metric: [B][N][D] nested lists.

    Returns (x_out, size_out, r_used, counts). x_out and size_out are in the op's output order
    (docs/token-merge-op.md): protected tokens, kept sources by position in A, then B by
    position in B (protected tokens, which the alternate split puts in A or B, only in front).
    """
    batch, n, p = len(x), len(x[0]), num_protected
    per_image = []
    for bi in range(batch):
        a_idx, b_idx = _split(n, p, size[bi], split_mode)
        scores, partners = _best_partners(metric[bi], a_idx, b_idx, p)
        per_image.append((a_idx, b_idx, scores, partners))

    counts = [sum(1 for s in scores if threshold is not None and s > threshold) for _, _, scores, _ in per_image]
    cap = (n - p) // 2
    r_used = min(r, cap) if r is not None else min(sum(counts) // batch, cap)

    x_out, size_out = [], []
    for bi, (a_idx, b_idx, scores, partners) in enumerate(per_image):
        ranked = sorted(range(len(a_idx)), key=lambda i: (-scores[i], i))
        merged, kept = ranked[:r_used], sorted(ranked[r_used:])
        sums = {b: [v * size[bi][b] for v in x[bi][b]] for b in b_idx}
        sizes = {b: size[bi][b] for b in b_idx}
        for i in merged:
            a, b = a_idx[i], b_idx[partners[i]]
            assert a >= p and b >= p, "a protected token was merged"
            sums[b] = [acc + v * size[bi][a] for acc, v in zip(sums[b], x[bi][a])]
            sizes[b] += size[bi][a]
        kept_a = [a_idx[i] for i in kept if a_idx[i] >= p]
        dests = [b for b in b_idx if b >= p]
        rows = [list(x[bi][t]) for t in range(p)] + [list(x[bi][a]) for a in kept_a]
        rows += [[v / sizes[b] for v in sums[b]] for b in dests]
        x_out.append(rows)
        size_out.append([size[bi][t] for t in range(p)] + [size[bi][a] for a in kept_a] + [sizes[b] for b in dests])
    return x_out, size_out, r_used, counts


def as_multiset(x_out, size_out) -> list[list[float]]:
    """One image's output tokens as a sorted list of (size, *x) rows: the order left out."""
    return sorted([float(s), *map(float, row)] for row, s in zip(x_out, size_out))


def sweep(num_protected: int, seeds: int = 3):
    """Random cases for one P: odd and even N (N = P + 1 and P + 2 included), every fixed r from
    0 to past the cap, and thresholds from "all" to "none".

    Yields (x [2, N, 4], size [2, N] (integers 1..3, so size ties happen), metric [2, N, 8],
    settings for token_merge (``r=`` or ``threshold=``), a description for messages).
    """
    import itertools

    import torch

    for n, seed in itertools.product(sorted({num_protected + 1, num_protected + 2, 16, 17}), range(seeds)):
        g = torch.Generator().manual_seed(seed * 100 + n)
        x = torch.randn(2, n, 4, generator=g)
        size = torch.randint(1, 4, (2, n), generator=g).float()
        metric = torch.randn(2, n, 8, generator=g)
        cap = (n - num_protected) // 2
        settings = [{"r": r} for r in range(cap + 2)] + [{"threshold": t} for t in (-1.0, 0.0, 0.3, 0.6, 1.0)]
        for kw in settings:
            yield x, size, metric, kw, f"P={num_protected} N={n} seed={seed} {kw}"


# ---------------------------------------------------------------------------------------------
# AdaMerge, restated with loops (docs/method.md): salience-weighted scores and averages, and the
# per-layer intensity rule.

def reference_salience(metric, p: int, temperature: float) -> list[float]:
    """One image: min-max normalised column sums of the row softmax of cos(u_i, u_j) / temperature
    over the unprotected tokens; protected tokens 1."""
    n = len(metric)
    tokens = list(range(p, n))
    column = {j: 0.0 for j in tokens}
    for i in tokens:
        logits = {j: _cosine(metric[i], metric[j]) / temperature for j in tokens}
        top = max(logits.values())
        weights = {j: math.exp(v - top) for j, v in logits.items()}
        total = sum(weights.values())
        for j in tokens:
            column[j] += weights[j] / total
    if not tokens:
        return [1.0] * n
    lo, hi = min(column.values()), max(column.values())
    return [1.0] * p + [(column[j] - lo) / max(hi - lo, 1e-2) for j in tokens]


def reference_adamerge(x, size, metric, *, r=None, threshold=None, intensity=None, salience_temperature=1.0,
                       split_mode="alternate", num_protected=1):
    """One AdaMerge step on nested lists. intensity: (r_max, mean, std, scale).

    Returns (x_out, size_out, r_used, per-image counts, per-image redundancy), outputs in the op's
    order as ``reference_merge``'s.
    """
    batch, n, p = len(x), len(x[0]), num_protected
    per_image = []
    for bi in range(batch):
        salience = reference_salience(metric[bi], p, salience_temperature)
        a_idx, b_idx = _split(n, p, size[bi], split_mode)
        cosines, partners = _best_partners(metric[bi], a_idx, b_idx, p)
        scores = [c if c == NEG_INF else salience[a] * c for a, c in zip(a_idx, cosines)]
        per_image.append((a_idx, b_idx, scores, partners, salience))

    cap = (n - p) // 2
    redundancy, counts = [], []
    for a_idx, _, scores, _, _ in per_image:
        real = [s for a, s in zip(a_idx, scores) if a >= p and s != NEG_INF]
        rho = sum(real) / len(real) if real else 0.0
        redundancy.append(rho)
        if intensity is not None:
            r_max, mean, std, scale = intensity
            counts.append(math.floor(r_max / (1.0 + math.exp(-scale * (rho - mean) / std))))
        else:
            counts.append(sum(1 for s in scores if threshold is not None and s > threshold))
    r_used = min(r, cap) if r is not None else min(sum(counts) // batch, cap)

    x_out, size_out = [], []
    for bi, (a_idx, b_idx, scores, partners, salience) in enumerate(per_image):
        weight = [size[bi][t] * (salience[t] + 1e-2) for t in range(n)]
        ranked = sorted(range(len(a_idx)), key=lambda i: (-scores[i], i))
        merged, kept = ranked[:r_used], sorted(ranked[r_used:])
        sums = {b: [v * weight[b] for v in x[bi][b]] for b in b_idx}
        weights = {b: weight[b] for b in b_idx}
        sizes = {b: size[bi][b] for b in b_idx}
        for i in merged:
            a, b = a_idx[i], b_idx[partners[i]]
            assert a >= p and b >= p, "a protected token was merged"
            sums[b] = [acc + v * weight[a] for acc, v in zip(sums[b], x[bi][a])]
            weights[b] += weight[a]
            sizes[b] += size[bi][a]
        kept_a = [a_idx[i] for i in kept if a_idx[i] >= p]
        dests = [b for b in b_idx if b >= p]
        rows = [list(x[bi][t]) for t in range(p)] + [list(x[bi][a]) for a in kept_a]
        rows += [[v / weights[b] for v in sums[b]] for b in dests]
        x_out.append(rows)
        size_out.append([size[bi][t] for t in range(p)] + [size[bi][a] for a in kept_a] + [sizes[b] for b in dests])
    return x_out, size_out, r_used, counts, redundancy
