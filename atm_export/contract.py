"""The TokenMerge op contract (docs/token-merge-op.md) in one place.

Its identity (domain, op type, versions), its attributes (names, defaults, validation), the
split-mode codes, and how nodes are named in exported graphs. Everything that writes, reads or
runs a TokenMerge node takes these from here: the PyTorch custom op and ONNX schema
(``ops.py``), the exporter, the lowering, the ONNX Runtime reference kernel, the integrity and
parity checks, the benchmarks. The C++ plugin mirrors this module in
``plugins/tokenMergePlugin/tokenMergeContract.h``; ``tests/test_contract.py`` keeps the two equal.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

DOMAIN = "atm_export"
OP_TYPE = "TokenMerge"
#: 2: ToMe's split of the whole sequence and the floor(M/2) cap. Version 1 split after the
#: protected tokens and let r reach ceil(M/2): another function, so graphs of version 1 are
#: refused (TensorRT finds no plugin for them, ``check`` says to re-export) rather than run.
VERSION = 2
PLUGIN_VERSION = str(VERSION)
PLUGIN_NAMESPACE = DOMAIN
#: The attributes TensorRT's ONNX parser looks plugins up by; they do not change the math.
LOOKUP_KEYS = {"plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}

#: split_mode attribute values, by the split names of atm_export.merge.
SPLIT_CODES = {"alternate": 0, "size": 1}
SPLIT_NAMES = {code: name for name, code in SPLIT_CODES.items()}
#: weighting attribute values, by the weighting names of atm_export.merge.
WEIGHTING_CODES = {"size": 0, "salience": 1}
WEIGHTING_NAMES = {code: name for name, code in WEIGHTING_CODES.items()}

NODE_PREFIX = f"{OP_TYPE}_b"


@dataclass(frozen=True)
class Attributes:
    """A TokenMerge node's attributes: those of the math, and two token counts for TensorRT.

    How many pairs merge: ``fixed_r`` if >= 0; else AdaMerge's intensity rule if ``r_max`` >= 0;
    else the ``threshold`` rule.
    threshold: merge the pairs more similar than this (ATM; used when ``fixed_r`` and ``r_max`` < 0);
    fixed_r: if >= 0, merge this many pairs (at most floor(M/2));
    split_mode: a value of SPLIT_CODES;
    num_protected: the leading tokens that are never merged;
    opt_num_tokens: the output count TensorRT tunes for (-1: unknown; no effect on the math);
    max_num_tokens: the model's input token count (patches + prefix tokens, N entering block 1),
        a bound on every node's N that the plugin sizes its workspace by when TensorRT reports
        none (-1: unknown; no effect on the math).
    weighting: a value of WEIGHTING_CODES: 0 size (ATM, ToMe), 1 salience (AdaMerge: scores and
        averaging weights use the tokens' salience);
    salience_temperature: tau of the salience softmax(u u^T / tau) (read when weighting = 1);
    r_max: if >= 0 (and fixed_r < 0), AdaMerge's intensity rule: image b merges
        floor(r_max * sigmoid(redundancy_scale * (rho_b - redundancy_mean) / redundancy_std))
        pairs, rho_b its mean match score; the batch merges the floor of their mean;
    redundancy_mean, redundancy_std: the layer's calibrated statistics of rho;
    redundancy_scale: the sigmoid's slope.
    """

    threshold: float = 1.0
    fixed_r: int = -1
    split_mode: int = 0
    num_protected: int = 1
    opt_num_tokens: int = -1
    max_num_tokens: int = -1
    weighting: int = 0
    salience_temperature: float = 1.0
    r_max: int = -1
    redundancy_mean: float = 0.0
    redundancy_std: float = 1.0
    redundancy_scale: float = 1.0

    def __post_init__(self):
        if self.split_mode not in SPLIT_NAMES:
            raise ValueError(f"split_mode must be one of {sorted(SPLIT_NAMES)}, got {self.split_mode}")
        if self.num_protected < 0:
            raise ValueError(f"num_protected must be >= 0, got {self.num_protected}")
        for name in ("opt_num_tokens", "max_num_tokens"):
            if getattr(self, name) < -1:
                raise ValueError(f"{name} must be >= -1, got {getattr(self, name)}")
        if self.weighting not in WEIGHTING_NAMES:
            raise ValueError(f"weighting must be one of {sorted(WEIGHTING_NAMES)}, got {self.weighting}")
        if self.weighting and not (math.isfinite(self.salience_temperature) and self.salience_temperature > 0):
            raise ValueError(f"salience_temperature must be > 0, got {self.salience_temperature}")
        if self.r_max < -1:
            raise ValueError(f"r_max must be >= -1, got {self.r_max}")
        if self.fixed_r < 0 and self.r_max >= 0:
            if not (math.isfinite(self.redundancy_std) and self.redundancy_std > 0):
                raise ValueError(f"redundancy_std must be > 0, got {self.redundancy_std}")
            if not (math.isfinite(self.redundancy_mean) and math.isfinite(self.redundancy_scale)):
                raise ValueError("redundancy_mean and redundancy_scale must be finite")
        elif self.fixed_r < 0 and math.isnan(self.threshold):
            raise ValueError("threshold is NaN (and fixed_r < 0 asks for the threshold)")

    @classmethod
    def for_step(cls, step, num_protected: int, opt_num_tokens: int = -1, max_num_tokens: int = -1) -> "Attributes":
        """The attributes of one block's merge step (an ``atm_export.schedule.StepSpec``)."""
        intensity = {}
        if step.intensity is not None:
            i = step.intensity
            intensity = {"r_max": int(i.r_max), "redundancy_mean": float(i.mean), "redundancy_std": float(i.std),
                         "redundancy_scale": float(i.scale)}
        return cls(
            threshold=1.0 if step.threshold is None else float(step.threshold),
            fixed_r=-1 if step.r is None else int(step.r),
            split_mode=SPLIT_CODES[step.split_mode],
            num_protected=int(num_protected),
            opt_num_tokens=int(opt_num_tokens),
            max_num_tokens=int(max_num_tokens),
            weighting=WEIGHTING_CODES[step.weighting],
            salience_temperature=float(step.salience_temperature),
            **intensity,
        )

    @classmethod
    def from_values(cls, values: dict) -> "Attributes":
        """From a node's attribute values (missing ones take their defaults, lookup keys ignored)."""
        kinds = {f.name: type(f.default) for f in fields(cls)}  # int or float
        return cls(**{name: kind(values[name]) for name, kind in kinds.items() if name in values})

    @property
    def split(self) -> str:
        """The split's name in atm_export.merge."""
        return SPLIT_NAMES[self.split_mode]

    @property
    def count_rule(self) -> str:
        """How the node decides its merge count: ``fixed``, ``intensity`` or ``threshold``."""
        return "fixed" if self.fixed_r >= 0 else "intensity" if self.r_max >= 0 else "threshold"

    def intensity(self):
        """AdaMerge's intensity rule (``atm_export.merge.Intensity``), or None for another count rule."""
        from .merge import Intensity

        if self.count_rule != "intensity":
            return None
        return Intensity(self.r_max, self.redundancy_mean, self.redundancy_std, self.redundancy_scale)

    def merge_kwargs(self) -> dict:
        """The keyword arguments of ``atm_export.merge.token_merge`` for these attributes."""
        rule = self.count_rule
        return {"threshold": self.threshold if rule == "threshold" else None,
                "r": self.fixed_r if rule == "fixed" else None, "intensity": self.intensity(),
                "weighting": WEIGHTING_NAMES[self.weighting], "salience_temperature": self.salience_temperature,
                "split_mode": self.split, "num_protected": self.num_protected}

    def onnx(self) -> dict:
        """Every attribute as written on a node, lookup keys included."""
        return {**asdict(self), **LOOKUP_KEYS}


#: Every attribute a TokenMerge node may carry, with its default.
DEFAULTS = Attributes().onnx()


def node_name(block: int) -> str:
    """The name of the TokenMerge node of ``block`` (1-based) in an exported graph."""
    return f"{NODE_PREFIX}{block}"


def node_block(name: str) -> int | None:
    """The block (1-based) a TokenMerge node name stands for, or None for another name."""
    head, _, number = name.partition(NODE_PREFIX)
    return int(number) if not head and number.isdigit() else None


def is_token_merge(node) -> bool:
    """Whether an ONNX node is a TokenMerge node of this contract's domain."""
    return node.op_type == OP_TYPE and node.domain == DOMAIN
