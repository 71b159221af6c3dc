"""The parity verdicts: passed, failed, and inconclusive where a choice was within rounding."""

from __future__ import annotations

import numpy as np

from atm_export.parity import FAILED, INCONCLUSIVE, PASSED, Reference, check_backend, compare

LOGITS = np.random.default_rng(0).normal(size=(3, 10)).astype(np.float32)


def reference(margins=None, tie_gaps=None) -> Reference:
    depth = 4
    return Reference(
        images=np.zeros((3, 3, 8, 8), np.float32), logits=LOGITS, tokens=[197, 150, 120, 100],
        margins=margins or [0.01, 0.02, 0.03, None], tie_gaps=tie_gaps or [0.01, 0.02, 0.03, None],
        thresholds=[0.99, 0.97, 0.95, None][:depth], steps=[],
    )


def test_equal_counts_and_close_logits_pass():
    r = compare(reference(), LOGITS + 5e-5, [197, 150, 120, 100])
    assert r["status"] == PASSED


def test_far_logits_fail():
    r = compare(reference(), LOGITS + 1e-2, [197, 150, 120, 100])
    assert r["status"] == FAILED and "no close choices" in r["note"]


def test_count_difference_without_a_close_call_fails():
    r = compare(reference(), LOGITS, [197, 150, 121, 101])
    assert r["status"] == FAILED and "block 3" in r["note"]


def test_count_difference_at_a_threshold_is_inconclusive_and_says_where():
    r = compare(reference(margins=[0.01, 3e-7, 0.03, None]), LOGITS + 0.1, [197, 150, 121, 101])
    assert r["status"] == INCONCLUSIVE and r["reason"] == "near_threshold"
    assert "block 2" in r["note"] and "3.0e-07" in r["note"] and "0.970000" in r["note"]


def test_logit_difference_after_a_near_tie_is_inconclusive():
    r = compare(reference(tie_gaps=[2e-7, 0.02, 0.03, None]), LOGITS + 0.1, [197, 150, 120, 100])
    assert r["status"] == INCONCLUSIVE and r["reason"] == "near_tie"


def test_a_close_call_after_the_divergence_does_not_excuse_it():
    # counts differ from block 2 on (decided by block 1's step); the close call is in block 3
    r = compare(reference(margins=[0.01, 0.02, 1e-8, None]), LOGITS, [197, 151, 121, 101])
    assert r["status"] == FAILED


def test_fp16_tolerances_are_wider():
    assert compare(reference(), LOGITS + 1e-2, [197, 150, 120, 100], precision="fp16")["status"] == PASSED


def test_summary_and_strict_mode():
    refs = [reference(tie_gaps=[2e-7, 0.02, 0.03, None])]
    backend = lambda images: (LOGITS + 0.1, [197, 150, 120, 100])  # noqa: E731
    loose = check_backend(backend, refs)
    assert loose["status"] == INCONCLUSIVE and not loose["passed"] and not loose["fails_run"]
    assert check_backend(backend, refs, strict=True)["fails_run"]


def test_extra_checks_settle_or_fail():
    refs = [reference(tie_gaps=[2e-7, 0.02, 0.03, None])]
    backend = lambda images: (LOGITS + 0.1, [197, 150, 120, 100])  # noqa: E731
    settled = check_backend(backend, refs, extra_checks={"replay": lambda ref: {"status": PASSED}})
    assert settled["status"] == PASSED and settled["settled_batches"] == ["3"] and "Settled by replay" in settled["notes"][0]
    broken = check_backend(backend, refs, extra_checks={"replay": lambda ref: {"status": FAILED, "note": "x"}})
    assert broken["status"] == FAILED
