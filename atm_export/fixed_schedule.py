"""Fixed token schedules: one token count per block, the same for every input.

A schedule is the list of tokens entering each block (``197, 180, ...`` for DeiT-S). Two things
use one: benchmarks that replay it (``--bench-schedule``, so random weights time like trained
ones), and static-schedule exports (``--static-schedule``), whose merge steps merge a fixed r so
that every token count is a static dimension. Schedules come from

- ``gflops:G``: one built for a FLOPs target (``schedule_for_gflops``);
- a JSON file: a report.json (its sample run's mean tokens), an eval.json (``FILE:NAME`` picks
  a setting; without a name the file must hold one merged setting), or any file with a
  top-level ``tokens_per_layer``;
- a comma-separated list of counts.

Mean counts are rounded; every schedule is checked against what one merge step can do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import UserError
from .flops import ViTDims, image_macs
from .merge import max_merges
from .schedule import r_from_tokens, replay_config


def schedule_gflops(dims: ViTDims, tokens: list[int], prefix_last: bool) -> float:
    """GFLOPs of one image following ``tokens`` (tokens entering each block)."""
    r = [tokens[i] - tokens[i + 1] for i in range(len(tokens) - 1)] + [0]
    merges = [v > 0 for v in r]
    return image_macs(dims, tokens, r, merges, prefix_last) / 1e9


def schedule_for_gflops(dims: ViTDims, target: float, prefix_last: bool = True) -> list[int]:
    """Tokens entering each block, shrinking geometrically (most merging early, like ATM's
    layer-dependent thresholds) so that the model costs about ``target`` GFLOPs."""
    p, m0 = dims.num_prefix, dims.num_patches

    def tokens_for(decay: float) -> list[int]:
        out, m = [], m0
        for _ in range(dims.depth):
            out.append(p + m)
            m = m - min(max_merges(m), round(m * (1.0 - math.exp(-decay))))
        return out

    lo, hi = 0.0, 5.0
    if schedule_gflops(dims, tokens_for(hi), prefix_last) > target:
        raise UserError(f"{target} GFLOPs is below what merging can reach for this model")
    for _ in range(60):  # bisection on the decay rate
        mid = (lo + hi) / 2
        if schedule_gflops(dims, tokens_for(mid), prefix_last) > target:
            lo = mid
        else:
            hi = mid
    return tokens_for(hi)


def tokens_in_file(spec: str, option: str) -> list[float]:
    """The token schedule a JSON file records: ``PATH`` or ``PATH:NAME`` (eval.json settings)."""
    path, _, name = spec.partition(".json")
    path, name = Path(path + ".json"), name.removeprefix(":")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{option} {spec}: cannot read {path} ({exc})") from None
    if isinstance(data, dict) and "tokens_per_layer" in data:
        return data["tokens_per_layer"]
    if isinstance(data, dict) and isinstance(data.get("tokens"), dict) and "mean" in data["tokens"]:
        return data["tokens"]["mean"]  # a report.json: the sample run
    if isinstance(data, dict) and isinstance(data.get("results"), list):  # an eval.json
        merged = {r["name"]: r["tokens"] for r in data["results"] if r.get("name") != "unmerged"}
        if name:
            if name not in merged:
                raise UserError(f"{option} {spec}: {path} has no setting {name!r} (it has: {', '.join(merged)})")
            return merged[name]
        if len(merged) != 1:
            raise UserError(f"{option} {spec}: {path} holds {len(merged)} settings; name one as "
                            f"{path}:NAME (one of: {', '.join(merged)})")
        return next(iter(merged.values()))
    raise UserError(f"{option} {spec}: {path} records no token schedule (a report.json, an eval.json, or a file "
                    "with tokens_per_layer)")


def parse_schedule(spec: str, dims: ViTDims, prefix_last: bool, option: str = "--bench-schedule") -> list[int]:
    """Tokens entering each block from ``gflops:G``, a JSON file (see the module), or ``197,150,...``.
    UserError (one line, naming ``option``) for anything unreadable or impossible."""
    if spec.startswith("gflops:"):
        try:
            target = float(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"{option} {spec!r}: expected gflops:<number>") from None
        return schedule_for_gflops(dims, target, prefix_last)
    if ".json" in spec:
        tokens = tokens_in_file(spec, option)
    else:
        try:
            tokens = [float(v) for v in spec.split(",")]
        except ValueError:
            raise UserError(f"{option} {spec!r}: expected comma-separated token counts") from None
    return checked_schedule(tokens, dims, option)


def checked_schedule(tokens: list[float], dims: ViTDims, option: str) -> list[int]:
    """``tokens`` rounded, or UserError when no model of ``dims`` can follow them."""
    try:
        tokens = [int(round(float(t))) for t in tokens]
    except (TypeError, ValueError):
        raise UserError(f"{option}: token counts must be numbers, got {tokens}") from None
    if len(tokens) != dims.depth or tokens[0] != dims.num_tokens:
        raise UserError(f"{option} needs {dims.depth} counts starting at {dims.num_tokens}, got {tokens}")
    for a, b in zip(tokens, tokens[1:]):
        if not a - max_merges(a - dims.num_prefix) <= b <= a:
            raise UserError(f"{option}: one block can merge at most half its unprotected tokens ({a} -> {b})")
    return tokens


def replay_model(atm, tokens: list[int]):
    """An eager model like ``atm`` (an ATMVisionTransformer) that merges a fixed r per block so
    that ``tokens`` enter its blocks: ToMe-style steps with ``atm``'s split layer and proportional
    attention, sharing ``atm``'s timm model."""
    from .patch import patch_model

    r = r_from_tokens(tokens, atm.num_protected, atm.class_token_head)
    return patch_model(atm.vit, replay_config(r, atm.config.resolved_split_layer(atm.depth), atm.prop_attn))
