"""One TokenMerge step in ONNX: the standard-op lowering and the ONNX Runtime reference kernel
against the PyTorch merge (atm_export.merge), on inputs that merge."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from atm_export import contract
from atm_export import merge as M
from atm_export.backends.ort_custom_op import Replay, kernel_calls, register, to_extensions_domain
from atm_export.export.lowering import MIN_OPSET, extract_step, lower_model, lower_token_merge, single_node_model
from conftest import merging_inputs, token_merge_model
from reference import as_multiset, reference_merge, sweep

CASES = [
    {"threshold": 0.8, "fixed_r": -1},
    {"threshold": 1.0, "fixed_r": -1},  # merges nothing
    {"threshold": -1.0, "fixed_r": -1},  # merges the maximum
    {"threshold": 1.0, "fixed_r": 5},
    {"threshold": 1.0, "fixed_r": 0},
]


def eager(x, size, metric, threshold, fixed_r, split_mode, num_protected):
    return M.token_merge(x, size, metric, threshold=None if fixed_r >= 0 else threshold,
                         r=fixed_r if fixed_r >= 0 else None, split_mode=["alternate", "size"][split_mode],
                         num_protected=num_protected)


def run_lowered(model, x, size, metric):
    lowered = lower_model(model)
    onnx.checker.check_model(lowered, full_check=True)
    session = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy(), "size": size.numpy(), "metric": metric.numpy()})


def run_reference_kernel(model, x, size, metric, replay=None):
    options = ort.SessionOptions()
    options.register_custom_ops_library(register())
    session = ort.InferenceSession(to_extensions_domain(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    with kernel_calls(replay):
        return session.run(None, {"x": x.numpy(), "size": size.numpy(), "metric": metric.numpy()})


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"thr{c['threshold']}-r{c['fixed_r']}")
@pytest.mark.parametrize("num_protected", [0, 1, 2])
@pytest.mark.parametrize("split_mode", [0, 1], ids=["alternate", "size"])
@pytest.mark.parametrize("runner", [run_lowered, run_reference_kernel], ids=["lowered", "ort-kernel"])
def test_matches_pytorch(runner, split_mode, num_protected, case):
    x, size, metric = merging_inputs(n=21, num_protected=num_protected)
    model = token_merge_model(split_mode=split_mode, num_protected=num_protected, **case)
    onnx.checker.check_model(model, full_check=True)
    x_out, size_out, num_tokens = runner(model, x, size, metric)
    expected = eager(x, size, metric, split_mode=split_mode, num_protected=num_protected, **case)
    assert int(num_tokens) == expected.x.shape[1]
    np.testing.assert_allclose(x_out, expected.x.numpy(), atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(size_out, expected.size.numpy())


@pytest.mark.parametrize("split_mode", [0, 1], ids=["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2, 5])
@pytest.mark.parametrize("runner", [run_lowered, run_reference_kernel], ids=["lowered", "ort-kernel"])
def test_tome_convention_reference_on_random_cases(runner, num_protected, split_mode):
    """The plain-loop reference's sweep (tests/reference.py): every r up to the cap, thresholds,
    odd and even N; outputs compared in order and as multisets of tokens."""
    for x, size, metric, kw, where in sweep(num_protected, seeds=2):
        attrs = {"fixed_r": kw["r"]} if "r" in kw else {"threshold": kw["threshold"]}
        model = token_merge_model(split_mode=split_mode, num_protected=num_protected, **attrs)
        x_out, size_out, num_tokens = runner(model, x, size, metric)
        ref_x, ref_size, ref_r, _ = reference_merge(x.double().tolist(), size.double().tolist(), metric.double().tolist(),
                                                    split_mode=["alternate", "size"][split_mode],
                                                    num_protected=num_protected, **kw)
        assert int(num_tokens) == x.shape[1] - ref_r, where
        np.testing.assert_allclose(x_out, np.array(ref_x), atol=1e-5, rtol=1e-5, err_msg=where)
        for bi in range(x.shape[0]):
            np.testing.assert_allclose(as_multiset(x_out[bi], size_out[bi]), as_multiset(ref_x[bi], ref_size[bi]),
                                       atol=1e-5, rtol=1e-5, err_msg=where)


def test_merging_happens_in_these_cases():
    x, size, metric = merging_inputs(n=21, num_protected=1)
    assert eager(x, size, metric, 0.8, -1, 0, 1).r > 0


def test_exact_ties_break_alike():
    """One-hot metrics: exact similarity ties. The lowering must pick the lower positions."""
    one = torch.eye(4)
    metric = torch.stack([one[3], one[0], one[0], one[0], one[0], one[1], one[0]]).unsqueeze(0)  # see test_merge
    x = torch.arange(7.0).reshape(1, 7, 1)
    size = torch.ones(1, 7)
    model = token_merge_model(threshold=1.0, fixed_r=2, split_mode=0, num_protected=1)
    x_out, size_out, _ = run_lowered(model, x, size, metric)
    expected = M.token_merge(x, size, metric, r=2, num_protected=1)
    # B1 receives A2 and A4: (1 + 2 + 4) / 3, summed in another order than eager's
    np.testing.assert_allclose(x_out, expected.x.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(size_out, expected.size.numpy())


def test_size_ties_sort_stably():
    """Equal sizes everywhere: the size-distinctive split must follow token order."""
    x, _, metric = merging_inputs(n=15, num_protected=1, seed=4)
    size = torch.ones(x.shape[:2])
    size[:, 5] = 3.0
    model = token_merge_model(threshold=0.5, fixed_r=-1, split_mode=1, num_protected=1)
    x_out, size_out, _ = run_lowered(model, x, size, metric)
    expected = M.token_merge(x, size, metric, threshold=0.5, split_mode="size", num_protected=1)
    np.testing.assert_allclose(x_out, expected.x.numpy(), atol=1e-6)
    np.testing.assert_array_equal(size_out, expected.size.numpy())


@pytest.mark.parametrize("split_mode", [0, 1], ids=["alternate", "size"])
@pytest.mark.parametrize("num_protected", [0, 1, 2])  # P odd leaves A empty, P even B (alternate split)
@pytest.mark.parametrize("runner", [run_lowered, run_reference_kernel], ids=["lowered", "ort-kernel"])
def test_one_unprotected_token_left(runner, num_protected, split_mode):
    n = num_protected + 1
    x, size, metric = merging_inputs(n=n, num_protected=num_protected)
    model = token_merge_model(threshold=-1.0, num_protected=num_protected, split_mode=split_mode)
    x_out, _, num_tokens = runner(model, x, size, metric)
    assert int(num_tokens) == n
    np.testing.assert_array_equal(x_out, x.numpy())


@pytest.mark.parametrize("split_mode", [0, 1], ids=["alternate", "size"])
def test_choices_are_exposed_for_checks(split_mode):
    """The step's choices come out as input-token positions, as merge.Choices states them."""
    x, size, metric = merging_inputs(n=21, num_protected=1)
    node = token_merge_model(threshold=0.8, split_mode=split_mode, num_protected=1).graph.node[0]
    session = ort.InferenceSession(single_node_model(node).SerializeToString(), providers=["CPUExecutionProvider"])
    _, _, _, src, dst, kept = session.run(None, {"x": x.numpy(), "size": size.numpy(), "metric": metric.numpy()})
    step = M.token_merge(x, size, metric, threshold=0.8, num_protected=1, split_mode=["alternate", "size"][split_mode])
    assert step.r > 0
    expected = M.Choices.of(step.plan)
    np.testing.assert_array_equal(src, expected.src.numpy())
    np.testing.assert_array_equal(dst, expected.dst.numpy())
    np.testing.assert_array_equal(kept, expected.kept.numpy())


def test_old_opset_is_refused():
    with pytest.raises(ValueError, match="too old"):
        lower_model(token_merge_model(opset=MIN_OPSET - 1))


def test_a_kernel_error_comes_back_as_a_python_exception():
    """An exception inside the Python kernel would abort the process if it crossed into ONNX
    Runtime's C++; the kernel holds it and the caller gets it after the run."""
    x, size, metric = merging_inputs(n=9)
    with pytest.raises(RuntimeError, match="more TokenMerge calls than recorded"):
        run_reference_kernel(token_merge_model(threshold=0.5), x, size, metric, replay=Replay([]))
    run_reference_kernel(token_merge_model(threshold=0.5), x, size, metric)  # the error went with its run


# ---------------------------------------------------------------- AdaMerge's attributes

SALIENCE = contract.WEIGHTING_CODES["salience"]
ADAMERGE_RULES = ["salience-fixed", "salience-threshold", "salience-intensity", "size-intensity"]
#: (P, N): tiny N (down to a single unprotected token) and two ViT-like ones.
ADAMERGE_SIZES = [(p, n) for p in (0, 1, 2) for n in (1, 2, 3, 4, 65, 197) if n > p]
#: Least distance between a decision and its flip (scores, threshold, a step of the intensity
#: rule) that the inputs must keep: far above float rounding, so the choices compare exactly.
MIN_MARGIN = 1e-4


def redundant_inputs(split_mode, num_protected, batch=3, n=65, c=6, d=32, seed=0):
    """Every source token (A) a near copy of a destination token (B): many near-duplicate rows, so
    merging happens under every rule, and every source has one clear partner. The copies' cosines
    to their partners are spread evenly (and shuffled) over [0.95 - 0.2 b, 0.99] in image b, so
    the images' redundancies (and their counts under the intensity rule) differ, and the scores
    lie far apart."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, c, generator=g)
    size = torch.randint(1, 5, (batch, n), generator=g).float()
    metric = torch.randn(batch, n, d, generator=g)
    split = M.split_tokens(size, num_protected, M.SPLIT_MODES[split_mode])
    na, nb = split.a.shape[1], split.b.shape[1]
    for bi in range(batch if nb else 0):
        partner = M.unit_rows(metric[bi, split.b[bi, torch.randint(0, nb, (na,), generator=g)]].unsqueeze(0))[0]
        away = torch.randn(na, d, generator=g)
        away = M.unit_rows((away - (away * partner).sum(-1, keepdim=True) * partner).unsqueeze(0))[0]  # orthogonal
        cos = torch.linspace(0.95 - 0.2 * bi, 0.99, na)[torch.randperm(na, generator=g)].unsqueeze(1)
        metric[bi, split.a[bi]] = cos * partner + (1 - cos ** 2).sqrt() * away
    return x, size, metric


def node_attributes(model) -> contract.Attributes:
    """The attributes as stored on the node (floats rounded to float32, as every backend reads them)."""
    node = model.graph.node[0]
    return contract.Attributes.from_values({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})


def _best(candidates, cap, batch_differs):
    """The candidate count rule that merges (0 < r, and cap / 4 <= r <= cap / 2 where the cap allows
    it), makes the images' counts differ where asked, and keeps the widest margin: (margin, r, counts,
    attrs)."""
    def key(c):
        margin, r, counts, _ = c
        return (r > 0, cap // 4 <= r <= max(cap // 2, 1), len(set(counts)) > 1 or not batch_differs, margin)
    return max(candidates, key=key)


def threshold_rule(score, cap, batch_differs):
    """A threshold midway between two neighbouring scores (or below them all)."""
    values = sorted(set(score.flatten().tolist()) | {-2.5, 1.5})  # below and above every score of every backend
    candidates = []
    for lo, hi in zip(values, values[1:]):
        counts = M.count_above(score, (lo + hi) / 2).tolist()
        candidates.append(((hi - lo) / 2, min(sum(counts) // len(counts), cap), counts, {"threshold": (lo + hi) / 2}))
    return _best(candidates, cap, batch_differs)


def intensity_rule(score, cap, batch_differs):
    """r_max, scale 2, std half the images' spread of redundancy, and the mean (around their median)
    that keeps every image's rho farthest from a step of the rule."""
    rho = M.redundancy(score)
    r_max, std = max(3, cap + 1), max(float(rho.max() - rho.min()) / 2, 1e-3)
    candidates = []
    for t in np.linspace(-1.0, 1.0, 81):
        rule = M.Intensity(r_max, float(rho.median()) + t * std, std, 2.0)
        counts = M.intensity_counts(rho, rule).tolist()
        attrs = {"r_max": r_max, "redundancy_mean": rule.mean, "redundancy_std": std, "redundancy_scale": 2.0}
        candidates.append((M.intensity_margin(rho, rule), min(sum(counts) // len(counts), cap), counts, attrs))
    return _best(candidates, cap, batch_differs)


def adamerge_model(rule, x, size, metric, split_mode, num_protected):
    """A one-node model for ``rule`` ("<weighting>-<count rule>"), and the margin of its count:
    how far the threshold or the intensity rule's steps keep from the scores (inf: fixed r)."""
    weighting, count = rule.split("-")
    attrs = {"weighting": contract.WEIGHTING_CODES[weighting], "salience_temperature": 0.5,
             "split_mode": split_mode, "num_protected": num_protected}
    split = M.split_tokens(size, num_protected, M.SPLIT_MODES[split_mode])
    score = M.match_scores(metric, split, weighting, 0.5)[0]
    cap = M.max_merges(x.shape[1] - num_protected)
    margin = float("inf")
    if count == "fixed":
        attrs["fixed_r"] = max(1, cap // 2)
    else:
        pick = threshold_rule if count == "threshold" else intensity_rule
        margin, _, _, rule_attrs = pick(score, cap, batch_differs=cap >= 8)  # tiny N: too few counts to differ
        attrs.update(rule_attrs)
    return token_merge_model(**attrs), margin


def adamerge_case(rule, split_mode, num_protected, n):
    """Inputs, model and eager step whose every decision keeps MIN_MARGIN from flipping: the first
    seed that gives them (the choices then compare exactly across backends)."""
    for seed in range(20):
        x, size, metric = redundant_inputs(split_mode, num_protected, n=n, seed=seed)
        model, margin = adamerge_model(rule, x, size, metric, split_mode, num_protected)
        attrs = node_attributes(model)
        step = M.token_merge(x, size, metric, diagnostics=True, **attrs.merge_kwargs())
        split = M.split_tokens(size, num_protected, attrs.split)
        score = M.match_scores(metric, split, M.WEIGHTINGS[attrs.weighting], attrs.salience_temperature)[0]
        if step.r == 0 or (margin > MIN_MARGIN and decisions_are_clear(step, score)):
            return x, size, metric, model, step
    raise AssertionError(f"no seed keeps {rule}'s decisions {MIN_MARGIN} from flipping")


def run_lowered_step(model, x, size, metric, static):
    """The lowered node (with N static or not) as a one-step model: outputs and choices."""
    if static:
        for value in model.graph.input:  # x, size, metric
            value.type.tensor_type.shape.dim[1].dim_value = x.shape[1]
    lowered = lower_model(model)
    onnx.checker.check_model(lowered, full_check=True)
    step = extract_step(lowered, model.graph.node[0])
    session = ort.InferenceSession(step.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy(), "size": size.numpy(), "metric": metric.numpy()})


def decisions_are_clear(step, score) -> bool:
    """Whether every choice of the eager step (the merged tokens' partners, their ranking, the r-th
    place) is MIN_MARGIN away from flipping."""
    top = score.topk(min(step.r + 1, score.shape[1]), dim=1).values
    ranking_gap = float((top[:, :-1] - top[:, 1:]).min()) if top.shape[1] > 1 else float("inf")
    return step.r == 0 or min(step.tie_gap, ranking_gap) > MIN_MARGIN


@pytest.mark.parametrize("num_protected, n", ADAMERGE_SIZES, ids=[f"P{p}-N{n}" for p, n in ADAMERGE_SIZES])
@pytest.mark.parametrize("split_mode", [0, 1], ids=["alternate", "size"])
@pytest.mark.parametrize("rule", ADAMERGE_RULES)
def test_adamerge_matches_pytorch(rule, split_mode, num_protected, n):
    """The lowered AdaMerge step, N symbolic and N static: the eager step's choices exactly, and its
    outputs to float rounding."""
    x, size, metric, model, expected = adamerge_case(rule, split_mode, num_protected, n)
    onnx.checker.check_model(model, full_check=True)
    attrs = node_attributes(model)
    assert attrs.count_rule == rule.split("-")[1]
    cap = M.max_merges(n - num_protected)
    assert expected.r > 0 or cap == 0, "the inputs merge"
    if attrs.count_rule != "fixed" and cap >= 8:
        assert len(set(expected.counts.tolist())) > 1, "the images' own counts differ"
    choices = M.Choices.of(expected.plan)
    # Two unprotected tokens have equal centralities in exact arithmetic: their saliences are
    # float rounding / SALIENCE_EPS (about 1e-5), a 1e-3 change of weights floored at 0.01.
    atol = 1e-2 if attrs.weighting == SALIENCE and n - num_protected <= 2 else 1e-5
    for static in (False, True):
        x_out, size_out, num_tokens, src, dst, kept = run_lowered_step(model, x, size, metric, static)
        assert int(num_tokens) == n - expected.r
        np.testing.assert_array_equal(src, choices.src.numpy())
        np.testing.assert_array_equal(dst, choices.dst.numpy())
        np.testing.assert_array_equal(kept, choices.kept.numpy())
        np.testing.assert_allclose(x_out, expected.x.numpy(), atol=atol, rtol=1e-5)
        np.testing.assert_array_equal(size_out, expected.size.numpy())


@pytest.mark.parametrize("split_mode", [0, 1], ids=["alternate", "size"])
@pytest.mark.parametrize("rule", ADAMERGE_RULES)
def test_adamerge_reference_kernel_reads_the_attributes(rule, split_mode):
    """The ONNX Runtime reference op gets AdaMerge's attributes through onnxruntime-extensions."""
    x, size, metric, model, _ = adamerge_case(rule, split_mode, 1, 65)
    x_out, size_out, num_tokens = run_reference_kernel(model, x, size, metric)
    expected = M.token_merge(x, size, metric, **node_attributes(model).merge_kwargs())
    assert expected.r > 0 and int(num_tokens) == 65 - expected.r
    np.testing.assert_allclose(x_out, expected.x.numpy(), atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(size_out, expected.size.numpy())


def test_salience_changes_what_merges():
    """The salience reaches the choices and the average (the same inputs merge otherwise by size)."""
    x, size, metric, model, _ = adamerge_case("salience-fixed", 0, 1, 65)
    out_salience = run_lowered_step(model, x, size, metric, static=False)
    plain = token_merge_model(fixed_r=node_attributes(model).fixed_r, num_protected=1)
    out_size = run_lowered_step(plain, x, size, metric, static=False)
    assert not np.array_equal(out_salience[3], out_size[3]), "other sources merge"
    assert not np.allclose(out_salience[0], out_size[0], atol=1e-3)


def _lowered_nodes(**attrs):
    nodes, inits = lower_token_merge(token_merge_model(**attrs).graph.node[0], num_tokens=65)
    return [n.SerializeToString() for n in nodes], [t.SerializeToString() for t in inits]


@pytest.mark.parametrize("count", [{"threshold": 0.8}, {"fixed_r": 5}], ids=["threshold", "fixed"])
def test_size_weighting_lowers_to_atms_graph(count):
    """weighting = 0 without the intensity rule ignores AdaMerge's other attributes: ATM's graph,
    node for node (an exported model.onnx must stay its plugin flavour lowered)."""
    unused = {"salience_temperature": 0.3, "redundancy_mean": 0.4, "redundancy_std": 0.2, "redundancy_scale": 3.0}
    assert _lowered_nodes(**count, **unused) == _lowered_nodes(**count)
    # fixed_r >= 0 wins over r_max
    assert _lowered_nodes(fixed_r=5, r_max=7) == _lowered_nodes(fixed_r=5)


def _dims(model, infos):
    """Float activations -> their dims that are not numbers (names, or [None]: no shape)."""
    weights = {t.name for t in model.graph.initializer}
    out = {}
    for info in infos:
        t = info.type.tensor_type
        if t.elem_type == onnx.TensorProto.FLOAT and info.name not in weights:
            out[info.name] = [d.dim_param or None for d in t.shape.dim if not d.HasField("dim_value")] \
                if t.HasField("shape") else [None]
    return out


@pytest.mark.parametrize("count", [{"fixed_r": 8}, {"r_max": 6, "redundancy_mean": 0.5, "redundancy_std": 0.1},
                                   {"threshold": 0.5}], ids=["fixed", "intensity", "threshold"])
def test_lowered_adamerge_node_passes_the_checker_and_strict_shape_inference(count):
    """N static: strict shape inference types every tensor; with a fixed r every float tensor's
    token dims are static too (only the batch is symbolic), as ATM's fixed-r steps."""
    model = token_merge_model(weighting=SALIENCE, num_protected=1, **count)
    for value in model.graph.input:  # x, size, metric: N = 65, as an export of a known image size
        value.type.tensor_type.shape.dim[1].dim_value = 65
    lowered = lower_model(model)
    onnx.checker.check_model(lowered, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(lowered, strict_mode=True)
    assert {"Softmax", "Sigmoid" if "r_max" in count else "Softmax"} <= {n.op_type for n in lowered.graph.node}
    assert not any(contract.is_token_merge(n) for n in lowered.graph.node)
    dims = _dims(inferred, inferred.graph.value_info)
    assert len(dims) > 50, "the lowered tensors are inferred"
    assert all(d != [None] for d in dims.values()), "every float tensor has a shape"
    if "fixed_r" in count:  # symbolic: the batch, and the channel and metric widths of the model's inputs
        assert {name: d for name, d in dims.items() if not set(d) <= {"B", "C", "D"}} == {}
