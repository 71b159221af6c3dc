"""A reference kernel for ``atm_export.TokenMerge`` in ONNX Runtime, without ORT's C headers.

onnxruntime-extensions runs Python functions as custom ops, but only in its own domain
(``ai.onnx.contrib``). So the plugin-flavour model is run through an in-memory copy whose
TokenMerge nodes are moved to that domain; the file on disk keeps the project's domain.
The kernel itself calls the PyTorch implementation (atm_export.merge), so this backend checks
the exported graph's wiring around the op, not a second implementation of the math. It copies
its outputs through Python lists (onnxruntime-extensions' interface), so it is slow for large
batches: a validation backend, not a deployment one.

A :class:`Replay` makes the kernel apply recorded merge choices (eager PyTorch's) instead of
making its own: the graph around the op is then checked to float precision even where a
near-tie would let the two runs choose differently. The kernel still makes its own decision
from the node's attributes on the replayed inputs and records it (``Replay.decisions``), so
that a replay also checks the attributes, not only the wiring. A replay belongs to the runner
that was built with it (atm_export.backends.ort), which makes it the kernel's state for the
duration of its own ``InferenceSession.run`` only (:func:`kernel_calls`).

An exception must never leave the kernel: ONNX Runtime calls it from C++, and a Python
exception crossing back aborts the whole process. The kernel records the first one instead and
returns placeholder outputs; :func:`kernel_calls` raises it once the run has returned.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from .. import contract
from .. import merge as M

EXTENSIONS_DOMAIN = "ai.onnx.contrib"
_registered = False


@dataclass
class Replay:
    """Recorded plans to apply, one per TokenMerge call in graph order, and the nodes' own decisions."""

    plans: list
    decisions: list = field(default_factory=list)  # per call: the MergeStep the node's attributes give
    applied: int = 0


_replay: Replay | None = None  # the replay of the run in progress (set by kernel_calls only)
_kernel_error: BaseException | None = None


@contextmanager
def kernel_calls(replay: Replay | None = None):
    """The kernel's state for one ``InferenceSession.run``: ``replay`` (or none), and the first
    exception the kernel caught, raised when the run has returned."""
    global _replay, _kernel_error
    if replay is not None:
        replay.decisions, replay.applied = [], 0
    _replay, _kernel_error = replay, None
    try:
        yield
    finally:
        error, _replay, _kernel_error = _kernel_error, None, None
    if error is not None:
        raise error
    if replay is not None and replay.applied != len(replay.plans):
        raise RuntimeError(f"{len(replay.plans) - replay.applied} recorded merge steps were not replayed: "
                           "the graph has fewer merges")


def _replay_next(x: torch.Tensor, size: torch.Tensor, own: M.MergeStep):
    if _replay.applied >= len(_replay.plans):
        raise RuntimeError("the graph has more TokenMerge calls than recorded merge steps")
    plan = _replay.plans[_replay.applied]
    if plan.out_index.shape[0] != x.shape[0] or int(plan.out_index.max()) >= x.shape[1]:
        raise RuntimeError(f"recorded merge step does not fit input {tuple(x.shape)}")
    _replay.applied += 1
    _replay.decisions.append(own)
    return M.merge_weighted(plan, x, size)


def _kernel(x, size, metric, **attributes):
    global _kernel_error
    try:
        tensors = [torch.from_numpy(np.ascontiguousarray(t)) for t in (x, size, metric)]
        step = M.token_merge(*tensors, **contract.Attributes.from_values(attributes).merge_kwargs())
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
        _ATTRIBUTE_TYPE = {float: PyCustomOpDef.dt_float, int: PyCustomOpDef.dt_int64, str: PyCustomOpDef.dt_string}
        onnx_op(
            op_type=contract.OP_TYPE,
            inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
            outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
            attrs={name: _ATTRIBUTE_TYPE[type(default)] for name, default in contract.DEFAULTS.items()},
        )(_kernel)
        _registered = True
    return get_library_path()


def to_extensions_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """An in-memory copy whose TokenMerge nodes live in onnxruntime-extensions' domain.

    onnxruntime-extensions insists that a node carries every attribute the kernel declares,
    so the missing ones get the contract's defaults.
    """
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    for node in moved.graph.node:
        if contract.is_token_merge(node):
            node.domain = EXTENSIONS_DOMAIN
            present = {a.name for a in node.attribute}
            node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in contract.DEFAULTS.items()
                                  if k not in present)
    imports = [o for o in moved.opset_import if o.domain != contract.DOMAIN]
    imports.append(onnx.helper.make_opsetid(EXTENSIONS_DOMAIN, 1))
    del moved.opset_import[:]
    moved.opset_import.extend(imports)
    return moved
