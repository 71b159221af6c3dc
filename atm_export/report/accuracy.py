"""The typed results of ``eval``, the ``check`` accuracy gate and ``tune``: JSON, markdown, a plot.

Each is a dataclass written as JSON with ``to_dict()`` and read back strictly with
``load_section`` (atm_export.report.model), like report.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .model import ModelInfo, _finite

EVAL_SCHEMA_VERSION = 1


@dataclass
class SettingResult:
    """What one merge setting did on an image folder, at one batch size.

    agreement: share of images (0..1) whose predicted class is the unmerged model's.
    top1, top5, top1_drop: percent, and the unmerged model's top-1 minus this one in percentage
    points (None without labels). gflops, tokens: realised means (tokens entering each block).
    """

    name: str
    params: dict  # the settings as run (policy, thresholds per block, split layer, ...)
    backend: str
    batch_size: int
    images: int
    agreement: float
    gflops: float
    tokens: list[float]
    images_per_s: float
    top1: float | None = None
    top5: float | None = None
    top1_drop: float | None = None


@dataclass
class EvalReport:
    """eval.json: the unmerged model first, then every setting evaluated."""

    schema_version: int
    atm_export_version: str
    created: str
    model: ModelInfo
    weights: dict
    data: dict  # path, images, labelled, classes, order
    batch_size: int
    results: list[SettingResult]
    warnings: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _finite(dataclasses.asdict(self))


@dataclass
class GateResult:
    """The ``check --data`` accuracy gate: the figures, the limits, and what fell short."""

    status: str  # passed / failed
    directory: str
    min_agreement: float | None
    max_top1_drop: float | None
    data: dict
    unmerged: SettingResult
    merged: SettingResult
    failures: list[str]

    def to_dict(self) -> dict:
        return _finite(dataclasses.asdict(self))


@dataclass
class TuneReport:
    """What ``tune`` searched, the front it found, its choice, and how that did on held-out images."""

    schema_version: int
    atm_export_version: str
    created: str
    model: ModelInfo
    weights: dict
    target: dict  # {"target_gflops": G} or {"min_agreement": A}, and the metric
    calibration: dict  # the calibration images (data dict)
    held_out: dict  # the held-out images (data dict)
    batch_size: int
    rungs: list[dict]  # per round of successive halving: images, candidates evaluated
    front: list[SettingResult]  # the calibration front, fewest GFLOPs first
    chosen: SettingResult | None
    chosen_held_out: SettingResult | None
    unmerged_held_out: SettingResult
    met_on_held_out: bool | None
    preset_file: str | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return _finite(dataclasses.asdict(self))


# ---------------------------------------------------------------------------------------------
# Markdown


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(results: list[SettingResult]) -> list[str]:
    labelled = any(r.top1 is not None for r in results)
    head = ["setting", "backend", "GFLOPs", "agreement"] + (["top-1", "top-5", "top-1 drop"] if labelled else [])
    lines = ["| " + " | ".join(head + ["images/s"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in results:
        cells = [r.name, r.backend, f"{r.gflops:.4f}", f"{r.agreement:.4f}"]
        if labelled:
            cells += [_pct(r.top1), _pct(r.top5), _pct(r.top1_drop)]
        lines.append("| " + " | ".join(cells + [f"{r.images_per_s:.1f}"]) + " |")
    return lines


def eval_markdown(report: EvalReport, picture: str | None) -> str:
    d = report.data
    lines = [f"# Accuracy of {report.model.name} with ATM", "",
             f"- images: {d['images']} from `{d['path']}` ({'labelled, ' + str(d['classes']) + ' classes' if d['labelled'] else 'no labels'}; {d['order']})",
             f"- batch size: {report.batch_size} (batch-adaptive merging: results depend on it)",
             f"- weights: {report.weights.get('source')}" + (f" `{report.weights['path']}`" if report.weights.get("path") else ""),
             "- agreement: share of images whose predicted class is the unmerged model's", ""]
    lines += [f"> warning: {w}" for w in report.warnings]
    lines += ["", *_table(report.results), ""]
    for r in report.results[1:]:
        lines.append(f"- {r.name}: tokens entering each block {', '.join(f'{t:.1f}' for t in r.tokens)}")
    if picture:
        lines += ["", f"![GFLOPs against accuracy]({picture})"]
    return "\n".join(lines) + "\n"


def gate_lines(gate: GateResult) -> list[str]:
    """The gate's figures, one line each (for the console)."""
    m, u = gate.merged, gate.unmerged
    lines = [f"accuracy gate on {m.images} images at batch {m.batch_size}: agreement {m.agreement:.4f}"
             + (f" (at least {gate.min_agreement})" if gate.min_agreement is not None else ""),
             f"GFLOPs {u.gflops:.4f} -> {m.gflops:.4f}"]
    if m.top1 is not None:
        lines.append(f"top-1 {_pct(u.top1)} -> {_pct(m.top1)}, drop {_pct(m.top1_drop)} points"
                     + (f" (at most {gate.max_top1_drop})" if gate.max_top1_drop is not None else ""))
    return lines
