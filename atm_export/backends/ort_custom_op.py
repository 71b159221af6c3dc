"""A reference kernel for ``atm_export.TokenMerge`` in ONNX Runtime, without ORT's C headers.

onnxruntime-extensions runs Python functions as custom ops, but only in its own domain
(``ai.onnx.contrib``). So the plugin-flavour model is run through an in-memory copy whose
TokenMerge nodes are moved to that domain; the file on disk keeps the project's domain.
The kernel itself calls the PyTorch implementation (atm_export.merge), so this backend checks
the exported graph's wiring around the op, not a second implementation of the math. It copies
its outputs through Python lists (onnxruntime-extensions' interface), so it is slow for large
batches: a validation backend, not a deployment one.

``replaying(plans)`` makes the kernel apply recorded merge choices (eager PyTorch's) instead
of making its own: the graph around the op is then checked to float precision even where a
near-tie would let the two runs choose differently. The kernel still makes its own decision
from the node's attributes on the replayed inputs and records it (``Replay.decisions``), so
that a replay also checks the attributes, not only the wiring.

An exception must never leave the kernel: ONNX Runtime calls it from C++, and a Python
exception crossing back aborts the whole process. The kernel records the first one instead and
returns placeholder outputs; ``raise_kernel_error()``, called after ``InferenceSession.run``,
raises it where Python can handle it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from .. import merge as M
from ..ops import ONNX_DOMAIN, ONNX_OP, PLUGIN_NAMESPACE, PLUGIN_VERSION, SPLIT_NAMES

EXTENSIONS_DOMAIN = "ai.onnx.contrib"
#: onnxruntime-extensions insists that a node carries every attribute the kernel declares.
ATTRIBUTE_DEFAULTS = {"threshold": 1.0, "fixed_r": -1, "split_mode": 0, "num_protected": 1, "opt_num_tokens": -1,
                      "plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}
_registered = False


@dataclass
class Replay:
    """Recorded plans to apply, one per TokenMerge call in order, and the nodes' own decisions."""

    plans: list
    decisions: list = field(default_factory=list)  # per call: the MergeStep the node's attributes give


_replay: Replay | None = None
_kernel_error: BaseException | None = None


@contextmanager
def replaying(plans: list):
    """Within this block, the kernel applies ``plans`` (one per TokenMerge call, in order)."""
    global _replay
    _replay = Replay(list(plans))
    try:
        yield _replay
        if _replay.plans:
            raise RuntimeError(f"{len(_replay.plans)} recorded merge steps were not replayed: the graph has fewer merges")
    finally:
        _replay = None


def raise_kernel_error() -> None:
    """Raise (and forget) the first exception the kernel caught since the last call, if any."""
    global _kernel_error
    error, _kernel_error = _kernel_error, None
    if error is not None:
        raise error


def _own_step(x, size, metric, threshold, fixed_r, split_mode, num_protected) -> M.MergeStep:
    return M.token_merge(
        x, size, metric,
        threshold=None if fixed_r >= 0 else float(threshold),
        r=int(fixed_r) if fixed_r >= 0 else None,
        split_mode=SPLIT_NAMES[int(split_mode)],
        num_protected=int(num_protected),
    )


def _replay_next(x: torch.Tensor, size: torch.Tensor, own: M.MergeStep):
    if not _replay.plans:
        raise RuntimeError("the graph has more TokenMerge calls than recorded merge steps")
    plan = _replay.plans.pop(0)
    if plan.out_index.shape[0] != x.shape[0] or int(plan.out_index.max()) >= x.shape[1]:
        raise RuntimeError(f"recorded merge step does not fit input {tuple(x.shape)}")
    _replay.decisions.append(own)
    return M.merge_weighted(plan, x, size)


def _kernel(x, size, metric, threshold=1.0, fixed_r=-1, split_mode=0, num_protected=1, **_lookup_attrs):
    global _kernel_error
    try:
        tensors = [torch.from_numpy(np.ascontiguousarray(t)) for t in (x, size, metric)]
        step = _own_step(*tensors, threshold, fixed_r, split_mode, num_protected)
        x_out, size_out = (step.x, step.size) if _replay is None else _replay_next(tensors[0], tensors[1], step)
        return x_out.numpy(), size_out.numpy(), np.array(x_out.shape[1], dtype=np.int64)
    except BaseException as exc:  # noqa: BLE001 - see the module docstring: nothing may cross into C++
        if _kernel_error is None:
            _kernel_error = exc
        return x, size, np.array(x.shape[1], dtype=np.int64)


def register() -> str:
    """Register the Python kernel with onnxruntime-extensions; returns its library path."""
    global _registered
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _registered:
        onnx_op(
            op_type=ONNX_OP,
            inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
            outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
            attrs={
                "threshold": PyCustomOpDef.dt_float,
                "fixed_r": PyCustomOpDef.dt_int64,
                "split_mode": PyCustomOpDef.dt_int64,
                "num_protected": PyCustomOpDef.dt_int64,
                "opt_num_tokens": PyCustomOpDef.dt_int64,
                "plugin_version": PyCustomOpDef.dt_string,
                "plugin_namespace": PyCustomOpDef.dt_string,
            },
        )(_kernel)
        _registered = True
    return get_library_path()


def to_extensions_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """An in-memory copy whose TokenMerge nodes live in onnxruntime-extensions' domain."""
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    for node in moved.graph.node:
        if node.domain == ONNX_DOMAIN and node.op_type == ONNX_OP:
            node.domain = EXTENSIONS_DOMAIN
            present = {a.name for a in node.attribute}
            node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in ATTRIBUTE_DEFAULTS.items()
                                  if k not in present)
    imports = [o for o in moved.opset_import if o.domain != ONNX_DOMAIN]
    imports.append(onnx.helper.make_opsetid(EXTENSIONS_DOMAIN, 1))
    del moved.opset_import[:]
    moved.opset_import.extend(imports)
    return moved
