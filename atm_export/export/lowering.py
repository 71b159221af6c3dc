"""Lower ``atm_export.TokenMerge`` nodes to standard ONNX ops (opset >= 17).

The lowered graph runs in stock ONNX Runtime and is TensorRT's plugin-free fallback, so it
uses only ops both handle with a runtime (data-dependent) size: Shape, Range, Gather,
GatherElements, TopK (runtime K), MatMul, Slice, Concat, and elementwise ops and reductions
(Softmax, ReduceSum/Min/Max/L2, Sigmoid, Floor, Cast, Min/Max, Div, Mul). The scatter-add of the
merge is a one-hot matrix product (no ScatterElements/ScatterND with reduction, which TensorRT
handles poorly), and the best-match search gets a sentinel column so that it is defined even when
the destination set is empty.

AdaMerge (``weighting`` = 1, salience) adds the salience (a softmax over the unprotected tokens'
affinities), weights the ranked scores and the average by it; its intensity rule (``r_max`` >= 0)
counts pairs from each image's mean score. With ``weighting`` = 0 and no intensity rule the
graph is ATM's, node for node.

Every step follows docs/token-merge-op.md; the comments name the step.
"""

from __future__ import annotations

import functools
import itertools
import operator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import contract
from ..merge import SALIENCE_EPS, SALIENCE_FLOOR, alternate_starts

#: Below every clamped similarity: the sentinel "no partner" column.
NO_PARTNER = -2.0
MIN_OPSET = 17
#: The step's choices as input-token positions ([B, .] int64): the merged-away tokens (best
#: first), their partners, and the kept source tokens in output order (merge.Choices).
CHOICE_NAMES = ("choice_src", "choice_dst", "choice_kept")
CHOICE_OUTPUTS = ("src", "dst", "kept")  # their names in a one-step model


class _Builder:
    """Emits nodes with unique names under one prefix, and constant initializers."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._ids = itertools.count()

    def name(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(self._ids)}"

    def const(self, value, dtype=np.int64, hint: str = "c") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> str | list[str]:
        names = outputs if isinstance(outputs, list) else [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), **attrs))
        return names[0] if len(names) == 1 else names

    # Integer arithmetic on values that are either known here (a Python int: folded, so that the
    # graph gets constants and static shapes) or int64 scalar tensors (names: emitted as ops).

    def tensor(self, value: int | str) -> str:
        return self.const(value) if isinstance(value, int) else value

    def arith(self, op_type: str, fold, a: int | str, b: int | str) -> int | str:
        if isinstance(a, int) and isinstance(b, int):
            return fold(a, b)
        return self.op(op_type, [self.tensor(a), self.tensor(b)])

    def vec(self, value: int | str) -> str:
        """A scalar as a [1] tensor, for Slice bounds, TopK's K and Expand shapes."""
        return self.const([value]) if isinstance(value, int) else self.op("Unsqueeze", [value, self.const([0])])

    def arange(self, start: int, limit: int | str, step: int) -> str:
        """[start, limit) by step, int64 (a constant when limit is known)."""
        if isinstance(limit, int):
            return self.const(np.arange(start, limit, step))
        return self.op("Range", [self.const(start), limit, self.const(step)])


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def lower_token_merge(node: onnx.NodeProto, num_tokens: int | None = None
                      ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Standard-op nodes (and constants) computing the same outputs as one TokenMerge node.

    Every emitted name starts with the node's name and a slash, and the step's choices are
    the tensors ``<name>/choice_src``, ``/choice_dst``, ``/choice_kept`` ([B, .] int64 input
    token positions, as in atm_export.merge.Choices), so that checks can run one step of a
    lowered graph alone and compare its choices with eager's.

    num_tokens: N when the graph knows it statically. Everything that follows from N (the split,
    the cap, and r for a fixed r) is then a constant, so shape inference gives static token
    dimensions (only the batch stays symbolic in a fixed-r graph). The threshold and intensity
    rules' r is data-dependent whatever N is.
    """
    a = contract.Attributes.from_values(_attrs(node))
    threshold, fixed_r, p = a.threshold, a.fixed_r, a.num_protected
    salience_weights = contract.WEIGHTING_NAMES[a.weighting] == "salience"
    size_mode = a.split == "size"
    x, size, metric = node.input
    x_out, size_out, num_tokens_out = node.output
    g = _Builder(node.name or "TokenMerge")
    sub = functools.partial(g.arith, "Sub", operator.sub)
    div = functools.partial(g.arith, "Div", operator.floordiv)  # of non-negative counts only
    vec = g.vec

    ax1, ax_last = g.const([1]), g.const([-1])
    shape = g.op("Shape", [x])
    batch = g.op("Gather", [shape, g.const(0)], axis=0)
    n = num_tokens if num_tokens is not None else g.op("Gather", [shape, g.const(1)], axis=0)
    m = sub(n, p)
    cap = div(m, 2)  # at most floor(M / 2) pairs merge
    first_a, first_b = alternate_starts(p)
    if size_mode:
        num_a = cap  # the floor(M / 2) smallest tokens
    else:  # the even positions in [P, N)
        num_a = div(sub(n, first_a - 1), 2)

    def expand_rows(index, width_of):  # [B, K] -> [B, K, W] for GatherElements on [B, N, W], N >= 1
        # index + zeros [1, 1, W] (from width_of's first token): broadcasting, not Expand to a
        # computed shape, so that shape inference knows [B, K, W] without data propagation.
        first = g.op("ReduceMax", [g.op("Slice", [width_of, vec(0), vec(1), ax1]), g.const([0])], keepdims=1)
        zeros = g.op("Mul", [g.op("Cast", [first], to=TensorProto.INT64), g.const(0)])
        return g.op("Add", [g.op("Unsqueeze", [index, ax_last]), zeros])

    # Step 1: split. alternate -> shared 1-D indices (Gather); size -> per-image [B, K] (GatherElements).
    if size_mode:
        rest = g.op("Slice", [size, vec(p), vec(n), ax1])
        offsets = g.op("Cast", [g.arange(0, m, 1)], to=TensorProto.FLOAT)
        # sizes are small integers, so size * M + offset is a unique, exact float32 key:
        # ascending order of the key = stable ascending sort by size.
        key = g.op("Add", [g.op("Mul", [rest, g.op("Cast", [g.tensor(m)], to=TensorProto.FLOAT)]), offsets])
        _, order = g.op("TopK", [key, vec(m)], outputs=2, axis=1, largest=0, sorted=1)
        order = g.op("Add", [order, g.const(p)])
        split = {"a": g.op("Slice", [order, vec(0), vec(num_a), ax1]),
                 "b": g.op("Slice", [order, vec(num_a), vec(m), ax1])}

        def take(t, part, tokens_2d=False):
            index = split[part] if tokens_2d else expand_rows(split[part], t)
            return g.op("GatherElements", [t, index], axis=1)

        def token_of(part, index, name):  # positions in A or B [B, K] -> input token positions
            return g.op("GatherElements", [split[part], index], [name], axis=1)
    else:  # ToMe's split of the whole sequence: A at even positions, B at odd ones
        split = {"a": g.arange(first_a, n, 2), "b": g.arange(first_b, n, 2)}

        def take(t, part, tokens_2d=False):
            return g.op("Gather", [t, split[part]], axis=1)

        def token_of(part, index, name):
            return g.op("Gather", [split[part], index], [name], axis=0)

    # Step 2: cosine similarity, clamped to [-1, 1].
    norm = g.op("ReduceL2", [metric, ax_last], keepdims=1)
    unit = g.op("Div", [metric, g.op("Max", [norm, g.const(1e-12, np.float32)])])
    sim = g.op("MatMul", [take(unit, "a"), g.op("Transpose", [take(unit, "b")], perm=[0, 2, 1])])
    sim = g.op("Clip", [sim, g.const(-1.0, np.float32), g.const(1.0, np.float32)])
    # Step 3: best partner. The sentinel column keeps ReduceMax/ArgMax defined when B is empty
    # and never wins otherwise (first index wins ties); the sentinel row, sliced off after, keeps
    # A non-empty (ONNX Runtime's reductions return a wrong shape for an empty tensor).
    sa, sb = take(size, "a", tokens_2d=True), take(size, "b", tokens_2d=True)

    def no_partner_like(t):  # NO_PARTNER in t's shape; sizes are finite, so t * 0 = 0. Broadcasting,
        # not Expand to a computed shape, lets shape inference know the shape without data propagation.
        return g.op("Add", [g.op("Mul", [t, g.const(0.0, np.float32)]), g.const(NO_PARTNER, np.float32)])

    sentinel_col = no_partner_like(g.op("Unsqueeze", [sa, ax_last]))  # [B, Na, 1]
    sim = g.op("Concat", [sim, sentinel_col], axis=2)
    first_size = g.op("Slice", [size, vec(0), vec(1), ax1])  # [B, 1]: N >= 1
    sentinel_row = no_partner_like(g.op("Unsqueeze", [g.op("Concat", [sb, first_size], axis=1), ax1]))  # [B, 1, Nb + 1]
    sim = g.op("Concat", [sim, sentinel_row], axis=1)
    score = g.op("Slice", [g.op("ReduceMax", [sim, ax_last], keepdims=0), vec(0), vec(num_a), ax1])
    dst = g.op("Slice", [g.op("ArgMax", [sim], axis=2, keepdims=0, select_last_index=0), vec(0), vec(num_a), ax1])
    # Step 3b (AdaMerge): salience. The partner stays the cosine's best; the score that is counted
    # and ranked becomes s_a * score_a, and the average weighs tokens by size * (salience + floor).
    weights_a, weights_b = sa, sb  # what the average weighs tokens by: their sizes, or ...
    if salience_weights:
        ones = g.op("Add", [g.op("Mul", [g.op("Slice", [size, vec(0), vec(p), ax1]), g.const(0.0, np.float32)]),
                            g.const(1.0, np.float32)]) if p else None  # [B, P]; sizes are finite
        salience = _salience(g, unit, ones, p, n, a.salience_temperature)
        score = g.op("Mul", [score, take(salience, "a", tokens_2d=True)])
        weights = g.op("Mul", [size, g.op("Add", [salience, g.const(SALIENCE_FLOOR, np.float32)])])
        weights_a, weights_b = take(weights, "a", tokens_2d=True), take(weights, "b", tokens_2d=True)

    # Step 4: how many pairs merge (the same r for every image), at most floor(M / 2).
    if fixed_r >= 0:
        r = g.arith("Min", min, fixed_r, cap)
    elif a.count_rule == "intensity":  # AdaMerge: r_b from the image's redundancy rho_b, its mean score
        zero_col = g.op("Mul", [first_size, g.const(0.0, np.float32)])  # [B, 1]
        counts = _intensity_counts(g, _redundancy(g, score, zero_col, num_a), a)
        total = g.op("ReduceSum", [counts], keepdims=0)  # over the whole batch
        r = g.arith("Min", min, div(total, batch), cap)
    else:
        above = g.op("Cast", [g.op("Greater", [score, g.const(threshold, np.float32)])], to=TensorProto.INT64)
        total = g.op("ReduceSum", [above], keepdims=0)  # over the whole batch
        r = g.arith("Min", min, div(total, batch), cap)

    # Step 5: rank A by score (descending; TopK breaks ties by lower index); the kept ones
    # go back to A's order (a float32 sort of positions, which are exact below 2^24).
    _, ranked = g.op("TopK", [score, vec(num_a)], outputs=2, axis=1, largest=1, sorted=1)
    src = g.op("Slice", [ranked, vec(0), vec(r), ax1])
    kept_ranked = g.op("Cast", [g.op("Slice", [ranked, vec(r), vec(num_a), ax1])], to=TensorProto.FLOAT)
    kept_sorted, _ = g.op("TopK", [kept_ranked, vec(sub(num_a, r))], outputs=2, axis=1, largest=0, sorted=1)
    unm = g.op("Cast", [kept_sorted], to=TensorProto.INT64)
    dst_src = g.op("GatherElements", [dst, src], axis=1)
    for part, index, name in zip("aba", (src, dst_src, unm), CHOICE_NAMES):
        token_of(part, index, f"{g.prefix}/{name}")

    # Step 6: weighted merge; the scatter-add is onehot[B, Nb, r] @ values[B, r, .]. With weights w
    # (the sizes, or AdaMerge's): x'_b = (w_b x_b + sum_i w_i x_i) / (w_b + sum_i w_i); the sizes
    # add up either way. Size weights emit exactly ATM's nodes (integrity re-lowers old bundles).
    xa, xb = take(x, "a"), take(x, "b")
    src_size = g.op("GatherElements", [sa, src], axis=1)
    src_weight = g.op("GatherElements", [weights_a, src], axis=1) if salience_weights else src_size
    src_x = g.op("GatherElements", [xa, expand_rows(src, x)], axis=1)
    slots = g.op("Reshape", [g.arange(0, sub(m, num_a), 1), g.const([1, -1, 1])])
    onehot = g.op("Cast", [g.op("Equal", [g.op("Unsqueeze", [dst_src, ax1]), slots])], to=TensorProto.FLOAT)

    def received(values):  # [B, r] -> [B, Nb]: per partner, the sum of its sources' values
        return g.op("Squeeze", [g.op("MatMul", [onehot, g.op("Unsqueeze", [values, ax_last])]), ax_last])

    weighted_src = g.op("Mul", [src_x, g.op("Unsqueeze", [src_weight, ax_last])])
    xb_sum = g.op("Add", [g.op("Mul", [xb, g.op("Unsqueeze", [weights_b, ax_last])]),
                          g.op("MatMul", [onehot, weighted_src])])
    sb_new = g.op("Add", [sb, received(src_size)])
    wb_new = g.op("Add", [weights_b, received(src_weight)]) if salience_weights else sb_new
    xb_new = g.op("Div", [xb_sum, g.op("Unsqueeze", [wb_new, ax_last])])

    # Step 7: [protected, kept A (in A's order), B].
    head = vec(p)
    x_kept = g.op("GatherElements", [xa, expand_rows(unm, x)], axis=1)
    s_kept = g.op("GatherElements", [sa, unm], axis=1)
    g.op("Concat", [g.op("Slice", [x, vec(0), head, ax1]), x_kept, xb_new], [x_out], axis=1)
    g.op("Concat", [g.op("Slice", [size, vec(0), head, ax1]), s_kept, sb_new], [size_out], axis=1)
    g.op("Sub", [g.tensor(n), g.tensor(r)], [num_tokens_out])
    return g.nodes, g.initializers


def _salience(g: _Builder, unit: str, ones: str | None, p: int, n: int | str, temperature: float) -> str:
    """AdaMerge's salience [B, N] (merge.salience) from the unit metric rows [B, N, D].

    Over the M unprotected rows u: c = column sums of softmax(u u^T / temperature) (row-wise),
    s = (c - min c) / max(max c - min c, SALIENCE_EPS) per image; the P protected tokens get 1
    (``ones`` [B, P], None when P = 0: no empty tensor). M >= 1, so no reduction sees an empty one.
    """
    ax1 = g.const([1])
    u = g.op("Slice", [unit, g.vec(p), g.vec(n), ax1])  # [B, M, D]
    affinity = g.op("Div", [g.op("MatMul", [u, g.op("Transpose", [u], perm=[0, 2, 1])]),
                            g.const(temperature, np.float32)])
    centrality = g.op("ReduceSum", [g.op("Softmax", [affinity], axis=-1), ax1], keepdims=0)  # column sums [B, M]
    lo = g.op("ReduceMin", [centrality, ax1], keepdims=1)
    spread = g.op("Max", [g.op("Sub", [g.op("ReduceMax", [centrality, ax1], keepdims=1), lo]),
                          g.const(SALIENCE_EPS, np.float32)])
    s = g.op("Div", [g.op("Sub", [centrality, lo]), spread])
    return s if ones is None else g.op("Concat", [ones, s], axis=1)


def _redundancy(g: _Builder, score: str, zero_col: str, num_a: int | str) -> str:
    """rho_b [B] (merge.redundancy): each image's mean score over A, 0 when A is empty.

    The zero column ([B, 1]) keeps the sum's input non-empty (ONNX Runtime's reductions return a
    wrong shape for an empty tensor); the sum is divided by max(Na, 1).
    """
    total = g.op("ReduceSum", [g.op("Concat", [score, zero_col], axis=1), g.const([1])], keepdims=0)
    count = g.arith("Max", max, num_a, 1)
    count = g.const(count, np.float32) if isinstance(count, int) else g.op("Cast", [count], to=TensorProto.FLOAT)
    return g.op("Div", [total, count])


def _intensity_counts(g: _Builder, rho: str, a: contract.Attributes) -> str:
    """r_b [B] int64 (merge.intensity_counts): floor(r_max * sigmoid(scale * (rho_b - mean) / std)),
    in float32 as the eager rule computes it."""
    f32 = functools.partial(g.const, dtype=np.float32)
    z = g.op("Div", [g.op("Sub", [rho, f32(a.redundancy_mean)]), f32(a.redundancy_std)])
    fraction = g.op("Mul", [g.op("Sigmoid", [g.op("Mul", [z, f32(a.redundancy_scale)])]), f32(a.r_max)])
    return g.op("Cast", [g.op("Floor", [fraction])], to=TensorProto.INT64)


def static_token_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> its dimension 1 (the token count of a [B, N, C] tensor), where the graph's
    inputs or value_info (which torch's exporter writes for every tensor) give it statically."""
    counts = {}
    for info in (*graph.input, *graph.value_info):
        dims = info.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].HasField("dim_value"):
            counts[info.name] = dims[1].dim_value
    return counts


def lower_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every TokenMerge node replaced by standard ops."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old for the lowering; need {MIN_OPSET} or newer")
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    graph = lowered.graph
    static_tokens = static_token_counts(graph)
    new_nodes = []
    for node in graph.node:
        if contract.is_token_merge(node):
            nodes, inits = lower_token_merge(node, static_tokens.get(node.input[0]))
            new_nodes.extend(nodes)
            graph.initializer.extend(inits)
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [o for o in lowered.opset_import if o.domain != contract.DOMAIN]
    del lowered.opset_import[:]
    lowered.opset_import.extend(kept)
    return lowered


def extract_step(lowered: onnx.ModelProto, merge_node: onnx.NodeProto, opset: int = 18) -> onnx.ModelProto:
    """One lowered merge step of ``lowered`` as a model of its own.

    ``merge_node`` is the step's TokenMerge node (from the plugin flavour): its name is the
    prefix of the lowered nodes, its input and output names are the step's. The model's inputs
    are x, size, metric; its outputs x_out, size_out, num_tokens and the three choice tensors.
    Raises ValueError when ``lowered`` holds no such step (not atm-export's lowering).
    """
    prefix = merge_node.name + "/"
    nodes = [n for n in lowered.graph.node if n.name.startswith(prefix)]
    produced = {o for n in nodes for o in n.output}
    choice_outputs = [prefix + c for c in CHOICE_NAMES]
    missing = [name for name in (*merge_node.output, *choice_outputs) if name not in produced]
    if not nodes or missing:
        raise ValueError(f"no lowered step {merge_node.name} (missing {missing[:3] or 'all nodes'})")
    used = {i for n in nodes for i in n.input}
    inits = [t for t in lowered.graph.initializer if t.name in used]
    renames = dict(zip(merge_node.input, ("x", "size", "metric")))
    renames.update(zip(merge_node.output, ("x_out", "size_out", "num_tokens")))
    renames.update(zip(choice_outputs, CHOICE_OUTPUTS))
    step_nodes = []
    for n in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        for field in (copy.input, copy.output):
            field[:] = [renames.get(name, name) for name in field]
        step_nodes.append(copy)
    return _step_model(step_nodes, inits, opset)


def _step_model(nodes, inits, opset: int) -> onnx.ModelProto:
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph(
        nodes, "token_merge_step",
        [helper.make_tensor_value_info("x", f, ["B", "N", "C"]), helper.make_tensor_value_info("size", f, ["B", "N"]),
         helper.make_tensor_value_info("metric", f, ["B", "N", "D"])],
        [helper.make_tensor_value_info("x_out", f, ["B", "M", "C"]), helper.make_tensor_value_info("size_out", f, ["B", "M"]),
         helper.make_tensor_value_info("num_tokens", i64, []),
         *[helper.make_tensor_value_info(k, i64, ["B", k + "_count"]) for k in CHOICE_OUTPUTS]],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def single_node_model(node: onnx.NodeProto, opset: int = 18) -> onnx.ModelProto:
    """One TokenMerge node, freshly lowered, as a model (see ``extract_step`` for the I/O)."""
    alone = onnx.NodeProto()
    alone.CopyFrom(node)
    alone.input[:] = ["x", "size", "metric"]
    alone.output[:] = ["x_out", "size_out", "num_tokens"]
    nodes, inits = lower_token_merge(alone)
    choices = [f"{alone.name}/{c}" for c in CHOICE_NAMES]
    nodes += [helper.make_node("Identity", [c], [k]) for c, k in zip(choices, CHOICE_OUTPUTS)]
    return _step_model(nodes, inits, opset)
