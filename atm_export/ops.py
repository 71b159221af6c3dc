"""The TokenMerge op (atm_export/contract.py) as a PyTorch custom op and as an ONNX node.

- ``torch.ops.atm_export.token_merge``: a custom op whose real implementation is
  ``atm_export.merge.token_merge`` and whose fake implementation declares the output token
  count (data-dependent for a threshold; static for a fixed r on a static N), so that
  ``torch.export`` records one opaque node per merge step instead of tracing through the
  merge internals.
- ``register_onnx_schema()``: the ONNX schema of ``atm_export.TokenMerge``, so that
  ``onnx.checker`` validates the nodes and the exporter can emit them.
- ``onnx_translation``: how the exporter turns the custom op into that node.
"""

from __future__ import annotations

import torch

from dataclasses import astuple

from . import contract
from . import merge as M


@torch.library.custom_op("atm_export::token_merge", mutates_args=())
def token_merge(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor,
    threshold: float, fixed_r: int, split_mode: int, num_protected: int,
    opt_num_tokens: int, max_num_tokens: int, weighting: int, salience_temperature: float,
    r_max: int, redundancy_mean: float, redundancy_std: float, redundancy_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One merge step. x [B,N,C], size [B,N] float32, metric [B,N,D] ->
    (x_out [B,N-r,C], size_out [B,N-r], num_tokens int64 scalar).

    The arguments after the tensors are contract.Attributes in their order. opt_num_tokens and
    max_num_tokens are TensorRT's hints, carried to the ONNX node; the math ignores them."""
    attrs = contract.Attributes(threshold, fixed_r, split_mode, num_protected, opt_num_tokens, max_num_tokens,
                                weighting, salience_temperature, r_max, redundancy_mean, redundancy_std,
                                redundancy_scale)
    step = M.token_merge(x, size, metric, **attrs.merge_kwargs())
    return step.x, step.size, torch.tensor(step.x.shape[1], dtype=torch.int64)


@token_merge.register_fake
def _token_merge_fake(x, size, metric, threshold, fixed_r, split_mode, num_protected, *hints_and_adamerge):
    batch, n, c = x.shape
    if fixed_r >= 0 and isinstance(n, int):  # known from N: a static dimension
        n_out = M.tokens_after_fixed_r(n, fixed_r, num_protected)
    else:  # data-dependent (at most floor((N - P) / 2) tokens go)
        n_out = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((batch, n_out, c)), size.new_empty((batch, n_out)), torch.empty((), dtype=torch.int64)


def token_merge_call(x, size, metric, attributes: contract.Attributes):
    """Call the custom op with a node's attributes. Returns (x, size, num_tokens)."""
    return torch.ops.atm_export.token_merge(x, size, metric, *astuple(attributes))


_DOCS = {
    "threshold": "merge pairs more similar than this (when fixed_r < 0)",
    "fixed_r": "if >= 0, merge this many pairs (at most floor(M / 2))",
    "split_mode": "0 alternate (ToMe's split), 1 size-distinctive",
    "num_protected": "leading tokens never merged",
    "opt_num_tokens": "typical output token count, TensorRT's tuning value (-1: unknown)",
    "max_num_tokens": "the model's input token count, a bound on N for TensorRT (-1: unknown)",
    "weighting": "0 size-weighted average (ATM, ToMe), 1 salience-weighted scores and average (AdaMerge)",
    "salience_temperature": "tau of the salience softmax(u u^T / tau) (weighting 1)",
    "r_max": "if >= 0 (and fixed_r < 0): AdaMerge's intensity rule with at most r_max merges per image",
    "redundancy_mean": "the layer's calibrated mean of the redundancy (intensity rule)",
    "redundancy_std": "the layer's calibrated spread of the redundancy (intensity rule, > 0)",
    "redundancy_scale": "the slope of the intensity rule's sigmoid",
    "plugin_version": "TensorRT plugin lookup",
    "plugin_namespace": "TensorRT plugin lookup",
}


def register_onnx_schema() -> None:
    """Register ``atm_export.TokenMerge`` with onnx, once (so the checker knows the node)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(contract.OP_TYPE, contract.DOMAIN):
        return
    schema = OpSchema(
        contract.OP_TYPE, contract.DOMAIN, contract.VERSION,
        doc="One ATM token-merge step with a data-dependent output token count (docs/token-merge-op.md).",
        inputs=[
            OpSchema.FormalParameter("x", "T", "tokens [B, N, C]"),
            OpSchema.FormalParameter("size", "tensor(float)", "merging sizes [B, N]"),
            OpSchema.FormalParameter("metric", "T", "similarity features [B, N, D]"),
        ],
        outputs=[
            OpSchema.FormalParameter("x_out", "T", "merged tokens [B, N - r, C]"),
            OpSchema.FormalParameter("size_out", "tensor(float)", "merged sizes [B, N - r]"),
            OpSchema.FormalParameter("num_tokens", "tensor(int64)",
                                     "N - r, a scalar (TensorRT's plugin: int32, cast to int64 in the graph)"),
        ],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "token and metric type")],
        attributes=[OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), _DOCS[name])
                    for name, default in contract.DEFAULTS.items()],
    )
    onnx.defs.register_schema(schema)


def onnx_translation():
    """The exporter's translation of ``atm_export::token_merge`` into an ``atm_export.TokenMerge`` node."""
    import onnxscript

    register_onnx_schema()
    opset = onnxscript.values.Opset(contract.DOMAIN, contract.VERSION)

    def token_merge_onnx(x, size, metric, threshold: float, fixed_r: int, split_mode: int, num_protected: int,
                         opt_num_tokens: int, max_num_tokens: int, weighting: int, salience_temperature: float,
                         r_max: int, redundancy_mean: float, redundancy_std: float, redundancy_scale: float):
        return opset.TokenMerge(
            x, size, metric,
            threshold=threshold, fixed_r=fixed_r, split_mode=split_mode, num_protected=num_protected,
            opt_num_tokens=opt_num_tokens, max_num_tokens=max_num_tokens, weighting=weighting,
            salience_temperature=salience_temperature, r_max=r_max, redundancy_mean=redundancy_mean,
            redundancy_std=redundancy_std, redundancy_scale=redundancy_scale, **contract.LOOKUP_KEYS,
        )

    return {torch.ops.atm_export.token_merge.default: token_merge_onnx}
