"""The ``atm-export`` command line.

    atm-export MODEL [--preset NAME] [settings] [--weights PATH | --random-init] [--output DIR]
    atm-export models                    list registered models and presets

``atm-export MODEL ...`` is short for ``atm-export export MODEL ...``. Every user mistake is
reported as one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import difflib
import os
import signal
import sys
from pathlib import Path

import click

from . import signals
from .errors import (AccuracyGateError, ArtifactMismatchError, NonFiniteInputError, ParityError, SettingsError, UserError,
                     failure_log_text)

#: Exit statuses: 2 a mistake in the input, 3 a check failed; 128 + the signal when interrupted.
EXIT_FAILED = 1  # an unexpected failure: one line, the traceback in a log file
EXIT_USAGE = 2
EXIT_CHECK_FAILED = 3


class DefaultGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to ``export``.

    A first word that is no model but close to a subcommand's name (``chek``) is taken for a
    mistyped subcommand, not for a model called "chek".
    """

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            self._refuse_mistyped_command(args[0])
            args = ["export", *args]
        return super().parse_args(ctx, args)

    def _refuse_mistyped_command(self, word: str) -> None:
        close = difflib.get_close_matches(word, list(self.commands), n=1, cutoff=0.75)
        if not close:
            return
        from .registry import find_model  # imports timm: only for words close to a subcommand

        if find_model(word) is None:
            raise click.UsageError(f"unknown command {word!r}; did you mean {close[0]!r}?")


def _number_list(value: str | None, kind: type, check, what: str) -> tuple | None:
    """'8' or '16,16,12' -> (8,) or (16, 16, 12) of ``kind``; click.BadParameter when a value
    is no ``kind`` or fails ``check`` (``what`` says what is expected)."""
    if value is None:
        return None
    try:
        numbers = tuple(kind(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise click.BadParameter(f"expected {noun} separated by commas, got {value!r}") from None
    if not numbers or not all(check(n) for n in numbers):
        raise click.BadParameter(f"{what}, got {value!r}")
    return numbers


def _int_list(value: str | None, minimum: int, what: str) -> tuple[int, ...] | None:
    """'8' or '16,16,12' -> (8,) or (16, 16, 12); click.BadParameter for anything else."""
    return _number_list(value, int, lambda n: n >= minimum, what)


def _parse_r(ctx, param, value):
    return _int_list(value, 0, "r must not be negative")


def _float_list(ctx, param, value):
    """'0.98,0.99' -> (0.98, 0.99): thresholds or rates, each in [0, 10]."""
    return _number_list(value, float, lambda n: 0.0 <= n <= 10.0, "expected numbers in [0, 10] separated by commas")


def _parse_batches(ctx, param, value):
    return _int_list(value, 1, "expected batch sizes of at least 1")


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="atm-export")
def cli():
    """Deploy timm Vision Transformers accelerated by Adaptive Token Merging (ATM)."""


def _statuses(parity: dict) -> str:
    return ", ".join(f"{name} {result.status}" for name, result in parity.items()) or "not run"


def _console(quiet: bool, verbose: bool):
    from .console import Console

    return Console(verbosity=0 if quiet else (2 if verbose else 1))


def _verbosity_options(command):
    command = click.option("--verbose", "-v", is_flag=True, help="Also print every detail (parity notes, each timing).")(command)
    return click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors and the final line.")(command)


def _merge_setting_options(command):
    """The model's weights and merge settings: the same options on every command that runs a model."""
    options = [
        click.option("--preset", help="Preset from models/registry.toml or --preset-file (default: lossless); the "
                                      "settings below override its fields. See `atm-export models`."),
        click.option("--preset-file", type=click.Path(dir_okay=False),
                     help="Presets of your own in the registry's format (e.g. written by `atm-export tune`)."),
        click.option("--policy", type=click.Choice(["atm", "atm-per-image", "tome", "adamerge", "none"]),
                     help="Merge policy: ATM (thresholds), ToMe (fixed r), AdaMerge (salience and calibrated intensity), none."),
        click.option("--alpha", type=float, help="ATM initial threshold (0..1)."),
        click.option("--beta", type=float, help="ATM threshold decay rate."),
        click.option("--theta-min", type=float, help="ATM lowest threshold (0..1)."),
        click.option("--split-layer", type=int,
                     help="Last block with alternate matching; later blocks use size-distinctive matching."),
        click.option("--r", "r", callback=_parse_r, help="ToMe merge count (with --policy tome): one number, or one per block."),
        click.option("--r-max", "r_max", callback=_parse_r,
                     help="AdaMerge: most merges per image and block (default 16): one number, or one per block."),
        click.option("--intensity-scale", type=float, help="AdaMerge: slope of the intensity sigmoid (default 1)."),
        click.option("--salience-temperature", type=click.FloatRange(min=0, min_open=True),
                     help="AdaMerge: temperature of the salience softmax (default 1)."),
        click.option("--prop-attn/--no-prop-attn", default=None,
                     help="Proportional attention (default: on for class-token models)."),
        click.option("--weights", type=click.Path(dir_okay=False), help="Local checkpoint (.safetensors or torch) instead of the hub."),
        click.option("--random-init", is_flag=True, help="Random weights (every output is flagged)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


OVERRIDES = ("policy", "alpha", "beta", "theta_min", "split_layer", "r", "prop_attn", "r_max", "intensity_scale",
             "salience_temperature")


def _openvino_options(command):
    """OpenVINO's device and threads, on every command that opens OpenVINO runners."""
    command = click.option("--openvino-threads", type=click.IntRange(min=1),
                           help="OpenVINO: inference threads (default: OpenVINO's, every core).")(command)
    return click.option("--openvino-device", default="CPU", show_default=True,
                        help="OpenVINO device: CPU, GPU, NPU, AUTO, HETERO:GPU,CPU, ...")(command)


def _backends_option(command):
    return click.option("--backends", metavar="LIST",
                        help="Backends to run: a comma list of runtimes (eager, ort, tensorrt, openvino) or backends "
                             "(e.g. openvino_bf16); a leading '-' leaves one out (--backends=-openvino). Default: every "
                             "backend available here.")(command)


def _overrides(kw: dict) -> dict:
    """Take the merge settings given on the command line out of ``kw``."""
    return {k: kw.pop(k) for k in OVERRIDES}


@cli.command("export")
@click.argument("model")
@_merge_setting_options
@click.option("--images", type=click.Path(file_okay=False), help="Directory of sample images (default: built-in scenes).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sample batch size.")
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Output directory (default: atm-out/MODEL-PRESET, or atm-out/MODEL with settings of your own).")
@click.option("--force", is_flag=True, help="Replace the artifacts of an earlier run in the output directory.")
@click.option("--onnx/--no-onnx", "export", default=True, show_default=True, help="Export ONNX (both flavours) and check it.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (17 or newer).")
@click.option("--external-data", is_flag=True,
              help="Write every ONNX file's weights to a side file next to it (NAME.onnx.data, ONNX's external-data "
                   "form). Graphs too large for one file (over 1.8 GB, e.g. ViT-H) are always written so.")
@click.option("--parity-batches", callback=_parse_batches, default="1,3", show_default=True,
              help="Batch sizes checked besides the sample batch.")
@click.option("--strict-parity", is_flag=True, help="Fail also when a count differs only because a similarity sits on a threshold.")
@click.option("--atol", type=click.FloatRange(min=0), help="Parity: absolute tolerance (default 1e-5 fp32, 2e-2 fp16).")
@click.option("--rtol", type=click.FloatRange(min=0), help="Parity: relative tolerance; passes when |a-b| <= atol + rtol*|b| (default 1e-4 fp32, 2e-2 fp16).")
@click.option("--benchmark/--no-benchmark", default=True, show_default=True, help="Measure latency.")
@click.option("--bench-batches", callback=_parse_batches, default="1,8,32", show_default=True, help="Benchmark batch sizes.")
@click.option("--bench-runs", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="At least this many timed runs per measurement ...")
@click.option("--bench-time", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="... and at least this many seconds (fast calls get many runs).")
@click.option("--bench-schedule", help="Replay a fixed token schedule: gflops:3.2, a report.json, or 197,180,...")
@click.option("--static-schedule", metavar="SOURCE",
              help="Also export model.static.onnx and model.static.plugin.onnx (and model.static.engine), whose "
                   "merge steps merge a fixed r per block, so every token count is static and only the batch is "
                   "dynamic (low-latency TensorRT, CUDA graphs). SOURCE: 'sample' (the sample run's counts), "
                   "gflops:G, a report.json or eval.json[:SETTING] (e.g. an eval run on calibration images), or "
                   "197,180,... (tokens entering each block).")
@click.option("--triton", type=click.Path(file_okay=False),
              help="Also write a Triton Inference Server model repository there: the portable model on ONNX Runtime "
                   "and, where TensorRT is present, the engine with the plugin library (docs/serving.md).")
@click.option("--triton-max-batch", type=click.IntRange(min=1),
              help="Triton's max_batch_size for the ONNX Runtime models (default: the engine's largest batch).")
@click.option("--tensorrt/--no-tensorrt", default=True, show_default=True, help="Build and check a TensorRT engine when TensorRT is installed.")
@click.option("--trt-precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Engine precision. fp32 builds with TF32 off (so parity holds at 1e-4); fp16 needs a TensorRT "
                   "with the FP16 builder flag (TensorRT 10; TensorRT 11 is strongly typed).")
@click.option("--trt-plugin", type=click.Path(dir_okay=False), help="TokenMerge plugin library (default: the one `atm-export build-plugin` built).")
@click.option("--trt-min-batch", type=click.IntRange(min=1), help="Engine: smallest batch it accepts (default 1).")
@click.option("--trt-opt-batch", type=click.IntRange(min=1), help="Engine: batch TensorRT tunes for (default: --batch-size).")
@click.option("--trt-max-batch", type=click.IntRange(min=1),
              help="Engine: largest batch it accepts (default: the largest batch this run checks or benchmarks).")
@click.option("--trt-timing-cache", metavar="PATH",
              help="Engine: timing cache file, read before and updated after every build so that later builds skip "
                   "timing kernels again (default: ~/.cache/atm-export/tensorrt.timing-cache; 'none' for no cache).")
@click.option("--trace-cache", metavar="DIR",
              help="Export: keep the block-by-block trace here, so that a later export of the same architecture and merge "
                   "pattern skips torch.export (default: ~/.cache/atm-export/traces; 'none' to trace every time).")
@click.option("--visualize", is_flag=True, help="Draw merge maps of the sample images (merge_maps.png).")
@click.option("--visualize-blocks", callback=lambda c, p, v: _int_list(v, 1, "expected block numbers of at least 1"),
              help="Blocks after which to draw the merge maps (default: the split layer and the last merge).")
@_backends_option
@_openvino_options
@_verbosity_options
def export_cmd(model, preset, output, quiet, verbose, **kw):
    """Patch MODEL with ATM, export ONNX, check every backend against eager PyTorch, benchmark, report."""
    from .jobs.export import JobOptions, default_output, run_job

    overrides = _overrides(kw)
    output = Path(output) if output else default_output(model, preset, overrides, kw["preset_file"])
    opts = JobOptions(model=model, output=output, preset=preset, overrides=overrides, **kw)
    report = run_job(opts, _console(quiet, verbose))
    click.echo(f"wrote {output}: {report.status} (GFLOPs {report.flops.baseline:.2f} -> {report.flops.atm:.2f}; "
               f"parity: {_statuses(report.parity)})")


@cli.command("eval")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="Image folder: one subfolder per class (ImageNet validation layout), or a flat folder (no labels).")
@_merge_setting_options
@click.option("--backend", default="eager", show_default=True,
              type=click.Choice(["eager", "ort_portable", "ort_plugin", "tensorrt", "openvino", "openvino_bf16",
                                 "openvino_fp16"]),
              help="Evaluate an exported artifact (model.onnx, model.plugin.onnx, model.engine) instead of eager PyTorch.")
@click.option("--artifacts", type=click.Path(file_okay=False),
              help="With --backend: the export's output directory (default: atm-out/MODEL-lossless).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per batch; batch-adaptive merging makes results depend on it (the paper used 1024).")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate at most N images (a fixed shuffled subset).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Image-decoding worker processes.")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Where eval.json and eval.md go (default: atm-out/MODEL-eval).")
@click.option("--force", is_flag=True, help="Replace the results of an earlier eval in the output directory.")
@click.option("--trt-plugin", type=click.Path(dir_okay=False), help="TokenMerge plugin library, with --backend tensorrt.")
@_openvino_options
@_verbosity_options
def eval_cmd(model, preset, output, quiet, verbose, **kw):
    """Accuracy of ATM on MODEL against the unmerged model: top-1/top-5, agreement, GFLOPs, images/s.

    --preset takes one preset, several (lossless,fast) or "all"; the unmerged model is always evaluated.
    """
    from .jobs.evaluate import EvalOptions, run_eval, summary_line

    overrides = _overrides(kw)
    output = Path(output) if output else Path("atm-out") / f"{model}-eval"
    presets = (preset,) if preset else ()
    report = run_eval(EvalOptions(model=model, output=output, presets=presets, overrides=overrides, **kw),
                      _console(quiet, verbose))
    for r in report.results:
        click.echo(summary_line(r))
    click.echo(f"wrote {output}: eval.json, eval.md")


@cli.command("tune")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Calibration images (class subfolders, or flat).")
@click.option("--target-gflops", type=float, help="Find the best agreement (or --metric top1) at or under G GFLOPs ...")
@click.option("--min-agreement", type=float, help="... or the fewest GFLOPs at agreement A or more (0..1).")
@click.option("--metric", type=click.Choice(["agreement", "top1"]), default="agreement", show_default=True,
              help="What 'best' means under --target-gflops (top1 needs labelled images).")
@click.option("--holdout-data", type=click.Path(file_okay=False), help="Held-out images to check the choice on ...")
@click.option("--holdout", type=float, default=0.2, show_default=True,
              help="... or this share of --data, set aside before the search.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local checkpoint (.safetensors or torch) instead of the hub.")
@click.option("--random-init", is_flag=True, help="Random weights (the result then means nothing).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per batch (batch-adaptive merging: the preset is tuned for this batch size).")
@click.option("--limit", type=click.IntRange(min=1), help="Use at most N images of --data (a fixed shuffled subset).")
@click.option("--alphas", callback=_float_list, help="alpha grid (default: 0.945 to 1.0, the paper's range).")
@click.option("--betas", callback=_float_list, help="beta grid (default: 0.015 to 0.05).")
@click.option("--theta-mins", callback=_float_list, help="theta_min grid (default: 0.8 to 0.945).")
@click.option("--split-layers", callback=lambda c, p, v: _int_list(v, 0, "expected block numbers"),
              help="Split layers to try (default: ATM's default, half the depth, the whole depth).")
@click.option("--eta", type=click.IntRange(min=2), default=3, show_default=True,
              help="Successive halving: keep 1/eta of the candidates per round.")
@click.option("--name", default="tuned", show_default=True, help="The preset's name in the file.")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="The preset file (default: atm-out/MODEL-tuned.toml); FILE.json and FILE.png go beside it.")
@click.option("--force", is_flag=True, help="Replace an earlier preset file and its record.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Image-decoding worker processes.")
@_verbosity_options
def tune_cmd(model, target_gflops, min_agreement, metric, output, alphas, betas, theta_mins, split_layers, quiet,
             verbose, **kw):
    """Search alpha, beta, theta_min and the split layer for a GFLOPs or agreement target; write a preset file.

    The preset works with the main command, eval and check: --preset-file FILE.
    """
    from . import tune as T
    from .jobs.tune import TuneOptions, run_tune

    target = T.Target(target_gflops=target_gflops, min_agreement=min_agreement, metric=metric)
    output = Path(output) if output else Path("atm-out") / f"{model}-tuned.toml"
    grid = {k: v for k, v in {"alphas": alphas, "betas": betas, "theta_mins": theta_mins}.items() if v}
    opts = TuneOptions(model=model, output=output, target=target, split_layers=split_layers,
                       command=f"atm-export tune {model} --data {kw['data']} " + (
                           f"--target-gflops {target_gflops}" if target_gflops is not None else f"--min-agreement {min_agreement}"),
                       **grid, **kw)
    report = run_tune(opts, _console(quiet, verbose))
    for r in report.front:
        top = "" if r.top1 is None else f", top-1 {r.top1:.2f}"
        click.echo(f"front: {r.name}: GFLOPs {r.gflops:.4f}, agreement {r.agreement:.4f}{top}")
    if report.chosen is None:
        raise AccuracyGateError(f"no setting meets the target ({target.describe()}); "
                                f"the front is in {output.with_suffix('.json')}")
    c, h = report.chosen, report.chosen_held_out
    click.echo(f"chosen: alpha {c.params['alpha']}, beta {c.params['beta']}, theta_min {c.params['theta_min']}, "
               f"split layer {c.params['split_layer']}: calibration GFLOPs {c.gflops:.4f}, agreement {c.agreement:.4f}; "
               f"held-out GFLOPs {h.gflops:.4f} (unmerged {report.unmerged_held_out.gflops:.4f}), agreement "
               f"{h.agreement:.4f}: target {'met' if report.met_on_held_out else 'MISSED'} on held-out images")
    click.echo(f"wrote {output} (use: --preset-file {output})")


@cli.command("calibrate")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="Calibration images (class subfolders, or a flat folder; labels are not read).")
@click.option("--r-max", "r_max", callback=_parse_r, help="Most merges per image and block (default 16): one number, or one per block.")
@click.option("--intensity-scale", type=float, help="Slope of the intensity sigmoid (default 1).")
@click.option("--salience-temperature", type=click.FloatRange(min=0, min_open=True),
              help="Temperature of the salience softmax (default 1).")
@click.option("--split-layer", type=int, help="Last block with alternate matching (default: every block).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local checkpoint (.safetensors or torch) instead of the hub.")
@click.option("--random-init", is_flag=True, help="Random weights (the statistics then describe an untrained model).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per batch (batch-adaptive merging: calibrate at the batch size you deploy).")
@click.option("--limit", type=click.IntRange(min=2), default=256, show_default=True,
              help="Use at most N images of --data (a fixed shuffled subset).")
@click.option("--name", default="calibrated", show_default=True, help="The preset's name in the file.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="The preset file (default: atm-out/MODEL-adamerge.toml).")
@click.option("--force", is_flag=True, help="Replace an earlier preset file.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Image-decoding worker processes.")
@_verbosity_options
def calibrate_cmd(model, output, quiet, verbose, r_max, intensity_scale, salience_temperature, split_layer, **kw):
    """AdaMerge: measure the per-layer redundancy statistics on your images; write a preset file.

    Use it with: atm-export MODEL --preset-file FILE (and with eval and check).
    """
    from .jobs.calibrate import CalibrateOptions, run_calibrate

    output = Path(output) if output else Path("atm-out") / f"{model}-adamerge.toml"
    overrides = {"r_max": r_max, "intensity_scale": intensity_scale, "salience_temperature": salience_temperature,
                 "split_layer": split_layer}
    command = f"atm-export calibrate {model} --data {kw['data']}"
    config = run_calibrate(CalibrateOptions(model=model, output=output, overrides=overrides, command=command, **kw),
                           _console(quiet, verbose))
    click.echo(f"wrote {output}: AdaMerge statistics for {len(config.redundancy_mean)} blocks "
               f"(use: atm-export {model} --preset-file {output})")


@cli.command("check")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), help="The checkpoint the artifacts were made from, if it moved.")
@click.option("--strict-parity", is_flag=True, help="Fail also on counts that differ only at a threshold.")
@click.option("--atol", type=click.FloatRange(min=0), help="Absolute tolerance (default 1e-5 fp32, 2e-2 fp16; not read from the report).")
@click.option("--rtol", type=click.FloatRange(min=0), help="Relative tolerance: |a-b| <= atol + rtol*|b| (default 1e-4 fp32, 2e-2 fp16).")
@click.option("--preset-file", type=click.Path(dir_okay=False),
              help="Also confirm the artifacts were made with this file's preset (e.g. from `atm-export tune`).")
@click.option("--preset", help="With --preset-file holding several presets: which one.")
@click.option("--data", type=click.Path(file_okay=False),
              help="Accuracy gate: evaluate the artifacts' settings against the unmerged model on these images.")
@click.option("--min-agreement", type=float, help="Gate: fail (exit 3) below this agreement with the unmerged model (0..1).")
@click.option("--max-top1-drop", type=float, help="Gate: fail (exit 3) when top-1 drops more than D percentage points (labelled images).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Gate: images per batch.")
@click.option("--limit", type=click.IntRange(min=1), help="Gate: at most N images (a fixed shuffled subset).")
@click.option("--gate-output", type=click.Path(dir_okay=False), help="Gate: the JSON file (default: DIRECTORY/accuracy_gate.json).")
@_backends_option
@_openvino_options
@_verbosity_options
def check_cmd(directory, weights, strict_parity, atol, rtol, preset_file, preset, data, min_agreement, max_top1_drop,
              batch_size, limit, gate_output, backends, openvino_device, openvino_threads, quiet, verbose):
    """Re-validate the artifacts in DIRECTORY against their report and eager PyTorch (for users' CI).

    Exit 0: everything matches; 3: an artifact or a figure does not match its report, a backend
    disagrees with eager PyTorch, or (with --data) accuracy falls below the limits; 2: the
    directory or its files cannot be read.
    """
    from .backends import RuntimeOptions
    from .jobs.check import check_artifacts, open_artifacts
    from .jobs.common import check_backend_options
    from .jobs.gate import GateOptions, check_preset, run_gate

    gate = None
    if data is not None:
        gate = GateOptions(data, min_agreement, max_top1_drop, batch_size, limit,
                           Path(gate_output) if gate_output else None)
        gate.check()
    elif min_agreement is not None or max_top1_drop is not None or gate_output or limit:
        raise UserError("--min-agreement, --max-top1-drop, --limit and --gate-output belong to the accuracy gate: add --data DIR")
    if preset is not None and preset_file is None:
        raise UserError("--preset needs --preset-file (the registry's presets are checked through report.json)")
    runtime = RuntimeOptions(openvino_device=openvino_device, openvino_threads=openvino_threads)
    check_backend_options(backends, runtime)
    console = _console(quiet, verbose)
    # read the artifacts and rebuild the model once, when more than the checks need them
    opened = open_artifacts(Path(directory), weights) if preset_file or gate is not None else None
    result = check_artifacts(Path(directory), weights=weights, strict=strict_parity, console=console, atol=atol, rtol=rtol,
                             more_steps=gate is not None, opened=opened, backends=backends, runtime_options=runtime)
    if preset_file:
        check_preset(*opened, preset_file, preset)
    click.echo(f"{directory}: artifacts match their report{' and ' + preset_file if preset_file else ''}; "
               f"parity {_statuses(result)}")
    if gate is not None:
        outcome = run_gate(Path(directory), *opened, gate, console)
        from .report.accuracy import gate_lines

        for line in gate_lines(outcome):
            click.echo(line)
        click.echo(f"accuracy gate passed; figures in {gate.output or Path(directory) / 'accuracy_gate.json'}")


@cli.command("build-plugin")
@click.option("--build-dir", type=click.Path(file_okay=False), help="Build directory (default: plugins/build of the checkout).")
@click.option("--tensorrt-root", type=click.Path(file_okay=False), help="TensorRT install with include/ and lib/ (default: $TENSORRT_ROOT).")
@click.option("--cuda-arch", help='CUDA architectures, e.g. "90", "80;90" or "native" (default: '
                                  '75-real;80-real;86-real;89-real;90, i.e. SASS for 7.5 to 9.0 and PTX for newer).')
@click.option("--kernels-only", is_flag=True, help="Build only the CUDA kernel library (no TensorRT needed).")
def build_plugin_cmd(build_dir, tensorrt_root, cuda_arch, kernels_only):
    """Build the TokenMerge CUDA kernels and TensorRT plugin libraries with CMake and nvcc."""
    from . import plugin_lib

    targets = (plugin_lib.KERNELS,) if kernels_only else None
    result = plugin_lib.build(build_dir, targets=targets, cuda_architectures=cuda_arch, tensorrt_root=tensorrt_root)
    click.echo(f"kernels: {result.kernels}")
    if kernels_only:
        return
    if result.plugin is None:
        raise UserError(plugin_lib.missing_tensorrt_message(dynamic=False))
    click.echo(f"plugin (self-registering; trtexec --staticPlugins, polygraphy --plugins): {result.plugin}")
    if result.plugin_dynamic:
        click.echo(f"plugin (getCreators; trtexec --dynamicPlugins): {result.plugin_dynamic}")


@cli.command("doctor")
@click.option("--output", "-o", type=click.Path(file_okay=False), default="atm-doctor", show_default=True,
              help="Where doctor.json, doctor.md and the checks' work files (work/) go.")
@_verbosity_options
def doctor_cmd(output, quiet, verbose):
    """Check this machine for GPU work: driver, GPU, CUDA, TensorRT; then, where a GPU is present,
    build the plugin, run the CUDA kernel tests, compute-sanitizer, a two-merge engine, and fp32 /
    fp16 / static-schedule runs of the main job. Without a GPU: what would run and why it cannot (exit 0).

    Exit 1 when a check that ran failed (named on stderr)."""
    from .jobs.doctor import run_doctor, summary_line, table_lines

    report = run_doctor(Path(output), _console(quiet, verbose))
    if not quiet:
        for line in table_lines(report):
            click.echo(line)
    if report.failed():
        click.echo(f"atm-export: doctor: failed: {', '.join(report.failed())}; see {Path(output) / 'doctor.md'}", err=True)
        raise click.exceptions.Exit(1)
    click.echo(summary_line(report))


@cli.command("models")
def models_cmd():
    """List the registered models and their presets."""
    from .registry import load_registry

    for short, entry in load_registry().items():
        presets = ", ".join(entry.presets) or "-"
        borrowed = next(iter(entry.presets.values())).borrowed_from if entry.presets else None
        note = f" (presets borrowed from {borrowed})" if borrowed else ""
        click.echo(f"{short:12s} {entry.timm_name:36s} presets: {presets}{note}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI, turning user errors into one line and an exit status.

    SIGINT and SIGTERM end the run with ``atm-export: aborted`` and status 130 or 143, after
    removing whatever the run had staged (atm_export.signals).
    """
    with signals.installed():
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    try:
        # without standalone mode, click returns a command's click.exceptions.Exit(n) as n
        status = cli.main(args=argv, prog_name="atm-export", standalone_mode=False)
    except signals.Aborted as exc:
        click.echo("atm-export: aborted", err=True)
        return 128 + exc.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    except (UserError, SettingsError, NonFiniteInputError) as exc:
        click.echo(f"atm-export: error: {exc}", err=True)
        return EXIT_USAGE
    except ParityError as exc:
        click.echo(f"atm-export: parity check failed: {exc}", err=True)
        return EXIT_CHECK_FAILED
    except ArtifactMismatchError as exc:
        click.echo(f"atm-export: check failed: {exc}", err=True)
        return EXIT_CHECK_FAILED
    except AccuracyGateError as exc:
        click.echo(f"atm-export: accuracy: {exc}", err=True)
        return EXIT_CHECK_FAILED
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        return 0
    except click.ClickException as exc:
        click.echo(f"atm-export: error: {exc.format_message()}", err=True)
        return EXIT_USAGE
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):  # a SIGINT before the handlers were installed
        click.echo("atm-export: aborted", err=True)
        return 128 + signal.SIGINT
    except Exception as exc:  # not a user mistake: say where it failed, keep the traceback for a bug report
        click.echo(failure_line(exc), err=True)
        return EXIT_FAILED
    return status if isinstance(status, int) else 0


def failure_line(exc: Exception) -> str:
    """One line for an unexpected failure: the step it happened in, what it was, and where its
    full traceback is (the run's staging directory, or a temporary file when the command has no
    output directory or the log could not be written there)."""
    import tempfile

    log = getattr(exc, "atm_log", None)
    if log is None:
        fd, log = tempfile.mkstemp(prefix="atm-export-failure-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(failure_log_text(exc))
    step = getattr(exc, "atm_step", None)
    what = (str(exc).strip().splitlines() or [""])[0][:300]
    return (f"atm-export: failed{f' while {step}' if step else ''}: {type(exc).__name__}"
            f"{': ' + what if what else ''} (full traceback: {log})")


if __name__ == "__main__":
    sys.exit(main())
