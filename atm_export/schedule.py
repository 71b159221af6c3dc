"""Merge-count policies: how many token pairs each block merges.

- ``atm``: ATM's layer-dependent threshold with batch-adaptive merging. Block l (1-based)
  merges the pairs whose similarity exceeds
  ``theta_l = max(alpha - (exp(beta * (l - 1)) - 1), theta_min)``; the batch merges
  ``r_l = floor(batch mean of those counts)`` pairs in every image. Blocks after
  ``split_layer`` use size-distinctive matching.
- ``atm-per-image``: the same thresholds, but every image merges its own count (the images
  are run one at a time). For comparison with the batch-adaptive mode.
- ``tome``: a fixed r per block (one number, or one per block), alternate matching. A list
  of r per block is also how a recorded token schedule is replayed for benchmarks.
- ``none``: no merging at all (the patched model then reproduces timm's).

The threshold formula and ``r_l = floor(mean)`` are reconstructions (docs/method.md).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field

from .errors import SettingsError, UserError
from .merge import ALTERNATE, SIZE_DISTINCTIVE

POLICIES = ("atm", "atm-per-image", "tome", "none")


@dataclass(frozen=True)
class StepSpec:
    """What the merge step of one block does: threshold (adaptive) or r (fixed), and split."""

    split_mode: str
    threshold: float | None = None
    r: int | None = None


@dataclass(frozen=True)
class MergeConfig:
    """Every setting of a merge schedule, checked when it is built.

    A setting that cannot work raises :class:`~atm_export.errors.SettingsError` (one line) at
    construction; the checks that need the model's depth (``split_layer`` and the length of an
    ``r`` list) run in :meth:`validate` and :meth:`steps`. For a model's preset with some
    settings changed, use :meth:`from_preset`.

    split_layer: the last block (1-based) that uses alternate matching; later blocks use
    size-distinctive matching. ``None`` means about 3/4 of the depth for ATM (the paper's
    choice, 9 of 12 blocks) and never for ToMe.
    r: the tome policy's merge count per block: one number (``8`` is taken as ``(8,)``), or one
    per block. Only the tome policy reads it, so any other policy refuses it.
    prop_attn: proportional attention; ``None`` means on for class-token models and off for
    global-pool models (the paper's MAE setting).
    """

    policy: str = "atm"
    alpha: float = 0.99
    beta: float = 0.04
    theta_min: float = 0.88
    split_layer: int | None = None
    r: tuple[int, ...] = field(default_factory=tuple)
    prop_attn: bool | None = None

    def __post_init__(self):
        if isinstance(self.r, (int, float)) and not isinstance(self.r, bool):
            object.__setattr__(self, "r", (self.r,))
        elif isinstance(self.r, (list, tuple)):
            object.__setattr__(self, "r", tuple(self.r))
        self._check()

    @classmethod
    def from_preset(cls, model: str, preset: str = "lossless", **overrides) -> "MergeConfig":
        """A registered model's preset with ``overrides`` (MergeConfig fields) on top.

        ``model``: a registry short name (``deit_s``) or a timm name. The rules are the
        command line's (atm_export.settings.resolve_settings): e.g.
        ``MergeConfig.from_preset("deit_s", alpha=0.985)`` is deit_s's lossless preset with
        alpha 0.985, and ``MergeConfig.from_preset("deit_s", policy="tome", r=8)`` uses no preset.
        """
        from .registry import resolve_model
        from .settings import api_preset, resolve_settings

        return resolve_settings(resolve_model(model), api_preset(preset), overrides).config

    def _check(self) -> None:
        """The checks that need no depth: raise SettingsError (one line)."""
        if self.policy not in POLICIES:
            raise SettingsError(f"unknown policy {self.policy!r}; choose one of: {', '.join(POLICIES)}")
        if self.policy.startswith("atm"):
            for name in ("alpha", "theta_min"):
                value = getattr(self, name)
                if not (_is_number(value) and 0.0 <= value <= 1.0):
                    raise SettingsError(f"{name} must be a similarity threshold in [0, 1], got {value}")
            if not (_is_number(self.beta) and 0.0 <= self.beta <= 10.0):
                raise SettingsError(f"beta (threshold decay rate) must be in [0, 10], got {self.beta}")
        if not isinstance(self.r, tuple):
            raise SettingsError(f"r must be a number or a list of numbers, got {self.r!r}")
        if self.policy == "tome":
            if not self.r:
                raise SettingsError("the tome policy needs r (one number, or one per block)")
            if any(not (_is_number(v) and float(v).is_integer() and v >= 0) for v in self.r):
                raise SettingsError(f"r must be non-negative integers, got {list(self.r)}")
        elif self.r:
            raise SettingsError(f"r (a fixed merge count) is only read by the tome policy, not by {self.policy!r}; "
                                "use policy 'tome' with r, or drop r")
        if self.split_layer is not None and not (isinstance(self.split_layer, numbers.Integral) and self.split_layer >= 0):
            raise SettingsError(f"split_layer must be in [0, depth], got {self.split_layer}")
        if self.prop_attn is not None and not isinstance(self.prop_attn, bool):
            raise SettingsError(f"prop_attn must be True, False or None, got {self.prop_attn!r}")

    def validate(self, depth: int | None = None) -> "MergeConfig":
        """Raise SettingsError (one line) for a setting that cannot work on a model of ``depth``
        blocks; return self. (What needs no depth was checked when it was built.)"""
        if depth is not None:
            if self.policy == "tome" and len(self.r) not in (1, depth):
                raise SettingsError(f"r has {len(self.r)} values; give one, or one per block ({depth})")
            if self.split_layer is not None and self.split_layer > depth:
                raise SettingsError(f"split_layer must be in [0, {depth}], got {self.split_layer}")
        return self

    def threshold(self, layer: int) -> float:
        """ATM's threshold for block ``layer`` (1-based)."""
        return max(self.alpha - (math.exp(self.beta * (layer - 1)) - 1.0), self.theta_min)

    def resolved_split_layer(self, depth: int) -> int:
        if self.split_layer is not None:
            return self.split_layer
        return round(0.75 * depth) if self.policy.startswith("atm") else depth

    def steps(self, depth: int, merge_in_last_block: bool) -> list[StepSpec | None]:
        """One entry per block: its merge step, or None where the block does not merge.

        Class-token models keep only their protected tokens after the last block's attention,
        so they never merge there (``merge_in_last_block=False``).
        """
        self.validate(depth)
        split_layer = self.resolved_split_layer(depth)
        steps: list[StepSpec | None] = []
        for layer in range(1, depth + 1):
            if self.policy == "none" or (layer == depth and not merge_in_last_block):
                steps.append(None)
                continue
            mode = ALTERNATE if layer <= split_layer else SIZE_DISTINCTIVE
            if self.policy == "tome":
                r = self.r[0] if len(self.r) == 1 else self.r[layer - 1]
                steps.append(StepSpec(mode, r=int(r)) if r > 0 else None)
            else:
                steps.append(StepSpec(mode, threshold=self.threshold(layer)))
        return steps

    @property
    def per_image(self) -> bool:
        return self.policy == "atm-per-image"

    def to_dict(self, depth: int | None = None) -> dict:
        """The settings as recorded in report.json (thresholds spelled out per block)."""
        d = asdict(self)
        d["r"] = list(self.r)
        if depth is not None:
            d["split_layer"] = self.resolved_split_layer(depth)
            if self.policy.startswith("atm"):
                d["thresholds"] = [round(self.threshold(layer), 6) for layer in range(1, depth + 1)]
        if not self.policy.startswith("atm"):
            for key in ("alpha", "beta", "theta_min"):
                d.pop(key)
        if self.policy != "tome":
            d.pop("r")
        return d


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def replay_config(r_per_block: list[int], split_layer: int | None = None, prop_attn: bool | None = None) -> MergeConfig:
    """A fixed per-block schedule (e.g. recorded token counts) as a ToMe-style config."""
    return MergeConfig(policy="tome", r=tuple(int(v) for v in r_per_block), split_layer=split_layer, prop_attn=prop_attn)


def r_from_tokens(tokens_per_layer: list[int], num_protected: int, last_block_keeps_prefix: bool) -> list[int]:
    """Turn token counts entering each block into the r merged by each block."""
    r = [tokens_per_layer[i] - tokens_per_layer[i + 1] for i in range(len(tokens_per_layer) - 1)]
    r.append(0)
    if any(v < 0 for v in r):
        raise UserError(f"a token schedule must not grow: {tokens_per_layer}")
    if tokens_per_layer and tokens_per_layer[-1] < num_protected + 1 and not last_block_keeps_prefix:
        raise UserError("a token schedule must keep at least one non-protected token")
    return r
