"""The ``atm-export`` command line.

    atm-export MODEL [--preset NAME] [settings] [--weights PATH | --random-init] [--output DIR]
    atm-export models                    list registered models and presets

``atm-export MODEL ...`` is short for ``atm-export export MODEL ...``. Every user mistake is
reported as one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import ParityError, UserError

EXIT_USAGE = 2


class DefaultGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to ``export``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["export", *args]
        return super().parse_args(ctx, args)


def _parse_r(ctx, param, value):
    if value is None:
        return None
    try:
        numbers = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected integers separated by commas, got {value!r}") from None
    if not numbers:
        raise click.BadParameter("expected at least one integer")
    if any(n < 0 for n in numbers):
        raise click.BadParameter(f"r must not be negative, got {value!r}")
    return numbers


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="atm-export")
def cli():
    """Deploy timm Vision Transformers accelerated by Adaptive Token Merging (ATM)."""


@cli.command("export")
@click.argument("model")
@click.option("--preset", help="Preset from models/registry.toml (default: lossless). See `atm-export models`.")
@click.option("--policy", type=click.Choice(["atm", "atm-per-image", "tome", "none"]), help="Merge-count policy.")
@click.option("--alpha", type=float, help="ATM initial threshold (0..1).")
@click.option("--beta", type=float, help="ATM threshold decay rate.")
@click.option("--theta-min", type=float, help="ATM lowest threshold (0..1).")
@click.option("--split-layer", type=int, help="Last block with alternate matching; later blocks use size-distinctive matching.")
@click.option("--r", "r", callback=_parse_r, help="ToMe merge count: one number, or one per block (comma-separated).")
@click.option("--prop-attn/--no-prop-attn", default=None, help="Proportional attention (default: on for class-token models).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local checkpoint (.safetensors or torch) instead of the hub.")
@click.option("--random-init", is_flag=True, help="Random weights (every output is flagged).")
@click.option("--images", type=click.Path(file_okay=False), help="Directory of sample images (default: built-in scenes).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sample batch size.")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Output directory (default: atm-out/MODEL-PRESET, or atm-out/MODEL).")
@click.option("--force", is_flag=True, help="Replace the artifacts of an earlier run in the output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def export_cmd(model, preset, policy, alpha, beta, theta_min, split_layer, r, prop_attn, weights, random_init,
               images, batch_size, output, force, quiet):
    """Patch MODEL with ATM, run it on sample images and write a report."""
    from .pipeline import JobOptions, run_job
    from .progress import Progress

    overrides = {"policy": policy, "alpha": alpha, "beta": beta, "theta_min": theta_min,
                 "split_layer": split_layer, "r": r, "prop_attn": prop_attn}
    output = Path(output) if output else Path("atm-out") / (f"{model}-{preset}" if preset else model)
    opts = JobOptions(model=model, output=output, preset=preset, overrides=overrides, weights=weights,
                      random_init=random_init, images=images, batch_size=batch_size, force=force)
    report = run_job(opts, Progress(enabled=not quiet))
    click.echo(f"wrote {output / 'report.json'} (GFLOPs {report['gflops']['baseline']:.2f} -> {report['gflops']['atm']:.2f})")


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
    """Entry point: runs the CLI, turning user errors into one line and an exit status."""
    try:
        cli.main(args=argv, prog_name="atm-export", standalone_mode=False)
    except UserError as exc:
        click.echo(f"atm-export: error: {exc}", err=True)
        return exc.exit_code
    except ParityError as exc:
        click.echo(f"atm-export: parity check failed: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        return 0
    except click.ClickException as exc:
        click.echo(f"atm-export: error: {exc.format_message()}", err=True)
        return EXIT_USAGE
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("atm-export: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("atm-export: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
