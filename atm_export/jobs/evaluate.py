"""``atm-export eval MODEL --data DIR``: accuracy of ATM settings against the unmerged model.

Every batch runs through the unmerged timm model first (its predictions are the reference for
agreement), then through each setting: eager PyTorch, or with ``--backend`` an exported
artifact. The results (eval.json, eval.md, and a GFLOPs/accuracy plot when several settings
are evaluated) are staged and written only when the whole evaluation completes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from .. import accuracy as A
from ..artifacts import open_output
from ..console import Console
from ..data import ImageFolder, batches, open_folder
from ..errors import UserError
from ..patch import patch_model
from ..preset_file import file_default_preset, with_preset_file
from ..registry import ModelEntry, resolve_model
from ..report.accuracy import EVAL_SCHEMA_VERSION, EvalReport, SettingResult, eval_markdown
from ..settings import FIXED_POLICIES, Settings, resolve_settings
from ..weights import create_model
from .common import RuntimeChoices, created, environment, model_info, run_params

#: The default batch size. The paper evaluates at 1024 (its Table A1 finds accuracy insensitive
#: to the batch size); 256 keeps a ViT-B batch within a few GB on a CPU machine.
DEFAULT_BATCH_SIZE = 256
EVAL_FILES = ("eval.json", "eval.md", "eval.png")
UNMERGED = "unmerged"
EAGER = "eager"
#: Backends that can evaluate an exported artifact, and the artifact each needs.
EXPORTED_BACKENDS = {"ort_portable": "model.onnx", "ort_plugin": "model.plugin.onnx", "tensorrt": "model.engine",
                     "openvino": "model.onnx", "openvino_bf16": "model.onnx", "openvino_fp16": "model.onnx"}


@dataclass
class EvalOptions(RuntimeChoices):
    model: str
    data: str
    output: Path
    presets: tuple[str, ...] = ()  # preset names; "all": every preset of the model
    preset_file: str | None = None
    overrides: dict = field(default_factory=dict)  # MergeConfig fields given on the command line
    weights: str | None = None
    random_init: bool = False
    backend: str = EAGER
    artifacts: str | None = None  # the exported artifacts' directory, with --backend
    batch_size: int = DEFAULT_BATCH_SIZE
    limit: int | None = None
    workers: int = 0
    force: bool = False


@dataclass
class Candidate:
    """A setting to evaluate: its name, the evaluator that runs it, and its params as run."""

    name: str
    evaluator: A.Evaluator
    params: dict
    backend: str = EAGER


def setting_name(settings: Settings) -> str:
    """"lossless", "lossless + alpha=0.985", "atm 0.99/0.04/0.88", "tome r=4", "none"."""
    config = settings.config
    if config.policy == "tome":
        return "tome r=" + ",".join(str(r) for r in config.r)
    if config.policy == "none":
        return "none"
    if config.policy == "adamerge" and settings.preset is None:
        return "adamerge r_max=" + ",".join(str(r) for r in config.r_max)
    if settings.preset is None:
        return f"{config.policy} {config.alpha}/{config.beta}/{config.theta_min}"
    given = ", ".join(f"{k}={v}" for k, v in settings.overrides.items())
    return settings.preset.name + (f" + {given}" if given else "")


def resolve_eval_settings(entry: ModelEntry, presets: tuple[str, ...], preset_file: str | None,
                          overrides: dict) -> list[Settings]:
    """One Settings per preset named (comma lists allowed, "all" for every preset), each with
    ``overrides`` on top; without a preset name, what the main command would use."""
    names = [n.strip() for p in presets for n in p.split(",") if n.strip()]
    if names == ["all"]:
        if not entry.presets:
            raise UserError(f"{entry.display_name} has no presets; give the settings instead")
        names = list(entry.presets)
    if not names:
        fixed = overrides.get("policy") in FIXED_POLICIES  # settings of their own: no preset
        names = [None if fixed else file_default_preset(preset_file, entry, None)]
    return [resolve_settings(entry, name, overrides) for name in names]


def evaluate(folder: ImageFolder, vit, candidates: list[Candidate], batch_size: int, console: Console,
             workers: int = 0) -> tuple[A.Tally, dict[str, A.Tally]]:
    """Run the unmerged model and every candidate over ``folder`` in batches of ``batch_size``.
    Returns (the unmerged model's tally, each candidate's tally by name)."""
    reference = A.unmerged(vit)
    base = A.Tally()
    tallies = {c.name: A.Tally() for c in candidates}
    evaluators = {c.name: c.evaluator for c in candidates}
    total = -(-len(folder) // batch_size)
    with console.progress(total, "batch") as advance:
        for images, labels in batches(folder, vit, batch_size, workers):
            predicted = A.score_reference(base, reference, images, labels)
            A.score_batch(tallies, evaluators, images, labels, predicted)
            advance(running_line(base, tallies), postfix=running_line(base, tallies, short=True))
    return base, tallies


def running_line(base: A.Tally, tallies: dict[str, A.Tally], short: bool = False) -> str:
    """The running figures after a batch: top-1 (when labelled) and agreement of each setting."""
    parts = [] if base.top1 is None else [f"unmerged top-1 {base.top1:.2f}"]
    for name, t in tallies.items():
        figures = ([] if t.top1 is None else [f"top-1 {t.top1:.2f}"]) + [f"agreement {t.agreement:.4f}"]
        parts.append(f"{name} " + " ".join(figures) if not short else f"{name}: " + "/".join(figures))
    return (f"{base.images} images: " if not short else "") + "; ".join(parts)


def result(name: str, tally: A.Tally, params: dict, backend: str, batch_size: int,
           unmerged: A.Tally | None = None) -> SettingResult:
    drop = None
    if unmerged is not None and tally.top1 is not None and unmerged.top1 is not None:
        drop = round(unmerged.top1 - tally.top1, 4)
    return SettingResult(name=name, params=params, backend=backend, batch_size=batch_size, images=tally.images,
                         agreement=round(tally.agreement, 6), gflops=round(tally.gflops, 6),
                         tokens=[round(t, 3) for t in tally.tokens], images_per_s=round(tally.images_per_second, 2),
                         top1=None if tally.top1 is None else round(tally.top1, 4),
                         top5=None if tally.top5 is None else round(tally.top5, 4), top1_drop=drop)


def results(base: A.Tally, tallies: dict[str, A.Tally], candidates: list[Candidate], batch_size: int,
            baseline_backend: str = EAGER) -> list[SettingResult]:
    """The unmerged model first, then every candidate."""
    out = [result(UNMERGED, base, {"policy": "none"}, baseline_backend, batch_size)]
    return out + [result(c.name, tallies[c.name], c.params, c.backend, batch_size, base) for c in candidates]


def eager_candidates(vit, settings: list[Settings], console: Console | None = None) -> list[Candidate]:
    """The settings run in eager PyTorch (AdaMerge without statistics calibrated on the built-in
    sample images, with a warning)."""
    from ..calibration import calibrated_settings
    from .common import sample_batch

    candidates = []
    for s in settings:
        if not s.config.calibrated:
            s = calibrated_settings(s, vit, sample_batch(vit, None, 8)[0], "the built-in sample images", console)
        atm = patch_model(vit, s.config)
        candidates.append(Candidate(setting_name(s), A.eager(atm), run_params(s.config, atm)))
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise UserError(f"the same setting is named twice: {', '.join(names)}")
    return candidates


def check_eval_options(opts: EvalOptions) -> None:
    if opts.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.limit is not None and opts.limit < 1:
        raise UserError(f"--limit must be at least 1, got {opts.limit}")
    if opts.backend != EAGER and opts.backend not in EXPORTED_BACKENDS:
        raise UserError(f"unknown backend {opts.backend!r}; choose eager or one of {', '.join(EXPORTED_BACKENDS)}")
    if opts.backend == EAGER and opts.artifacts:
        raise UserError(f"--artifacts is read with --backend ({', '.join(EXPORTED_BACKENDS)})")
    if opts.backend != EAGER:
        given = [k for k, v in opts.overrides.items() if v is not None]
        if opts.presets or opts.preset_file or given or opts.random_init:
            raise UserError(f"--backend {opts.backend} evaluates the artifacts as exported, with their settings and "
                            "weights; drop --preset, --preset-file, --random-init and the merge settings")


def exported_candidate(opts: EvalOptions, stack) -> tuple[ModelEntry, object, dict, list[Candidate]]:
    """(entry, timm model, weights info, [the artifact's candidate]) for ``--backend``; the
    runner is entered on ``stack`` (an ExitStack) and closed with it."""
    from ..backends import open_runner, unavailable
    from .check import open_artifacts
    from .export import default_output

    directory = Path(opts.artifacts) if opts.artifacts else default_output(opts.model, None, {})
    report, bundle = open_artifacts(directory, opts.weights)
    entry = resolve_model(opts.model)
    if opts.model not in (report.model.name, report.model.timm_name) and entry.display_name != report.model.name:
        raise UserError(f"{directory} holds artifacts of {report.model.name} ({report.model.timm_name}), "
                        f"not of {opts.model}")
    if opts.backend == "tensorrt" and bundle.engine is None:
        raise UserError(f"{directory} holds no model.engine (TensorRT was not available when it was exported)")
    reason = unavailable(opts.backend, bundle, opts.runtime_options())
    if reason:
        raise UserError(f"--backend {opts.backend}: {reason}")
    runner = stack.enter_context(open_runner(bundle, opts.backend, runtime_options=opts.runtime_options()))
    name = report.settings.preset or "artifacts"
    candidate = Candidate(f"{name} ({EXPORTED_BACKENDS[opts.backend]})", A.exported(runner, bundle.atm),
                          report.settings.params, opts.backend)
    return entry, bundle.vit, report.weights, [candidate]


def run_eval(opts: EvalOptions, console: Console | None = None) -> EvalReport:
    """Evaluate and write eval.json, eval.md (and eval.png) to ``opts.output``."""
    from contextlib import ExitStack

    console = console or Console(verbosity=0)
    check_eval_options(opts)
    console.plan(3)
    with ExitStack() as stack:
        with console.step(f"loading {opts.model}" + (f" and its {opts.backend} artifact" if opts.backend != EAGER else "")):
            if opts.backend == EAGER:
                entry = with_preset_file(resolve_model(opts.model), opts.preset_file)
                settings = resolve_eval_settings(entry, opts.presets, opts.preset_file, opts.overrides)
                vit, info = create_model(entry, opts.weights, opts.random_init)
                weights = info.to_dict()
                candidates = eager_candidates(vit, settings, console)
            else:
                entry, vit, weights, candidates = exported_candidate(opts, stack)
            folder = open_folder(opts.data, vit.num_classes, "--data", opts.limit)
        writer = stack.enter_context(open_output(opts.output, opts.force, EVAL_FILES))
        with console.step(f"evaluating {len(candidates)} setting(s) and the unmerged model on {len(folder)} images "
                          f"(batch size {opts.batch_size})"):
            base, tallies = evaluate(folder, vit, candidates, opts.batch_size, console, opts.workers)
        report = EvalReport(
            schema_version=EVAL_SCHEMA_VERSION, atm_export_version=__version__,
            created=created(),
            model=model_info(entry),
            weights=weights, data=folder.to_dict(), batch_size=opts.batch_size,
            results=results(base, tallies, candidates, opts.batch_size),
            warnings=[weights["warning"]] if weights.get("warning") else [], environment=environment())
        with console.step(f"writing {opts.output}"):
            write_eval(report, writer)
    return report


def summary_line(r: SettingResult) -> str:
    change = "" if r.top1_drop is None else f" ({0.0 - r.top1_drop:+.2f})"
    top = "" if r.top1 is None else f", top-1 {r.top1:.2f}{change}"
    return f"{r.name}: GFLOPs {r.gflops:.4f}, agreement {r.agreement:.4f}{top}, {r.images_per_s:.1f} images/s"


def write_eval(report: EvalReport, writer) -> None:
    from ..report import plots

    picture = None
    merged = report.results[1:]
    if len(merged) > 1:  # a plot of one setting against the unmerged model says nothing a table does not
        labelled = report.results[0].top1 is not None
        points = [(r.name, r.gflops, r.top1 if labelled else r.agreement) for r in report.results]
        plots.plot_accuracy_front(points, writer.path("eval.png"), "top-1 (%)" if labelled else "agreement with unmerged",
                                  title=f"{report.model.name}: GFLOPs against {'top-1' if labelled else 'agreement'} "
                                        f"(batch {report.batch_size})")
        picture = "eval.png"
    writer.write_text("eval.md", eval_markdown(report, picture))
    writer.write_text("eval.json", json.dumps(report.to_dict(), indent=2) + "\n")
