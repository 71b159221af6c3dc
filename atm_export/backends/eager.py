"""Eager PyTorch as a runner: the ATM-patched model, or the unmerged timm model."""

from __future__ import annotations

import time
from collections import OrderedDict

import torch
from torch import nn

from ..patch import ATMVisionTransformer
from .base import INPUT_NAME, LOGITS, TOKENS, Runner


class EagerRunner(Runner):
    """Runs ``model`` in PyTorch. An ``ATMVisionTransformer`` runs through the TokenMerge custom op
    (the form that is exported) and also returns its token counts; a timm model returns logits."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__(name=name)
        self.model = model

    def activate_impl(self):
        self.model.eval()

    def infer_impl(self, feed_dict):
        images = torch.from_numpy(feed_dict[INPUT_NAME])
        start = time.perf_counter()
        with torch.inference_mode():
            if isinstance(self.model, ATMVisionTransformer):
                logits, tokens = self.model.forward_export(images)
                out = OrderedDict([(LOGITS, logits.numpy()), (TOKENS, tokens.numpy())])
            else:
                out = OrderedDict([(LOGITS, self.model(images).numpy())])
        self.inference_time = time.perf_counter() - start
        return out

    def deactivate_impl(self):
        pass
