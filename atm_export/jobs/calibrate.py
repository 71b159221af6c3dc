"""``atm-export calibrate``: AdaMerge's per-layer statistics on the user's images, as a preset file.

The file is in the registry's format (atm_export/preset_file.py) and holds one adamerge preset;
the main command, ``eval`` and ``check`` take it with ``--preset-file``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..artifacts import open_output
from ..calibration import calibrate
from ..console import Console
from ..data import batches, open_folder
from ..errors import UserError
from ..preset_file import preset_file_text
from ..settings import settings_for
from ..weights import create_model

#: Images used when --limit is not given: AdaMerge's calibration set is small.
DEFAULT_LIMIT = 256


@dataclass
class CalibrateOptions:
    model: str
    data: str
    output: Path
    overrides: dict = field(default_factory=dict)  # r_max, intensity_scale, salience_temperature, split_layer, ...
    weights: str | None = None
    random_init: bool = False
    batch_size: int = 64
    limit: int | None = DEFAULT_LIMIT
    name: str = "calibrated"
    workers: int = 0
    force: bool = False
    command: str = ""


def run_calibrate(opts: CalibrateOptions, console: Console | None = None):
    """Calibrate, write the preset file; returns the calibrated MergeConfig."""
    console = console or Console(verbosity=0)
    if opts.output.suffix != ".toml":
        raise UserError(f"--output must name a .toml preset file, got {opts.output}")
    if not opts.name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"--name must be letters, digits, - and _, got {opts.name!r}")
    entry, settings = settings_for(opts.model, None, {**opts.overrides, "policy": "adamerge"})
    console.plan(3)
    with console.step(f"loading {entry.display_name} and the calibration images"):
        vit, info = create_model(entry, opts.weights, opts.random_init)
        if info.random:
            console.warn("random weights (--random-init): the statistics describe an untrained model")
        folder = open_folder(opts.data, vit.num_classes, "--data", opts.limit)
        images = [b for b, _ in batches(folder, vit, opts.batch_size, opts.workers)]
    count = sum(int(b.shape[0]) for b in images)
    source = f"{opts.command or 'atm-export calibrate'} ({count} images, batch {opts.batch_size})"
    with console.step(f"measuring the redundancy of every block on {count} images"):
        config = calibrate(vit, settings.config, images, source)
        console.note(f"per block: mean {list(config.redundancy_mean)}, spread {list(config.redundancy_std)}")
    with console.step(f"writing {opts.output}"):
        comments = [f"written by atm-export {__version__} calibrate",
                    f"use with: atm-export {entry.display_name} --preset-file {opts.output.name}",
                    "AdaMerge's statistics depend on the batch size: calibrate at the batch size you deploy"]
        with open_output(opts.output.parent, opts.force, (opts.output.name,)) as writer:
            writer.write_text(opts.output.name, preset_file_text(entry, opts.name, config, {}, source, comments))
    return config
