"""``atm-export check DIR``: re-validate existing artifacts against their report and eager PyTorch.

For users' CI. Nothing in report.json is taken on trust: check rebuilds the eager model from
what the report recorded (model, settings, weights, sample images) and then

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

import json
from pathlib import Path

import onnx

from .errors import ArtifactMismatchError, ParityError, UserError
from .export.onnx import check_model, read_metadata
from .ops import OP_VERSION
from .patch import patch_model
from .pipeline import run_figures, run_params, sample_batch
from .progress import Progress
from .registry import resolve_model
from .schedule import MergeConfig
from .weights import RANDOM_SEED, create_model, file_sha256

FLAVOURS = {"model.onnx": "portable", "model.plugin.onnx": "plugin"}


def read_report(directory: Path) -> dict:
    path = directory / "report.json"
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    if not path.is_file():
        raise UserError(f"no report.json in {directory}: not an atm-export output directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None


def load_artifact(path: Path, flavour: str) -> onnx.ModelProto:
    """Load and validate one ONNX artifact; every problem is a one-line UserError."""
    if not path.is_file():
        raise UserError(f"{path} is missing (the report lists it)")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types for garbage
        raise UserError(f"{path} is not a valid ONNX file ({type(exc).__name__})") from None
    meta = read_metadata(model)
    if "version" not in meta or meta.get("flavour") != flavour:
        raise UserError(f"{path} was not written by atm-export as the {flavour} flavour "
                        f"(metadata: {meta or 'none'}); re-export it with atm-export")
    contract = meta.get("token_merge_version", 1)  # exports before atm-export 0.2 did not record it
    if contract != OP_VERSION:
        raise UserError(f"{path} was exported by atm-export {meta['version']} with TokenMerge version {contract} "
                        f"(another split convention); this atm-export implements version {OP_VERSION}: re-export it")
    try:
        check_model(model, flavour)
    except Exception as exc:
        raise UserError(f"{path} fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    return model


def config_from_report(params: dict) -> MergeConfig:
    fields = {k: params[k] for k in ("policy", "alpha", "beta", "theta_min", "split_layer", "prop_attn") if k in params}
    if "r" in params:
        fields["r"] = tuple(params["r"])
    return MergeConfig(**fields).validate()


def rebuild_model(report: dict, weights: str | None):
    """The eager model the artifacts were exported from."""
    entry = resolve_model(report["model"])
    if entry.timm_name != report["timm_name"]:  # a registry change since the export
        entry = resolve_model(report["timm_name"])
    recorded = report["weights"]
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


def settings_differences(report: dict, atm) -> list[str]:
    """Where the report's recorded settings differ from what its own merge settings give."""
    expected = run_params(atm.config, atm)
    recorded = report["params"]
    return [f"report.json's params.{key} is {recorded.get(key)!r}, but its settings give {value!r}"
            for key, value in expected.items() if recorded.get(key) != value]


def artifact_differences(report: dict, models: dict[str, onnx.ModelProto], atm) -> list[str]:
    """Every way the ONNX artifacts differ from what the report says they are."""
    from .export.integrity import lowering_difference, merge_node_differences

    problems = settings_differences(report, atm)
    plugin, portable = models.get("model.plugin.onnx"), models.get("model.onnx")
    if plugin is not None:
        problems += [f"model.plugin.onnx: {p}" for p in merge_node_differences(plugin, atm.steps, atm.num_protected)]
    if plugin is not None and portable is not None:
        difference = lowering_difference(portable, plugin)
        if difference:
            problems.append(difference)
    return problems


def figure_differences(report: dict, atm, reference, precision: str = "fp32") -> tuple[list[str], list[str]]:
    """The report's figures against a fresh eager run on its sample batch (``reference``, whose
    run left ``atm.last_stats``). Returns (mismatches, notes): a token count that differs only
    after a close call is a note (the fresh run may rightly have chosen otherwise)."""
    fresh = run_figures(atm, atm.last_stats)
    recorded_tokens = [float(t) for t in report.get("tokens_per_layer", [])]
    if recorded_tokens != [float(t) for t in fresh["tokens_per_layer"]]:
        tokens = [int(round(t)) for t in recorded_tokens]
        first, call = reference.explain_counts(tokens, precision) if len(tokens) == len(reference.tokens) else (0, None)
        what = (f"report.json's tokens_per_layer {report.get('tokens_per_layer')} are not what the model gives on its "
                f"sample images ({fresh['tokens_per_layer']})")
        if call is None:
            return [what], []
        from .parity import explain_call

        return [], [f"{what}, but {explain_call(reference, call)}"]
    mismatches = []
    if [float(r) for r in report.get("r_per_layer", [])] != [float(r) for r in fresh["r_per_layer"]]:
        mismatches.append(f"report.json's r_per_layer {report.get('r_per_layer')} are not the sample run's "
                          f"{fresh['r_per_layer']}")
    for key, value in fresh["gflops"].items():
        recorded = report.get("gflops", {}).get(key)
        if not isinstance(recorded, (int, float)) or abs(recorded - value) > 1e-4:
            mismatches.append(f"report.json's gflops.{key} is {recorded}, the sample run gives {value}")
    return mismatches, []


def _raise_mismatch(problems: list[str], progress: Progress) -> None:
    for problem in problems:
        progress.note(problem)
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise ArtifactMismatchError(f"{problems[0]}{more}")


def check_artifacts(directory: Path, weights: str | None = None, strict: bool = False,
                    progress: Progress | None = None, atol: float | None = None, rtol: float | None = None) -> dict:
    """Validate the artifacts in ``directory``. Raises ArtifactMismatchError when they or the
    report's figures do not match the report, ParityError on a parity failure. Returns the
    parity results."""
    from .backends import ort as ort_backend
    from .backends import tensorrt as trt_backend
    from .images import take_batch
    from .parity import ort_extra_checks, reference_run, tolerance_for
    from .pipeline import parity_all

    progress = progress or Progress(enabled=False)
    report = read_report(directory)
    models = {name: load_artifact(directory / name, flavour) for name, flavour in FLAVOURS.items()
              if name in report.get("artifacts", [])}
    if not models:
        raise UserError(f"{directory} holds no ONNX artifacts to check (report.json lists none)")
    with progress.step(f"rebuilding eager {report['model']}"):
        vit = rebuild_model(report, weights)
        atm = patch_model(vit, config_from_report(report["params"]))
        images = report["images"]
        batch, _ = sample_batch(vit, None if images["source"] == "builtin" else images["source"], images["count"])
    with progress.step("comparing the artifacts with report.json"):
        problems = artifact_differences(report, models, atm)
        if problems:
            _raise_mismatch(problems, progress)
    with progress.step("recomputing the report's GFLOPs and token counts"):
        sample_ref = reference_run(atm, batch)
        problems, notes = figure_differences(report, atm, sample_ref)
        if problems:
            _raise_mismatch(problems, progress)
        for note in notes:
            progress.note(note)
        if notes and strict:
            raise ParityError(f"{notes[0]} (--strict-parity)")
    sizes = sorted({int(b) for r in report.get("parity", {}).values() for b in r.get("batches", {})} or {batch.shape[0]})
    refs = [sample_ref if b == batch.shape[0] else reference_run(atm, take_batch(batch, b)) for b in sizes]
    runners = {}
    if "model.onnx" in models:
        runners["ort_portable"] = ort_backend.OrtRunner(models["model.onnx"], "portable").run
    if "model.plugin.onnx" in models:
        runners["ort_plugin"] = ort_backend.OrtRunner(models["model.plugin.onnx"], "plugin").run
    engine = directory / "model.engine"
    if engine.is_file():
        reason = trt_backend.unavailable_reason()
        if reason:
            progress.note(f"model.engine not checked: {reason}")
        else:
            runners["tensorrt"] = trt_backend.EngineRunner(engine.read_bytes(), built_on=report.get("tensorrt")).run
    extra = {}
    if "model.plugin.onnx" in models:
        extra = ort_extra_checks(models["model.plugin.onnx"], runners["ort_plugin"], models.get("model.onnx"),
                                 tolerance_for("fp32", atol, rtol))
    precisions = {"tensorrt": report.get("tensorrt", {}).get("precision", "fp32")}
    results = parity_all(runners, refs, extra, precisions, strict, progress, atol, rtol)
    failed = [n for n, r in results.items() if r["fails_run"]]
    if failed:
        worst = results[failed[0]]
        raise ParityError(f"{', '.join(failed)} disagree with eager PyTorch: {(worst['notes'] or [worst['status']])[0]}")
    return results
