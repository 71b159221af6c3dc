"""Export the plugin flavour a block at a time: trace each kind of block once, reuse it.

torch.export spends its time on symbolic shape reasoning, and a merge step's data-dependent
token count makes every op after it costlier to trace (docs/benchmarks.md: DeiT-S exports in
8.8 s without merge steps, 33 s with them). The blocks after the first merge are alike except
for their weights and their TokenMerge attributes, so this exporter traces:

- the *prologue*: the embedding and every block up to the first merging block (static token
  count; out: tokens, sizes, the count after that merge, the counts entering those blocks);
- one *middle* block of each kind (merging or not), with a dynamic token count, standing for
  every block of its kind between the prologue and the last block;
- the *epilogue*: the last block, the final norm and the head.

All pieces go through one ``torch.onnx.export`` call (``_Pieces``: each its own inputs and
dims; the call has a fixed cost of seconds), and ``split`` cuts the graph back into them.
``stitch`` then wires copies of them into one graph, each copy with its own block's weights and
merge attributes, ``tokens_per_layer`` concatenated from the counts, and runs the exporter's own
optimizer once over the whole (the trace is left unoptimized, so that every weight is a
parameter of its block, not a constant folded from it). The numbers are the same ops on the same
weights; tests compare the result with the whole-model export, and every run checks it against
eager PyTorch. :class:`NotBlockwise` says when a model does not fit the scheme; the caller then
exports the whole model.

The one trace depends on the architecture and on which blocks merge, not on the weights or the
steps' settings, so ``trace_cache.py`` can keep it on disk: a later export of such a model skips
torch.export and only stitches.
"""

from __future__ import annotations

import math
import re
import warnings

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from .. import contract
from .trace_cache import TraceCache, Uncacheable, settings

#: Tensor names inside a piece that are the model's parameters (kept, and swapped per block).
PARAM_PREFIX = "atm."
#: Attributes of the patched model that the trace does not depend on: the steps' settings reach
#: the graph only as TokenMerge attributes, which ``stitch`` sets (the kinds follow which merge).
REFILLED = frozenset({"config", "steps", "last_stats"})
#: How the one trace names a parameter: by the path of the piece that uses it first.
_PIECE_PATH = re.compile(r"^(prologue|others\.\d+)\.")


class NotBlockwise(Exception):
    """The model's blocks do not fit the prologue / middle / epilogue scheme."""


class _Prologue(nn.Module):
    """images [B, 3, H, W] -> tokens [B, N', C], sizes [B, N'], the count N' (int64 scalar), the
    counts entering blocks 0..last [last + 1]."""

    def __init__(self, atm, last: int, typical_tokens, half: bool):
        super().__init__()
        self.atm, self.last, self.typical_tokens, self.half = atm, last, typical_tokens, half

    def forward(self, images):
        from ..patch import _OpMerges

        x = self.atm._embed(images.half() if self.half else images)
        merges = _OpMerges(self.atm, x.shape[1], self.typical_tokens)
        x, size = self.atm._blocks(x, merges, True, blocks=range(self.last + 1))
        return x, size, merges.count, torch.stack(merges.counts)


class _Middle(nn.Module):
    """Block ``block`` alone: (tokens, sizes) -> (tokens, sizes, count) where it merges, else tokens."""

    def __init__(self, atm, block: int, max_tokens: int, typical_tokens):
        super().__init__()
        self.atm, self.block, self.max_tokens, self.typical_tokens = atm, block, max_tokens, typical_tokens

    def forward(self, x, size):
        from ..patch import _OpMerges

        merges = _OpMerges(self.atm, self.max_tokens, self.typical_tokens)
        x, size = self.atm._blocks(x, merges, True, size=size, blocks=range(self.block, self.block + 1))
        return (x, size, merges.count) if self.atm.steps[self.block] is not None else x


class _Epilogue(nn.Module):
    """The last block, the norm and the head: (tokens, sizes) -> logits [B, K] float32."""

    def __init__(self, atm, max_tokens: int, typical_tokens, half: bool):
        super().__init__()
        self.atm, self.max_tokens, self.typical_tokens, self.half = atm, max_tokens, typical_tokens, half

    def forward(self, x, size):
        from ..patch import _OpMerges

        merges = _OpMerges(self.atm, self.max_tokens, self.typical_tokens)
        x, size = self.atm._blocks(x, merges, True, size=size, blocks=range(self.atm.depth - 1, self.atm.depth))
        logits = self.atm._head(self.atm.vit.norm(x), size)
        return logits.float() if self.half else logits


def _kind(atm, block: int) -> tuple:
    """Blocks of one kind trace to the same graph but for weights and merge attributes. The
    model code does not branch on a step's settings (split, count rule, weighting), which all
    travel as the TokenMerge node's attributes; it does on the block's modules and their
    settings (heads, eps, ...), which are therefore part of the kind."""
    try:
        modules = tuple((name, type(module).__qualname__, settings(module))
                        for name, module in atm.vit.blocks[block].named_modules())
    except Uncacheable as exc:
        raise NotBlockwise(f"block {block} cannot be compared with the others: {exc}") from None
    return ("plain" if atm.steps[block] is None else "merge", modules)


class _Pieces(nn.Module):
    """Every piece in one module, so that one trace serves them all (torch.onnx.export has a
    fixed cost per call): images and each piece's (tokens, sizes) in, every piece's outputs out.
    The pieces share no tensor, so ``split`` cuts the graph back into them."""

    def __init__(self, prologue: nn.Module, others: list[nn.Module]):
        super().__init__()
        self.prologue, self.others = prologue, nn.ModuleList(others)

    def forward(self, images, states: list):
        outputs = list(self.prologue(images))
        for i, piece in enumerate(self.others):
            out = piece(states[2 * i], states[2 * i + 1])
            outputs += list(out) if isinstance(out, tuple) else [out]
        return tuple(outputs)


def export_blockwise(atm, example: torch.Tensor, opset: int, typical_tokens, half: bool,
                     max_batch: int, cache: TraceCache | None = None) -> onnx.ModelProto:
    """The plugin flavour's graph (before node names, casts and metadata), traced piecewise.
    ``example``: a batch of at least 2 images. NotBlockwise when the model does not fit.
    ``cache``: where the trace is looked up first, and kept after tracing (trace_cache.py)."""
    depth = atm.depth
    merging = [i for i, step in enumerate(atm.steps) if step is not None]
    if not merging or merging[0] >= depth - 1:
        raise NotBlockwise("no merge step before the last block")
    if any(atm.steps[i].r is not None for i in merging):
        raise NotBlockwise("fixed-r steps: every token count is static, and a block per count would be traced")
    first = merging[0]
    n0 = int(atm._embed(example[:1].half() if half else example[:1]).shape[1])
    kinds = [_kind(atm, block) for block in range(depth)]
    representative = {}
    for block in range(first + 1, depth - 1):
        representative.setdefault(kinds[block], block)
    # piece key -> output names; the prologue first, the epilogue last
    names = {"prologue": ["x", "size", "count", "counts"],
             **{block: ["x_out", "size_out", "count"] if atm.steps[block] is not None else ["x_out"]
                for block in representative.values()},
             "epilogue": ["logits"]}
    inputs = ["prologue__images"] + [f"{key}__{n}" for key in list(names)[1:] for n in ("x", "size")]
    outputs = [f"{key}__{n}" for key, outs in names.items() for n in outs]
    cache_key = whole = None
    if cache is not None:
        try:
            cache_key = cache.key(atm, refilled=REFILLED, opset=opset, half=half, max_batch=max_batch,
                                  images=tuple(example.shape[1:]), dtype=str(example.dtype),
                                  kinds=tuple(kinds),
                                  representative=tuple(representative.items()))
        except Uncacheable as exc:
            cache.unused = str(exc)
        else:
            whole = cache.load(cache_key, inputs, outputs)
    cached = whole is not None
    if not cached:
        whole = _trace(atm, example, opset, typical_tokens, half, max_batch, first, n0, names, inputs, outputs)
        if whole.functions or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                  for n in whole.graph.node for a in n.attribute):
            raise NotBlockwise("the trace has functions or subgraphs")
    cut = {key: split(whole, key, ["images"] if key == "prologue" else ["x", "size"], outs)
           for key, outs in names.items()}
    model = stitch(atm, cut, {b: representative[kinds[b]] for b in range(first + 1, depth - 1)},
                   typical_tokens, n0)
    if cached:
        cache.hits += 1
    elif cache_key is not None:  # only a trace that stitched is kept
        cache.store(cache_key, whole, lambda name: _PIECE_PATH.sub("", name).startswith(PARAM_PREFIX))
    return model


def _trace(atm, example: torch.Tensor, opset: int, typical_tokens, half: bool, max_batch: int, first: int,
           n0: int, names: dict, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """The one torch.onnx.export call: every piece of ``names`` (its key -> its output names)
    traced on the tokens that enter its block when the model runs ``example``."""
    depth = atm.depth
    prologue = _Prologue(atm, first, typical_tokens, half).eval()
    with torch.no_grad():
        x, size, _, _ = prologue(example)
    states = {}  # block -> (tokens, sizes) entering it, for the pieces' examples
    with torch.no_grad():
        for block in range(first + 1, depth):
            states[block] = (x, size)
            out = _Middle(atm, block, n0, typical_tokens)(x, size)
            x, size = (out[0], out[1]) if isinstance(out, tuple) else (out, size)
    pieces = [_Middle(atm, key, n0, typical_tokens) for key in names if key not in ("prologue", "epilogue")]
    pieces.append(_Epilogue(atm, n0, typical_tokens, half))
    keys = list(names)[1:]
    entering = [t for key in keys for t in states[depth - 1 if key == "epilogue" else key]]
    # each piece its own batch and token dims: a shared one would be read from whichever input holds it first
    dims = [(torch.export.Dim(f"batch_{key}", min=1, max=max_batch), torch.export.Dim(f"tokens_{key}", min=1, max=n0))
            for key in keys]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        from ..ops import onnx_translation

        program = torch.onnx.export(
            _Pieces(prologue, pieces).eval(), (example, entering), dynamo=True, opset_version=opset,
            input_names=inputs, output_names=outputs,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=max_batch)},
                            [{0: batch, 1: tokens} for batch, tokens in dims for _ in range(2)]),
            verbose=False, optimize=False, custom_translation_table=onnx_translation())
    return program.model_proto


def split(model: onnx.ModelProto, key: str, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """Piece ``key`` of the one trace: the nodes its outputs need, with its inputs and outputs
    named without the ``key__`` prefix."""
    plain = {f"{key}__{n}": n for n in (*inputs, *outputs)}
    graph = model.graph
    needed = {f"{key}__{n}" for n in outputs}
    nodes = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
    if any(f"{other.name}" in needed for other in graph.input if other.name not in plain):
        raise NotBlockwise(f"piece {key} reads another piece's input")

    for init in graph.initializer:  # parameters by their model's names (the trace names them by module path)
        if init.name in needed:
            plain[init.name] = _PIECE_PATH.sub("", init.name)

    def renamed(info):
        copy = type(info)()
        copy.CopyFrom(info)
        copy.name = plain.get(info.name, info.name)
        return copy

    piece = helper.make_graph([], f"piece_{key}", [renamed(i) for i in graph.input if i.name in plain],
                              [renamed(o) for o in graph.output if o.name in plain],
                              [renamed(t) for t in graph.initializer if t.name in needed])
    for node in reversed(nodes):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [plain.get(v, v) for v in node.input]
        copy.output[:] = [plain.get(v, v) for v in node.output]
        piece.node.append(copy)
    piece.value_info.extend(renamed(v) for v in graph.value_info if v.name in needed and v.name not in plain)
    return helper.make_model(piece, ir_version=model.ir_version, opset_imports=list(model.opset_import))


def stitch(atm, pieces: dict, uses: dict[int, int], typical_tokens, n0: int) -> onnx.ModelProto:
    """One graph from the pieces: the prologue, block b of ``uses`` as a copy of the piece of
    block ``uses[b]`` (its weights and merge attributes replaced by block b's), the epilogue."""
    prologue = pieces["prologue"]
    graph = helper.make_graph([], "atm_vit", [prologue.graph.input[0]], [])
    params = nn.ModuleDict({"atm": atm}).state_dict(keep_vars=True)  # by the names the trace gives them
    added: set[str] = set()
    add = _Adder(graph, params, added)
    outs = add(prologue, "prologue/", {"images": "images"})
    first = next(i for i, step in enumerate(atm.steps) if step is not None)
    _retune_merge_nodes(graph, prologue, first, atm, typical_tokens, n0, "prologue/")
    x, size, count = outs["x"], outs["size"], outs["count"]
    counts = [outs["counts"]]
    for block, source in uses.items():
        counts.append(_unsqueezed(graph, count, block, added))
        piece = pieces[source]
        outs = add(piece, f"block{block}/", {"x": x, "size": size}, swap=(source, block))
        _retune_merge_nodes(graph, piece, block, atm, typical_tokens, n0, f"block{block}/")
        x = outs["x_out"]
        if "count" in outs:
            size, count = outs["size_out"], outs["count"]
    last = atm.depth - 1
    counts.append(_unsqueezed(graph, count, last, added))
    outs = add(pieces["epilogue"], "epilogue/", {"x": x, "size": size})
    _retune_merge_nodes(graph, pieces["epilogue"], last, atm, typical_tokens, n0, "epilogue/")
    graph.node.append(helper.make_node("Identity", [outs["logits"]], ["logits"], name="logits_out"))
    graph.node.append(helper.make_node("Concat", counts, ["tokens_per_layer"], name="tokens_per_layer_concat", axis=0))
    logits_info = onnx.ValueInfoProto()
    logits_info.CopyFrom(pieces["epilogue"].graph.output[0])
    logits_info.name = "logits"
    graph.output.extend([logits_info, helper.make_tensor_value_info("tokens_per_layer", TensorProto.INT64,
                                                                    [atm.depth])])
    model = _optimized(helper.make_model(graph, ir_version=prologue.ir_version,
                                         opset_imports=list(prologue.opset_import)), add.weights)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for info in (*model.graph.value_info, *model.graph.output):  # one batch dimension, as a whole trace names it
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param.startswith(f"{batch}_"):
                dim.dim_param = batch
    return model


class _Adder:
    """Copies a piece's nodes, weights and shapes into ``graph`` under a prefix."""

    def __init__(self, graph: onnx.GraphProto, params: dict, added: set):
        self.graph, self.params, self.added = graph, params, added
        self.weights: dict[str, torch.Tensor] = {}  # the parameters the graph uses, by initializer name

    def __call__(self, piece: onnx.ModelProto, prefix: str, inputs: dict[str, str],
                 swap: tuple[int, int] | None = None) -> dict[str, str]:
        g = piece.graph
        rename = dict(inputs)
        for init in g.initializer:
            rename[init.name] = self._weight(init, prefix, swap)
        outputs = {o.name: prefix + o.name for o in g.output}

        def name(value: str) -> str:
            if not value:
                return value
            return rename.get(value) or outputs.get(value) or prefix + value

        for node in g.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            # the exporter's notes (stack trace, FX node with its arguments) describe the traced
            # piece, not this copy of it: another block's, or (from the trace cache) another run's
            copy.ClearField("metadata_props")
            copy.name = prefix + node.name
            copy.input[:] = [name(v) for v in node.input]
            copy.output[:] = [name(v) for v in node.output]
            self.graph.node.append(copy)
        for info in g.value_info:
            if info.name not in rename:
                copy = onnx.ValueInfoProto()
                copy.CopyFrom(info)
                copy.name = name(info.name)
                self.graph.value_info.append(copy)
        for info in g.output:  # the piece's outputs are tensors of the whole graph: keep their shapes
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(info)
            copy.name = outputs[info.name]
            self.graph.value_info.append(copy)
        return outputs

    def _weight(self, init: onnx.TensorProto, prefix: str, swap: tuple[int, int] | None) -> str:
        if not init.name.startswith(PARAM_PREFIX):  # a constant of the trace (shapes, scalars)
            if math.prod(init.dims) > 64:
                raise NotBlockwise(f"a piece holds a large constant {init.name} that is not a parameter")
            new, tensor = prefix + init.name, None
        else:
            new = init.name
            if swap is not None:
                source, block = swap
                old = f"{PARAM_PREFIX}vit.blocks.{source}."
                if not init.name.startswith(old):
                    raise NotBlockwise(f"block {source}'s piece holds {init.name}, not a parameter of its own")
                new = f"{PARAM_PREFIX}vit.blocks.{block}." + init.name[len(old):]
            tensor = self.params.get(new)
            if tensor is None or list(tensor.shape) != list(init.dims):
                raise NotBlockwise(f"no parameter {new} of the shape {list(init.dims)}")
        if new not in self.added:
            self.added.add(new)
            copy = onnx.TensorProto()
            if tensor is None:
                copy.CopyFrom(init)
            else:  # a parameter: its bytes stay in the torch model until the final proto (_optimized)
                copy.dims[:], copy.data_type = init.dims, init.data_type
                self.weights[new] = tensor
            copy.name = new
            self.graph.initializer.append(copy)
        return new


def _retune_merge_nodes(graph: onnx.GraphProto, piece: onnx.ModelProto, block: int, atm, typical_tokens,
                        n0: int, prefix: str) -> None:
    """Give the TokenMerge node copied for ``block`` that block's attributes (threshold, r, ...,
    and TensorRT's hints), as the whole-model export would: a piece was traced for another block,
    or (from the trace cache) for another run's settings."""
    from ..patch import _OpMerges

    names = {prefix + n.name for n in piece.graph.node if contract.is_token_merge(n)}
    if not names:
        return
    if len(names) > 1:
        raise NotBlockwise(f"the piece copied for block {block} has {len(names)} merge steps")
    values = _OpMerges(atm, n0, typical_tokens).attributes(block, atm.steps[block]).onnx()
    for node in graph.node:
        if node.name in names:
            for attr in node.attribute:
                if attr.name in values:
                    attr.CopyFrom(helper.make_attribute(attr.name, values[attr.name]))


def _unsqueezed(graph: onnx.GraphProto, count: str, block: int, added: set) -> str:
    """``count`` (an int64 scalar) as a [1] tensor, for tokens_per_layer."""
    if "blockwise_axis0" not in added:
        added.add("blockwise_axis0")
        graph.initializer.append(numpy_helper.from_array(torch.zeros(1, dtype=torch.int64).numpy(), "blockwise_axis0"))
    out = f"tokens_entering_block{block}"
    graph.node.append(helper.make_node("Unsqueeze", [count, "blockwise_axis0"], [out], name=f"{out}_unsqueeze"))
    return out


def _optimized(model: onnx.ModelProto, weights: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """The exporter's optimizer over the whole graph (constant folding, as torch.onnx.export runs
    it), on the model's own parameters: ``model``'s initializers of those names hold no data, the
    IR reads the torch tensors in place, and only the final proto copies them (one copy, not three)."""
    import onnx_ir as ir
    from onnxscript import optimizer

    graph = ir.from_proto(model)
    for name, tensor in weights.items():
        value = graph.graph.initializers[name]
        array = tensor.detach().cpu().numpy()  # shares the parameter's memory
        if ir.DataType.from_numpy(array.dtype) != value.dtype:
            raise NotBlockwise(f"{name} is {array.dtype}, the trace's {value.dtype}")
        value.const_value = ir.Tensor(array, name=name)
    optimizer.optimize_ir(graph)
    return ir.to_proto(graph)
