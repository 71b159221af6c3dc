"""OpenVINO runner for the portable graphs (standard ONNX ops, data-dependent token counts).

OpenVINO reads ``model.onnx`` as it is (its ONNX frontend keeps the data-dependent sizes) and
runs it on any OpenVINO device; on Intel CPUs it is the engine deployers use. A runner runs at
one inference precision: fp32 (``INFERENCE_PRECISION_HINT=f32``, judged with fp32's
tolerances) or a reduced one (bf16, fp16) where the device lists it among its
``OPTIMIZATION_CAPABILITIES``; reduced precision is judged like a TensorRT fp16 engine
(atm_export.parity). The precision is always set explicitly: OpenVINO's CPU default is bf16
wherever the CPU has it, which would silently turn an "fp32" check into a bf16 one.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import onnx
from polygraphy.backend.base import BaseRunner

from .base import Runner

DEFAULT_DEVICE = "CPU"
#: Our precision names -> OpenVINO's INFERENCE_PRECISION_HINT and OPTIMIZATION_CAPABILITIES entries.
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
CAPABILITIES = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16"}
INSTALL_HINT = "pip install 'atm-export[openvino]'"


def installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _core():
    """One Core per process (OpenVINO's advice): it loads each device plugin once, where a new
    Core per availability check would load them again (about 16 ms a check on the CPU)."""
    import openvino

    return openvino.Core()


def device_problem(device: str) -> str | None:
    """Why OpenVINO cannot use ``device`` here (a one-line reason), or None.

    Physical devices (CPU, GPU.1, NPU) must be among ``Core.available_devices``; virtual ones
    (AUTO, HETERO:..., MULTI:..., BATCH:...) are checked through the devices they name.
    """
    if not installed():
        return f"openvino is not installed ({INSTALL_HINT})"
    available = _core().available_devices
    kind, _, targets = device.partition(":")
    named = [t.strip() for t in targets.split(",") if t.strip()] if kind in ("HETERO", "MULTI", "BATCH") else (
        [] if kind == "AUTO" else [device])
    missing = [d for d in named if d not in available and d.split(".")[0] not in available]
    if missing:
        return f"OpenVINO has no device {missing[0]} here (available: {', '.join(available) or 'none'})"
    return None


def precision_problem(device: str, precision: str) -> str | None:
    """Why ``device`` cannot run at ``precision`` (fp32, bf16, fp16), or None."""
    problem = device_problem(device)
    if problem or precision == "fp32":
        return problem
    try:
        capabilities = list(_core().get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except Exception as exc:  # some virtual devices do not report it
        return f"OpenVINO cannot say whether {device} runs {precision} ({str(exc).splitlines()[0][:120]})"
    if CAPABILITIES[precision] not in capabilities:
        return f"the OpenVINO {device} device ({device_name(device)}) has no {precision} support here " \
               f"(OPTIMIZATION_CAPABILITIES: {', '.join(capabilities)})"
    return None


def device_name(device: str) -> str:
    """The device's full name as OpenVINO gives it (the CPU model), or ``device``."""
    try:
        return str(_core().get_property(device, "FULL_DEVICE_NAME"))
    except Exception:
        return device


def version() -> str | None:
    if not installed():
        return None
    import openvino

    return openvino.__version__


def compile_options(precision: str, threads: int | None, profile: bool = False) -> dict:
    """OpenVINO's compile properties for one synchronous request at ``precision`` (``profile``:
    per-node timing on, for ``run_profiled``)."""
    options = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        options["INFERENCE_NUM_THREADS"] = int(threads)
    if profile:
        options["PERF_COUNT"] = True
    return options


def run_step(model: onnx.ModelProto, feeds: dict[str, np.ndarray], device: str = DEFAULT_DEVICE) -> list[np.ndarray]:
    """Run a small standard-op model (one lowered merge step) once in OpenVINO at fp32: its
    outputs in the graph's order (what ``atm_export.parity.lowering_check`` reads)."""
    core = _core()
    compiled = core.compile_model(core.read_model(model.SerializeToString()), device, compile_options("fp32", None))
    result = compiled.create_infer_request().infer(feeds)
    return [np.asarray(result[port]) for port in compiled.outputs]


class OpenVinoRunner(Runner):
    """A graph of standard ONNX ops compiled by OpenVINO for ``device`` at ``precision``.

    polygraphy's runner contract: ``activate_impl`` reads and compiles the graph,
    ``infer_impl`` runs one synchronous request and returns the outputs by name. weights_dir:
    where the side files of a weightless graph lie (atm_export.export.external_data).
    """

    def __init__(self, model: onnx.ModelProto, name: str, *, precision: str = "fp32", device: str = DEFAULT_DEVICE,
                 threads: int | None = None, profile: bool = False, weights_dir=None):
        self.is_active = False  # polygraphy's __del__ reads it, also when __init__ raises
        if precision not in HINTS:
            raise ValueError(f"unknown OpenVINO precision {precision!r}; choose one of {', '.join(HINTS)}")
        BaseRunner.__init__(self, name=name, prefix="openvino-runner")
        self.model, self.precision, self.device, self.threads, self.profile = model, precision, device, threads, profile
        self.weights_dir = weights_dir
        self.compiled = self.request = None

    def activate_impl(self):
        from ..export.external_data import is_weightless, readable_file

        core = _core()
        if is_weightless(self.model):  # OpenVINO finds side files only next to a model file
            with readable_file(self.model, self.weights_dir) as path:
                graph = core.read_model(str(path))
        else:
            graph = core.read_model(self.model.SerializeToString())
        self.compiled = core.compile_model(graph, self.device, compile_options(self.precision, self.threads, self.profile))
        self.request = self.compiled.create_infer_request()

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for port in self.compiled.inputs:
            shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
            meta.add(port.get_any_name(), np.float32, shape)
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        result = self.request.infer(feed_dict)
        outputs = {port.get_any_name(): np.asarray(result[port]) for port in self.compiled.outputs}
        self.inference_time = time.perf_counter() - start
        return outputs

    def run_profiled(self, images: np.ndarray) -> list[tuple[str, float]]:
        """One run with per-node timing (built with ``profile=True``): (node name, seconds) of
        every executed node. OpenVINO keeps the ONNX node names, fused nodes under one of them."""
        self.run(images)
        return [(p.node_name, p.real_time.total_seconds()) for p in self.request.profiling_info]

    def deactivate_impl(self):
        self.compiled = self.request = None
