"""Which merge settings a run uses: a model's preset, with the settings the user gave on top.

The rules, the same for the command line and the Python API (``overrides`` are MergeConfig
fields; a value of None counts as not given):

1. The settings given override single fields of the chosen preset; the other fields keep the
   preset's values. Without a preset name, the preset is ``lossless`` for a model that has
   presets: ``--alpha 0.985`` is the lossless preset with alpha 0.985.
2. ``--policy atm`` and ``--policy atm-per-image`` keep the preset's thresholds.
3. ``--policy tome`` and ``--policy none`` are complete settings of their own: no preset is
   used (the report says preset none, overrides policy and r). Naming a preset with them is
   an error, and so are thresholds (``--alpha``, ``--beta``, ``--theta-min``), which they
   would ignore. ``--policy tome`` needs ``--r``.
4. ``--r`` is the tome policy's merge count: without ``--policy tome`` it is an error.
   Likewise AdaMerge's settings (``--r-max``, ``--intensity-scale``, ``--salience-temperature``)
   need ``--policy adamerge`` (or an adamerge preset).
5. ``--policy adamerge`` uses an adamerge preset (a preset file written by ``atm-export
   calibrate``) when one is named or the preset file holds one, and no preset otherwise (its
   statistics are then calibrated on the run's sample images). Registry presets hold ATM
   thresholds, so naming one with it is an error, and so are the thresholds and ``--r``.
6. A model without presets (a timm ViT outside models/registry.toml) needs complete settings:
   all three thresholds for an ATM policy, ``--policy tome --r N``, or ``--policy none``.

Every broken rule raises :class:`~atm_export.errors.SettingsError` with one line that names
the fix (in the command line's spelling: ``--theta-min`` is the keyword ``theta_min``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import SettingsError
from .registry import ModelEntry, Preset, registered_model
from .schedule import ADAMERGE, ADAMERGE_FIELDS, MergeConfig

DEFAULT_PRESET = "lossless"
FIELDS = tuple(f.name for f in dataclasses.fields(MergeConfig))
THRESHOLDS = ("alpha", "beta", "theta_min")
FIXED_POLICIES = ("tome", "none")  # complete settings of their own: no preset, no thresholds
EXAMPLE = "e.g. --alpha 0.99 --beta 0.04 --theta-min 0.88, or --policy tome --r 8"


@dataclass(frozen=True)
class Settings:
    """The merge settings of a run, and where they came from.

    config: what runs. preset: the preset it starts from (None when the settings are complete
    on their own). overrides: only the fields the user gave, by MergeConfig field name.
    """

    config: MergeConfig
    preset: Preset | None
    overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Where the settings came from, for report.json (the settings themselves are its params)."""
        return {
            "preset": self.preset.name if self.preset else None,
            "preset_source": self.preset.to_dict() if self.preset else None,
            "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in self.overrides.items()},
        }


def resolve_settings(entry: ModelEntry, preset_name: str | None, overrides: dict) -> Settings:
    """``entry``'s preset (``preset_name``, or lossless when None) with ``overrides`` on top,
    by the rules in this module's docstring; SettingsError for settings that cannot work."""
    given = _given(overrides)
    policy = given.get("policy")
    if policy in FIXED_POLICIES:
        return _fixed_policy(policy, preset_name, given)
    preset = _preset(entry, preset_name)
    if policy == ADAMERGE or (policy is None and preset_name is not None and preset.config.policy == ADAMERGE):
        return _adamerge(preset if preset_name is not None else None, given)
    adamerge_only = [_flag(k) for k in ADAMERGE_FIELDS if k in given]
    if adamerge_only and (preset is None or preset.config.policy != ADAMERGE):
        raise SettingsError(f"{', '.join(adamerge_only)} {'applies' if len(adamerge_only) == 1 else 'apply'} only to "
                            "AdaMerge: add --policy adamerge")
    if preset is not None and preset.config.policy == ADAMERGE and policy is not None:
        raise SettingsError(f"preset {preset.name} is an AdaMerge preset; drop --policy {policy} or use --policy adamerge")
    if "r" in given and (policy or (preset.config.policy if preset else "atm")) != "tome":
        raise SettingsError("--r (a fixed merge count per block) needs --policy tome; "
                            "the ATM policies merge by threshold (--alpha, --beta, --theta-min)")
    if preset is not None:
        return _settings(dataclasses.replace(preset.config, **given), preset, given)
    if not given:
        raise SettingsError(f"{entry.display_name} has no presets; give the settings ({EXAMPLE})")
    missing = [_flag(k) for k in THRESHOLDS if k not in given]
    if missing:
        raise SettingsError(f"{entry.display_name} has no presets to take the other thresholds from; "
                            f"give {', '.join(missing)} too ({EXAMPLE})")
    return _settings(MergeConfig(**given), None, given)


def settings_for(model: str, preset: str | None, overrides: dict, preset_file: str | None = None
                 ) -> tuple[ModelEntry, Settings]:
    """The command line's model and settings: ``model`` from the registry (or timm), with the
    presets of ``preset_file`` added; without ``preset``, the file's preset when it holds one."""
    from .preset_file import file_default_preset, with_preset_file
    from .registry import resolve_model

    entry = with_preset_file(resolve_model(model), preset_file)
    if overrides.get("policy") not in FIXED_POLICIES:
        preset = file_default_preset(preset_file, entry, preset)
    return entry, resolve_settings(entry, preset, overrides)


def _given(overrides: dict) -> dict:
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = [k for k in given if k not in FIELDS]
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]!r}; the settings are: {', '.join(FIELDS)}")
    return given


def _fixed_policy(policy: str, preset_name: str | None, given: dict) -> Settings:
    flag = f"--policy {policy}"
    if preset_name is not None:
        raise SettingsError(f"{flag} is a complete setting of its own and uses no preset; "
                            f"drop --preset {preset_name} (or --policy)")
    thresholds = [_flag(k) for k in THRESHOLDS if k in given]
    if thresholds:
        what = "is an ATM threshold" if len(thresholds) == 1 else "are ATM thresholds"
        raise SettingsError(f"{', '.join(thresholds)} {what}, which {flag} would ignore; drop "
                            f"{'it' if len(thresholds) == 1 else 'them'}, or use --policy atm")
    if policy == "tome" and "r" not in given:
        raise SettingsError(f"{flag} needs --r (merges per block: one number, or one per block)")
    if policy == "none" and "r" in given:
        raise SettingsError("--r (a fixed merge count per block) needs --policy tome; --policy none merges nothing")
    return _settings(MergeConfig(**given), None, given)


def _adamerge(preset: Preset | None, given: dict) -> Settings:
    """``--policy adamerge`` (or an adamerge preset): the preset's statistics, or none yet."""
    if preset is not None and preset.config.policy != ADAMERGE:
        raise SettingsError(f"preset {preset.name} holds ATM thresholds, not AdaMerge statistics; write an AdaMerge "
                            "preset with `atm-export calibrate MODEL --data DIR -o F.toml` and pass --preset-file F.toml, "
                            "or drop --preset (the statistics are then calibrated on the sample images)")
    wrong = [_flag(k) for k in (*THRESHOLDS, "r") if k in given]
    if wrong:
        raise SettingsError(f"{', '.join(wrong)} {'is not an AdaMerge setting' if len(wrong) == 1 else 'are not AdaMerge settings'}; "
                            "AdaMerge takes --r-max, --intensity-scale and --salience-temperature")
    if preset is None:
        return _settings(MergeConfig(**{**given, "policy": ADAMERGE}), None, given)
    return _settings(dataclasses.replace(preset.config, **given), preset, given)


def _preset(entry: ModelEntry, preset_name: str | None) -> Preset | None:
    if preset_name is None:
        if not entry.presets:
            return None
        preset_name = DEFAULT_PRESET
    return entry.preset(preset_name)


def _settings(config: MergeConfig, preset: Preset | None, given: dict) -> Settings:
    """The overrides as the config holds them (``r=8`` is recorded as ``(8,)``)."""
    return Settings(config, preset, {k: getattr(config, k) for k in given})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------- the Python API


def api_preset(preset: str | None) -> str | None:
    """The API's default preset (``lossless``) behaves as no ``--preset`` on the command line:
    a model without presets, or policy tome or none, then simply uses no preset."""
    return None if preset == DEFAULT_PRESET else preset


def timm_model_entry(model) -> ModelEntry:
    """The registry entry of a timm model instance (found by its timm name and tag), or an
    entry without presets for a model the registry does not hold."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        return ModelEntry(timm_name=type(model).__name__)
    names = [f"{arch}.{cfg['tag']}", arch] if cfg.get("tag") else [arch]
    return next((e for e in map(registered_model, names) if e is not None), None) or ModelEntry(timm_name=arch)


def patch(model, preset: str | None = DEFAULT_PRESET, config: MergeConfig | None = None, **overrides):
    """Patch a timm VisionTransformer with ATM: ``atm_export.patch(timm_model)``.

    The settings are the model's ``preset`` from the registry (found by the model's timm
    name) with ``overrides`` (MergeConfig fields, e.g. ``alpha=0.985``) on top, by the rules of
    :func:`resolve_settings`; or ``config`` as it is, for any ViT. Returns an
    :class:`~atm_export.patch.ATMVisionTransformer` that shares ``model``'s parameters.
    """
    from .patch import patch_model

    if isinstance(model, str):
        raise TypeError(f"patch() takes a timm model instance, not the name {model!r}: "
                        f"atm_export.patch(timm.create_model({model!r})), or MergeConfig.from_preset({model!r})")
    if config is not None:
        if overrides or api_preset(preset) is not None:
            raise SettingsError("give either config or a preset and settings, not both")
        return patch_model(model, config)
    entry = timm_model_entry(model)
    if not entry.presets and not overrides:
        raise SettingsError(f"{entry.display_name} has no presets in atm-export's registry; pass config=MergeConfig("
                            "alpha=0.99, beta=0.04, theta_min=0.88) or the settings themselves "
                            "(alpha=..., beta=..., theta_min=...; or policy='tome', r=8)")
    return patch_model(model, resolve_settings(entry, api_preset(preset), overrides).config)
