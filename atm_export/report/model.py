"""The typed report of a run: one object, written as report.json and rendered as report.md.

``Report.to_dict()`` is report.json; ``load_report(data)`` reads one back and refuses anything
that does not follow this module's schema (``SCHEMA_VERSION``): a missing or unknown field, a
wrong type, another schema version. ``json_schema()`` states the same schema as JSON Schema,
derived from the dataclasses below, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

SCHEMA_VERSION = 1
PASSED, FAILED, INCONCLUSIVE = "passed", "failed", "inconclusive"


class ReportSchemaError(ValueError):
    """A report.json that does not follow the schema of this atm-export."""


@dataclass
class ModelInfo:
    name: str  # as the user named it (a registry short name, or a timm name)
    timm_name: str
    timm_kwargs: dict
    paper_model: str | None = None


@dataclass
class SettingsInfo:
    """How the merge settings came about, and what they are."""

    preset: str | None  # the registry preset the settings start from
    preset_source: dict | None  # its citation (paper row, figures)
    overrides: dict  # settings given on top of the preset, by field
    params: dict  # the settings as run: policy, thresholds per block, split layer, ...


@dataclass
class Flops:
    baseline: float  # GFLOPs of the unmerged model
    atm: float  # GFLOPs of the ATM model on the sample batch (batch mean)
    reduction: float  # 1 - atm / baseline
    convention: str
    paper: dict | None = None  # the paper's figures for this model and preset


@dataclass
class Tokens:
    """Tokens entering each block on the sample batch: batch mean and per-image range."""

    mean: list[float]
    min: list[int]
    max: list[int]
    merged: list[float]  # pairs merged by each block (batch mean)


@dataclass
class ParityBatch:
    status: str
    max_abs_diff: float | None
    error_ratio: float | None  # largest |a - b| / (atol + rtol |b|): at most 1 passes
    top1_agreement: float | None
    token_counts_equal: bool | None
    tokens: list[int] | None = None
    reference_tokens: list[int] | None = None
    min_decision_margin: float | None = None
    reason: str | None = None  # near_threshold / near_tie, for an inconclusive batch
    note: str | None = None
    settled: bool = False  # inconclusive free run, settled by the extra checks
    checks: dict = field(default_factory=dict)  # replay / lowering / integrity findings
    # per block whose token count differs: both counts, the deciding block and eager's margin there
    moved_decisions: list[dict] = field(default_factory=list)


@dataclass
class BackendParity:
    status: str
    passed: bool
    fails_run: bool
    precision: str
    tolerance: dict  # atol, rtol, rule
    max_abs_diff: float | None
    max_error_ratio: float | None
    top1_agreement: float | None
    token_counts_equal: bool | None
    settled_batches: list[str]
    batches: dict[str, ParityBatch]
    notes: list[str]


@dataclass
class TimingStats:
    """One backend at one batch size; times in milliseconds per batch."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    spread: float  # (p90 - p10) / p50
    throughput: float  # images per second at the median
    runs: int
    noisy: bool


@dataclass
class Benchmark:
    description: str
    batches: list[int]
    threads: int
    plan: dict  # how long each measurement ran (min runs, time budget, max runs)
    latency: dict[str, dict[str, TimingStats]]  # backend -> batch size -> statistics
    speedup: dict[str, float]  # median speed-up over the same runtime's unmerged model
    speedup_batch: int  # the batch size of ``speedup``
    flops_ratio: float  # baseline GFLOPs / merged GFLOPs of what was timed
    speedup_over_flops_ratio: dict[str, float]
    merge_share: dict[str, float]  # fraction of the forward time spent in merge steps
    noisy: list[str]  # measurements whose spread is too large to state as fact
    schedule: dict | None = None  # the replayed token schedule, when one was


@dataclass
class StaticSchedule:
    """The static-schedule models (--static-schedule): the fixed schedule they follow."""

    source: str  # "sample", gflops:G, a JSON file, or the counts given
    tokens_per_layer: list[int]  # tokens entering each block
    r_per_layer: list[int]  # pairs each block merges
    gflops: float  # of one image following the schedule


@dataclass
class Report:
    schema_version: int
    status: str  # passed / failed / inconclusive: the parity verdict of the run
    atm_export_version: str
    created: str
    model: ModelInfo
    settings: SettingsInfo
    weights: dict
    images: dict  # source, count
    flops: Flops
    tokens: Tokens
    parity: dict[str, BackendParity] = field(default_factory=dict)
    benchmark: Benchmark | None = None
    tensorrt: dict | None = None
    static_schedule: StaticSchedule | None = None
    triton: dict | None = None  # the Triton model repository written (--triton): path, models, max_batch_size
    signature: dict = field(default_factory=dict)  # inputs and outputs of the merged graphs
    preprocessing: dict = field(default_factory=dict)  # what an image goes through before `images`
    skipped: dict[str, str] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)
    # every step before the report's own: title, seconds, peak_rss_mb (peak resident memory)
    steps: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """report.json's content. A value that is not finite (inf, NaN) becomes null: JSON has none."""
        return _finite(dataclasses.asdict(self))

    def overall_status(self) -> str:
        """failed if a backend failed the run, inconclusive if an fp32 one is, else passed.

        A reduced-precision backend (fp16, bf16) is inconclusive when its rounding moved a merge
        decision within its reach; its own status and notes say so, but it does not make the run
        inconclusive: that is what reduced precision does, not a doubt about the export."""
        statuses = [p.status for p in self.parity.values()]
        if any(p.fails_run for p in self.parity.values()) or FAILED in statuses:
            return FAILED
        fp32 = [p.status for p in self.parity.values() if p.precision == "fp32"]
        return INCONCLUSIVE if INCONCLUSIVE in fp32 else PASSED


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Reading a report back, strictly.

def _check(value, hint, where: str):
    """``value`` converted to ``hint`` (a dataclass, list[...], dict[str, ...], a union ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _check(value, option, where)
            except ReportSchemaError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ReportSchemaError(f"{where}: {value!r} is none of {hint}")
    if hint is type(None):
        if value is not None:
            raise ReportSchemaError(f"{where}: expected null, got {value!r}")
        return None
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ReportSchemaError(f"{where}: expected a list, got {type(value).__name__}")
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ReportSchemaError(f"{where}: expected an object, got {type(value).__name__}")
        return value if not args else {k: _check(v, args[1], f"{where}.{k}") for k, v in value.items()}
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str)}[hint]
    if not ok:
        raise ReportSchemaError(f"{where}: expected {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def _from_dict(cls, data, where: str):
    if not isinstance(data, dict):
        raise ReportSchemaError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ReportSchemaError(f"{where}: unknown field(s) {unknown}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _check(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ReportSchemaError(f"{where}: missing field {name!r}")
    return cls(**values)


def load_section(cls, data: dict):
    """One part of a report (a dataclass of this module) from its dict, checked like a report."""
    return _from_dict(cls, data, cls.__name__)


def load_report(data: dict) -> Report:
    """A report.json's content as a Report; ReportSchemaError when it does not follow the schema."""
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ReportSchemaError(f"report schema version {version!r}; this atm-export reads version {SCHEMA_VERSION}")
    return _from_dict(Report, data, "report")


# ---------------------------------------------------------------------------------------------
# The same schema as JSON Schema.

def _schema_of(hint) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema_of(a) for a in args]}
    if hint is type(None):
        return {"type": "null"}
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        fields = dataclasses.fields(hint)
        return {"type": "object", "additionalProperties": False,
                "properties": {f.name: _schema_of(hints[f.name]) for f in fields},
                "required": [f.name for f in fields
                             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]}
    if origin is list:
        return {"type": "array", "items": _schema_of(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(args[1])}
    if hint is dict:
        return {"type": "object"}
    return {"type": {bool: "boolean", int: "integer", float: "number", str: "string"}[hint]}


def json_schema() -> dict:
    """report.json's schema (this SCHEMA_VERSION) as a JSON Schema document."""
    schema = _schema_of(Report)
    schema["properties"]["schema_version"] = {"const": SCHEMA_VERSION}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"atm-export report.json, schema version {SCHEMA_VERSION}", **schema}
