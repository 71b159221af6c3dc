"""A plain-loop reference of one TokenMerge step (docs/token-merge-op.md), written for clarity.

Python loops over images, tokens and pairs, float64 arithmetic: independent of the tensor
code in atm_export.merge, so that the two can check each other.
"""

from __future__ import annotations

import math


def _cosine(u, v) -> float:
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    dot = sum(a * b for a, b in zip(u, v))
    return max(-1.0, min(1.0, dot / (max(nu, 1e-12) * max(nv, 1e-12))))


def reference_merge(x, size, metric, *, threshold=None, r=None, split_mode="alternate", num_protected=1):
    """x: [B][N][C], size: [B][N], metric: [B][N][D] nested lists.

    Returns (x_out, size_out, r_used, counts) as nested lists.
    """
    batch = len(x)
    n = len(x[0])
    p = num_protected
    per_image = []
    for bi in range(batch):
        unprotected = list(range(p, n))
        if split_mode == "alternate":
            a_idx, b_idx = unprotected[0::2], unprotected[1::2]
        else:
            order = sorted(unprotected, key=lambda t: (size[bi][t], t))
            half = (len(order) + 1) // 2
            a_idx, b_idx = order[:half], order[half:]
        scores, partners = [], []
        for a in a_idx:
            best, best_j = -math.inf, 0
            for j, b in enumerate(b_idx):
                s = _cosine(metric[bi][a], metric[bi][b])
                if s > best:  # strict: the first partner wins a tie
                    best, best_j = s, j
            scores.append(best if b_idx else -1.0)
            partners.append(best_j)
        per_image.append((a_idx, b_idx, scores, partners))

    counts = [sum(1 for s in scores if threshold is not None and s > threshold) for _, _, scores, _ in per_image]
    num_a, num_b = len(per_image[0][0]), len(per_image[0][1])
    if num_b == 0:
        r_used = 0
    elif r is not None:
        r_used = min(r, num_a)
    else:
        r_used = min(sum(counts) // batch, num_a)

    x_out, size_out = [], []
    for bi, (a_idx, b_idx, scores, partners) in enumerate(per_image):
        ranked = sorted(range(len(a_idx)), key=lambda i: (-scores[i], i))
        merged, kept = ranked[:r_used], ranked[r_used:]
        sums = [[v * size[bi][b] for v in x[bi][b]] for b in b_idx]
        sizes = [size[bi][b] for b in b_idx]
        for i in merged:
            a, j = a_idx[i], partners[i]
            sums[j] = [acc + v * size[bi][a] for acc, v in zip(sums[j], x[bi][a])]
            sizes[j] += size[bi][a]
        kept = sorted(kept)  # kept tokens stay in A's order
        rows = [list(x[bi][t]) for t in range(p)] + [list(x[bi][a_idx[i]]) for i in kept]
        rows += [[v / s for v in acc] for acc, s in zip(sums, sizes)]
        x_out.append(rows)
        size_out.append([size[bi][t] for t in range(p)] + [size[bi][a_idx[i]] for i in kept] + sizes)
    return x_out, size_out, r_used, counts
