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

NODE_PREFIX = f"{OP_TYPE}_b"


@dataclass(frozen=True)
class Attributes:
    """A TokenMerge node's attributes: the four of the math, and two token counts for TensorRT.

    threshold: merge the pairs more similar than this (used when ``fixed_r`` < 0);
    fixed_r: if >= 0, merge this many pairs (at most floor(M/2));
    split_mode: a value of SPLIT_CODES;
    num_protected: the leading tokens that are never merged;
    opt_num_tokens: the output count TensorRT tunes for (-1: unknown; no effect on the math);
    max_num_tokens: the model's input token count (patches + prefix tokens, N entering block 1),
        a bound on every node's N that the plugin sizes its workspace by when TensorRT reports
        none (-1: unknown; no effect on the math).
    """

    threshold: float = 1.0
    fixed_r: int = -1
    split_mode: int = 0
    num_protected: int = 1
    opt_num_tokens: int = -1
    max_num_tokens: int = -1

    def __post_init__(self):
        if self.split_mode not in SPLIT_NAMES:
            raise ValueError(f"split_mode must be one of {sorted(SPLIT_NAMES)}, got {self.split_mode}")
        if self.num_protected < 0:
            raise ValueError(f"num_protected must be >= 0, got {self.num_protected}")
        for name in ("opt_num_tokens", "max_num_tokens"):
            if getattr(self, name) < -1:
                raise ValueError(f"{name} must be >= -1, got {getattr(self, name)}")
        if self.fixed_r < 0 and math.isnan(self.threshold):
            raise ValueError("threshold is NaN (and fixed_r < 0 asks for the threshold)")

    @classmethod
    def for_step(cls, step, num_protected: int, opt_num_tokens: int = -1, max_num_tokens: int = -1) -> "Attributes":
        """The attributes of one block's merge step (an ``atm_export.schedule.StepSpec``)."""
        return cls(
            threshold=1.0 if step.threshold is None else float(step.threshold),
            fixed_r=-1 if step.r is None else int(step.r),
            split_mode=SPLIT_CODES[step.split_mode],
            num_protected=int(num_protected),
            opt_num_tokens=int(opt_num_tokens),
            max_num_tokens=int(max_num_tokens),
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

    def merge_kwargs(self) -> dict:
        """The keyword arguments of ``atm_export.merge.token_merge`` for these attributes."""
        fixed = self.fixed_r >= 0
        return {"threshold": None if fixed else self.threshold, "r": self.fixed_r if fixed else None,
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
