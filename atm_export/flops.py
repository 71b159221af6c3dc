"""FLOPs from the realized per-block token counts.

Convention (as fvcore's): one multiply-add is one FLOP. Counted: every linear layer and the
patch-embedding convolution (multiply-adds), the two attention matrix products (q.k and
attention.v), the merge step's similarity product (|A| x |B| x head_dim), and LayerNorm at
two multiply-adds per element (normalise, then the affine). Not counted, as in fvcore:
softmax, GELU, residual adds, pooling, and the gathers/scatters of merging.

With that convention the unmerged baselines are DeiT-T 1.26, DeiT-S 4.60 and DeiT-B 17.57
GFLOPs, the ATM paper's figures (fvcore's own rough 5 FLOPs per LayerNorm element would give
4.61 and 17.58). The count follows what ``atm_export.patch`` runs: the last block of a
class-token model computes queries, projection and MLP for the protected tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .merge import ALTERNATE, set_sizes

LAYERNORM_MACS_PER_ELEMENT = 2


@dataclass(frozen=True)
class ViTDims:
    """The sizes of a ViT that its FLOPs depend on."""

    depth: int
    embed_dim: int
    attn_dim: int
    head_dim: int
    mlp_hidden: int
    num_patches: int
    patch_macs: int  # multiply-adds per output channel of one patch: in_chans * ph * pw
    num_prefix: int
    num_classes: int
    num_head_layers: int  # 2 for distilled DeiT (class and distillation heads)
    has_fc_norm: bool
    has_final_norm: bool

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix

    @classmethod
    def from_timm(cls, model: nn.Module) -> "ViTDims":
        blk = model.blocks[0]
        proj = model.patch_embed.proj
        in_ch, kh, kw = proj.weight.shape[1:]
        head_layers = [h for h in (model.head, getattr(model, "head_dist", None)) if isinstance(h, nn.Linear)]
        return cls(
            depth=len(model.blocks),
            embed_dim=model.embed_dim,
            attn_dim=blk.attn.num_heads * blk.attn.head_dim,
            head_dim=blk.attn.head_dim,
            mlp_hidden=blk.mlp.fc1.out_features,
            num_patches=model.patch_embed.num_patches,
            patch_macs=in_ch * kh * kw,
            num_prefix=model.num_prefix_tokens,
            num_classes=head_layers[0].out_features if head_layers else 0,
            num_head_layers=len(head_layers),
            has_fc_norm=not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity),
            has_final_norm=not isinstance(getattr(model, "norm", nn.Identity()), nn.Identity),
        )


def block_macs(d: ViTDims, n_in: int, n_out: int, q_rows: int | None = None, merges: bool = False) -> int:
    """Multiply-adds of one block: n_in tokens enter, n_out reach the MLP.

    q_rows: queries computed (default n_in; the protected tokens in a class-token model's
    last block). merges: the block has a merge step (adds its similarity product).
    """
    c, a = d.embed_dim, d.attn_dim
    q = n_in if q_rows is None else q_rows
    macs = LAYERNORM_MACS_PER_ELEMENT * n_in * c  # norm1
    macs += n_in * c * 2 * a + q * c * a  # keys and values for all tokens, queries for q
    macs += 2 * q * n_in * a  # q.k and attention.v
    macs += q * a * c  # output projection
    if merges:
        na, nb = set_sizes(n_in, d.num_prefix, ALTERNATE)  # Na * Nb is the same for either split
        macs += na * nb * d.head_dim
    macs += LAYERNORM_MACS_PER_ELEMENT * n_out * c  # norm2
    macs += 2 * n_out * c * d.mlp_hidden  # fc1 and fc2
    return macs


def _stem_and_head_macs(d: ViTDims, final_tokens: int) -> int:
    macs = d.num_patches * d.patch_macs * d.embed_dim
    if d.has_final_norm:
        macs += LAYERNORM_MACS_PER_ELEMENT * final_tokens * d.embed_dim
    if d.has_fc_norm:
        macs += LAYERNORM_MACS_PER_ELEMENT * d.embed_dim
    return macs + d.num_head_layers * d.embed_dim * d.num_classes


def baseline_macs(d: ViTDims) -> int:
    """The unpatched timm model: every block sees every token."""
    n = d.num_tokens
    return d.depth * block_macs(d, n, n) + _stem_and_head_macs(d, n)


def image_macs(d: ViTDims, tokens: list[int], r: list[int], merges: list[bool], prefix_last: bool) -> int:
    """The patched model for one image.

    tokens[i]: tokens entering block i; r[i]: pairs block i merged; merges[i]: block i has a
    merge step; prefix_last: the last block keeps only the protected tokens (class-token heads).
    """
    total = 0
    for i, (n_in, r_i, has_step) in enumerate(zip(tokens, r, merges)):
        if prefix_last and i == d.depth - 1:
            total += block_macs(d, n_in, d.num_prefix, q_rows=d.num_prefix)
            n_final = d.num_prefix
        else:
            n_final = n_in - r_i
            total += block_macs(d, n_in, n_final, merges=has_step)
    return total + _stem_and_head_macs(d, n_final)


def atm_gflops(d: ViTDims, per_image_tokens: list[list[int]], per_image_r: list[list[int]],
               merges: list[bool], prefix_last: bool) -> float:
    """Batch-averaged GFLOPs of the patched model."""
    per_image = [image_macs(d, t, r, merges, prefix_last) for t, r in zip(per_image_tokens, per_image_r)]
    return sum(per_image) / len(per_image) / 1e9


def baseline_gflops(d: ViTDims) -> float:
    return baseline_macs(d) / 1e9


def run_gflops(model, stats) -> float:
    """Batch-averaged GFLOPs of an ATMVisionTransformer's last run (``model.last_stats``)."""
    d = ViTDims.from_timm(model.vit)
    merges = [step is not None for step in model.steps]
    return atm_gflops(d, stats.per_image_tokens, stats.per_image_r, merges, model.class_token_head)
