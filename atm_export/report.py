"""report.md: the human-readable twin of report.json."""

from __future__ import annotations


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render_markdown(report: dict) -> str:
    lines = [f"# atm-export report: {report['model']}", ""]
    if report.get("warning"):
        lines += [f"> **{report['warning']}**", ""]
    params = report["params"]
    lines += [
        f"- timm model: `{report['timm_name']}`",
        f"- preset: {report['preset'] or '(explicit settings)'}",
        f"- weights: {report['weights']['source']}" + (f" ({report['weights'].get('path')})" if report['weights'].get('path') else ""),
        f"- sample images: {report['images']['source']} ({report['images']['count']})",
        f"- created: {report['created']} with atm-export {report['atm_export_version']}",
        "",
        "## Settings",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in params.items()]
    if report.get("preset_source"):
        lines += ["", f"Preset source: {report['preset_source']['source']}"]
        if report["preset_source"].get("note"):
            lines += ["", f"Note: {report['preset_source']['note']}"]
    g = report["gflops"]
    lines += [
        "",
        "## FLOPs (sample batch, batch mean)",
        "",
        f"- baseline: {g['baseline']:.2f} GFLOPs",
        f"- ATM: {g['atm']:.2f} GFLOPs ({g['reduction'] * 100:.1f}% fewer)",
        f"- convention: {g['convention']}",
        "",
        "## Tokens entering each block",
        "",
        "| block | tokens | merged |",
        "|---|---|---|",
    ]
    for i, (t, r) in enumerate(zip(report["tokens_per_layer"], report["r_per_layer"])):
        lines.append(f"| {i + 1} | {_fmt(t)} | {_fmt(r)} |")
    for section in _extra_sections(report):
        lines += ["", *section]
    return "\n".join(lines) + "\n"


def _extra_sections(report: dict) -> list[list[str]]:
    """Sections for the steps that ran: parity, latency, skipped backends."""
    sections = []
    if report.get("parity"):
        rows = ["## Parity against eager PyTorch", "",
                "A batch passes when the token counts are equal and every logit is within the tolerance: "
                "|a - b| <= atol + rtol * |b|, b being eager PyTorch's logit. *of tolerance* is the largest "
                "|a - b| / (atol + rtol * |b|): at most 1 passes.", "",
                "| backend | tolerance | batch | max abs diff | of tolerance | top-1 agreement | token counts equal | status |",
                "|---|---|---|---|---|---|---|---|"]
        for backend, result in report["parity"].items():
            tol = result.get("tolerance") or {}
            tolerance = f"atol {tol['atol']:g}, rtol {tol['rtol']:g}" if tol else "-"
            for batch, r in result.get("batches", {}).items():
                rows.append(f"| {backend} | {tolerance} | {batch} | {_fmt(r['max_abs_diff'], 3)} | "
                            f"{_fmt(r.get('error_ratio'), 3)} | {_fmt(r['top1_agreement'], 3)} | "
                            f"{r['token_counts_equal']} | {r['status']} |")
            for note in result.get("notes", []):
                rows.append(f"\n{backend}: {note}")
        sections.append(rows)
    if report.get("latency_ms"):
        rows = ["## Latency (ms)", "", "| backend | batch | p50 | p90 |", "|---|---|---|---|"]
        for backend, per_batch in report["latency_ms"].items():
            for batch, r in per_batch.items():
                rows.append(f"| {backend} | {batch} | {r['p50']:.2f} | {r['p90']:.2f} |")
        bench = report.get("benchmark") or {}
        if bench:
            rows += ["", f"Benchmark setup: {bench.get('description', '')}"]
            largest = max(bench.get("batches", [0]))
            for name, speedup in bench.get("speedup", {}).items():
                rows.append(f"- {name}: {speedup:.2f}x over its unmerged baseline at batch {largest} "
                            f"({bench['speedup_over_flops_ratio'][name]:.2f} of the FLOPs ratio {bench['flops_ratio']:.2f})")
            for name, share in bench.get("merge_share", {}).items():
                rows.append(f"- {name}: merge steps take {share * 100:.1f}% of the forward time")
        sections.append(rows)
    if report.get("skipped"):
        rows = ["## Skipped", ""]
        rows += [f"- {backend}: {reason}" for backend, reason in report["skipped"].items()]
        sections.append(rows)
    if report.get("artifacts"):
        sections.append(["## Artifacts", "", *[f"- {a}" for a in report["artifacts"]]])
    return sections
