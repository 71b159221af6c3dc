"""The model registry: short names, timm names and ATM presets, read from models/registry.toml."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from .errors import SettingsError, UserError
from .schedule import MergeConfig


@dataclass(frozen=True)
class Preset:
    name: str
    config: MergeConfig
    source: str
    gflops: float | None = None
    top1: float | None = None
    borrowed_from: str | None = None  # presets of another model, not validated on this one

    def to_dict(self) -> dict:
        d = {"name": self.name, "source": self.source, "paper_gflops": self.gflops, "paper_top1": self.top1}
        if self.borrowed_from:
            d["borrowed_from"] = self.borrowed_from
            d["note"] = (f"the paper did not evaluate this model; these are {self.borrowed_from}'s settings, "
                         "a starting point rather than a validated operating point")
        return d


@dataclass(frozen=True)
class ModelEntry:
    timm_name: str
    short_name: str | None = None
    timm_kwargs: dict = field(default_factory=dict)
    paper_model: str | None = None
    baseline_gflops: float | None = None
    baseline_top1: float | None = None
    hub: bool = True
    hub_note: str | None = None
    presets: dict[str, Preset] = field(default_factory=dict)
    weights: str | None = None  # weights that ship with atm-export (a path inside the package)

    @property
    def display_name(self) -> str:
        return self.short_name or self.timm_name

    def preset(self, name: str) -> Preset:
        """The preset called ``name``; SettingsError (naming the presets there are) if none is."""
        if name in self.presets:
            return self.presets[name]
        if not self.presets:
            raise SettingsError(f"{self.display_name} has no presets; give the settings instead "
                                "(e.g. --alpha 0.99 --beta 0.04 --theta-min 0.88)")
        raise SettingsError(f"{self.display_name} has no preset {name!r}; its presets: {', '.join(self.presets)}")


def _parse_presets(raw: dict, borrowed_from: str | None) -> dict[str, Preset]:
    presets = {}
    for name, p in raw.items():
        config = MergeConfig(
            policy=p.get("policy", "atm"),
            alpha=float(p.get("alpha", 0.99)),
            beta=float(p.get("beta", 0.04)),
            theta_min=float(p.get("theta_min", 0.88)),
            split_layer=p.get("split_layer"),
        )
        presets[name] = Preset(name, config, p["source"], p.get("gflops"), p.get("top1"), borrowed_from)
    return presets


@lru_cache(maxsize=1)
def load_registry() -> dict[str, ModelEntry]:
    """All registered models by short name."""
    text = resources.files("atm_export.models_data").joinpath("registry.toml").read_text()
    raw = tomllib.loads(text)
    entries = {}
    for short, spec in raw.items():
        source = spec.get("presets_from")
        presets = _parse_presets(raw[source].get("presets", {}) if source else spec.get("presets", {}), source)
        entries[short] = ModelEntry(
            timm_name=spec["timm_name"],
            short_name=short,
            timm_kwargs=_tuples(dict(spec.get("timm_kwargs", {}))),
            paper_model=spec.get("paper_model"),
            baseline_gflops=spec.get("baseline_gflops"),
            baseline_top1=spec.get("baseline_top1"),
            hub=spec.get("hub", True),
            hub_note=spec.get("hub_note"),
            presets=presets,
            weights=spec.get("weights"),
        )
    return entries


def _tuples(value):
    """TOML arrays -> tuples, at any depth (timm's configs hold tuples, e.g. input_size)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def bundled_weights(entry: ModelEntry):
    """The path of the weights that ship with atm-export for ``entry``, or None."""
    if not entry.weights:
        return None
    return resources.files("atm_export").joinpath(entry.weights)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def registered_model(name: str) -> ModelEntry | None:
    """The registry's entry for a short name or a registered timm name; None if it has none."""
    registry = load_registry()
    if name in registry:
        return registry[name]
    return next((entry for entry in registry.values() if entry.timm_name == name), None)


def find_model(name: str) -> ModelEntry | None:
    """A short name, a registered timm name, or any timm model name (without presets); None
    for a name that is none of these. Imports timm only for names outside the registry."""
    entry = registered_model(name)
    if entry is not None:
        return entry
    import timm

    return ModelEntry(timm_name=name) if timm.is_model(name.split(".", 1)[0]) else None


def resolve_model(name: str) -> ModelEntry:
    """A short name (``deit_s``), a registered timm name, or any timm model name."""
    entry = find_model(name)
    if entry is not None:
        return entry
    candidates = list(load_registry()) + _timm_names()
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `atm-export models` for the registered names"
    raise UserError(f"unknown model {name!r}{hint}")
