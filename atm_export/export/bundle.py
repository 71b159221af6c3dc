"""The export bundle: every model of one run, each produced once, for the runners to open.

A bundle holds the eager models (the ATM-patched model and the unmerged timm model it shares
its parameters with), the ONNX graphs (the plugin flavour, the portable flavour lowered from it,
the unmerged baseline), and the TensorRT engines where they were built. Parity, the benchmarks
and ``check`` open runners on a bundle (``atm_export.backends.open_runner``) and never export or
lower anything themselves. ``static`` holds the static-schedule models (a bundle of their own,
whose ``atm`` replays the schedule). ``with_schedule`` gives the bundle whose merged models replay a
fixed token schedule (for benchmarks), made from this one's graphs without a new export.

Graphs too large for one file are held *weightless*: their weights lie in side files in
``directory`` (atm_export.export.external_data), which the runners read them from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import onnx
from torch import nn

from ..fixed_schedule import replay_model
from ..patch import ATMVisionTransformer
from ..schedule import r_from_tokens
from .onnx import portable_flavour, with_fixed_schedule


@dataclass
class Bundle:
    """The models of one run. Graphs and engines are None where they were not made."""

    atm: ATMVisionTransformer
    vit: nn.Module
    plugin: onnx.ModelProto | None = None
    portable: onnx.ModelProto | None = None
    baseline: onnx.ModelProto | None = None
    engine: bytes | None = None  # TensorRT, from ``plugin``
    engine_baseline: bytes | None = None  # TensorRT, from ``baseline``
    engine_info: dict | None = None  # what built the engines (GPU, TensorRT version, precision, profile)
    schedule: list[int] | None = None  # tokens entering each block, when the merged models replay it
    static: "Bundle | None" = None  # the static-schedule models (--static-schedule), with their eager replay
    directory: Path | None = None  # where its graph files lie, and the side files of weightless graphs

    # The static-schedule models as backends time them (atm_export.backends._RUNNERS).
    @property
    def static_portable(self) -> onnx.ModelProto | None:
        return None if self.static is None else self.static.portable

    @property
    def static_engine(self) -> bytes | None:
        return None if self.static is None else self.static.engine

    def with_schedule(self, tokens: list[int]) -> "Bundle":
        """This bundle with its merged models replaying ``tokens`` (tokens entering each block):
        a ToMe-style eager model with a fixed r per block, and copies of the plugin graph whose
        TokenMerge nodes merge that r (and its lowering). Engines of the merged model are dropped
        (an engine is built from the graph it runs), and so are the static-schedule models."""
        replaying = replay_model(self.atm, tokens)
        r = r_from_tokens(tokens, self.atm.num_protected, self.atm.class_token_head)
        plugin = None if self.plugin is None else with_fixed_schedule(self.plugin, r)
        return dataclasses.replace(self, atm=replaying, plugin=plugin,
                                   portable=None if plugin is None else portable_flavour(plugin),
                                   engine=None, schedule=list(tokens), static=None)
