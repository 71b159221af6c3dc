"""The ``atm-export`` command line.

    atm-export MODEL [--preset NAME] [settings] [--weights PATH | --random-init] [--output DIR]
    atm-export models                    list registered models and presets

``atm-export MODEL ...`` is short for ``atm-export export MODEL ...``. Every user mistake is
reported as one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import difflib
import signal
import sys
from pathlib import Path

import click

from . import signals
from .errors import ArtifactMismatchError, NonFiniteInputError, ParityError, SettingsError, UserError

#: Exit statuses: 2 a mistake in the input, 3 a check failed; 128 + the signal when interrupted.
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


def _int_list(value: str | None, minimum: int, what: str) -> tuple[int, ...] | None:
    """'8' or '16,16,12' -> (8,) or (16, 16, 12); click.BadParameter for anything else."""
    if value is None:
        return None
    try:
        numbers = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {value!r}") from None
    if not numbers or any(n < minimum for n in numbers):
        raise click.BadParameter(f"{what}, got {value!r}")
    return numbers


def _parse_r(ctx, param, value):
    return _int_list(value, 0, "r must not be negative")


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


@cli.command("export")
@click.argument("model")
@click.option("--preset", help="Preset from models/registry.toml (default: lossless); the settings below override "
                                 "its fields. See `atm-export models`.")
@click.option("--policy", type=click.Choice(["atm", "atm-per-image", "tome", "none"]), help="Merge-count policy.")
@click.option("--alpha", type=float, help="ATM initial threshold (0..1).")
@click.option("--beta", type=float, help="ATM threshold decay rate.")
@click.option("--theta-min", type=float, help="ATM lowest threshold (0..1).")
@click.option("--split-layer", type=int, help="Last block with alternate matching; later blocks use size-distinctive matching.")
@click.option("--r", "r", callback=_parse_r, help="ToMe merge count (with --policy tome): one number, or one per block.")
@click.option("--prop-attn/--no-prop-attn", default=None, help="Proportional attention (default: on for class-token models).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local checkpoint (.safetensors or torch) instead of the hub.")
@click.option("--random-init", is_flag=True, help="Random weights (every output is flagged).")
@click.option("--images", type=click.Path(file_okay=False), help="Directory of sample images (default: built-in scenes).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sample batch size.")
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Output directory (default: atm-out/MODEL-PRESET, or atm-out/MODEL with settings of your own).")
@click.option("--force", is_flag=True, help="Replace the artifacts of an earlier run in the output directory.")
@click.option("--onnx/--no-onnx", "export", default=True, show_default=True, help="Export ONNX (both flavours) and check it.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (17 or newer).")
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
@click.option("--tensorrt/--no-tensorrt", default=True, show_default=True, help="Build and check a TensorRT engine when TensorRT is installed.")
@click.option("--trt-precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--trt-plugin", type=click.Path(dir_okay=False), help="TokenMerge plugin library (default: the one `atm-export build-plugin` built).")
@click.option("--visualize", is_flag=True, help="Draw merge maps of the sample images (merge_maps.png).")
@click.option("--visualize-blocks", callback=lambda c, p, v: _int_list(v, 1, "expected block numbers of at least 1"),
              help="Blocks after which to draw the merge maps (default: the split layer and the last merge).")
@_verbosity_options
def export_cmd(model, preset, output, quiet, verbose, **kw):
    """Patch MODEL with ATM, export ONNX, check every backend against eager PyTorch, benchmark, report."""
    from .jobs.export import JobOptions, default_output, run_job

    overrides = {k: kw.pop(k) for k in ("policy", "alpha", "beta", "theta_min", "split_layer", "r", "prop_attn")}
    output = Path(output) if output else default_output(model, preset, overrides)
    opts = JobOptions(model=model, output=output, preset=preset, overrides=overrides, **kw)
    report = run_job(opts, _console(quiet, verbose))
    click.echo(f"wrote {output}: {report.status} (GFLOPs {report.flops.baseline:.2f} -> {report.flops.atm:.2f}; "
               f"parity: {_statuses(report.parity)})")


@cli.command("check")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), help="The checkpoint the artifacts were made from, if it moved.")
@click.option("--strict-parity", is_flag=True, help="Fail also on counts that differ only at a threshold.")
@click.option("--atol", type=click.FloatRange(min=0), help="Absolute tolerance (default 1e-5 fp32, 2e-2 fp16; not read from the report).")
@click.option("--rtol", type=click.FloatRange(min=0), help="Relative tolerance: |a-b| <= atol + rtol*|b| (default 1e-4 fp32, 2e-2 fp16).")
@_verbosity_options
def check_cmd(directory, weights, strict_parity, atol, rtol, quiet, verbose):
    """Re-validate the artifacts in DIRECTORY against their report and eager PyTorch (for users' CI).

    Exit 0: everything matches; 3: an artifact or a figure does not match its report, or a
    backend disagrees with eager PyTorch; 2: the directory or its files cannot be read.
    """
    from .jobs.check import check_artifacts

    result = check_artifacts(Path(directory), weights=weights, strict=strict_parity, console=_console(quiet, verbose),
                             atol=atol, rtol=rtol)
    click.echo(f"{directory}: artifacts match their report; parity {_statuses(result)}")


@cli.command("build-plugin")
@click.option("--build-dir", type=click.Path(file_okay=False), help="Build directory (default: plugins/build of the checkout).")
@click.option("--tensorrt-root", type=click.Path(file_okay=False), help="TensorRT install with include/ and lib/ (default: $TENSORRT_ROOT).")
@click.option("--cuda-arch", help='CUDA architectures, e.g. "90" or "80;90" (default: 80;90).')
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
        cli.main(args=argv, prog_name="atm-export", standalone_mode=False)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
