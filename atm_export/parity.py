"""Parity of a backend against eager PyTorch: logits, top-1, and per-block token counts.

ATM makes discrete choices in every merge step: how many pairs clear the threshold, which
tokens are among the r best matched, which partner each one takes. Where eager PyTorch made a
choice within float rounding of the alternative, another backend may rightly choose the other
way, and from there on its outputs are not comparable. So every reference run records, per
block, how close its choices came (``margin`` to the threshold, ``tie gap`` to the runner-up),
and a backend's batch ends in one of three states:

- ``passed``: token counts equal and logits within the tolerance (fp32: 1e-4);
- ``failed``: a difference that no close call explains;
- ``inconclusive``: a difference that starts at a block where a choice was within float
  rounding (``near_threshold`` or ``near_tie``); the note names the block and the margin.

An inconclusive batch is never reported as passed (``passed`` is false), but it does not fail
the run unless ``strict`` is set (``fails_run``).

ONNX Runtime backends get two more checks that settle the close calls: ``replay_check`` runs
the plugin flavour with eager PyTorch's recorded choices (so the graph around the op must
match to float precision), and ``lowering_check`` runs every lowered TokenMerge of the
portable flavour on the very inputs eager PyTorch's merge steps saw, and accepts a different
choice only where eager's own similarities make it a tie within rounding. A free run that is
inconclusive but whose batch passes these checks is reported as passed, with a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import merge as M
from .patch import ATMVisionTransformer, RecordedStep

LOGITS_TOL = {"fp32": 1e-4, "fp16": 2e-2}
#: How close a choice must be for float rounding to explain a different one.
DECISION_TOL = {"fp32": 1e-5, "fp16": 5e-3}

PASSED, FAILED, INCONCLUSIVE = "passed", "failed", "inconclusive"

#: images [B, 3, H, W] float32 -> (logits [B, K], tokens entering each block or None)
Backend = Callable[[np.ndarray], tuple[np.ndarray, list[int] | None]]


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

    def closest_call(self, last_block: int, precision: str) -> tuple[str, int, float] | None:
        """The first block (0-based, up to ``last_block``) with a choice within rounding."""
        tol = DECISION_TOL[precision]
        for i in range(min(last_block + 1, len(self.margins))):
            if self.margins[i] is not None and self.margins[i] <= tol:
                return "near_threshold", i, self.margins[i]
            if self.tie_gaps[i] is not None and self.tie_gaps[i] <= tol:
                return "near_tie", i, self.tie_gaps[i]
        return None

    def min_decision_margin(self) -> float:
        values = [v for v in (*self.margins, *self.tie_gaps) if v is not None]
        return min(values) if values else float("inf")


def reference_run(atm: ATMVisionTransformer, images: torch.Tensor) -> Reference:
    """Eager PyTorch on ``images``, with the decision margins measured."""
    atm.diagnostics = True
    try:
        with torch.inference_mode():
            logits = atm(images)
    finally:
        atm.diagnostics = False
    stats = atm.last_stats
    thresholds = [None if s is None else s.threshold for s in atm.steps]
    return Reference(images.numpy(), logits.numpy(), [int(t) for t in stats.tokens_per_layer],
                     list(stats.margin_per_layer), list(stats.tie_gap_per_layer), thresholds, stats.steps)


def _explain(ref: Reference, kind: str, block: int, margin: float, tokens, first: int | None) -> str:
    what = (f"a similarity lies {margin:.1e} from the threshold {ref.thresholds[block]:.6f}"
            if kind == "near_threshold" else
            f"two candidate choices are {margin:.1e} apart (which tokens merge, or into which partner)")
    where = (f"the backend kept {tokens[first]} tokens in block {first + 1} where PyTorch kept {ref.tokens[first]}"
             if first is not None else "the token counts agree but the logits differ")
    return (f"block {block + 1}: {what}, within float rounding, so a backend may rightly choose otherwise; "
            f"{where}; the outputs are not comparable on this batch")


def compare(ref: Reference, logits: np.ndarray, tokens: list[int] | None, precision: str = "fp32") -> dict:
    """One backend on one batch."""
    diff = float(np.abs(logits.astype(np.float64) - ref.logits).max())
    top1 = float(np.mean(logits.argmax(-1) == ref.logits.argmax(-1)))
    tokens = None if tokens is None else [int(t) for t in tokens]
    equal = None if tokens is None else tokens == ref.tokens
    result = {"max_abs_diff": diff, "top1_agreement": top1, "token_counts_equal": equal,
              "tokens": tokens, "reference_tokens": ref.tokens,
              "min_decision_margin": ref.min_decision_margin()}
    if equal is not False and diff <= LOGITS_TOL[precision]:
        result["status"] = PASSED
        return result
    first = None if equal is not False else next(i for i, (a, b) in enumerate(zip(tokens, ref.tokens)) if a != b)
    # the merge step of block ``first - 1`` decided block ``first``'s count
    last_block = len(ref.tokens) - 1 if first is None else first - 1
    call = ref.closest_call(last_block, precision)
    if call:
        kind, block, margin = call
        result.update(status=INCONCLUSIVE, reason=kind, note=_explain(ref, kind, block, margin, tokens, first))
    elif first is not None:
        result.update(status=FAILED, note=f"token counts differ from block {first + 1} on "
                                          f"({tokens[first]} vs {ref.tokens[first]}) and no choice before it was close")
    else:
        result.update(status=FAILED, note=f"logits differ by {diff:.2e} (tolerance {LOGITS_TOL[precision]:g}) "
                                          "with equal token counts and no close choices")
    return result


def replay_check(run: Backend, ref: Reference) -> dict:
    """Run the plugin flavour in ONNX Runtime with eager PyTorch's choices replayed."""
    from .backends.ort_custom_op import replaying

    try:
        with replaying([step.plan for step in ref.steps]):
            logits, tokens = run(ref.images)
    except Exception as exc:
        return {"status": FAILED, "note": f"replay failed: {str(exc).splitlines()[0]}"}
    diff = float(np.abs(logits.astype(np.float64) - ref.logits).max())
    ok = tokens == ref.tokens and diff <= LOGITS_TOL["fp32"]
    return {"status": PASSED if ok else FAILED, "max_abs_diff": diff,
            **({} if ok else {"note": f"with eager's choices replayed the graph still differs (max abs diff {diff:.2e})"})}


def same_choices(plan: M.MergePlan, src: torch.Tensor, dst: torch.Tensor, unm: torch.Tensor) -> bool:
    """Whether another run merged the same tokens into the same partners (order of src aside)."""
    if src.shape != plan.src.shape or not torch.equal(unm, plan.unm):
        return False
    mine, theirs = plan.src.sort(dim=1), src.sort(dim=1)
    return torch.equal(mine.values, theirs.values) and torch.equal(
        plan.dst.gather(1, mine.indices), dst.gather(1, theirs.indices))


def choice_deviation(step: RecordedStep, src: torch.Tensor, dst: torch.Tensor, unm: torch.Tensor) -> float:
    """How much worse, in eager's own similarities, another run's choices for ``step`` are.

    0 for eager's choices; a tiny value for a different choice among near-equals; inf for
    choices that are not a valid merge (another r, or kept tokens out of A's order).
    """
    plan = step.plan
    if src.shape != plan.src.shape or unm.shape != plan.unm.shape:
        return float("inf")
    metric = step.metric / step.metric.norm(dim=-1, keepdim=True).clamp_min(M.NORM_EPS)
    ma, mb = plan.split.select(metric)
    sim = (ma @ mb.transpose(1, 2)).clamp(-1.0, 1.0)
    score = sim.max(dim=-1).values
    na, nb = sim.shape[1], sim.shape[2]
    if src.numel() and (src.min() < 0 or src.max() >= na or dst.min() < 0 or dst.max() >= nb):
        return float("inf")
    if plan.r == 0:
        return 0.0 if torch.equal(unm, plan.unm) else float("inf")
    kept = torch.ones_like(score, dtype=torch.bool).scatter(1, src, False)
    expected_unm = torch.arange(score.shape[1]).expand_as(score)[kept].view(score.shape[0], -1)
    if not torch.equal(unm, expected_unm):
        return float("inf")
    worst_chosen = score.gather(1, plan.src).min(dim=1, keepdim=True).values
    which = (worst_chosen - score.gather(1, src)).clamp_min(0).max()
    sim_of_src = sim.gather(1, src.unsqueeze(-1).expand(-1, -1, sim.shape[-1]))  # [B, r, Nb]
    partner = (score.gather(1, src) - sim_of_src.gather(2, dst.unsqueeze(-1)).squeeze(-1)).clamp_min(0).max()
    return float(max(which, partner))


def lowering_check(portable_model, plugin_model, ref: Reference) -> dict:
    """Every lowered merge step of the portable flavour, run alone on the inputs eager's merge
    step saw: same choices and outputs, or a different choice only where eager's own
    similarities make it a tie within rounding."""
    import onnxruntime as ort

    from .export.lowering import extract_step

    merges = {n.name: n for n in plugin_model.graph.node if n.op_type == "TokenMerge"}
    worst_gap, worst_diff, differing = 0.0, 0.0, []
    for step in ref.steps:
        node = merges.get(f"TokenMerge_b{step.block + 1}")
        try:
            if node is None:
                raise ValueError(f"no TokenMerge node for block {step.block + 1}")
            model = extract_step(portable_model, node)
        except ValueError as exc:
            return {"status": FAILED, "note": f"model.onnx is not atm-export's lowering: {exc}"}
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {"x": step.x.numpy(), "size": step.size.numpy(), "metric": step.metric.numpy()}
        x_out, size_out, _, src, dst, unm = session.run(None, feeds)
        src, dst, unm = torch.from_numpy(src), torch.from_numpy(dst), torch.from_numpy(unm)
        if same_choices(step.plan, src, dst, unm):
            expected_x, expected_size = M.merge_weighted(step.plan, step.x, step.size)
            worst_diff = max(worst_diff, float(np.abs(x_out - expected_x.numpy()).max()),
                             float(np.abs(size_out - expected_size.numpy()).max()))
        else:
            differing.append(step.block + 1)
            worst_gap = max(worst_gap, choice_deviation(step, src, dst, unm))
    ok = worst_diff <= LOGITS_TOL["fp32"] and worst_gap <= DECISION_TOL["fp32"]
    result = {"status": PASSED if ok else FAILED, "steps": len(ref.steps), "max_abs_diff": worst_diff,
              "choices_differ_in_blocks": differing, "largest_choice_gap": worst_gap}
    if not ok:
        result["note"] = (f"a lowered merge step differs from eager on the same inputs "
                          f"(output diff {worst_diff:.2e}, choice gap {worst_gap:.2e} in blocks {differing})")
    return result


def check_backend(backend: Backend, references: list[Reference], precision: str = "fp32", strict: bool = False,
                  extra_checks: dict | None = None) -> dict:
    """A backend on every reference batch -> the report's ``parity.<backend>`` entry.

    extra_checks: name -> fn(reference) -> {"status", ...}, run on every batch (see
    ``replay_check`` and ``lowering_check``); they can settle an inconclusive free run.
    """
    batches = {}
    for ref in references:
        logits, tokens = backend(ref.images)
        result = compare(ref, logits, tokens, precision)
        checks = {name: fn(ref) for name, fn in (extra_checks or {}).items()}
        if checks:
            result["checks"] = checks
            bad = [name for name, c in checks.items() if c["status"] != PASSED]
            if bad and result["status"] != FAILED:
                result["status"] = FAILED
                result["note"] = "; ".join(checks[name].get("note", f"{name} failed") for name in bad)
            elif not bad and result["status"] == INCONCLUSIVE:
                result["status"] = PASSED
                result["settled"] = True  # its free-run numbers are not a measure of fidelity
                how = ["with eager's choices replayed, the graph matches"]
                if "lowering" in checks:
                    how.append("on the same inputs the lowered op chose alike or within a rounding tie")
                result["note"] = f"{result['note']}. Settled by {' and '.join(checks)}: {'; '.join(how)}"
        batches[str(ref.images.shape[0])] = result
    statuses = [b["status"] for b in batches.values()]
    comparable = [b for b in batches.values() if b["status"] != INCONCLUSIVE and not b.get("settled")]
    status = FAILED if FAILED in statuses else (INCONCLUSIVE if INCONCLUSIVE in statuses else PASSED)
    return {
        "max_abs_diff": max((b["max_abs_diff"] for b in comparable if b["token_counts_equal"] is not False), default=None),
        "top1_agreement": min((b["top1_agreement"] for b in comparable), default=None),
        "token_counts_equal": all(b["token_counts_equal"] is not False for b in comparable) if comparable else None,
        "settled_batches": [k for k, b in batches.items() if b.get("settled")],
        "passed": status == PASSED,
        "status": status,
        "fails_run": status == FAILED or (strict and status == INCONCLUSIVE),
        "tolerance": LOGITS_TOL[precision],
        "batches": batches,
        "notes": [f"batch {k}: {b['note']}" for k, b in batches.items() if b.get("note")],
    }


def ort_extra_checks(plugin_model, plugin_run: Backend, portable_model=None) -> dict[str, dict]:
    """The replay and lowering checks for the ONNX Runtime backends, by backend name.

    The portable flavour is checked as the plugin graph (verified by the replay) with each
    merge step lowered (verified step by step): this holds only if, outside the merge steps,
    model.onnx is node for node and weight for weight model.plugin.onnx; if not, its
    integrity check fails.
    """
    from functools import partial

    from .export.lowering import shared_graph_difference

    replays: dict[int, dict] = {}

    def replay(ref: Reference) -> dict:  # one replay per batch, shared by both backends
        if id(ref) not in replays:
            replays[id(ref)] = replay_check(plugin_run, ref)
        return replays[id(ref)]

    checks = {"ort_plugin": {"replay": replay}}
    if portable_model is not None:
        difference = shared_graph_difference(portable_model, plugin_model)
        if difference:
            note = f"model.onnx is not model.plugin.onnx with its merge steps lowered: {difference}"
            checks["ort_portable"] = {"integrity": lambda ref: {"status": FAILED, "note": note}}
        else:
            checks["ort_portable"] = {"lowering": partial(lowering_check, portable_model, plugin_model),
                                      "replay of the shared graph": replay}
    return checks
