"""The TokenMerge op (docs/token-merge-op.md) as a PyTorch custom op and as an ONNX node.

- ``torch.ops.atm_export.token_merge``: a custom op whose real implementation is
  ``atm_export.merge.token_merge`` and whose fake implementation declares the data-dependent
  token count, so that ``torch.export`` records one opaque node per merge step instead of
  tracing through the merge internals.
- ``ONNX_DOMAIN`` / ``register_onnx_schema()``: the ONNX schema of ``atm_export.TokenMerge``,
  so that ``onnx.checker`` validates the nodes and the exporter can emit them.
- ``onnx_translation``: how the exporter turns the custom op into that node.
"""

from __future__ import annotations

import torch

from . import merge as M
from .schedule import StepSpec

ONNX_DOMAIN = "atm_export"
ONNX_OP = "TokenMerge"
#: 2: ToMe's split of the whole sequence and the floor(M/2) cap (version 1 split after the
#: protected tokens and let r reach ceil(M/2)); a contract change, so TensorRT and the checks
#: refuse graphs of the other version rather than run them with the wrong split.
OP_VERSION = 2
PLUGIN_VERSION = str(OP_VERSION)
PLUGIN_NAMESPACE = ONNX_DOMAIN

SPLIT_CODES = {M.ALTERNATE: 0, M.SIZE_DISTINCTIVE: 1}
SPLIT_NAMES = {code: name for name, code in SPLIT_CODES.items()}
NODE_PREFIX = f"{ONNX_OP}_b"


def merge_node_name(block: int) -> str:
    """The name of the TokenMerge node of ``block`` (1-based) in an exported graph."""
    return f"{NODE_PREFIX}{block}"


def merge_node_block(name: str) -> int | None:
    """The block (1-based) a TokenMerge node name stands for, or None for another name."""
    head, _, number = name.partition(NODE_PREFIX)
    return int(number) if not head and number.isdigit() else None


def step_attributes(step: StepSpec, num_protected: int) -> dict:
    """The math attributes of the TokenMerge node for one block's StepSpec."""
    return {
        "threshold": 1.0 if step.threshold is None else float(step.threshold),
        "fixed_r": -1 if step.r is None else int(step.r),
        "split_mode": SPLIT_CODES[step.split_mode],
        "num_protected": int(num_protected),
    }


@torch.library.custom_op("atm_export::token_merge", mutates_args=())
def token_merge(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor,
    threshold: float, fixed_r: int, split_mode: int, num_protected: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One merge step. x [B,N,C], size [B,N] float32, metric [B,N,D] ->
    (x_out [B,N-r,C], size_out [B,N-r], num_tokens int64 scalar)."""
    step = M.token_merge(
        x, size, metric,
        threshold=None if fixed_r >= 0 else threshold,
        r=fixed_r if fixed_r >= 0 else None,
        split_mode=SPLIT_NAMES[split_mode],
        num_protected=num_protected,
    )
    num_tokens = torch.tensor(step.x.shape[1], dtype=torch.int64)
    return step.x, step.size, num_tokens


@token_merge.register_fake
def _token_merge_fake(x, size, metric, threshold, fixed_r, split_mode, num_protected):
    batch, n, c = x.shape
    n_out = torch.library.get_ctx().new_dynamic_size()
    # What the merge guarantees: at most floor((N - P) / 2) tokens go.
    return x.new_empty((batch, n_out, c)), size.new_empty((batch, n_out)), torch.empty((), dtype=torch.int64)


def token_merge_op(x, size, metric, step: StepSpec, num_protected: int):
    """Call the custom op for one block's StepSpec. Returns (x, size, num_tokens)."""
    a = step_attributes(step, num_protected)
    return torch.ops.atm_export.token_merge(x, size, metric, a["threshold"], a["fixed_r"], a["split_mode"],
                                            a["num_protected"])


def register_onnx_schema() -> None:
    """Register ``atm_export.TokenMerge`` with onnx, once (so the checker knows the node)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(ONNX_OP, ONNX_DOMAIN):
        return
    attr = OpSchema.Attribute
    schema = OpSchema(
        ONNX_OP, ONNX_DOMAIN, OP_VERSION,
        doc="One ATM token-merge step with a data-dependent output token count (docs/token-merge-op.md).",
        inputs=[
            OpSchema.FormalParameter("x", "T", "tokens [B, N, C]"),
            OpSchema.FormalParameter("size", "tensor(float)", "merging sizes [B, N]"),
            OpSchema.FormalParameter("metric", "T", "similarity features [B, N, D]"),
        ],
        outputs=[
            OpSchema.FormalParameter("x_out", "T", "merged tokens [B, N - r, C]"),
            OpSchema.FormalParameter("size_out", "tensor(float)", "merged sizes [B, N - r]"),
            OpSchema.FormalParameter("num_tokens", "tensor(int64)", "N - r, a scalar"),
        ],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "token and metric type")],
        attributes=[
            attr("threshold", onnx.helper.make_attribute("threshold", 1.0), "merge pairs more similar than this"),
            attr("fixed_r", onnx.helper.make_attribute("fixed_r", -1), "if >= 0, merge this many pairs"),
            attr("split_mode", onnx.helper.make_attribute("split_mode", 0), "0 alternate, 1 size-distinctive"),
            attr("num_protected", onnx.helper.make_attribute("num_protected", 1), "leading tokens never merged"),
            attr("opt_num_tokens", onnx.helper.make_attribute("opt_num_tokens", -1),
                 "typical output token count, TensorRT's tuning value (-1: unknown)"),
            attr("plugin_version", onnx.helper.make_attribute("plugin_version", PLUGIN_VERSION), "TensorRT plugin lookup"),
            attr("plugin_namespace", onnx.helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE), "TensorRT plugin lookup"),
        ],
    )
    onnx.defs.register_schema(schema)


def onnx_translation():
    """The exporter's translation of ``atm_export::token_merge`` into an ``atm_export.TokenMerge`` node."""
    import onnxscript

    register_onnx_schema()
    opset = onnxscript.values.Opset(ONNX_DOMAIN, OP_VERSION)

    def token_merge_onnx(x, size, metric, threshold: float, fixed_r: int, split_mode: int, num_protected: int):
        return opset.TokenMerge(
            x, size, metric,
            threshold=threshold, fixed_r=fixed_r, split_mode=split_mode, num_protected=num_protected,
            plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE,
        )

    return {torch.ops.atm_export.token_merge.default: token_merge_onnx}
