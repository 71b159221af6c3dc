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

import time
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
    redundancy_per_layer: per image, AdaMerge's redundancy (mean match score) at each block
        (None where the block has no intensity step).
    sources: [B, N, N0] which input patches each token holds (only with ``trace_source``),
        taken before the last block of class-token models drops the image tokens.
    sources_after: with ``trace_source``, block (1-based) -> [B, N_b, N0] the same after
        every block that merges.
    steps: with ``diagnostics``, every merge step's inputs and choices (for parity checks).
    merge_seconds: wall time spent in the merge steps (measured when ``time_merges`` is set).
    """

    tokens_per_layer: list[float]
    r_per_layer: list[float]
    counts_per_layer: list[list[int] | None]
    margin_per_layer: list[float | None]
    tie_gap_per_layer: list[float | None]
    per_image_tokens: list[list[int]]
    per_image_r: list[list[int]]
    redundancy_per_layer: list[list[float] | None] = field(default_factory=list)
    sources: torch.Tensor | list[torch.Tensor] | None = None
    sources_after: dict[int, torch.Tensor] = field(default_factory=dict)
    steps: list["RecordedStep"] = field(default_factory=list)
    merge_seconds: float = 0.0


@dataclass
class RecordedStep:
    """One merge step of a diagnostic run: its block, settings, inputs and choices."""

    block: int  # 0-based
    spec: StepSpec
    x: torch.Tensor
    size: torch.Tensor
    metric: torch.Tensor
    plan: M.MergePlan


class _EagerMerges:
    """The merge steps of an eager run (atm_export.merge), recording what a RunStats holds."""

    def __init__(self, model: "ATMVisionTransformer", batch: int, n: int, x: torch.Tensor, *,
                 diagnostics: bool, time_merges: bool):
        self.model, self.diagnostics, self.time_merges = model, diagnostics, time_merges
        self.tokens: list[int] = []
        self.r: list[int] = []
        self.counts: list[list[int] | None] = []
        self.margins: list[float | None] = []
        self.tie_gaps: list[float | None] = []
        self.redundancy: list[list[float] | None] = []
        self.steps: list[RecordedStep] = []
        self.merge_seconds = 0.0
        self.sources = torch.eye(n, dtype=x.dtype).expand(batch, n, n) if model.trace_source else None
        self.sources_after: dict[int, torch.Tensor] = {}

    def enter(self, block: int, x: torch.Tensor) -> None:
        self.tokens.append(x.shape[1])

    def skip(self, block: int) -> None:
        self.r.append(0)
        self.counts.append(None)
        self.margins.append(None)
        self.tie_gaps.append(None)
        self.redundancy.append(None)

    def merge(self, block: int, step: StepSpec, x, size, metric):
        start = time.perf_counter() if self.time_merges else 0.0
        out = M.token_merge(x, size, metric, **step.merge_kwargs(), num_protected=self.model.num_protected,
                            diagnostics=self.diagnostics)
        if self.time_merges:
            self.merge_seconds += time.perf_counter() - start
        if self.sources is not None:
            self.sources = M.merge_summed(out.plan, self.sources)
            self.sources_after[block + 1] = self.sources
        self.r.append(out.r)
        self.counts.append(None if out.counts is None else [int(c) for c in out.counts])
        self.margins.append(out.margin)
        self.tie_gaps.append(out.tie_gap)
        self.redundancy.append(None if out.redundancy is None else out.redundancy.tolist())
        if self.diagnostics:
            self.steps.append(RecordedStep(block, step, x, size, metric, out.plan))
        return out.x, out.size

    def stats(self, batch: int) -> RunStats:
        return RunStats(
            tokens_per_layer=[float(t) for t in self.tokens], r_per_layer=[float(r) for r in self.r],
            counts_per_layer=self.counts, margin_per_layer=self.margins, tie_gap_per_layer=self.tie_gaps,
            per_image_tokens=[list(self.tokens) for _ in range(batch)], per_image_r=[list(self.r) for _ in range(batch)],
            redundancy_per_layer=self.redundancy, sources=self.sources, sources_after=self.sources_after, steps=self.steps, merge_seconds=self.merge_seconds)


class _OpMerges:
    """The merge steps as the TokenMerge custom op (the exported form), counting tokens as tensors.

    Every node gets TensorRT's hints: ``max_num_tokens`` = n, the tokens entering block 1 (no
    later N exceeds it), and ``opt_num_tokens`` = the block's entry of ``typical_tokens``.
    """

    def __init__(self, model: "ATMVisionTransformer", n: int, typical_tokens: list[float] | None = None):
        self.model = model
        self.max_tokens = int(n)
        self.typical_tokens = typical_tokens
        self.count = torch.full((), n, dtype=torch.int64)
        self.counts: list[torch.Tensor] = []

    def enter(self, block: int, x: torch.Tensor) -> None:
        self.counts.append(self.count)

    def skip(self, block: int) -> None:
        pass

    def attributes(self, block: int, step: StepSpec):
        """The contract.Attributes of block ``block``'s TokenMerge node."""
        from . import contract

        opt = max(1, round(self.typical_tokens[block])) if self.typical_tokens else -1
        return contract.Attributes.for_step(step, self.model.num_protected, opt, self.max_tokens)

    def merge(self, block: int, step: StepSpec, x, size, metric):
        from .ops import token_merge_call

        x, size, self.count = token_merge_call(x, size, metric, self.attributes(block, step))
        return x, size


class ATMVisionTransformer(nn.Module):
    """A timm VisionTransformer run with ATM merging. Shares ``vit``'s parameters.

    - ``forward(images)`` returns what the timm model returns (logits); the merge statistics of
      the call are in ``last_stats``.
    - ``run(images, diagnostics=..., time_merges=...)`` returns ``(logits, RunStats)``; with
      ``diagnostics`` every merge step also measures how close its choices came to their
      runner-ups and records its inputs (for parity checks), with ``time_merges`` the time
      spent merging is measured.
    - ``forward_export(images)`` runs every merge step through the ``atm_export::token_merge``
      custom op (the exported form) and returns ``(logits, tokens_per_layer)`` as tensors.

    ``trace_source`` (when built): the statistics say which input patches each token holds,
    after every merging block (for merge maps). ``check_finite`` (default on): a batch holding
    NaN or infinite pixels raises :class:`NonFiniteInputError` instead of running, because
    batch-adaptive merging would let the broken image change every other image's token counts.
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
        self.last_stats: RunStats | None = None

    # ------------------------------------------------------------------ public API
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, self.last_stats = self.run(images)
        return logits

    def run(self, images: torch.Tensor, *, diagnostics: bool = False, time_merges: bool = False,
            explicit_attention: bool = False) -> tuple[torch.Tensor, RunStats]:
        """Eager forward pass: (logits, RunStats). explicit_attention: never timm's fused SDPA."""
        self._require_finite(images)
        modes = (diagnostics, time_merges, explicit_attention)
        if self.config.per_image and images.shape[0] > 1:
            parts = [self._run(images[i : i + 1], *modes) for i in range(images.shape[0])]
            return torch.cat([p[0] for p in parts]), _combine_stats([p[1] for p in parts])
        return self._run(images, *modes)

    def forward_export(self, images: torch.Tensor, *, explicit_attention: bool = False,
                       typical_tokens: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward through the TokenMerge custom op: (logits [B, K], tokens_per_layer [L] int64).

        explicit_attention: never timm's fused SDPA (the exporter cannot decompose it with a
        data-dependent token count); the finite-input check is left out then too (it cannot be
        exported either).
        typical_tokens: per block (0-based), the tokens a sample run kept after that block's
        merge; each node's ``opt_num_tokens`` (TensorRT's tuning value), -1 without it. Every
        node's ``max_num_tokens`` is the token count entering block 1. Neither changes the math.
        """
        if not explicit_attention:
            self._require_finite(images)
        x = self._embed(images)
        merges = _OpMerges(self, x.shape[1], typical_tokens)
        x, size = self._blocks(x, merges, explicit_attention)
        return self._head(self.vit.norm(x), size), torch.stack(merges.counts)

    def _require_finite(self, images: torch.Tensor) -> None:
        if not self.check_finite:
            return
        finite = torch.isfinite(images).flatten(1).all(1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise NonFiniteInputError(
                f"image(s) {bad} of the batch hold NaN or infinite values; batch-adaptive merging would let "
                "them change every image's token counts (set check_finite=False on the model to allow them)")

    # ------------------------------------------------------------------ the forward pass
    def _run(self, images: torch.Tensor, diagnostics: bool, time_merges: bool,
             explicit_attention: bool) -> tuple[torch.Tensor, RunStats]:
        x = self._embed(images)
        batch, n, _ = x.shape
        merges = _EagerMerges(self, batch, n, x, diagnostics=diagnostics, time_merges=time_merges)
        x, size = self._blocks(x, merges, explicit_attention)
        return self._head(self.vit.norm(x), size), merges.stats(batch)

    def _blocks(self, x: torch.Tensor, merges, explicit_attention: bool, size: torch.Tensor | None = None,
                blocks: range | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every block (or those of ``blocks``, entered with ``size``): attention, then its merge
        step (``merges.merge``), then the MLP.

        Returns the tokens after the last block and their sizes (None if nothing merged).
        """
        for i in blocks if blocks is not None else range(self.depth):
            blk, step = self.vit.blocks[i], self.steps[i]
            merges.enter(i, x)
            if i == self.depth - 1 and self.class_token_head:
                x = self._prefix_block(blk, x, size, explicit_attention)
                merges.skip(i)
                continue
            h, metric = self._attention(blk.attn, blk.norm1(x), size, explicit=explicit_attention)
            x = x + blk.drop_path1(blk.ls1(h))
            if step is None:
                merges.skip(i)
            else:  # every token has size 1 until the first merge
                size = x.new_ones(x.shape[:2], dtype=torch.float32) if size is None else size
                x, size = merges.merge(i, step, x, size, metric)
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x, size

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def _attention(self, attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None, q_rows: int | None = None,
                   explicit: bool = False):
        """timm Attention with proportional attention. Returns (output [B, Nq, C], metric [B, N, D]).

        ``q_rows``: compute queries (and the output) for the first q_rows tokens only.
        ``explicit``: the explicit formulation even where timm would use fused SDPA.
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
        if getattr(attn, "fused_attn", False) and not explicit:
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

    def _prefix_block(self, blk: nn.Module, x: torch.Tensor, size: torch.Tensor | None, explicit: bool) -> torch.Tensor:
        """Last block of a class-token model: only the protected tokens leave it."""
        p = self.num_protected
        h, _ = self._attention(blk.attn, blk.norm1(x), size, q_rows=p, explicit=explicit)
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
        redundancy_per_layer=[
            None if stats[0].redundancy_per_layer[i] is None else [v for s in stats for v in s.redundancy_per_layer[i]]
            for i in range(depth)
        ],
        sources=None if stats[0].sources is None else [s.sources[0] for s in stats],
        merge_seconds=sum(s.merge_seconds for s in stats),
    )


def patch_model(vit: nn.Module, config: MergeConfig | None = None, **kwargs) -> ATMVisionTransformer:
    """Wrap a timm VisionTransformer for ATM. The timm model itself is left unchanged."""
    return ATMVisionTransformer(vit, config or MergeConfig(), **kwargs)
