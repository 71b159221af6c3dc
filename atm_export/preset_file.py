"""Preset files: presets of your own, in the registry's format (models/registry.toml).

``atm-export tune`` writes one; the main command, ``eval`` and ``check`` read it with
``--preset-file FILE``. A preset file holds one model's table, named by the registry's short
name or the timm name, with its presets::

    [shapes_vit]
    timm_name = "vit_tiny_patch16_224"

    [shapes_vit.presets.tuned]
    alpha = 0.985
    beta = 0.035
    theta_min = 0.86
    split_layer = 5          # optional
    gflops = 0.31            # optional: what the settings gave where they were made
    agreement = 0.995        # optional
    top1 = 98.7              # optional
    source = "atm-export tune shapes_vit --data calib/ --min-agreement 0.99"

An AdaMerge preset (``atm-export calibrate`` writes one) holds its settings and the per-layer
statistics of the redundancy, one value per merging block::

    [shapes_vit.presets.calibrated]
    policy = "adamerge"
    r_max = 16                        # or one per block
    intensity_scale = 1.0
    salience_temperature = 1.0
    redundancy_mean = [0.61, 0.55, 0.52, 0.50, 0.47]
    redundancy_std = [0.05, 0.06, 0.06, 0.07, 0.07]
    source = "atm-export calibrate shapes_vit --data calib/ (2000 images, batch 64)"

Its presets join the model's registered ones (a name in both is the file's).
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from .errors import SettingsError, UserError
from .registry import ModelEntry, Preset, load_registry
from .schedule import ADAMERGE, MergeConfig

ADAMERGE_KEYS = ("r_max", "intensity_scale", "salience_temperature", "redundancy_mean", "redundancy_std")
SETTING_KEYS = ("policy", "alpha", "beta", "theta_min", "split_layer", *ADAMERGE_KEYS)
PRESET_KEYS = {*SETTING_KEYS, "gflops", "agreement", "top1", "source"}


def _fail(path: Path, why: str):
    raise UserError(f"--preset-file {path}: {why}")


def read_preset_file(path: str | Path, entry: ModelEntry) -> dict[str, Preset]:
    """The presets ``path`` holds for ``entry``'s model; UserError (one line) for a file that
    cannot be read, does not parse, holds another model's presets or settings that cannot work."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        _fail(path, "no such file")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(path, f"cannot read it ({getattr(exc, 'strerror', None) or exc})")
    except tomllib.TOMLDecodeError as exc:
        _fail(path, f"not valid TOML ({exc})")
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if not tables:
        _fail(path, "holds no model table (expected [MODEL] and [MODEL.presets.NAME], as in models/registry.toml)")
    names = {entry.short_name, entry.timm_name} - {None}
    registry = load_registry()
    match = [k for k in tables if k in names] or [  # by timm name, unless the table names another registered model
        k for k, v in tables.items() if v.get("timm_name") == entry.timm_name and k not in registry]
    if not match:
        _fail(path, f"holds presets for {', '.join(tables)}, not for {entry.display_name}")
    presets = tables[match[0]].get("presets")
    if not isinstance(presets, dict) or not presets:
        _fail(path, f"[{match[0]}] has no presets (expected [{match[0]}.presets.NAME] tables)")
    return {name: _preset(path, name, spec) for name, spec in presets.items()}


def _preset(path: Path, name: str, spec) -> Preset:
    if not isinstance(spec, dict):
        _fail(path, f"preset {name!r} is not a table")
    unknown = sorted(set(spec) - PRESET_KEYS)
    if unknown:
        _fail(path, f"preset {name!r} has unknown field(s) {', '.join(unknown)}; fields: {', '.join(sorted(PRESET_KEYS))}")
    policy = spec.get("policy", "atm")
    required = ("redundancy_mean", "redundancy_std") if policy == ADAMERGE else (
        ("alpha", "beta", "theta_min") if str(policy).startswith("atm") else ())
    missing = [k for k in required if k not in spec]
    if missing:
        _fail(path, f"preset {name!r} lacks {', '.join(missing)}")
    source = str(spec.get("source", f"preset file {path}"))
    settings = {k: spec[k] for k in SETTING_KEYS if k in spec}
    if policy == ADAMERGE:
        settings["calibration_source"] = f"{path} [{name}]: {source}"
    try:
        config = MergeConfig(**settings)
    except (SettingsError, TypeError) as exc:
        _fail(path, f"preset {name!r}: {exc}")
    return Preset(name, config, source, spec.get("gflops"), spec.get("top1"))


def with_preset_file(entry: ModelEntry, path: str | Path | None) -> ModelEntry:
    """``entry`` with the presets of ``path`` added (None: ``entry`` unchanged)."""
    if path is None:
        return entry
    return dataclasses.replace(entry, presets={**entry.presets, **read_preset_file(path, entry)})


def file_default_preset(path: str | Path | None, entry: ModelEntry, preset: str | None) -> str | None:
    """With ``--preset-file`` and no ``--preset``, the file's preset when it holds just one."""
    if path is None or preset is not None:
        return preset
    presets = read_preset_file(path, entry)
    if len(presets) == 1:
        return next(iter(presets))
    raise UserError(f"--preset-file {path} holds several presets ({', '.join(presets)}); choose one with --preset")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def preset_file_text(entry: ModelEntry, name: str, config: MergeConfig, figures: dict, source: str,
                     comments: list[str] = ()) -> str:
    """A preset file holding one preset: ``config`` called ``name``, with ``figures`` (gflops,
    agreement, top1) and where it came from (``source``); ``comments`` go on top."""
    key = entry.short_name or entry.timm_name
    key = key if key.replace("_", "").isalnum() else f'"{key}"'
    lines = [f"# {c}" for c in comments]
    lines += [f"[{key}]", f"timm_name = {_toml_value(entry.timm_name)}", "", f"[{key}.presets.{name}]"]
    if config.policy == ADAMERGE:
        values = {"policy": ADAMERGE, "r_max": list(config.r_max) if len(config.r_max) > 1 else config.r_max[0],
                  **{k: getattr(config, k) for k in ADAMERGE_KEYS[1:]}}
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    else:
        values = {"alpha": config.alpha, "beta": config.beta, "theta_min": config.theta_min}
    if config.split_layer is not None:
        values["split_layer"] = config.split_layer
    values.update({k: v for k, v in figures.items() if v is not None})
    values["source"] = source
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
