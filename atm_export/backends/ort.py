"""ONNX Runtime sessions for the exported flavours (CPU, and CUDA where onnxruntime-gpu is installed)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from ..export.onnx import INPUT_NAME
from ..signals import deferred

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def available(device: str) -> bool:
    import onnxruntime as ort

    return PROVIDERS[device] in ort.get_available_providers()


@dataclass
class OrtRunner:
    """Runs an exported model: ``run(images) -> (logits, tokens_per_layer or None)``."""

    model: onnx.ModelProto
    flavour: str  # "portable", "plugin" or "baseline"
    device: str = "cpu"
    threads: int | None = None
    profile: bool = False

    def __post_init__(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        if self.profile:
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"atm_export_ort_{os.getpid()}")
        model = self.model
        if self.flavour == "plugin":
            from .ort_custom_op import register, to_extensions_domain

            options.register_custom_ops_library(register())
            model = to_extensions_domain(model)
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=[PROVIDERS[self.device]])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, list[int] | None]:
        # The plugin flavour calls back into Python (the reference kernel): a signal arriving
        # meanwhile is held until ONNX Runtime has returned (atm_export.signals).
        with deferred():
            results = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
        if self.flavour == "plugin":
            from .ort_custom_op import raise_kernel_error

            raise_kernel_error()
        tokens = results[1].tolist() if len(results) > 1 else None
        return results[0], tokens

    def run_profiled(self, images: np.ndarray) -> list[dict]:
        """One run with ONNX Runtime's profiler (needs ``profile=True``): its trace events.

        The trace file ONNX Runtime writes is read and removed, also when the run fails.
        """
        try:
            self.run(images)
        finally:
            path = self.session.end_profiling()
            try:
                with open(path) as f:
                    events = json.load(f)
            finally:
                os.remove(path)
        return events
