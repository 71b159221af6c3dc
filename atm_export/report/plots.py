"""The report's charts: tokens per block and latency against batch size, as small pure functions.

Each function takes plain Python data and a path, writes one PNG there and returns the path.
matplotlib is imported inside the functions (it is slow to import) and drawn through
``FigureCanvasAgg`` directly, so no global backend is switched.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Resolution of every picture of the report (pixels per inch).
DPI = 100

#: When the largest latency is this many times the smallest, the latency axis is logarithmic.
LOG_RANGE = 20.0


def new_figure(width_in: float, height_in: float):
    """A matplotlib Figure (inches) bound to an Agg canvas, with constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path) -> Path:
    """Write fig as a PNG to path and return it as a Path.

    The PNG is written next to path first and moved over it, so that a crash mid-write never
    leaves a truncated picture where a report links one.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".part")
    fig.savefig(partial, format="png", dpi=DPI)
    os.replace(partial, path)
    return path


def plot_tokens(
    tokens_mean: list[float],
    tokens_min: list[int],
    tokens_max: list[int],
    path,
    title: str = "Tokens entering each block",
) -> Path:
    """Tokens entering each block 1..L: the batch mean as a line, the per-image range as a band.

    tokens_mean, tokens_min, tokens_max: length L (one entry per block), token counts.
    """
    from matplotlib.ticker import MaxNLocator

    if not (len(tokens_mean) == len(tokens_min) == len(tokens_max)):
        raise ValueError(
            f"tokens_mean, tokens_min and tokens_max must have one entry per block; got lengths "
            f"{len(tokens_mean)}, {len(tokens_min)} and {len(tokens_max)}"
        )
    if not tokens_mean:
        raise ValueError("no blocks to plot: tokens_mean is empty")
    blocks = list(range(1, len(tokens_mean) + 1))
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    label = "range over images (min to max)"
    if len(blocks) == 1:  # a band over a single x has no width: draw the range as a bar
        ax.vlines(blocks, tokens_min, tokens_max, colors="C0", alpha=0.25, linewidth=8, label=label)
    else:
        ax.fill_between(blocks, tokens_min, tokens_max, color="C0", alpha=0.25, linewidth=0, label=label)
    ax.plot(blocks, tokens_mean, color="C0", marker="o", markersize=4, label="batch mean")
    top = max([*tokens_max, *tokens_mean, 1])
    ax.set_ylim(0, top * 1.05)
    ax.set_xlim(0.5, len(blocks) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    return save_png(fig, path)


def latency_styles(backends: list[str], baselines: dict[str, str]) -> dict[str, tuple[str, bool]]:
    """Colour and dashing of every backend's line: name -> (matplotlib colour, dashed).

    A merged backend and its baseline (``baselines``: merged name -> baseline name) share a
    colour, the baseline dashed. A baseline whose merged partner is absent is still dashed,
    in a colour of its own; every other backend gets its own colour, solid. Colours are
    given in the order of ``backends`` (first come, first served), so they are stable.
    """
    present = set(backends)
    group_of = {}
    for name in backends:
        partners = [m for m, base in baselines.items() if base == name and m in present]
        group_of[name] = partners[0] if partners else name  # a baseline follows its first partner
    colours: dict[str, str] = {}
    for name in backends:
        colours.setdefault(group_of[name], f"C{len(colours) % 10}")
    dashed = set(baselines.values())
    return {name: (colours[group_of[name]], name in dashed) for name in backends}


def plot_latency(
    latency_ms: dict[str, dict[int, float]],
    baselines: dict[str, str],
    path,
    title: str = "Latency against batch size",
) -> Path:
    """p50 latency (ms per batch) against batch size, one line per backend.

    latency_ms: backend name -> {batch size: p50 milliseconds}; batch sizes may come as
    strings (e.g. from JSON). baselines: merged backend name -> its unmerged baseline's name
    (see ``latency_styles`` for the colours). x is log2 with the measured batch sizes as
    ticks; y is logarithmic when the latencies span more than ``LOG_RANGE`` times.
    """
    from matplotlib.ticker import NullLocator

    curves = {
        name: sorted((int(batch), float(ms)) for batch, ms in points.items())
        for name, points in latency_ms.items()
        if points
    }
    if not curves:
        raise ValueError("no latency to plot: latency_ms has no backend with a measured batch size")
    styles = latency_styles(list(curves), baselines)
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    for name, points in curves.items():
        colour, dashed = styles[name]
        batches, ms = zip(*points)
        ax.plot(batches, ms, color=colour, linestyle="--" if dashed else "-", marker="o", markersize=4, label=name)
    batch_sizes = sorted({b for points in curves.values() for b, _ in points})
    values = [ms for points in curves.values() for _, ms in points]
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, labels=[str(b) for b in batch_sizes])
    ax.xaxis.set_minor_locator(NullLocator())  # only the measured batch sizes are ticks
    ax.set_xlim(batch_sizes[0] / 1.5, batch_sizes[-1] * 1.5)
    if min(values) > 0 and max(values) / min(values) > LOG_RANGE:
        ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency p50 (ms per batch)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return save_png(fig, path)


def plot_accuracy_front(
    points: list[tuple[str, float, float]],
    path,
    ylabel: str,
    title: str = "GFLOPs against accuracy",
    highlight: list[str] | None = None,
    others: list[tuple[float, float]] | None = None,
    others_label: str = "candidates",
    front: bool = False,
) -> Path:
    """Accuracy (or agreement) against GFLOPs: one marker per setting.

    points: (name, GFLOPs, value) per setting, the unmerged model among them; highlight: names
    drawn larger (e.g. the setting tune chose); others: (GFLOPs, value) of settings drawn as
    small grey dots (e.g. every candidate tune tried). front: the points are a Pareto front:
    joined by a line, and only "unmerged" and the highlighted ones labelled (the rest would
    crowd); otherwise every point is labelled and none joined.
    """
    if not points:
        raise ValueError("no settings to plot")
    highlight = highlight or []
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    if others:
        xs, ys = zip(*others)
        ax.scatter(xs, ys, s=8, color="0.7", label=others_label, zorder=1)
    ordered = sorted(points, key=lambda p: p[1])
    if front:
        ax.plot([p[1] for p in ordered], [p[2] for p in ordered], color="tab:blue", alpha=0.4, zorder=2,
                label="front")
    for name, gflops, value in ordered:
        big = name in highlight
        ax.scatter([gflops], [value], s=60 if big else 25, color="tab:red" if big else "tab:blue", zorder=3)
        if not front or big or name == "unmerged":
            ax.annotate(name, (gflops, value), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set_xlabel("GFLOPs per image (realised mean)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if others or front:
        ax.legend(fontsize="small", loc="lower right")
    return save_png(fig, path)
