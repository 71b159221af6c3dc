"""report.md: the readable view of the Report (report/model.py), with its pictures."""

from __future__ import annotations

from pathlib import Path

from .model import Benchmark, Report
from .next_steps import next_steps

LEGEND = [
    ("status", "passed: every backend matches eager PyTorch; failed: one does not; inconclusive: a "
               "difference that a choice within float rounding explains (see the note), not a failure"),
    ("of tolerance", "the largest |a - b| / (atol + rtol * |b|) over the logits, b being eager PyTorch's: "
                     "at most 1 passes"),
    ("top-1 agreement", "the fraction of images whose top class equals eager PyTorch's"),
    ("settled", "an inconclusive batch shown to be right by replaying eager's merge choices in the "
                "exported graph and running each lowered merge step on eager's inputs"),
    ("spread", "(p90 - p10) / p50 of the timed runs; a measurement marked ~ has a large spread (or too "
               "few runs) and is not to be taken as fact"),
    ("speed-up", "the median latency of the same runtime's unmerged model divided by the merged one's"),
    ("share of the FLOPs ratio", "speed-up / (baseline GFLOPs / merged GFLOPs): 1 means the FLOPs saved "
                                 "turn fully into time saved"),
]


def fmt(value, digits: int = 3) -> str:
    """Numbers to ``digits`` significant digits; None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        rounded = float(f"{value:.{digits}g}")
        return f"{rounded:.0f}" if 1e3 <= abs(rounded) < 1e9 else f"{value:.{digits}g}"  # 1280, not 1.28e+03
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines


def _overview(report: Report) -> list[str]:
    s, m = report.settings, report.model
    lines = [f"# atm-export report: {m.name}", ""]
    lines += [f"> **{w}**" for w in report.warnings] + ([""] if report.warnings else [])
    preset = s.preset or "none (explicit settings)"
    overrides = ", ".join(f"{k} = {v}" for k, v in s.overrides.items()) or "none"
    lines += [
        f"**Status: {report.status}**", "",
        f"- timm model: `{m.timm_name}`",
        f"- preset: {preset}; overrides: {overrides}",
        *([f"- policy: AdaMerge; calibration: {s.params.get('calibration_source')}"]
          if s.params.get("policy") == "adamerge" else []),
        f"- weights: {report.weights['source']}" + (f" ({report.weights['path']})" if report.weights.get("path") else ""),
        f"- sample images: {report.images['source']} ({report.images['count']})",
        f"- created {report.created} by atm-export {report.atm_export_version} (report schema {report.schema_version})",
        "", "## Settings", "",
    ]
    lines += [f"- {k}: {v}" for k, v in s.params.items()]
    if s.preset_source:
        lines += ["", f"Preset source: {s.preset_source.get('source', '-')}"]
        if s.preset_source.get("note"):
            lines += ["", f"Note: {s.preset_source['note']}"]
    return lines


def _flops_and_tokens(report: Report) -> list[str]:
    f, t = report.flops, report.tokens
    lines = ["", "## FLOPs and tokens (sample batch)", "",
             f"- baseline: {fmt(f.baseline)} GFLOPs; ATM: {fmt(f.atm)} GFLOPs ({fmt(f.reduction * 100)}% fewer)",
             f"- convention: {f.convention}", ""]
    lines += _table(["block", "tokens (mean)", "min", "max", "merged"],
                    [[i + 1, t.mean[i], t.min[i], t.max[i], t.merged[i]] for i in range(len(t.mean))])
    lines += _picture(report, "tokens.png", "Tokens entering each block")
    return lines


def _parity(report: Report) -> list[str]:
    if not report.parity:
        return []
    rows, tolerances, notes = [], [], []
    for backend, p in report.parity.items():
        for batch, b in p.batches.items():
            status = b.status + (" (settled)" if b.settled else "")
            rows.append([backend, batch, b.max_abs_diff, b.error_ratio, b.top1_agreement, b.token_counts_equal,
                         status])
        tolerances.append(f"{backend} {p.precision} (atol {p.tolerance['atol']:g}, rtol {p.tolerance['rtol']:g})")
        notes += [f"- {backend}, {note}" for note in p.notes]
    lines = ["", "## Parity against eager PyTorch", "",
             "Per backend and batch size: the logits and the tokens entering each block, against eager PyTorch.", ""]
    lines += _table(["backend", "batch", "max abs diff", "of tolerance", "top-1 agreement", "token counts equal",
                     "status"], rows)
    lines += ["", f"Tolerances: {'; '.join(tolerances)}."]
    return lines + (["", "Notes:", "", *notes] if notes else [])


def _benchmark(report: Report) -> list[str]:
    b: Benchmark | None = report.benchmark
    if b is None:
        return []
    rows = []
    for backend, per_batch in b.latency.items():
        for batch, t in per_batch.items():
            mark = "~" if t.noisy else ""
            rows.append([backend, batch, f"{mark}{fmt(t.p50)}", fmt(t.p90), fmt(t.p99), fmt(t.throughput),
                         fmt(t.spread), t.runs])
    lines = ["", "## Latency", "", f"Timed: {b.description}.", ""]
    lines += _table(["backend", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s", "spread", "runs"], rows)
    lines += ["", f"Speed-ups at batch {b.speedup_batch} (FLOPs ratio {fmt(b.flops_ratio)}):", ""]
    lines += [f"- {name}: {fmt(v)}x over its unmerged baseline, {fmt(b.speedup_over_flops_ratio[name])} of the "
              "FLOPs ratio" for name, v in b.speedup.items()]
    lines += [f"- {name}: merge steps take {fmt(share * 100)}% of the forward time" for name, share in b.merge_share.items()]
    if b.noisy:
        lines += ["", f"Noisy measurements (spread above the limit; repeat on a quiet machine): {', '.join(b.noisy)}."]
    lines += _picture(report, "latency.png", "Latency against batch size")
    return lines


def _picture(report: Report, name: str, caption: str) -> list[str]:
    return ["", f"![{caption}]({name})"] if name in report.pictures else []


def _rest(report: Report) -> list[str]:
    lines = []
    if "merge_maps.png" in report.pictures:
        lines += ["", "## Merge maps", "", "Every token after the chosen blocks, painted as the region of patches "
                  "it holds (one colour per token).", *_picture(report, "merge_maps.png", "Merge maps")]
    if report.tensorrt:
        lines += ["", "## TensorRT", "", *[f"- {k}: {v}" for k, v in report.tensorrt.items()]]
    if report.skipped:
        lines += ["", "## Skipped", "", *[f"- {k}: {v}" for k, v in report.skipped.items()]]
    if report.artifacts:
        lines += ["", "## Artifacts", "", *[f"- {a}" for a in report.artifacts]]
    if report.steps:
        lines += ["", "## Steps", "", "Wall time and peak resident memory of each step of the run.", "",
                  *_table(["step", "seconds", "peak memory (MB)"],
                          [[s["title"], f"{s['seconds']:.1f}", f"{s['peak_rss_mb']:.0f}"] for s in report.steps])]
    lines += ["", "## Legend", "", *[f"- **{term}**: {meaning}" for term, meaning in LEGEND]]
    return lines


def render_markdown(report: Report, directory: Path | None = None, plugin_library: str | None = None) -> str:
    """report.md. With ``directory`` (where the files end up), it ends with the next steps for
    them (``plugin_library``: the TensorRT plugin's path, where known)."""
    lines = [*_overview(report), *_flops_and_tokens(report), *_parity(report), *_benchmark(report)]
    if directory is not None:
        lines += next_steps(report, directory, plugin_library)
    lines += _rest(report)
    return "\n".join(lines) + "\n"
