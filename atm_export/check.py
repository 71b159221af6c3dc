"""``atm-export check DIR``: re-validate existing artifacts against eager PyTorch (for users' CI).

It rebuilds the eager model from what report.json recorded (model, settings, weights, sample
images), checks that every ONNX artifact is a valid atm-export file of its flavour, then runs
the same parity checks as the export did. Any failure is a non-zero exit.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from .errors import ParityError, UserError
from .export.onnx import check_model, read_metadata
from .patch import patch_model
from .pipeline import sample_batch
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


def check_artifacts(directory: Path, weights: str | None = None, strict: bool = False,
                    progress: Progress | None = None) -> dict:
    """Validate the artifacts in ``directory``; raise ParityError on a mismatch. Returns parity results."""
    from .backends import ort as ort_backend
    from .backends import tensorrt as trt_backend
    from .images import take_batch
    from .parity import ort_extra_checks, reference_run
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
    sizes = sorted({int(b) for r in report.get("parity", {}).values() for b in r.get("batches", {})} or {batch.shape[0]})
    refs = [reference_run(atm, take_batch(batch, b)) for b in sizes]
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
        extra = ort_extra_checks(models["model.plugin.onnx"], runners["ort_plugin"], models.get("model.onnx"))
    precisions = {"tensorrt": report.get("tensorrt", {}).get("precision", "fp32")}
    results = parity_all(runners, refs, extra, precisions, strict, progress)
    failed = [n for n, r in results.items() if r["fails_run"]]
    if failed:
        worst = results[failed[0]]
        raise ParityError(f"{', '.join(failed)} disagree with eager PyTorch "
                          f"(max abs diff {worst['max_abs_diff']}, token counts equal {worst['token_counts_equal']})")
    return results
