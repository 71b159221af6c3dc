"""``atm-export tune MODEL --data CALIB_DIR``: find ATM settings for a target, check them on held-out images.

The calibration images are decoded once and held in memory with the unmerged model's
predictions; the search (atm_export.tune) then costs one merged forward pass per candidate
and batch it sees. The chosen setting is evaluated on held-out images (``--holdout-data``, or
a share of CALIB_DIR that the search never sees), and written as a preset file in the
registry's format, with the search record (FILE.json) and the front it found (FILE.png).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from .. import __version__
from .. import accuracy as A
from .. import tune as T
from ..artifacts import open_output
from ..console import Console
from ..data import batches, open_folder
from ..errors import UserError
from ..patch import patch_model
from ..preset_file import preset_file_text
from ..registry import resolve_model
from ..report.accuracy import EVAL_SCHEMA_VERSION, SettingResult, TuneReport
from ..weights import create_model
from .common import created, model_info, run_params
from .evaluate import DEFAULT_BATCH_SIZE, Candidate, evaluate, result, results

DEFAULT_HOLDOUT = 0.2


@dataclass
class TuneOptions:
    model: str
    data: str
    output: Path  # the preset file
    target: T.Target
    holdout_data: str | None = None
    holdout: float = DEFAULT_HOLDOUT  # share of --data held out when there is no --holdout-data
    weights: str | None = None
    random_init: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    limit: int | None = None
    name: str = "tuned"
    alphas: tuple[float, ...] = T.ALPHAS
    betas: tuple[float, ...] = T.BETAS
    theta_mins: tuple[float, ...] = T.THETA_MINS
    split_layers: tuple[int, ...] | None = None  # None: the default, half the depth, the whole depth
    eta: int = T.ETA
    workers: int = 0
    force: bool = False
    command: str = ""  # as the user typed it, for the preset's source


def output_names(path: Path) -> tuple[str, str, str]:
    """The preset file, the search record and the front's picture, side by side."""
    return path.name, path.stem + ".json", path.stem + ".png"


def check_tune_options(opts: TuneOptions) -> None:
    if opts.output.suffix != ".toml":
        raise UserError(f"--output {opts.output}: a preset file is TOML; name it *.toml")
    if not opts.name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"--name {opts.name!r}: use letters, digits, - and _")
    if not 0.0 < opts.holdout < 1.0:
        raise UserError(f"--holdout must be between 0 and 1, got {opts.holdout}")
    if opts.batch_size < 1 or (opts.limit is not None and opts.limit < 1) or opts.eta < 2:
        raise UserError("--batch-size and --limit must be at least 1, --eta at least 2")


def cached_batches(folder, vit, batch_size: int, workers: int) -> tuple[list, A.Tally]:
    """Every batch of ``folder`` as (images, labels, the unmerged model's predicted classes),
    and the unmerged model's tally over them."""
    reference = A.unmerged(vit)
    cache, base = [], A.Tally()
    for images, labels in batches(folder, vit, batch_size, workers):
        cache.append((images, labels, A.score_reference(base, reference, images, labels)))
    return cache, base


@dataclass
class Search:
    """What the search found on the calibration images."""

    pool: list[T.Candidate]  # every candidate, with what it saw
    rungs: list[dict]
    front: list[T.Candidate]  # among the candidates that saw every batch
    chosen: T.Candidate | None
    unmerged: A.Tally


def run_tune(opts: TuneOptions, console: Console | None = None) -> TuneReport:
    """Search, check the choice on held-out images, write the preset file, its record and picture."""
    console = console or Console(verbosity=0)
    check_tune_options(opts)
    console.plan(5)
    with console.step(f"loading {opts.model} and the images"):
        entry = resolve_model(opts.model)
        vit, info = create_model(entry, opts.weights, opts.random_init)
        calib = open_folder(opts.data, vit.num_classes, "--data", opts.limit)
        if opts.holdout_data:
            held = open_folder(opts.holdout_data, vit.num_classes, "--holdout-data")
        else:
            calib, held = calib.split(opts.holdout)
        if opts.target.metric == "top1" and not calib.labelled:
            raise UserError("--metric top1 needs labelled calibration images (one subfolder per class)")
        probe = patch_model(vit, T.MergeConfig())
        pool = T.candidates(probe.depth, not probe.class_token_head, opts.alphas, opts.betas, opts.theta_mins,
                            opts.split_layers)
        console.note(f"{len(calib)} calibration images, {len(held)} held out; {len(pool)} candidate settings")
    with open_output(opts.output.parent, opts.force, output_names(opts.output)) as writer:
        with console.step(f"decoding the calibration images and running the unmerged model (batch size {opts.batch_size})"):
            cache, unmerged = cached_batches(calib, vit, opts.batch_size, opts.workers)
        with console.step(f"searching: {opts.target.describe()}"):
            found = search(vit, pool, cache, unmerged, opts, console)
        with console.step(f"checking the choice on {len(held)} held-out images"):
            report = build_report(opts, entry, info.to_dict(), calib, held, found, vit)
        with console.step(f"writing {opts.output}"):
            _write(report, opts, writer, found, entry)
    return report


def search(vit, pool: list[T.Candidate], cache: list, unmerged: A.Tally, opts: TuneOptions, console: Console) -> Search:
    """Successive halving over ``pool`` on the cached calibration batches."""
    models = {}

    def run(c: T.Candidate, index: int) -> None:
        atm = models.setdefault(c.name, patch_model(vit, c.config))
        images, labels, reference = cache[index]
        pred, seconds = A.timed(A.eager(atm), images)
        c.tally.add(pred, labels, reference, seconds)

    def on_round(i: int, rounds: int, alive: int) -> None:
        console.note(f"round {i + 1}/{rounds}: {alive} candidates")

    rungs = T.successive_halving(pool, len(cache), run, opts.target, opts.eta, on_round)
    done = T.finished(pool, len(cache))
    console.note(f"{sum(c.batches for c in pool)} candidate-batches run, against {len(pool) * len(cache)} for "
                 "every candidate on every batch")
    return Search(pool, rungs, T.pareto_front(done, opts.target.metric), T.choose(done, opts.target), unmerged)


def _setting(name: str, c: T.Candidate, vit, unmerged: A.Tally, batch_size: int) -> SettingResult:
    atm = patch_model(vit, c.config)
    return result(name, c.tally, run_params(c.config, atm), "eager", batch_size, unmerged)


def build_report(opts: TuneOptions, entry, weights: dict, calib, held, found: Search, vit) -> TuneReport:
    """The search record, with the chosen setting evaluated on the held-out images."""
    chosen, target = found.chosen, opts.target
    held_candidates = []
    if chosen is not None:
        atm = patch_model(vit, chosen.config)
        held_candidates = [Candidate(opts.name, A.eager(atm), run_params(chosen.config, atm))]
    held_unmerged, held_tallies = evaluate(held, vit, held_candidates, opts.batch_size, Console(verbosity=0), opts.workers)
    unmerged_result, *chosen_held = results(held_unmerged, held_tallies, held_candidates, opts.batch_size)
    chosen_result = held_result = met = None
    notes = []
    if chosen is not None:
        chosen_result = _setting(opts.name, chosen, vit, found.unmerged, opts.batch_size)
        held_result = chosen_held[0]
        met = (held_result.gflops <= target.target_gflops if target.target_gflops is not None
               else held_result.agreement >= target.min_agreement)
    else:
        closest = found.front[0] if target.target_gflops is not None else (found.front[-1] if found.front else None)
        notes.append("no setting of the grid meets the target on the calibration images"
                     + (f"; the closest: {closest.name} (GFLOPs {closest.tally.gflops:.4f}, agreement "
                        f"{closest.tally.agreement:.4f})" if closest else ""))
    return TuneReport(
        schema_version=EVAL_SCHEMA_VERSION, atm_export_version=__version__,
        created=created(),
        model=model_info(entry),
        weights=weights, target=target.to_dict(), calibration=calib.to_dict(), held_out=held.to_dict(),
        batch_size=opts.batch_size, rungs=found.rungs,
        front=[_setting(c.name, c, vit, found.unmerged, opts.batch_size) for c in found.front],
        chosen=chosen_result, chosen_held_out=held_result,
        unmerged_held_out=unmerged_result,
        met_on_held_out=met, preset_file=None if chosen is None else str(opts.output), notes=notes)


def _write(report: TuneReport, opts: TuneOptions, writer, found: Search, entry) -> None:
    """The front's picture, the search record, and the preset file (when a setting was chosen)."""
    preset_name, record, picture = output_names(opts.output)
    plot_front(report, found, opts.target.metric, writer.path(picture))
    writer.write_text(record, json.dumps(report.to_dict(), indent=2) + "\n")
    if found.chosen is None:
        return
    c, h = report.chosen, report.chosen_held_out

    def figures(r: SettingResult) -> str:
        top = "" if r.top1 is None else f", top-1 {r.top1:.2f}"
        return f"{r.images} images: GFLOPs {r.gflops:.4f}, agreement {r.agreement:.4f}{top}"

    source = (f"{opts.command or 'atm-export tune'}: {opts.target.describe()}; calibration {figures(c)}; "
              f"held-out {figures(h)} ({'met' if report.met_on_held_out else 'missed'} the target); "
              f"batch size {opts.batch_size}")
    held = {"gflops": round(h.gflops, 4), "agreement": round(h.agreement, 4),
            "top1": None if h.top1 is None else round(h.top1, 2)}
    comments = [f"written by atm-export {__version__} tune on {report.created}",
                f"use with: atm-export {entry.display_name} --preset-file {opts.output.name}",
                f"figures: on the held-out images (the search record is {record})"]
    writer.write_text(preset_name, preset_file_text(entry, opts.name, found.chosen.config, held, source, comments))


def plot_front(report: TuneReport, found: Search, metric: str, path) -> None:
    """The front (with the unmerged model and the choice) over every candidate tried."""
    from ..report import plots

    def value(r: SettingResult) -> float:
        return r.top1 if metric == "top1" else r.agreement

    base = found.unmerged
    points = [("unmerged", base.gflops, base.top1 if metric == "top1" else 1.0)]
    chosen = report.chosen
    points += [(r.name, r.gflops, value(r)) for r in report.front if chosen is None or r.params != chosen.params]
    if chosen is not None:
        points.append((chosen.name, chosen.gflops, value(chosen)))
    others = [(c.tally.gflops, c.tally.top1 if metric == "top1" else c.tally.agreement) for c in found.pool
              if c.tally.images]
    plots.plot_accuracy_front(points, path, "top-1 (%)" if metric == "top1" else "agreement with unmerged",
                              title=f"{report.model.name}: tune front on {report.calibration['images']} calibration images",
                              highlight=[chosen.name] if chosen is not None else [], others=others,
                              others_label="candidates, on the images they reached before being dropped", front=True)
