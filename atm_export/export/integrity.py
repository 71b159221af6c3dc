"""Whether exported graphs are what their report says they are, read from the graphs alone.

Two structural checks that no choice of test images can fool:

- ``merge_node_differences``: the plugin flavour has exactly one TokenMerge node per merging
  block, of this op version, with the attributes that the run's merge settings give that block
  (threshold or r, split mode, protected tokens), and a ``max_num_tokens`` that bounds every
  node's input token count (the plugin sizes its workspace by it);
- ``lowering_difference``: the portable flavour is the plugin flavour with its TokenMerge nodes
  lowered by this version of atm-export, node for node and weight for weight.

With both, the numerical checks (parity and replay of the plugin flavour against eager PyTorch,
and each lowered step on eager's inputs) cover every part of both files.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .. import contract
from ..schedule import StepSpec
from .external_data import tensor_bytes
from .lowering import lower_model, static_token_counts

#: TensorRT's hints: not given by the merge settings. opt_num_tokens is a tuning value (any value
#: is right); max_num_tokens is a bound, checked by ``max_tokens_differences``.
_HINTS = ("opt_num_tokens", "max_num_tokens")


def expected_merge_nodes(steps: list[StepSpec | None], num_protected: int) -> dict[str, dict]:
    """Node name -> the attributes it must carry, for every block that merges (in block order)."""
    expected = {}
    for block, step in enumerate(steps, start=1):
        if step is not None:
            attrs = contract.Attributes.for_step(step, num_protected).onnx()
            attrs = {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in attrs.items()}  # as ONNX stores it
            for hint in _HINTS:
                del attrs[hint]
            expected[contract.node_name(block)] = attrs
    return expected


def _describe(name: str, value) -> str:
    if name == "split_mode" and value in contract.SPLIT_NAMES:
        return f"{value} ({contract.SPLIT_NAMES[value]})"
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


def merge_node_differences(plugin: onnx.ModelProto, steps: list[StepSpec | None], num_protected: int) -> list[str]:
    """Every way the plugin flavour's TokenMerge nodes differ from the merge settings ([] if none)."""
    versions = [o.version for o in plugin.opset_import if o.domain == contract.DOMAIN]
    if versions != [contract.VERSION]:
        return [f"the graph uses {contract.DOMAIN} opset {versions or 'none'}, this atm-export writes {contract.VERSION} "
                "(another TokenMerge contract): re-export it"]
    expected = expected_merge_nodes(steps, num_protected)
    nodes = [n for n in plugin.graph.node if contract.is_token_merge(n)]
    names = [n.name for n in nodes]
    if names != list(expected):
        return [f"TokenMerge nodes {names} where the settings merge in {list(expected)}"]
    problems = max_tokens_differences(plugin.graph, nodes)
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        for name, want in expected[node.name].items():
            got = attrs.get(name)
            if got != want:
                problems.append(f"{node.name}: {name} is {_describe(name, got)} where the settings give "
                                f"{_describe(name, want)}")
    return problems


def max_tokens_differences(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[str]:
    """Every way the nodes' ``max_num_tokens`` fails to bound their input token counts ([] if none).

    The exporter writes the model's input token count on every node: one value, at least every
    input N that the graph states statically (the first merge's N always is).
    """
    known = static_token_counts(graph)
    values = {n.name: next((a.i for a in n.attribute if a.name == "max_num_tokens"), -1) for n in nodes}
    problems = [f"{name}: max_num_tokens is {value} (missing or unknown): re-export the model"
                for name, value in values.items() if value < 1]
    if len(set(values.values())) > 1:
        problems.append(f"max_num_tokens differs between the nodes ({values}); it is the model's input token count")
    for node in nodes:
        n = known.get(node.input[0])
        if n is not None and 0 < values[node.name] < n:
            problems.append(f"{node.name}: max_num_tokens {values[node.name]} is below its input's {n} tokens")
    return problems


def _same_graph(ours: onnx.GraphProto, theirs: onnx.GraphProto, weights_dir=None) -> str | None:
    for what, a, b in (("inputs", ours.input, theirs.input), ("outputs", ours.output, theirs.output)):
        if [x.SerializeToString() for x in a] != [x.SerializeToString() for x in b]:
            return f"the graph {what} differ"
    mine, other = [n.SerializeToString() for n in ours.node], [n.SerializeToString() for n in theirs.node]
    if mine != other:
        at = next((i for i, (x, y) in enumerate(zip(mine, other)) if x != y), min(len(mine), len(other)))
        where = ours.node[at].name if at < len(ours.node) else "the end"
        return f"node {at} ({where}) differs" if len(mine) == len(other) else \
            f"{len(other)} nodes where the lowering gives {len(mine)} (first difference at node {at}, {where})"
    # compared one at a time, by content: the two files' weights may lie in different side files
    weights, other_weights = {t.name: t for t in ours.initializer}, {t.name: t for t in theirs.initializer}
    for name in sorted(set(weights) | set(other_weights)):
        if name not in weights or name not in other_weights or \
                tensor_bytes(weights[name], weights_dir) != tensor_bytes(other_weights[name], weights_dir):
            return f"weight or constant {name} differs"
    return None


def lowering_difference(portable: onnx.ModelProto, plugin: onnx.ModelProto,
                        names: tuple[str, str] = ("model.onnx", "model.plugin.onnx"), weights_dir=None) -> str | None:
    """Where ``portable`` differs from ``plugin`` with its TokenMerge nodes lowered (None: nowhere).
    ``names``: the two files, as the message names them; weights_dir: where the side files of
    weightless graphs lie (atm_export.export.external_data)."""
    try:
        expected = lower_model(plugin)
    except ValueError as exc:
        return f"the plugin flavour cannot be lowered: {exc}"
    difference = _same_graph(expected.graph, portable.graph, weights_dir)
    if difference is None:
        imports = sorted((o.domain, o.version) for o in portable.opset_import)
        if imports != sorted((o.domain, o.version) for o in expected.opset_import):
            difference = f"its opset imports {imports} differ"
    return None if difference is None else f"{names[0]} is not {names[1]} with its merge steps lowered: {difference}"
