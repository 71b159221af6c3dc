"""``atm-export check DIR``: re-validate existing artifacts against their report and eager PyTorch.

For users' CI. Nothing in report.json is taken on trust: check reads it against its schema,
rebuilds the eager model from what it recorded (model, settings, weights, sample images) and

1. checks every ONNX artifact is a valid atm-export file of its flavour (else exit 2);
2. compares the artifacts with the report (exit 3 on any difference): the settings in the
   report must be the ones its alpha/beta/theta_min (or r) give; every TokenMerge node must
   carry the attributes those settings give its block (``export.integrity``); model.onnx must
   be model.plugin.onnx with its merge steps lowered;
3. recomputes the report's figures (GFLOPs, tokens and merges per block) from a fresh eager run
   on the same images (exit 3 on a difference that no close call explains);
4. runs the same parity checks as the export did (exit 3 on a failure).
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import onnx
import torch

from .. import contract
from ..backends import RuntimeOptions
from ..console import Console
from ..errors import ArtifactMismatchError, ParityError, UserError
from ..export.bundle import Bundle
from ..export.onnx import check_model, read_metadata
from ..fixed_schedule import checked_schedule, replay_model
from ..flops import ViTDims
from ..patch import ATMVisionTransformer, patch_model
from ..registry import resolve_model
from ..report.model import BackendParity, Report, ReportSchemaError, load_report
from ..schedule import MergeConfig
from ..weights import RANDOM_SEED, create_model, file_sha256
from .common import check_parity, check_static_parity, run_flops, run_params, run_tokens, sample_batch

FLAVOURS = {"model.onnx": "portable", "model.plugin.onnx": "plugin",
            "model.static.onnx": "portable", "model.static.plugin.onnx": "plugin",
            # fp16-typed graphs (--trt-precision fp16): validated as files; parity is the engine's
            "model.fp16.plugin.onnx": "plugin", "model.static.fp16.plugin.onnx": "plugin"}


def read_report(directory: Path) -> Report:
    path = directory / "report.json"
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    if not path.is_file():
        raise UserError(f"no report.json in {directory}: not an atm-export output directory")
    try:
        return load_report(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    except ReportSchemaError as exc:
        raise UserError(f"{path} is not a report this atm-export can check ({exc}); re-export with it") from None


def load_artifact(path: Path, flavour: str) -> onnx.ModelProto:
    """Load and validate one ONNX artifact; every problem is a one-line UserError. A graph with
    a side file of weights is returned weightless (atm_export.export.external_data)."""
    from ..export import external_data

    if not path.is_file():
        raise UserError(f"{path} is missing (the report lists it)")
    try:
        model = external_data.load(path)
    except Exception as exc:  # protobuf raises several types for garbage
        raise UserError(f"{path} is not a valid ONNX file ({type(exc).__name__})") from None
    missing = external_data.missing_side_files(model, path.parent)
    if missing:
        raise UserError(f"{path}'s weights lie in {', '.join(missing)}, which is not in {path.parent}: "
                        "keep each .onnx file's side file next to it")
    meta = read_metadata(model)
    if "version" not in meta or meta.get("flavour") != flavour:
        raise UserError(f"{path} was not written by atm-export as the {flavour} flavour "
                        f"(metadata: {meta or 'none'}); re-export it with atm-export")
    version = meta.get("token_merge_version", 1)  # exports before atm-export 0.2 did not record it
    if version != contract.VERSION:
        raise UserError(f"{path} was exported by atm-export {meta['version']} with TokenMerge version {version} "
                        f"(another split convention); this atm-export implements version {contract.VERSION}: re-export it")
    try:
        check_model(model, flavour, path)
    except Exception as exc:
        raise UserError(f"{path} fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    return model


def config_from_report(params: dict) -> MergeConfig:
    """The MergeConfig that report.json's params record (MergeConfig.to_dict, read back)."""
    return MergeConfig(**{f.name: params[f.name] for f in dataclasses.fields(MergeConfig) if f.name in params}).validate()


def rebuild_model(report: Report, weights: str | None):
    """The eager timm model the artifacts were exported from."""
    entry = resolve_model(report.model.name)
    if entry.timm_name != report.model.timm_name:  # a registry change since the export
        entry = resolve_model(report.model.timm_name)
    recorded = report.weights
    if recorded["source"] == "random":
        if recorded.get("seed") != RANDOM_SEED:
            raise UserError(f"the artifacts used random weights with seed {recorded.get('seed')}; this version "
                            f"of atm-export draws them with seed {RANDOM_SEED}")
        vit, _ = create_model(entry, random_init=True)
    elif recorded["source"] == "file":
        path = weights or recorded["path"]
        if not Path(path).is_file():
            raise UserError(f"the weights the artifacts were made from ({path}) are not there; pass --weights PATH")
        if file_sha256(Path(path)) != recorded["sha256"]:
            raise UserError(f"{path} is not the checkpoint the artifacts were made from (sha256 differs)")
        vit, _ = create_model(entry, weights=path)
    else:
        vit, _ = create_model(entry, weights=weights)
    return vit


def settings_differences(report: Report, atm: ATMVisionTransformer) -> list[str]:
    """Where the report's recorded settings differ from what its own merge settings give."""
    expected, recorded = run_params(atm.config, atm), report.settings.params
    return [f"report.json's params.{key} is {recorded.get(key)!r}, but its settings give {value!r}"
            for key, value in expected.items() if recorded.get(key) != value]


def artifact_differences(report: Report, bundle: Bundle) -> list[str]:
    """Every way the ONNX artifacts differ from what the report says they are."""
    from ..export.integrity import lowering_difference, merge_node_differences

    atm = bundle.atm
    problems = settings_differences(report, atm)
    if bundle.plugin is not None:
        problems += [f"model.plugin.onnx: {p}" for p in merge_node_differences(bundle.plugin, atm.steps, atm.num_protected)]
    if bundle.plugin is not None and bundle.portable is not None:
        difference = lowering_difference(bundle.portable, bundle.plugin, weights_dir=bundle.directory)
        if difference:
            problems.append(difference)
    if bundle.static is not None:
        problems += static_differences(report, bundle.static)
    return problems


def static_differences(report: Report, static: Bundle) -> list[str]:
    """Every way the static-schedule artifacts differ from the schedule report.json records."""
    from ..export.integrity import lowering_difference, merge_node_differences
    from ..fixed_schedule import schedule_gflops
    from ..schedule import r_from_tokens

    atm, recorded = static.atm, report.static_schedule
    problems = []
    r = r_from_tokens(static.schedule, atm.num_protected, atm.class_token_head)
    if recorded.r_per_layer != r:
        problems.append(f"report.json's static_schedule.r_per_layer {recorded.r_per_layer} is not what its "
                        f"tokens_per_layer give ({r})")
    gflops = round(schedule_gflops(ViTDims.from_timm(atm.vit), static.schedule, atm.class_token_head), 4)
    if abs(recorded.gflops - gflops) > 1e-4:
        problems.append(f"report.json's static_schedule.gflops is {recorded.gflops}, its schedule gives {gflops}")
    if static.plugin is not None:
        problems += [f"model.static.plugin.onnx: {p}"
                     for p in merge_node_differences(static.plugin, atm.steps, atm.num_protected)]
    if static.plugin is not None and static.portable is not None:
        difference = lowering_difference(static.portable, static.plugin, ("model.static.onnx", "model.static.plugin.onnx"),
                                         static.directory)
        if difference:
            problems.append(difference)
    return problems


def figure_differences(report: Report, atm: ATMVisionTransformer, reference, precision: str = "fp32"
                       ) -> tuple[list[str], list[str]]:
    """The report's figures against a fresh eager run on its sample batch (``reference``).
    Returns (mismatches, notes): a token count that differs only after a close call is a note
    (the fresh run may rightly have chosen otherwise)."""
    from ..parity import explain_call

    flops, tokens = run_flops(atm, reference.stats), run_tokens(reference.stats)
    recorded = report.tokens
    if recorded.mean != tokens.mean:
        counts = [int(round(t)) for t in recorded.mean]
        _, call = reference.explain_counts(counts, precision) if len(counts) == len(reference.tokens) else (0, None)
        what = (f"report.json's tokens {recorded.mean} are not what the model gives on its sample images "
                f"({tokens.mean})")
        return ([what], []) if call is None else ([], [f"{what}, but {explain_call(reference, call)}"])
    mismatches = [f"report.json's tokens.{name} {getattr(recorded, name)} are not the sample run's "
                  f"{getattr(tokens, name)}" for name in ("min", "max", "merged")
                  if getattr(recorded, name) != getattr(tokens, name)]
    for name in ("baseline", "atm", "reduction"):
        value, claimed = getattr(flops, name), getattr(report.flops, name)
        if abs(claimed - value) > 1e-4:
            mismatches.append(f"report.json's flops.{name} is {claimed}, the sample run gives {value}")
    return mismatches, []


def _raise_mismatch(problems: list[str], console: Console) -> None:
    for problem in problems:
        console.note(problem)
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise ArtifactMismatchError(f"{problems[0]}{more}")


def open_artifacts(directory: Path, weights: str | None = None, report: Report | None = None) -> tuple[Report, Bundle]:
    """The report of ``directory`` (``report`` when the caller has read it) and a bundle of its
    artifacts, with the eager models rebuilt from what the report recorded. UserError (one line)
    for anything unreadable."""
    report = report or read_report(directory)
    models = {name: load_artifact(directory / name, flavour) for name, flavour in FLAVOURS.items()
              if name in report.artifacts}
    if not models:
        raise UserError(f"{directory} holds no ONNX artifacts (report.json lists none)")
    vit = rebuild_model(report, weights)
    atm = patch_model(vit, config_from_report(report.settings.params))
    bundle = Bundle(atm=atm, vit=vit, plugin=models.get("model.plugin.onnx"), portable=models.get("model.onnx"),
                    engine=_engine(directory / "model.engine"), engine_info=report.tensorrt, directory=directory)
    static = report.static_schedule
    if static is not None:
        tokens = checked_schedule(static.tokens_per_layer, ViTDims.from_timm(vit), "report.json's static_schedule")
        bundle.static = Bundle(atm=replay_model(atm, tokens), vit=vit, plugin=models.get("model.static.plugin.onnx"),
                               portable=models.get("model.static.onnx"),
                               engine=_engine(directory / "model.static.engine"), engine_info=report.tensorrt,
                               schedule=tokens, directory=directory)
    return report, bundle


def _engine(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def check_artifacts(directory: Path, weights: str | None = None, strict: bool = False, console: Console | None = None,
                    atol: float | None = None, rtol: float | None = None, more_steps: int = 0,
                    opened: tuple[Report, Bundle] | None = None, backends: str | None = None,
                    runtime_options: RuntimeOptions = RuntimeOptions()) -> dict[str, BackendParity]:
    """Validate the artifacts in ``directory``. Raises ArtifactMismatchError when they or the
    report's figures do not match the report, ParityError on a parity failure. Returns the
    parity results. more_steps: steps the caller runs after these (for the numbering);
    opened: what ``open_artifacts`` gave, when the caller has it already; backends: which
    backends to check (--backends; default: every one that can run here)."""
    from ..backends import select, unavailable
    from ..images import take_batch
    from ..parity import reference_run

    console = console or Console(verbosity=0)
    report = opened[0] if opened else read_report(directory)
    console.plan(4 + (report.static_schedule is not None) + more_steps)
    with console.step(f"rebuilding the eager model from {directory / 'report.json'}"):
        report, bundle = opened or open_artifacts(directory, weights, report)
        atm, vit = bundle.atm, bundle.vit
        source = report.images["source"]
        batch, _ = sample_batch(vit, None if source == "builtin" else source, report.images["count"])
    with console.step("comparing the artifacts with report.json"):
        problems = artifact_differences(report, bundle)
        if problems:
            _raise_mismatch(problems, console)
    with console.step("recomputing the report's GFLOPs and token counts"):
        sample_ref = reference_run(atm, batch)
        problems, notes = figure_differences(report, atm, sample_ref)
        if problems:
            _raise_mismatch(problems, console)
        for note in notes:
            console.note(note)
        if notes and strict:
            raise ParityError(f"{notes[0]} (--strict-parity)")
    sizes = sorted({int(b) for p in report.parity.values() for b in p.batches} or {batch.shape[0]})
    refs = [sample_ref if b == batch.shape[0] else reference_run(atm, take_batch(batch, b)) for b in sizes]
    selected = select(backends)
    names = [n for n in selected if n != "eager_atm" and not unavailable(n, bundle, runtime_options)]
    if bundle.engine is not None and "tensorrt" in selected and "tensorrt" not in names:
        console.note(f"model.engine not checked: {unavailable('tensorrt', bundle)}")
    precisions = {"tensorrt": (report.tensorrt or {}).get("precision", "fp32")}
    options = dict(strict=strict, atol=atol, rtol=rtol, precisions=precisions, runtime_options=runtime_options)
    results = check_parity(bundle, names, refs, console, **options)
    if bundle.static is not None:
        results.update(check_static_parity(bundle.static, [torch.from_numpy(r.images) for r in refs], console,
                                           selected=selected, **options))
    failed = [n for n, r in results.items() if r.fails_run]
    if failed:
        worst = results[failed[0]]
        raise ParityError(f"{', '.join(failed)} disagree with eager PyTorch: {(worst.notes or [worst.status])[0]}")
    return results
