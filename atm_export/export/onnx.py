"""ONNX export: one export path, two flavours, plus the unmerged baseline for benchmarks.

- ``model.plugin.onnx``: every merge step is one ``atm_export.TokenMerge`` node (for TensorRT
  with the project's plugin, or ONNX Runtime with the reference kernel).
- ``model.onnx``: the same graph with each TokenMerge node lowered to standard ops
  (``lowering.py``): stock ONNX Runtime, and TensorRT without the plugin.

Inputs and outputs of both: ``images`` [B, 3, H, W] float32 -> ``logits`` [B, K] float32 and
``tokens_per_layer`` [depth] int64 (tokens entering each block, the same for the whole batch).
The batch dimension is dynamic; token dimensions inside are data-dependent.
"""

from __future__ import annotations

import copy
import json
import warnings

import onnx
import torch
from torch import nn

from .. import __version__
from ..errors import UserError
from .. import contract
from ..ops import onnx_translation, register_onnx_schema
from ..patch import ATMVisionTransformer
from .blockwise import export_blockwise
from .trace_cache import TraceCache
from .lowering import MIN_OPSET, lower_model

DEFAULT_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "tokens_per_layer")
METADATA_PREFIX = "atm_export."
MAX_BATCH = 4096


class _ExportView(nn.Module):
    """``forward`` = the patched model's custom-op forward with explicit attention, for torch.export.

    typical_tokens: per block, the sample run's kept tokens (ATMVisionTransformer.forward_export).
    half: the model runs in float16 between a cast of the images and a cast of the logits back
    to float32 (an fp16-typed graph whose inputs and outputs stay float32).
    """

    def __init__(self, atm: ATMVisionTransformer, typical_tokens: list[float] | None = None, half: bool = False):
        super().__init__()
        self.atm = atm
        self.typical_tokens = typical_tokens
        self.half = half

    def forward(self, images: torch.Tensor):
        if not self.half:
            return self.atm.forward_export(images, explicit_attention=True, typical_tokens=self.typical_tokens)
        logits, tokens = self.atm.forward_export(images.half(), explicit_attention=True,
                                                 typical_tokens=self.typical_tokens)
        return logits.float(), tokens


def check_opset(opset: int) -> int:
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset} is too old: the exported graph needs opset {MIN_OPSET} or newer")
    if opset > 23:
        raise UserError(f"--opset {opset} is newer than atm-export supports (17..23)")
    return opset


def _batch_of_two(example: torch.Tensor) -> torch.Tensor:
    return example.repeat(2, 1, 1, 1) if example.shape[0] < 2 else example  # a batch of one would be specialised to 1


def _torch_export(module: nn.Module, example: torch.Tensor, opset: int, output_names, **kwargs) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = _batch_of_two(example)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(output_names),
            dynamic_shapes=({0: batch},), verbose=False, **kwargs,
        )
    return program.model_proto


def set_metadata(proto: onnx.ModelProto, **fields) -> None:
    """Record ``fields`` (JSON-encoded) as ``atm_export.<key>`` metadata properties."""
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in fields.items():
        text = value if isinstance(value, str) else json.dumps(value)
        full = METADATA_PREFIX + key
        if full in existing:
            existing[full].value = text
        else:
            proto.metadata_props.add(key=full, value=text)


def read_metadata(model: onnx.ModelProto) -> dict:
    out = {}
    for p in model.metadata_props:
        if p.key.startswith(METADATA_PREFIX):
            key = p.key[len(METADATA_PREFIX):]
            try:
                out[key] = json.loads(p.value)
            except json.JSONDecodeError:
                out[key] = p.value
    return out


def export_plugin_flavour(atm: ATMVisionTransformer, example: torch.Tensor, opset: int = DEFAULT_OPSET,
                          metadata: dict | None = None, typical_tokens: list[float] | None = None,
                          half: bool = False, blockwise: bool = True,
                          trace_cache: TraceCache | None = None) -> onnx.ModelProto:
    """``model.plugin.onnx``: the patched model with one TokenMerge node per merge step.

    typical_tokens: per block, the tokens a sample run kept after that block's merge; the op's
    translation records them as each node's ``opt_num_tokens`` (TensorRT's tuning value for the
    data-dependent count), and the model's input token count as every node's ``max_num_tokens``.
    half: an fp16-typed graph (``model.fp16.plugin.onnx``): weights and activations float16,
    merge sizes float32, ``images`` and ``logits`` float32. Strongly typed TensorRT builds
    (TensorRT 11 always) take their precision from these types. ``atm`` is left unchanged.
    blockwise: trace each kind of block once and reuse it (``blockwise.py``: the same graph,
    several times faster); the whole model is traced where the blocks do not fit that scheme.
    trace_cache: where blockwise traces are looked up and kept (``trace_cache.py``: the same graph
    again without torch.export); None traces every time.
    """
    check_opset(opset)
    register_onnx_schema()
    if half:
        atm = copy.deepcopy(atm).half()  # the caller's model (and the timm model it shares) stay float32
    model = None
    if blockwise:
        try:
            model = export_blockwise(atm, _batch_of_two(example), opset, typical_tokens, half, MAX_BATCH,
                                     trace_cache)
        except Exception:  # NotBlockwise, or a trace the pieces do not allow: the whole model, traced at once
            model = None
    if model is None:
        model = _torch_export(_ExportView(atm, typical_tokens, half).eval(), example, opset, OUTPUT_NAMES,
                              custom_translation_table=onnx_translation())
    merge_blocks = [i + 1 for i, step in enumerate(atm.steps) if step is not None]
    for node, block in zip([n for n in model.graph.node if contract.is_token_merge(n)], merge_blocks):
        node.name = contract.node_name(block)
    _cast_counts_to_int64(model)
    model.graph.name = "atm_vit"
    model.doc_string = "ATM-merged ViT exported by atm-export; see docs/token-merge-op.md"
    set_metadata(model, **(metadata or {}), version=__version__, flavour="plugin", token_merge_version=contract.VERSION,
                 dtype="float16" if half else "float32")
    return model


def _cast_counts_to_int64(model: onnx.ModelProto) -> None:
    """Follow every TokenMerge's num_tokens with a Cast to int64.

    TensorRT's plugin returns its count as INT32 (a size tensor for an adaptive node, the type
    every TensorRT header documents), while the op and the rest of the graph use int64; for
    ONNX Runtime the cast is a no-op.
    """
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if contract.is_token_merge(node):
            count = node.output[2]
            node.output[2] = f"{node.name}_count"
            nodes.append(onnx.helper.make_node("Cast", [node.output[2]], [count], name=f"{node.name}_count_int64",
                                               to=onnx.TensorProto.INT64))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def portable_flavour(plugin_model: onnx.ModelProto) -> onnx.ModelProto:
    """``model.onnx``: the plugin flavour with its TokenMerge nodes lowered to standard ops."""
    model = lower_model(plugin_model)
    set_metadata(model, flavour="portable")
    return model


class _HalfView(nn.Module):
    """A copy of ``module`` in float16 between float32 ``images`` and float32 logits."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module).half()

    def forward(self, images: torch.Tensor):
        return self.module(images.half()).float()


def export_baseline(vit: nn.Module, example: torch.Tensor, opset: int = DEFAULT_OPSET,
                    metadata: dict | None = None, half: bool = False) -> onnx.ModelProto:
    """The unmerged timm model (the benchmarks' baseline), with the same input and logits output;
    half: fp16-typed like export_plugin_flavour's (``vit`` is left unchanged)."""
    check_opset(opset)
    model = _torch_export((_HalfView(vit) if half else vit).eval(), example, opset, OUTPUT_NAMES[:1])
    set_metadata(model, **(metadata or {}), version=__version__, flavour="baseline",
                 dtype="float16" if half else "float32")
    return model


def custom_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(domain, op_type) of every node outside the standard ONNX domains."""
    return [(n.domain, n.op_type) for n in model.graph.node if n.domain not in ("", "ai.onnx")]


def check_model(model: onnx.ModelProto, flavour: str, path=None) -> None:
    """onnx.checker's full check, plus the flavour's rule on custom nodes. ``path``: the file
    ``model`` was saved to or read from; the checker reads that (the only way past protobuf's
    2 GiB, and how it finds a side file of weights)."""
    register_onnx_schema()
    onnx.checker.check_model(model if path is None else str(path), full_check=True)
    customs = set(custom_nodes(model))
    if flavour == "plugin" and customs - {(contract.DOMAIN, contract.OP_TYPE)}:
        raise ValueError(f"plugin flavour has custom nodes other than TokenMerge: {sorted(customs)}")
    if flavour in ("portable", "baseline") and customs:
        raise ValueError(f"{flavour} flavour must hold standard ops only, found {sorted(customs)}")


def with_fixed_schedule(plugin_model: onnx.ModelProto, r_per_block: list[int]) -> onnx.ModelProto:
    """A copy whose TokenMerge nodes merge a fixed r each (a recorded schedule, for benchmarks)."""
    replay = onnx.ModelProto()
    replay.CopyFrom(plugin_model)
    for node in replay.graph.node:
        if contract.is_token_merge(node):
            set_int_attribute(node, "fixed_r", int(r_per_block[contract.node_block(node.name) - 1]))
    return replay


def set_int_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    """Set (or add) an integer attribute of ``node``."""
    for attr in node.attribute:
        if attr.name == name:
            attr.i = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))
