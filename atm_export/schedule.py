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
- ``adamerge``: AdaMerge. Salience-weighted scores and averages, and per-layer intensity
  ``r_b = floor(r_max * sigmoid(intensity_scale * (rho_b - mean_l) / std_l))`` from each
  image's redundancy rho_b (its mean match score), the batch merging the floor of the mean;
  mean_l and std_l are calibrated per layer on sample images (atm_export.calibration).
- ``none``: no merging at all (the patched model then reproduces timm's).

The threshold formula, ``r_l = floor(mean)`` and AdaMerge's details are reconstructions
(docs/method.md).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field

from .errors import SettingsError, UserError
from .merge import ALTERNATE, SALIENCE_WEIGHTS, SIZE_DISTINCTIVE, SIZE_WEIGHTS, Intensity

POLICIES = ("atm", "atm-per-image", "tome", "adamerge", "none")
ADAMERGE = "adamerge"
#: AdaMerge's most merges per image and block when none is given.
DEFAULT_R_MAX = 16
#: The fields only AdaMerge reads.
ADAMERGE_FIELDS = ("r_max", "intensity_scale", "salience_temperature", "redundancy_mean", "redundancy_std",
                   "calibration_source")


@dataclass(frozen=True)
class StepSpec:
    """What the merge step of one block does: its count rule (a threshold, a fixed r, or
    AdaMerge's intensity), its split, and its weighting (size, or AdaMerge's salience)."""

    split_mode: str
    threshold: float | None = None
    r: int | None = None
    intensity: Intensity | None = None
    weighting: str = SIZE_WEIGHTS
    salience_temperature: float = 1.0

    def merge_kwargs(self) -> dict:
        """The keyword arguments of ``atm_export.merge.token_merge`` (num_protected aside)."""
        return {"threshold": self.threshold, "r": self.r, "intensity": self.intensity, "weighting": self.weighting,
                "salience_temperature": self.salience_temperature, "split_mode": self.split_mode}


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
    AdaMerge's (only the adamerge policy reads them): r_max, its most merges per image, one
    number or one per block (DEFAULT_R_MAX when not given); intensity_scale, the sigmoid's
    slope; salience_temperature, tau of the salience softmax; redundancy_mean and
    redundancy_std, the calibrated statistics of the redundancy, one per merging block (empty:
    not calibrated yet, see atm_export.calibration); calibration_source, where they came from.
    """

    policy: str = "atm"
    alpha: float = 0.99
    beta: float = 0.04
    theta_min: float = 0.88
    split_layer: int | None = None
    r: tuple[int, ...] = field(default_factory=tuple)
    prop_attn: bool | None = None
    r_max: tuple[int, ...] = field(default_factory=tuple)
    intensity_scale: float = 1.0
    salience_temperature: float = 1.0
    redundancy_mean: tuple[float, ...] = field(default_factory=tuple)
    redundancy_std: tuple[float, ...] = field(default_factory=tuple)
    calibration_source: str | None = None

    def __post_init__(self):
        for name in ("r", "r_max", "redundancy_mean", "redundancy_std"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                object.__setattr__(self, name, (value,))
            elif isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        if self.policy == ADAMERGE and not self.r_max:
            object.__setattr__(self, "r_max", (DEFAULT_R_MAX,))
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
        if self.policy == ADAMERGE:
            self._check_adamerge()
        else:
            given = [name for name in ADAMERGE_FIELDS[3:] if getattr(self, name)] + (["r_max"] if self.r_max else [])
            if given:
                raise SettingsError(f"{', '.join(given)} only apply to the adamerge policy, not to {self.policy!r}")
        if self.split_layer is not None and not (isinstance(self.split_layer, numbers.Integral) and self.split_layer >= 0):
            raise SettingsError(f"split_layer must be in [0, depth], got {self.split_layer}")
        if self.prop_attn is not None and not isinstance(self.prop_attn, bool):
            raise SettingsError(f"prop_attn must be True, False or None, got {self.prop_attn!r}")

    def _check_adamerge(self) -> None:
        if any(not (_is_number(v) and float(v).is_integer() and v >= 0) for v in self.r_max):
            raise SettingsError(f"r_max must be non-negative integers, got {list(self.r_max)}")
        if not _is_number(self.intensity_scale):
            raise SettingsError(f"intensity_scale must be a finite number, got {self.intensity_scale}")
        if not (_is_number(self.salience_temperature) and self.salience_temperature > 0):
            raise SettingsError(f"salience_temperature must be > 0, got {self.salience_temperature}")
        if len(self.redundancy_mean) != len(self.redundancy_std):
            raise SettingsError(f"redundancy_mean and redundancy_std need one value per merging block each, got "
                                f"{len(self.redundancy_mean)} and {len(self.redundancy_std)}")
        if any(not _is_number(v) for v in self.redundancy_mean):
            raise SettingsError(f"redundancy_mean must be finite numbers, got {list(self.redundancy_mean)}")
        if any(not (_is_number(v) and v > 0) for v in self.redundancy_std):
            raise SettingsError(f"redundancy_std must be numbers > 0, got {list(self.redundancy_std)}")

    @property
    def calibrated(self) -> bool:
        """Whether the adamerge policy has its per-layer statistics (other policies need none)."""
        return self.policy != ADAMERGE or bool(self.redundancy_mean)

    def validate(self, depth: int | None = None) -> "MergeConfig":
        """Raise SettingsError (one line) for a setting that cannot work on a model of ``depth``
        blocks; return self. (What needs no depth was checked when it was built.)"""
        if depth is not None:
            if self.policy == "tome" and len(self.r) not in (1, depth):
                raise SettingsError(f"r has {len(self.r)} values; give one, or one per block ({depth})")
            if self.policy == ADAMERGE and len(self.r_max) not in (1, depth):
                raise SettingsError(f"r_max has {len(self.r_max)} values; give one, or one per block ({depth})")
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
        merging = merging_blocks(depth, merge_in_last_block) if self.policy == ADAMERGE else 0
        if self.policy == ADAMERGE and len(self.redundancy_mean) != merging:
            raise SettingsError(
                "the adamerge policy needs its per-layer redundancy statistics from a calibration run "
                f"({merging} merging blocks, {len(self.redundancy_mean)} calibrated): "
                "atm-export calibrate MODEL --data DIR -o F.toml, then --preset-file F.toml")
        for layer in range(1, depth + 1):
            if self.policy == "none" or (layer == depth and not merge_in_last_block):
                steps.append(None)
                continue
            mode = ALTERNATE if layer <= split_layer else SIZE_DISTINCTIVE
            if self.policy == "tome":
                r = self.r[0] if len(self.r) == 1 else self.r[layer - 1]
                steps.append(StepSpec(mode, r=int(r)) if r > 0 else None)
            elif self.policy == ADAMERGE:
                r_max = self.r_max[0] if len(self.r_max) == 1 else self.r_max[layer - 1]
                intensity = Intensity(int(r_max), float(self.redundancy_mean[layer - 1]),
                                      float(self.redundancy_std[layer - 1]), float(self.intensity_scale))
                steps.append(StepSpec(mode, intensity=intensity, weighting=SALIENCE_WEIGHTS,
                                      salience_temperature=float(self.salience_temperature)))
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
        if self.policy == ADAMERGE:
            for key in ("r_max", "redundancy_mean", "redundancy_std"):
                d[key] = list(d[key])
        else:
            for key in ADAMERGE_FIELDS:
                d.pop(key)
        return d


def merging_blocks(depth: int, merge_in_last_block: bool) -> int:
    """How many blocks have a merge step under a policy that merges in every block it can."""
    return depth if merge_in_last_block else depth - 1


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
