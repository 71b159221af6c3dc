"""The runner interface every backend follows, built on polygraphy's runners.

A runner has a ``name``; ``with runner:`` loads it (a session, an engine) and frees it again;
``runner.run(images)`` returns :class:`Outputs`: the logits, the tokens entering each block,
and for a replaying runner the decisions its merge steps made. Options (a replayed plan, a
profiler) are given when a runner is built, never through module state.

Runners are polygraphy ``BaseRunner`` subclasses (its ONNX Runtime runner is used as it is),
so they also work with polygraphy's own tools: ``infer(feed_dict)`` returns the graph's
outputs by name and ``last_inference_time()`` the time of the last call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from polygraphy.backend.base import BaseRunner

INPUT_NAME = "images"
LOGITS = "logits"
TOKENS = "tokens_per_layer"


@dataclass
class Outputs:
    """What one call of a runner returns.

    logits: [B, K] float32; tokens: tokens entering each block (None for an unmerged model);
    decisions: for a replaying runner, per merge step the ``MergeStep`` that the node's own
    attributes give on its inputs (atm_export.backends.ort_custom_op).
    """

    logits: np.ndarray
    tokens: list[int] | None = None
    decisions: list | None = None


class Runner(BaseRunner):
    """polygraphy's runner interface plus ``run(images) -> Outputs``."""

    def run(self, images: np.ndarray) -> Outputs:
        """images [B, 3, H, W] float32 -> Outputs. The runner must be active (``with runner:``)."""
        out = self.infer({INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)}, check_inputs=False)
        tokens = out.get(TOKENS)
        return Outputs(np.asarray(out[LOGITS], dtype=np.float32),
                       None if tokens is None else [int(t) for t in np.asarray(tokens).tolist()],
                       self.last_decisions())

    def last_decisions(self) -> list | None:
        """The merge decisions of the last call, for runners that record them."""
        return None
