"""Parity of a backend against eager PyTorch: logits, top-1, and per-block token counts.

ATM makes discrete choices in every merge step: how many pairs clear the threshold, which
tokens are among the r best matched, which partner each one takes. Where eager PyTorch made a
choice within float rounding of the alternative, another backend may rightly choose the other
way, and from there on its outputs are not comparable. So every reference run records, per
block, how close its choices came (``margin`` to the threshold, ``tie gap`` to the runner-up),
and a backend's batch ends in one of three states:

- ``passed``: token counts equal and logits within the tolerance, elementwise
  ``|a - b| <= atol + rtol * |b|`` (b: eager PyTorch; polygraphy's rule);
- ``failed``: a difference that no close call explains;
- ``inconclusive``: a difference that starts after a choice within float rounding; the note
  names the block and the margin.

What can explain what: a block's token count is decided by how many similarities clear the
threshold, so a count that differs first after block k is explained only by a similarity
within rounding of block k's threshold, or by a near tie in an earlier block (other tokens
merged there, so block k saw other inputs). A tie between two partners in block k itself never
changes how many tokens block k merges, and a near-threshold similarity in an earlier block
changed nothing (that block's count agreed). Logits that differ with equal counts are
explained by a near tie, or by a near-threshold similarity in the last block, whose merge
count shows in no token count.

An inconclusive batch is never reported as passed (``passed`` is false), but it does not fail
the run unless ``strict`` is set (``fails_run``). At a reduced precision (fp16, bf16) moved
decisions are expected: each batch lists every block whose count moved with eager's margin
there (``moved_decisions``), its top-1 agreement counts every batch, and ``strict`` leaves it be.

ONNX Runtime backends get two more checks that settle the close calls: ``replay_check`` runs
the plugin flavour with eager PyTorch's recorded choices (so the graph around the op must
match to float precision, and each node's own choice, from its attributes on the replayed
inputs, must be eager's or differ only within rounding), and ``lowering_check`` runs every
lowered TokenMerge of the portable flavour on the very inputs eager PyTorch's merge steps saw,
with the same rule for its choices. OpenVINO at fp32 gets both too, its lowering check run by
OpenVINO itself. A free run that is inconclusive but whose batch passes these checks is
reported as passed, with a note.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from . import merge as M
from .patch import ATMVisionTransformer, RecordedStep, RunStats

PASSED, FAILED, INCONCLUSIVE = "passed", "failed", "inconclusive"
RULE = "|a - b| <= atol + rtol * |b|, elementwise, b = eager PyTorch"


@dataclass(frozen=True)
class Tolerance:
    """How far a backend's outputs may be from eager PyTorch's: ``|a - b| <= atol + rtol * |b|``."""

    atol: float
    rtol: float

    def error_ratio(self, actual, expected) -> float:
        """max over elements of |a - b| / (atol + rtol |b|): at most 1 passes; inf for a NaN
        or a shape mismatch."""
        a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
        if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
            return float("inf")
        if a.size == 0:
            return 0.0
        diff = np.abs(a - b)
        allowed = self.atol + self.rtol * np.abs(b)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(diff == 0, 0.0, diff / allowed)
        return float(ratio.max())

    def to_dict(self) -> dict:
        return {**asdict(self), "rule": RULE}


#: Defaults per precision. fp32: a ViT's logits through ONNX Runtime differ from PyTorch's by
#: about 1e-6 (docs/parity.md); fp16 engines round every activation to 11 bits; bf16 (OpenVINO
#: on CPUs with bf16) to 8 bits, eight times coarser.
DEFAULT_TOLERANCES = {"fp32": Tolerance(atol=1e-5, rtol=1e-4), "fp16": Tolerance(atol=2e-2, rtol=2e-2),
                      "bf16": Tolerance(atol=5e-2, rtol=5e-2)}
#: How close a choice must be for float rounding to explain a different one.
DECISION_TOL = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 4e-2}
#: Precisions below fp32, whose moved decisions each batch lists block by block.
REDUCED = ("fp16", "bf16")

#: merge plans -> a replaying runner of the plugin flavour (atm_export.backends; not yet active)
OpenReplay = Callable[[list], object]


def tolerance_for(precision: str, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """The default tolerance of ``precision``, with ``atol``/``rtol`` replacing its fields when given."""
    base = DEFAULT_TOLERANCES[precision]
    return Tolerance(base.atol if atol is None else float(atol), base.rtol if rtol is None else float(rtol))


@dataclass
class Reference:
    """Eager PyTorch on one batch: what every backend is compared with."""

    images: np.ndarray
    logits: np.ndarray
    tokens: list[int]
    margins: list[float | None]  # per block: smallest |similarity - threshold|
    tie_gaps: list[float | None]  # per block: smallest gap between a choice and its runner-up
    thresholds: list[float | None]
    steps: list[RecordedStep]  # every merge step's inputs and choices
    stats: RunStats  # the run's statistics (token counts per image, merge counts)

    def _call(self, block: int, kind: str, precision: str) -> tuple[str, int, float] | None:
        value = (self.margins if kind == "near_threshold" else self.tie_gaps)[block]
        return (kind, block, value) if value is not None and value <= DECISION_TOL[precision] else None

    def explain_counts(self, tokens: list[int], precision: str) -> tuple[int | None, tuple[str, int, float] | None]:
        """(first block whose token count differs from ``tokens``, or None; the close call
        that explains it, or None).

        The merge step of the block before decided that count: only a similarity within
        rounding of that step's threshold changes how many tokens it merges. Any earlier step
        explains it through a near tie (other tokens merged, so other inputs later), but not
        through a near-threshold similarity: its count agreed, so it changed nothing.
        """
        first = next((i for i, (a, b) in enumerate(zip(tokens, self.tokens)) if a != b), None)
        if first is None:
            return None, None
        step = first - 1
        if step < 0:
            return first, None
        calls = [self._call(i, "near_tie", precision) for i in range(step)]
        calls.append(self._call(step, "near_threshold", precision))
        return first, next((c for c in calls if c), None)

    def explain_logits(self, precision: str) -> tuple[str, int, float] | None:
        """The close call that explains different logits with equal token counts, or None: a
        near tie anywhere, or a near-threshold similarity in the last block, whose merge count
        shows in no token count (global-pool models merge there)."""
        last = len(self.tokens) - 1
        calls = [self._call(i, "near_tie", precision) for i in range(last + 1)]
        calls.append(self._call(last, "near_threshold", precision))
        return next((c for c in calls if c), None)

    def moved_decisions(self, tokens: list[int], precision: str) -> list[dict]:
        """Every block whose token count differs from eager's: both counts, the block whose
        merge step decided it, how close eager's choice there came to another count (its
        margin, None for the first block), and whether that is within ``precision``'s rounding.
        Blocks after the first moved one saw other inputs, so their margins are eager's only."""
        moved = []
        for i, (mine, eager) in enumerate(zip(tokens, self.tokens)):
            if mine != eager:
                margin = self.margins[i - 1] if i > 0 else None
                moved.append({"block": i + 1, "tokens": mine, "reference_tokens": eager, "decided_in_block": i,
                              "margin": margin,
                              "within_rounding": margin is not None and margin <= DECISION_TOL[precision]})
        return moved

    def min_decision_margin(self) -> float:
        values = [v for v in (*self.margins, *self.tie_gaps) if v is not None]
        return min(values) if values else float("inf")


def reference_run(atm: ATMVisionTransformer, images: torch.Tensor) -> Reference:
    """Eager PyTorch on ``images``, with the decision margins measured."""
    with torch.inference_mode():
        logits, stats = atm.run(images, diagnostics=True)
    thresholds = [None if s is None else s.threshold for s in atm.steps]
    return Reference(images.numpy(), logits.numpy(), [int(t) for t in stats.tokens_per_layer],
                     list(stats.margin_per_layer), list(stats.tie_gap_per_layer), thresholds, stats.steps, stats)


def explain_call(ref: Reference, call: tuple[str, int, float]) -> str:
    kind, block, margin = call
    threshold = ref.thresholds[block]
    near_count = (f"a similarity lies {margin:.1e} from the threshold {threshold:.6f}" if threshold is not None else
                  f"an image's redundancy lies {margin:.1e} from a step of AdaMerge's intensity rule")
    what = (near_count if kind == "near_threshold" else
            f"two candidate choices are {margin:.1e} apart (which tokens merge, or into which partner)")
    return f"block {block + 1}: {what}, within float rounding, so a backend may rightly choose otherwise"


def compare(ref: Reference, logits: np.ndarray, tokens: list[int] | None, precision: str = "fp32",
            tolerance: Tolerance | None = None) -> dict:
    """One backend on one batch."""
    tol = tolerance or DEFAULT_TOLERANCES[precision]
    diff = float(np.abs(logits.astype(np.float64) - ref.logits).max()) if logits.shape == ref.logits.shape else float("inf")
    ratio = tol.error_ratio(logits, ref.logits)
    top1 = float(np.mean(logits.argmax(-1) == ref.logits.argmax(-1))) if logits.shape == ref.logits.shape else 0.0
    tokens = None if tokens is None else [int(t) for t in tokens]
    equal = None if tokens is None else tokens == ref.tokens
    result = {"max_abs_diff": diff, "error_ratio": ratio, "top1_agreement": top1, "token_counts_equal": equal,
              "tokens": tokens, "reference_tokens": ref.tokens, "min_decision_margin": ref.min_decision_margin()}
    if equal is not False and ratio <= 1.0:
        result["status"] = PASSED
        return result
    if equal is False:
        result["moved_decisions"] = moved = ref.moved_decisions(tokens, precision)
        first, call = ref.explain_counts(tokens, precision)
        where = f"the backend kept {tokens[first]} tokens in block {first + 1} where PyTorch kept {ref.tokens[first]}"
        if precision in REDUCED:  # each block a reduced precision moved, never only the first
            where += f" ({precision} moved the counts of blocks " + ", ".join(
                f"{m['block']} ({m['tokens']} vs {m['reference_tokens']})" for m in moved) + ")"
        unexplained = (f"token counts differ from block {first + 1} on ({tokens[first]} vs {ref.tokens[first]}), and "
                       f"no similarity near block {first}'s threshold nor any near tie before explains it")
    else:
        call = ref.explain_logits(precision)
        where = "the token counts agree but the logits differ"
        unexplained = (f"logits differ by up to {diff:.2e} ({ratio:.1f} times the tolerance atol {tol.atol:g}, "
                       f"rtol {tol.rtol:g}) with equal token counts and no close choices")
    if call:
        result.update(status=INCONCLUSIVE, reason=call[0],
                      note=f"{explain_call(ref, call)}; {where}; the outputs are not comparable on this batch")
    else:
        result.update(status=FAILED, note=unexplained)
    return result


def threshold_margin(step: RecordedStep) -> float:
    """How close eager's merge step came to another count: smallest |score - threshold|, or for
    AdaMerge's intensity rule the smallest distance of a redundancy to a step of the rule (inf
    for a fixed r)."""
    spec = step.spec
    if spec.threshold is None and spec.intensity is None:
        return float("inf")
    score = M.match_scores(step.metric, step.plan.split, spec.weighting, spec.salience_temperature)[0]
    if spec.intensity is not None:
        return M.intensity_margin(M.redundancy(score), spec.intensity)
    return float((score - spec.threshold).abs().min()) if score.numel() else float("inf")


def same_choices(step: RecordedStep, other: M.Choices) -> bool:
    """Whether another run merged the same tokens into the same partners (order of src aside)."""
    mine = M.Choices.of(step.plan)
    if other.src.shape != mine.src.shape or not torch.equal(other.kept, mine.kept):
        return False
    a, b = mine.src.sort(dim=1), other.src.sort(dim=1)
    return torch.equal(a.values, b.values) and torch.equal(mine.dst.gather(1, a.indices), other.dst.gather(1, b.indices))


def choice_deviation(step: RecordedStep, other: M.Choices) -> float:
    """How much worse, in eager's own similarities, another run's choices for ``step`` are.

    0 for eager's choices; a tiny value for a different choice among near-equals; for another
    r, the distance of eager's closest similarity to the threshold (only that can change r);
    inf for choices that are no valid merge of eager's split (a token outside A or B, a kept
    token out of order, a token merged twice) or another r under a fixed count.
    """
    plan = step.plan
    mine = M.Choices.of(plan)
    if other.src.shape != mine.src.shape or other.kept.shape != mine.kept.shape:
        return threshold_margin(step)
    batch, n = step.x.shape[:2]
    position = torch.full((batch, n), -1, dtype=torch.int64)  # token -> its position in A (or B)
    a_pos = position.scatter(1, plan.split.a, torch.arange(plan.split.a.shape[1]).expand_as(plan.split.a))
    b_pos = position.scatter(1, plan.split.b, torch.arange(plan.split.b.shape[1]).expand_as(plan.split.b))
    try:
        src, dst, kept = a_pos.gather(1, other.src), b_pos.gather(1, other.dst), a_pos.gather(1, other.kept)
    except RuntimeError:  # a position outside the sequence
        return float("inf")
    if (src < 0).any() or (dst < 0).any() or (kept < 0).any():
        return float("inf")
    is_src = torch.zeros(batch, plan.split.a.shape[1], dtype=torch.bool).scatter(1, src, True)
    if int(is_src.sum()) != src.numel():
        return float("inf")  # a token merged twice
    expected_kept = torch.arange(is_src.shape[1]).expand_as(is_src)[~is_src].view(batch, -1)
    if not torch.equal(kept, expected_kept):
        return float("inf")
    if plan.r == 0:
        return 0.0
    ma, mb = plan.split.select(M.unit_rows(step.metric))
    sim = (ma @ mb.transpose(1, 2)).clamp(-1.0, 1.0)
    best = sim.max(dim=-1).values
    score = M.match_scores(step.metric, plan.split, step.spec.weighting, step.spec.salience_temperature)[0]
    worst_chosen = score.gather(1, plan.src).min(dim=1, keepdim=True).values  # ranked by the (weighted) score
    which = (worst_chosen - score.gather(1, src)).clamp_min(0).max()
    sim_of_src = sim.gather(1, src.unsqueeze(-1).expand(-1, -1, sim.shape[-1]))  # [B, r, Nb]
    partner = (best.gather(1, src) - sim_of_src.gather(2, dst.unsqueeze(-1)).squeeze(-1)).clamp_min(0).max()
    return float(max(which, partner))


def replay_check(open_replay: OpenReplay, ref: Reference, tolerance: Tolerance | None = None) -> dict:
    """Run the plugin flavour with eager PyTorch's choices replayed (``open_replay(plans)``).

    Two findings: the graph around the op must reproduce eager's logits, and every node's own
    decision (its attributes applied to the replayed inputs) must be eager's choice or one
    within float rounding of it.
    """
    tol = tolerance or DEFAULT_TOLERANCES["fp32"]
    try:
        with open_replay([step.plan for step in ref.steps]) as runner:
            out = runner.run(ref.images)
    except Exception as exc:
        return {"status": FAILED, "note": f"replay failed: {str(exc).splitlines()[0]}"}
    logits, tokens = out.logits, out.tokens
    diff = float(np.abs(logits.astype(np.float64) - ref.logits).max())
    ratio = tol.error_ratio(logits, ref.logits)
    result = {"status": PASSED, "max_abs_diff": diff, "error_ratio": ratio}
    for step, own in zip(ref.steps, out.decisions or []):
        deviation = choice_deviation(step, M.Choices.of(own.plan))
        if deviation > DECISION_TOL["fp32"]:
            what = (f"merges {own.r} pairs where eager merges {step.plan.r}" if own.r != step.plan.r
                    else "chooses other tokens or partners than eager")
            result.update(status=FAILED, note=f"on eager's inputs, TokenMerge of block {step.block + 1} {what}, "
                                              f"which no close call explains: its attributes do not give eager's step")
            return result
    if tokens != ref.tokens or ratio > 1.0:
        result.update(status=FAILED, note=f"with eager's choices replayed the graph still differs (max abs diff "
                                          f"{diff:.2e}, {ratio:.1f} times the tolerance)")
    return result


def lowering_check(portable_model, plugin_model, ref: Reference, tolerance: Tolerance | None = None,
                   run_step: Callable | None = None) -> dict:
    """Every lowered merge step of the portable flavour, run alone on the inputs eager's merge
    step saw: same choices and outputs, or a different choice only where eager's own
    similarities make it a tie within rounding. run_step(model, feeds) -> outputs: the runtime
    that runs each step (default: ONNX Runtime on the CPU)."""
    from .contract import node_name
    from .export.lowering import extract_step

    if run_step is None:
        from .backends.ort import run_step

    tol = tolerance or DEFAULT_TOLERANCES["fp32"]
    merges = {n.name: n for n in plugin_model.graph.node if n.op_type == "TokenMerge"}
    worst_gap, worst_ratio, differing = 0.0, 0.0, []
    for step in ref.steps:
        node = merges.get(node_name(step.block + 1))
        try:
            if node is None:
                raise ValueError(f"no TokenMerge node for block {step.block + 1}")
            model = extract_step(portable_model, node)
        except ValueError as exc:
            return {"status": FAILED, "note": f"model.onnx is not atm-export's lowering: {exc}"}
        feeds = {"x": step.x.numpy(), "size": step.size.numpy(), "metric": step.metric.numpy()}
        try:
            x_out, size_out, _, src, dst, kept = run_step(model, feeds)
        except Exception as exc:  # e.g. an index out of range: not a valid merge step
            return {"status": FAILED, "choices_differ_in_blocks": [step.block + 1],
                    "note": f"the lowered merge step of block {step.block + 1} fails on eager's inputs: "
                            f"{str(exc).splitlines()[0][:200]}"}
        choices = M.Choices(*(torch.from_numpy(t) for t in (src, dst, kept)))
        if same_choices(step, choices):
            expected_x, expected_size = M.merge_weighted(step.plan, step.x, step.size)
            worst_ratio = max(worst_ratio, tol.error_ratio(x_out, expected_x.numpy()),
                              tol.error_ratio(size_out, expected_size.numpy()))
        else:
            differing.append(step.block + 1)
            worst_gap = max(worst_gap, choice_deviation(step, choices))
    ok = worst_ratio <= 1.0 and worst_gap <= DECISION_TOL["fp32"]
    result = {"status": PASSED if ok else FAILED, "steps": len(ref.steps), "error_ratio": worst_ratio,
              "choices_differ_in_blocks": differing, "largest_choice_gap": worst_gap}
    if not ok:
        result["note"] = (f"a lowered merge step differs from eager on the same inputs (outputs at {worst_ratio:.2g} "
                          f"times the tolerance, choice gap {worst_gap:.2e} in blocks {differing})")
    return result


def check_backend(runner, references: list[Reference], precision: str = "fp32", strict: bool = False,
                  extra_checks: dict | None = None, tolerance: Tolerance | None = None) -> dict:
    """An (active) runner on every reference batch -> the report's ``parity.<backend>`` entry.

    extra_checks: name -> fn(reference) -> {"status", ...}, run on every batch (see
    ``replay_check`` and ``lowering_check``); they can settle an inconclusive free run.
    """
    tol = tolerance or DEFAULT_TOLERANCES[precision]
    batches = {}
    for ref in references:
        try:
            out = runner.run(ref.images)
            result = compare(ref, out.logits, out.tokens, precision, tol)
        except Exception as exc:  # a broken graph may fail to run at all: that is a failed check
            result = {"status": FAILED, "max_abs_diff": None, "error_ratio": None, "top1_agreement": None,
                      "token_counts_equal": None, "note": f"the backend fails to run: {str(exc).splitlines()[0][:200]}"}
        checks = {name: fn(ref) for name, fn in (extra_checks or {}).items()}
        if checks:
            result["checks"] = checks
            bad = [name for name, c in checks.items() if c["status"] != PASSED]
            if bad:
                notes = [checks[name].get("note", f"{name} failed") for name in bad]
                result["note"] = "; ".join(notes if result["status"] != FAILED else [*notes, result["note"]])
                result["status"] = FAILED
            elif not bad and result["status"] == INCONCLUSIVE:
                result["status"] = PASSED
                result["settled"] = True  # its free-run numbers are not a measure of fidelity
                how = ["with eager's choices replayed, the graph matches and each node chooses as eager"]
                if "lowering" in checks:
                    how.append("on the same inputs the lowered op chose alike or within a rounding tie")
                result["note"] = f"{result['note']}. Settled by {' and '.join(checks)}: {'; '.join(how)}"
        batches[str(ref.images.shape[0])] = result
    statuses = [b["status"] for b in batches.values()]
    comparable = [b for b in batches.values()
                  if b["status"] != INCONCLUSIVE and not b.get("settled") and b["max_abs_diff"] is not None]
    # at reduced precision what a deployer gets includes the decisions it moved
    top1_from = [b for b in batches.values() if b["top1_agreement"] is not None] if precision in REDUCED else comparable
    status = FAILED if FAILED in statuses else (INCONCLUSIVE if INCONCLUSIVE in statuses else PASSED)
    same_counts = [b for b in comparable if b["token_counts_equal"] is not False]
    return {
        "max_abs_diff": max((b["max_abs_diff"] for b in same_counts), default=None),
        "max_error_ratio": max((b["error_ratio"] for b in same_counts), default=None),
        "top1_agreement": min((b["top1_agreement"] for b in top1_from), default=None),
        "token_counts_equal": all(b["token_counts_equal"] is not False for b in comparable) if comparable else None,
        "settled_batches": [k for k, b in batches.items() if b.get("settled")],
        "passed": status == PASSED,
        "status": status,
        "fails_run": status == FAILED or (strict and status == INCONCLUSIVE and precision not in REDUCED),
        "precision": precision,
        "tolerance": tol.to_dict(),
        "batches": batches,
        "notes": [f"batch {k}: {b['note']}" for k, b in batches.items() if b.get("note")],
    }


def settling_checks(plugin_model, open_replay: OpenReplay, portable_model=None,
                    tolerance: Tolerance | None = None, openvino_step: Callable | None = None,
                    weights_dir=None) -> dict[str, dict]:
    """The replay and lowering checks for the ONNX Runtime backends (and OpenVINO at fp32, with
    ``openvino_step``: its run_step), by backend name. weights_dir: where the side files of
    weightless graphs lie.

    The portable flavour is checked as the plugin graph (verified by the replay) with each
    merge step lowered (verified step by step, by the runtime that runs it): this holds only if
    model.onnx is exactly the lowering of model.plugin.onnx; if not, its integrity check fails.
    """
    from functools import partial

    from .export.integrity import lowering_difference

    replays: dict[int, dict] = {}

    def replay(ref: Reference) -> dict:  # one replay per batch, shared by both backends
        if id(ref) not in replays:
            replays[id(ref)] = replay_check(open_replay, ref, tolerance)
        return replays[id(ref)]

    checks = {"ort_plugin": {"replay": replay}}
    if portable_model is not None:
        difference = lowering_difference(portable_model, plugin_model, weights_dir=weights_dir)
        runners = {"ort_portable": None, **({"openvino": openvino_step} if openvino_step else {})}
        for name, run_step in runners.items():
            if difference:
                checks[name] = {"integrity": lambda ref: {"status": FAILED, "note": difference}}
            else:
                checks[name] = {"lowering": partial(lowering_check, portable_model, plugin_model, tolerance=tolerance,
                                                    run_step=run_step),
                                "replay of the shared graph": replay}
    return checks
