"""ONNX Runtime runners for the exported graphs (CPU, and CUDA where onnxruntime-gpu is installed).

polygraphy's ``OnnxrtRunner`` runs them, on a session that this module guards: the plugin
flavour calls back into Python (the reference kernel), so a signal arriving during
``InferenceSession.run`` is held until ONNX Runtime has returned (atm_export.signals), and an
error the kernel caught is raised once it has (atm_export.backends.ort_custom_op).
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import partial

import numpy as np
import onnx
from polygraphy.backend.onnxrt import OnnxrtRunner

from ..signals import deferred
from .base import Runner
from .ort_custom_op import Replay, kernel_calls, register, to_extensions_domain

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def available(device: str) -> bool:
    import onnxruntime as ort

    return PROVIDERS[device] in ort.get_available_providers()


class _GuardedSession:
    """An ``InferenceSession`` whose ``run`` defers signals and owns the kernel's state."""

    def __init__(self, session, replay: Replay | None):
        self.session, self.replay = session, replay

    def run(self, output_names, feed_dict):
        with deferred(), kernel_calls(self.replay):
            return self.session.run(output_names, feed_dict)

    def __getattr__(self, name):  # get_inputs, get_outputs, end_profiling, ...
        return getattr(self.session, name)


def _session_options(weights_dir):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if weights_dir is not None:  # a weightless graph (its side files there) is read from bytes
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    return options


def _open_session(model: onnx.ModelProto, plugin: bool, device: str, threads: int | None, profile: bool,
                  replay: Replay | None, weights_dir) -> _GuardedSession:
    import onnxruntime as ort

    options = _session_options(weights_dir)
    if threads:
        options.intra_op_num_threads = threads
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"atm_export_ort_{os.getpid()}")
    if plugin:
        options.register_custom_ops_library(register())
        model = to_extensions_domain(model)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[PROVIDERS[device]])
    return _GuardedSession(session, replay)


class OrtRunner(OnnxrtRunner, Runner):
    """An exported graph in ONNX Runtime.

    plugin: the graph has TokenMerge nodes (run by the reference kernel); replay: recorded merge
    plans the kernel applies instead of its own choices (plugin flavour only); profile: ORT's
    profiler on, for ``run_profiled``; weights_dir: where the side files of a weightless graph
    lie (atm_export.export.external_data).
    """

    def __init__(self, model: onnx.ModelProto, name: str, *, plugin: bool = False, device: str = "cpu",
                 threads: int | None = None, profile: bool = False, replay: list | None = None,
                 weights_dir=None):
        self.is_active = False  # polygraphy's __del__ reads it, also when __init__ raises
        if replay is not None and not plugin:
            raise ValueError("only the plugin flavour can replay merge plans")
        self.replay = None if replay is None else Replay(list(replay))
        super().__init__(partial(_open_session, model, plugin, device, threads, profile, self.replay,
                                 weights_dir), name=name)

    def last_decisions(self) -> list | None:
        return None if self.replay is None else list(self.replay.decisions)

    def run_profiled(self, images: np.ndarray) -> list[dict]:
        """One run with ONNX Runtime's profiler (built with ``profile=True``): its trace events.

        The trace file ONNX Runtime writes is read and removed, also when the run fails.
        """
        try:
            self.run(images)
        finally:
            path = self.sess.end_profiling()
            try:
                with open(path) as f:
                    events = json.load(f)
            finally:
                os.remove(path)
        return events


def run_step(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a small standard-op model (e.g. one lowered merge step) once on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=[PROVIDERS["cpu"]])
    return session.run(None, feeds)
