"""Data package: the model registry and presets (registry.toml), shipped inside atm_export."""
