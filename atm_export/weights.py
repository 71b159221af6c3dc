"""Creating the timm model and loading its weights: hub, local file, or random (only when asked)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import UserError
from .patch import unsupported_reason
from .registry import ModelEntry, bundled_weights

#: Random weights are drawn with this seed, so that a later ``atm-export check`` rebuilds them.
RANDOM_SEED = 0

_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module")


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from, as recorded in report.json."""

    source: str  # "hub", "file" or "random"
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None

    @property
    def random(self) -> bool:
        return self.source == "random"

    def to_dict(self) -> dict:
        d = {"source": self.source}
        if self.path:
            d["path"], d["sha256"] = self.path, self.sha256
        if self.random:
            d["seed"] = self.seed
            d["warning"] = "RANDOM WEIGHTS: outputs, merge counts and timings do not reflect a trained model"
        return d


def create_model(entry: ModelEntry, weights: str | None = None, random_init: bool = False) -> tuple[nn.Module, WeightsInfo]:
    """Build ``entry``'s timm model in eval mode with its weights.

    weights: a local checkpoint (.safetensors, or a torch file loaded with weights_only).
    random_init: use random weights (seeded). Neither: the weights that ship with atm-export
    for a model that has them (the registry's ``weights``), else the timm hub.
    """
    import timm

    if weights and random_init:
        raise UserError("give either --weights or --random-init, not both")
    torch.manual_seed(RANDOM_SEED)
    try:
        model = timm.create_model(entry.timm_name, pretrained=False, **entry.timm_kwargs)
    except Exception as exc:  # timm raises several types for bad names and kwargs
        raise UserError(f"timm could not build {entry.timm_name}: {_one_line(exc)}") from None
    reason = unsupported_reason(model)
    if reason:
        raise UserError(f"{entry.display_name} is not a supported ViT: {reason}")
    if random_init:
        return model.eval(), WeightsInfo("random", seed=RANDOM_SEED)
    weights = weights or bundled_weights(entry)
    if weights:
        info = load_checkpoint(model, Path(weights))
        return model.eval(), info
    return _from_hub(entry).eval(), WeightsInfo("hub", path=None)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or HF_ENDPOINT) accepts a connection."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_cache_only():
    """Make huggingface_hub use its local cache only (no retries against a dead network)."""
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


def _from_hub(entry: ModelEntry) -> nn.Module:
    import timm

    if not entry.hub:
        raise UserError(f"no hub weights for {entry.display_name}: {entry.hub_note}; "
                        "or pass --random-init to try the pipeline with random weights")
    online = hub_reachable()
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        if online:
            return timm.create_model(entry.timm_name, pretrained=True, **entry.timm_kwargs)
        with _hub_cache_only():
            return timm.create_model(entry.timm_name, pretrained=True, **entry.timm_kwargs)
    except Exception as exc:  # network, hub and cache errors come in many types
        why = _one_line(exc) if online else "the hub is unreachable and the weights are not in the local cache"
        raise UserError(
            f"could not get pretrained weights for {entry.timm_name} from the model hub ({why}); "
            "pass --weights PATH with a local checkpoint (.safetensors or .pth), "
            "or --random-init to run with random weights"
        ) from None
    finally:
        hub_log.setLevel(level)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read weights from {path}: {_one_line(exc)} "
                        "(expected a .safetensors file or a torch checkpoint of plain tensors)") from None
    for key in _WRAPPER_KEYS:  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(model: nn.Module, path: Path) -> WeightsInfo:
    """Load a local checkpoint into ``model`` strictly; original DeiT/MAE key layouts are converted."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = _read_state_dict(path)
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as exc:
        raise UserError(f"{path} does not fit {type(model).__name__}: {_one_line(exc)}") from None
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UserError(f"{path} does not match the model's weights: {_one_line(exc)}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing (e.g. {', '.join(result.missing_keys[:3])})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. {', '.join(result.unexpected_keys[:3])})")
    if problems:
        raise UserError(f"{path} does not match the model's weights: {'; '.join(problems)}")
    return WeightsInfo("file", path=str(path.resolve()), sha256=file_sha256(path))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
