"""The accuracy gate of ``atm-export check DIR --data VAL_DIR``: for users' CI.

After the artifacts pass ``check`` (so the exported models are known to match eager ATM), the
gate evaluates the artifacts' settings in eager PyTorch against the unmerged model on the
user's images, and fails (exit 3) when agreement is below ``--min-agreement`` or the top-1 drop
exceeds ``--max-top1-drop`` percentage points. The figures go to the console and to a JSON
file, written whether the gate passes or not.

``--preset-file`` makes ``check`` also confirm that the artifacts were made with that preset
(e.g. the one ``tune`` wrote), so that a CI job notices artifacts made with other settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import accuracy as A
from ..artifacts import write_atomic
from ..console import Console
from ..data import open_folder
from ..errors import AccuracyGateError, ArtifactMismatchError, UserError
from ..preset_file import file_default_preset, with_preset_file
from ..registry import resolve_model
from ..report.accuracy import GateResult, gate_lines
from ..export.bundle import Bundle
from ..report.model import Report
from .check import config_from_report
from .common import run_params
from .evaluate import DEFAULT_BATCH_SIZE, Candidate, evaluate, results

GATE_FILE = "accuracy_gate.json"
COMPARED = ("policy", "alpha", "beta", "theta_min", "split_layer", "r_max", "intensity_scale", "salience_temperature",
            "redundancy_mean", "redundancy_std")


@dataclass
class GateOptions:
    data: str
    min_agreement: float | None = None
    max_top1_drop: float | None = None  # percentage points
    batch_size: int = DEFAULT_BATCH_SIZE
    limit: int | None = None
    output: Path | None = None  # the JSON file (default: DIR/accuracy_gate.json)
    workers: int = 0

    def check(self) -> None:
        if self.min_agreement is None and self.max_top1_drop is None:
            raise UserError("--data needs a limit: --min-agreement A and/or --max-top1-drop D")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise UserError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")
        if self.max_top1_drop is not None and self.max_top1_drop < 0:
            raise UserError(f"--max-top1-drop must not be negative, got {self.max_top1_drop}")


def preset_differences(report: Report, bundle: Bundle, preset_file: str, preset: str | None) -> list[str]:
    """Where the artifacts' settings (``report``, ``bundle``: from ``open_artifacts``) differ from
    ``preset_file``'s preset (both as run)."""
    from ..patch import patch_model

    entry = with_preset_file(resolve_model(report.model.name), preset_file)
    name = file_default_preset(preset_file, entry, preset) or preset
    config = entry.preset(name).config
    wanted = run_params(config, patch_model(bundle.vit, config))
    made = run_params(config_from_report(report.settings.params), bundle.atm)
    return [f"the artifacts were made with {key} {made.get(key)!r}, the preset {name!r} of {preset_file} has "
            f"{wanted.get(key)!r}" for key in COMPARED if made.get(key) != wanted.get(key)]


def check_preset(report: Report, bundle: Bundle, preset_file: str, preset: str | None) -> None:
    """ArtifactMismatchError when the artifacts were not made with ``preset_file``'s preset."""
    problems = preset_differences(report, bundle, preset_file, preset)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactMismatchError(problems[0] + more)


def run_gate(directory: Path, report: Report, bundle: Bundle, gate: GateOptions,
             console: Console | None = None) -> GateResult:
    """Evaluate the artifacts' settings (``report``, ``bundle``: from ``open_artifacts`` on
    ``directory``) against the unmerged model on ``gate.data``; write the JSON file; raise
    AccuracyGateError when a limit is not met."""
    console = console or Console(verbosity=0)
    gate.check()
    vit, atm = bundle.vit, bundle.atm
    folder = open_folder(gate.data, vit.num_classes, "--data", gate.limit)
    if gate.max_top1_drop is not None and not folder.labelled:
        raise UserError(f"--max-top1-drop needs labelled images (one subfolder per class); {gate.data} has none")
    name = report.settings.preset or "artifacts"
    candidate = Candidate(name, A.eager(atm), report.settings.params)
    with console.step(f"accuracy gate: {name} against the unmerged model on {len(folder)} images "
                      f"(batch size {gate.batch_size})"):
        base, tallies = evaluate(folder, vit, [candidate], gate.batch_size, console, gate.workers)
    unmerged, merged = results(base, tallies, [candidate], gate.batch_size)
    failures = []
    if gate.min_agreement is not None and merged.agreement < gate.min_agreement:
        failures.append(f"agreement {merged.agreement:.4f} is below --min-agreement {gate.min_agreement}")
    if gate.max_top1_drop is not None and merged.top1_drop > gate.max_top1_drop:
        failures.append(f"top-1 drops {merged.top1_drop:.2f} points ({unmerged.top1:.2f} -> {merged.top1:.2f}), "
                        f"more than --max-top1-drop {gate.max_top1_drop}")
    outcome = GateResult(status="failed" if failures else "passed", directory=str(directory.resolve()),
                         min_agreement=gate.min_agreement, max_top1_drop=gate.max_top1_drop, data=folder.to_dict(),
                         unmerged=unmerged, merged=merged, failures=failures)
    write_json_atomic(gate.output or directory / GATE_FILE, outcome.to_dict())
    if failures:
        for line in gate_lines(outcome):
            console.note(line)
        raise AccuracyGateError(f"{failures[0]} on {merged.images} images of {gate.data}")
    return outcome


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path``, atomically."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
