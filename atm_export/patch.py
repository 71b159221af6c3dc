"""Run timm VisionTransformer models with ATM token merging.

``patch_model(vit, config)`` returns an :class:`ATMVisionTransformer` that shares the timm
model's modules and parameters and runs its own forward pass:

- every block: attention (with proportional attention, i.e. a ``log(size)`` bias on the keys,
  for class-token models), then the block's merge step (``atm_export.merge``) between the
  attention and the MLP, as in ToMe and ATM;
- class-token models keep only their protected tokens (class, distillation, register tokens)
  after the last block's attention: the last block computes queries, projection and MLP
  for those tokens only, which is exact for a head that reads them;
- global-pool models (MAE-style) pool with a size-weighted average and merge in every block.

The attention uses timm's fused ``scaled_dot_product_attention`` when the timm module has
``fused_attn`` set, and the explicit formulation otherwise (and when exporting, because the
exporter's SDPA decomposition cannot handle a data-dependent token count).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import merge as M
from .errors import NonFiniteInputError, UserError
from .schedule import MergeConfig, StepSpec

SUPPORTED_POOLS = ("token", "avg")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be patched, or None when it can."""
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        return f"{name} is not a timm VisionTransformer (ATM patches ViT/DeiT-style models only)"
    if getattr(model, "attn_pool", None) is not None:
        return "attention-pool (MAP) heads are not supported; use a class-token or average-pool ViT"
    if model.global_pool not in SUPPORTED_POOLS:
        return f"global_pool={model.global_pool!r} is not supported (supported: {', '.join(SUPPORTED_POOLS)})"
    if model.global_pool == "token" and model.cls_token is None:
        return "a token-pooled model without a class token is not supported"
    for i, blk in enumerate(model.blocks):
        if type(blk).forward is not Block.forward:
            return f"block {i} is a {type(blk).__name__}, not timm's standard pre-norm Block"
        if type(blk.attn).forward is not Attention.forward:
            return f"block {i} uses {type(blk.attn).__name__}, not timm's standard Attention"
    return None


@dataclass
class RunStats:
    """What one forward pass merged. Token counts are batch means (per-image mode can differ).

    tokens_per_layer: tokens entering each block's attention.
    r_per_layer: pairs merged by each block (0 where the block has no merge step).
    counts_per_layer: per image, pairs above the block's threshold (None: no adaptive step).
    margin_per_layer: smallest |similarity - threshold| in the batch (None: no adaptive step);
        a tiny margin means another backend's rounding may change that block's count.
    tie_gap_per_layer: with ``diagnostics``, the smallest gap between a choice the block made
        (which tokens merge, into which partner) and its runner-up (None: not measured).
    per_image_tokens: tokens entering each block, for every image.
    per_image_r: pairs merged by each block, for every image.
    sources: [B, N, N0] which input patches each token holds (only with ``trace_source``),
        taken before the last block of class-token models drops the image tokens.
    steps: with ``diagnostics``, every merge step's inputs and choices (for parity checks).
    """

    tokens_per_layer: list[float]
    r_per_layer: list[float]
    counts_per_layer: list[list[int] | None]
    margin_per_layer: list[float | None]
    tie_gap_per_layer: list[float | None]
    per_image_tokens: list[list[int]]
    per_image_r: list[list[int]]
    sources: torch.Tensor | list[torch.Tensor] | None = None
    steps: list["RecordedStep"] = field(default_factory=list)


@dataclass
class RecordedStep:
    """One merge step of a diagnostic run: its block, settings, inputs and choices."""

    block: int  # 0-based
    spec: StepSpec
    x: torch.Tensor
    size: torch.Tensor
    metric: torch.Tensor
    plan: M.MergePlan


@dataclass
class _Trace:
    tokens: list[int] = field(default_factory=list)
    r: list[int] = field(default_factory=list)
    counts: list[list[int] | None] = field(default_factory=list)
    margins: list[float | None] = field(default_factory=list)
    tie_gaps: list[float | None] = field(default_factory=list)
    sources: torch.Tensor | None = None
    steps: list[RecordedStep] = field(default_factory=list)

    def no_step(self) -> None:
        self.r.append(0)
        self.counts.append(None)
        self.margins.append(None)
        self.tie_gaps.append(None)


class ATMVisionTransformer(nn.Module):
    """A timm VisionTransformer run with ATM merging. Shares ``vit``'s parameters.

    ``forward(images)`` returns what the timm model returns (logits); the merge statistics of
    the last call are in ``last_stats``. With ``use_op=True`` every merge step goes through the
    ``atm_export::token_merge`` custom op (the exported form) and ``forward_export`` returns
    ``(logits, tokens_per_layer)`` as tensors. With ``diagnostics`` set, every merge step
    also measures how close its choices came to their runner-ups (for parity checks).

    ``check_finite`` (default on): a batch holding NaN or infinite pixels raises
    :class:`NonFiniteInputError` instead of running, because batch-adaptive merging would let
    the broken image change every other image's token counts. Set it to False to allow them.
    """

    def __init__(self, vit: nn.Module, config: MergeConfig, *, trace_source: bool = False, check_finite: bool = True):
        super().__init__()
        reason = unsupported_reason(vit)
        if reason:
            raise UserError(reason)
        self.vit = vit.eval()
        self.config = config
        self.depth = len(vit.blocks)
        self.num_protected = int(vit.num_prefix_tokens)
        self.class_token_head = vit.global_pool == "token"
        self.prop_attn = self.class_token_head if config.prop_attn is None else bool(config.prop_attn)
        self.steps: list[StepSpec | None] = config.steps(self.depth, merge_in_last_block=not self.class_token_head)
        self.trace_source = trace_source
        self.check_finite = check_finite
        self.diagnostics = False
        self.exporting = False
        self.last_stats: RunStats | None = None

    # ------------------------------------------------------------------ public API
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._require_finite(images)
        if self.config.per_image and images.shape[0] > 1:
            parts = [self._run(images[i : i + 1]) for i in range(images.shape[0])]
            self.last_stats = _combine_stats([p[1] for p in parts])
            return torch.cat([p[0] for p in parts])
        logits, stats = self._run(images)
        self.last_stats = stats
        return logits

    def forward_export(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward through the TokenMerge custom op: (logits [B, K], tokens_per_layer [L] int64)."""
        from .ops import token_merge_op

        self._require_finite(images)
        vit = self.vit
        x = self._embed(images)
        batch, n, _ = x.shape
        size = x.new_ones(batch, n, dtype=torch.float32)
        merged = False
        count = torch.full((), n, dtype=torch.int64)
        counts = []
        for i, (blk, step) in enumerate(zip(vit.blocks, self.steps)):
            counts.append(count)
            if i == self.depth - 1 and self.class_token_head:
                x = self._prefix_block(blk, x, size if merged else None)
                continue
            h, metric = self._attention(blk.attn, blk.norm1(x), size if merged else None)
            x = x + blk.drop_path1(blk.ls1(h))
            if step is not None:
                x, size, count = token_merge_op(x, size, metric, step, self.num_protected)
                merged = True
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        logits = self._head(vit.norm(x), size if merged else None)
        return logits, torch.stack(counts)

    def _require_finite(self, images: torch.Tensor) -> None:
        if not self.check_finite or self.exporting:  # a data-dependent check cannot be exported
            return
        finite = torch.isfinite(images).flatten(1).all(1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise NonFiniteInputError(
                f"image(s) {bad} of the batch hold NaN or infinite values; batch-adaptive merging would let "
                "them change every image's token counts (set check_finite=False on the model to allow them)")

    # ------------------------------------------------------------------ the forward pass
    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, RunStats]:
        vit = self.vit
        x = self._embed(images)
        batch, n, _ = x.shape
        size: torch.Tensor | None = None
        trace = _Trace()
        if self.trace_source:
            trace.sources = torch.eye(n, device=x.device, dtype=x.dtype).expand(batch, n, n)
        for i, (blk, step) in enumerate(zip(vit.blocks, self.steps)):
            trace.tokens.append(x.shape[1])
            if i == self.depth - 1 and self.class_token_head:
                x = self._prefix_block(blk, x, size)
                trace.no_step()
                continue
            h, metric = self._attention(blk.attn, blk.norm1(x), size)
            x = x + blk.drop_path1(blk.ls1(h))
            if step is not None:
                x, size = self._merge(x, size, metric, step, trace)
            else:
                trace.no_step()
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        logits = self._head(vit.norm(x), size)
        stats = RunStats(
            tokens_per_layer=[float(t) for t in trace.tokens],
            r_per_layer=[float(r) for r in trace.r],
            counts_per_layer=trace.counts,
            margin_per_layer=trace.margins,
            tie_gap_per_layer=trace.tie_gaps,
            steps=trace.steps,
            per_image_tokens=[list(trace.tokens) for _ in range(batch)],
            per_image_r=[list(trace.r) for _ in range(batch)],
            sources=trace.sources,
        )
        return logits, stats

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def _merge(self, x, size, metric, step: StepSpec, trace: _Trace):
        if size is None:
            size = x.new_ones(x.shape[:2], dtype=torch.float32)
        with torch.profiler.record_function("atm.merge"):
            out = M.token_merge(
                x, size, metric,
                threshold=step.threshold, r=step.r,
                split_mode=step.split_mode, num_protected=self.num_protected,
                diagnostics=self.diagnostics,
            )
            if trace.sources is not None:
                trace.sources = M.merge_summed(out.plan, trace.sources)
        trace.r.append(out.r)
        trace.counts.append(None if out.counts is None else [int(c) for c in out.counts])
        trace.margins.append(out.margin)
        trace.tie_gaps.append(out.tie_gap)
        if self.diagnostics:
            trace.steps.append(RecordedStep(len(trace.tokens) - 1, step, x, size, metric, out.plan))
        return out.x, out.size

    def _fused(self, attn: nn.Module) -> bool:
        return bool(getattr(attn, "fused_attn", False)) and not self.exporting

    def _attention(self, attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None, q_rows: int | None = None):
        """timm Attention with proportional attention. Returns (output [B, Nq, C], metric [B, N, D]).

        ``q_rows``: compute queries (and the output) for the first q_rows tokens only.
        """
        batch, n, _ = x.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        attn_dim = heads * head_dim
        if q_rows is None:
            qkv = attn.qkv(x).reshape(batch, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            nq = n
        else:
            w, b = attn.qkv.weight, attn.qkv.bias
            q = F.linear(x[:, :q_rows], w[:attn_dim], None if b is None else b[:attn_dim])
            q = q.reshape(batch, q_rows, heads, head_dim).transpose(1, 2)
            kv = F.linear(x, w[attn_dim:], None if b is None else b[attn_dim:])
            k, v = kv.reshape(batch, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            nq = q_rows
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = None
        if size is not None and self.prop_attn:
            bias = size.log().to(q.dtype)[:, None, None, :]
        if self._fused(attn):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            logits = (q * attn.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            out = logits.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(batch, nq, attn_dim)
        out = attn.norm(out)
        gate = getattr(attn, "gate", None)
        if gate is not None:
            out = out * gate(x[:, :nq]).sigmoid()
        out = attn.proj_drop(attn.proj(out))
        return out, k.mean(dim=1)

    def _prefix_block(self, blk: nn.Module, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        """Last block of a class-token model: only the protected tokens leave it."""
        p = self.num_protected
        h, _ = self._attention(blk.attn, blk.norm1(x), size, q_rows=p)
        x = x[:, :p] + blk.drop_path1(blk.ls1(h))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def _head(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        vit = self.vit
        if vit.global_pool != "avg":
            return vit.forward_head(x)
        start = 0 if getattr(vit, "pool_include_prefix", False) else self.num_protected
        tokens = x[:, start:]
        if size is None:
            pooled = tokens.mean(dim=1)
        else:
            weights = size[:, start:].to(tokens.dtype).unsqueeze(-1)
            pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        return vit.head(vit.head_drop(vit.fc_norm(pooled)))


def _min_or_none(values) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _combine_stats(stats: list[RunStats]) -> RunStats:
    """Per-image runs (batch of 1 each) -> one RunStats with batch-mean counts."""
    n = len(stats)
    depth = len(stats[0].tokens_per_layer)
    return RunStats(
        tokens_per_layer=[sum(s.tokens_per_layer[i] for s in stats) / n for i in range(depth)],
        r_per_layer=[sum(s.r_per_layer[i] for s in stats) / n for i in range(depth)],
        counts_per_layer=[
            None if stats[0].counts_per_layer[i] is None else [c for s in stats for c in s.counts_per_layer[i]]
            for i in range(depth)
        ],
        margin_per_layer=[_min_or_none(s.margin_per_layer[i] for s in stats) for i in range(depth)],
        tie_gap_per_layer=[_min_or_none(s.tie_gap_per_layer[i] for s in stats) for i in range(depth)],
        per_image_tokens=[t for s in stats for t in s.per_image_tokens],
        per_image_r=[r for s in stats for r in s.per_image_r],
        sources=None if stats[0].sources is None else [s.sources[0] for s in stats],
    )


def patch_model(vit: nn.Module, config: MergeConfig | None = None, **kwargs) -> ATMVisionTransformer:
    """Wrap a timm VisionTransformer for ATM. The timm model itself is left unchanged."""
    return ATMVisionTransformer(vit, config or MergeConfig(), **kwargs)
