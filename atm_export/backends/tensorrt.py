"""TensorRT: build an engine from ``model.plugin.onnx`` with the TokenMerge plugin, and run it.

Written against TensorRT 10's Python API (``tensorrt``). Everything here needs TensorRT and an
NVIDIA GPU; where either is missing, ``unavailable_reason()`` says so and the pipeline records
the skip. The engine's merge steps have data-dependent token counts, so execution uses an
``IOutputAllocator`` for every output (outputs with data-dependent shapes get their memory
once TensorRT knows the size) and cannot be captured in a CUDA graph.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .. import contract
from ..signals import deferred
from .base import INPUT_NAME, Runner

_loaded_plugins: set[str] = set()


def unavailable_reason() -> str | None:
    """Why the TensorRT step cannot run here, or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ("TensorRT not installed: the `tensorrt` Python package does not import "
                "(install TensorRT 10+ on an NVIDIA GPU machine, e.g. pip install tensorrt)")
    except Exception as exc:  # a stub or broken install
        return f"TensorRT does not load: {type(exc).__name__}: {exc}"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: TensorRT needs an NVIDIA GPU"
    return None


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def load_plugin(library: str | Path | None = None) -> Path:
    """Load the TokenMerge plugin library so that it registers its creator with TensorRT."""
    import tensorrt as trt

    from .. import plugin_lib

    path = Path(library) if library else plugin_lib.find_plugin_library()  # tensorrt is imported: libnvinfer is loaded
    if path is None or not path.is_file():
        raise UserError(f"TensorRT plugin library not found{f' at {path}' if path else ''}; "
                        "build it with `atm-export build-plugin` (needs nvcc, CMake and TensorRT), "
                        "or pass --trt-plugin PATH")
    key = str(path.resolve())
    if key not in _loaded_plugins:
        try:
            ctypes.CDLL(key, mode=ctypes.RTLD_GLOBAL)  # static initialisers register the creator
        except OSError as exc:
            raise UserError(f"cannot load plugin library {path}: {exc}; it was probably built for another "
                            "TensorRT or CUDA version: rebuild it with `atm-export build-plugin`") from None
        _loaded_plugins.add(key)
    registry = trt.get_plugin_registry()
    creator = registry.get_creator(contract.OP_TYPE, contract.PLUGIN_VERSION, contract.PLUGIN_NAMESPACE)
    if creator is None:
        raise UserError(f"{path} loaded but registered no {contract.PLUGIN_NAMESPACE}::{contract.OP_TYPE} v{contract.PLUGIN_VERSION} plugin "
                        f"(built against another TensorRT?); rebuild it with `atm-export build-plugin`")
    return path


def has_token_merge_nodes(onnx_path: str | Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(contract.is_token_merge(n) for n in model.graph.node)


@dataclass(frozen=True)
class EngineSpec:
    min_batch: int
    opt_batch: int
    max_batch: int
    precision: str = "fp32"  # or "fp16"
    workspace_gib: float = 4.0
    timing_cache: str | None = None  # a file of kernel timings, read before and updated after each build


def default_timing_cache() -> Path:
    """Where builds keep their timing cache unless told otherwise ($XDG_CACHE_HOME/atm-export)."""
    from ..artifacts import user_cache_dir

    return user_cache_dir() / "tensorrt.timing-cache"


def _attach_timing_cache(config, path: str | None):
    """Give the builder ``path``'s timing cache (a fresh one if the file is missing, or was
    written by another GPU or TensorRT version: TensorRT refuses a mismatched cache)."""
    data = Path(path).read_bytes() if path and Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config, path: str | None) -> None:
    """Write the builder's timing cache (what it knew plus what this build timed) to ``path``."""
    if path:
        from ..artifacts import write_atomic

        write_atomic(path, bytes(config.get_timing_cache().serialize()))


@dataclass(frozen=True)
class BuildMode:
    """How a precision is built on this TensorRT: network creation flags, builder flags to set
    and to clear, and what the report records."""

    network_flags: list
    set_flags: list
    clear_flags: list
    record: dict


def build_mode(trt, precision: str) -> BuildMode:
    """The build of ``precision`` on ``trt`` (the tensorrt module), found by feature, not by version.

    - fp32: TF32 off. TensorRT enables TF32 by default on Ampere and newer (about 1e-3 relative
      error), which fp32 parity against eager PyTorch (1e-4) would not survive.
    - fp16: the engine is built from the fp16-typed export (model.fp16.plugin.onnx) as a
      strongly typed network where TensorRT has that flag (TensorRT 10; TensorRT 11 networks
      always are), so the graph's types decide; the FP16 builder flag is used only where strong
      typing is missing and the flag exists.
    """
    builder, network = trt.BuilderFlag, trt.NetworkDefinitionCreationFlag
    if precision == "fp16":
        if hasattr(network, "STRONGLY_TYPED"):
            return BuildMode([network.STRONGLY_TYPED], [], [], {"builder_flags": [], "strongly_typed": True})
        if hasattr(builder, "FP16"):
            return BuildMode([], [builder.FP16], [], {"builder_flags": ["FP16"], "strongly_typed": False,
                                                      "tf32": hasattr(builder, "TF32")})
        raise UserError("this TensorRT has neither strongly typed networks nor the FP16 builder flag; "
                        "use --trt-precision fp32")
    if precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}")
    clear = [builder.TF32] if hasattr(builder, "TF32") else []
    return BuildMode([], [], clear, {"builder_flags": [], "tf32": False})


def build_engine(onnx_path: str | Path, spec: EngineSpec, plugin: str | Path | None = None,
                 needs_plugin: bool = True, logger=None) -> bytes:
    """Parse ``model.plugin.onnx`` (with the plugin loaded) and build a serialized engine.

    logger: a ``tensorrt.ILogger`` for this build (default: warnings and errors to stderr).

    needs_plugin=False builds a plugin-free model (the unmerged baseline, or model.onnx).
    """
    import tensorrt as trt

    if needs_plugin:
        if not has_token_merge_nodes(onnx_path):
            raise UserError(f"{onnx_path} has no {contract.OP_TYPE} nodes: build the engine from model.plugin.onnx "
                            "(model.onnx is the plugin-free flavour and needs no plugin)")
        load_plugin(plugin)
    logger = logger or _logger()
    mode = build_mode(trt, spec.precision)
    builder = trt.Builder(logger)
    network = builder.create_network(sum(1 << int(flag) for flag in mode.network_flags))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_gib * (1 << 30)))
    for flag in mode.set_flags:
        config.set_flag(flag)
    for flag in mode.clear_flags:
        config.clear_flag(flag)
    shape = tuple(network.get_input(0).shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (spec.min_batch, *shape), (spec.opt_batch, *shape), (spec.max_batch, *shape))
    config.add_optimization_profile(profile)
    _attach_timing_cache(config, spec.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    _save_timing_cache(config, spec.timing_cache)
    return bytes(serialized)


def device_info() -> dict:
    """What an engine is tied to: the GPU and the TensorRT version."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "tensorrt": trt.__version__}


def _make_output_allocator():
    import tensorrt as trt
    import torch

    class TorchOutputAllocator(trt.IOutputAllocator):
        """Device memory for outputs, sized when TensorRT knows it (data-dependent shapes)."""

        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, torch.Tensor] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output(self, tensor_name, memory, size, alignment):
            buffer = self.buffers.get(tensor_name)
            if buffer is None or buffer.numel() < size:
                buffer = torch.empty(max(size, 1), dtype=torch.uint8, device="cuda")
                self.buffers[tensor_name] = buffer
            return buffer.data_ptr()

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(shape)

    return TorchOutputAllocator()


class EngineRunner(Runner):
    """A serialized TensorRT engine as a runner (every output through an output allocator).

    plugin: the TokenMerge plugin library to load first (None: the one `atm-export build-plugin`
    built), or needs_plugin=False for a plugin-free engine; built_on: the GPU and TensorRT
    version that built it, for the error message when this machine cannot load it.
    """

    def __init__(self, engine: bytes, name: str, *, plugin: str | Path | None = None, needs_plugin: bool = True,
                 built_on: dict | None = None):
        super().__init__(name=name)
        self.engine_bytes, self.plugin, self.needs_plugin, self.built_on = engine, plugin, needs_plugin, built_on

    def activate_impl(self):
        import tensorrt as trt
        import torch

        if self.needs_plugin:
            load_plugin(self.plugin)
        self.runtime = trt.Runtime(_logger())
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_bytes)
        if self.engine is None:
            where = f" (built on {self.built_on['gpu']} with TensorRT {self.built_on['tensorrt']})" if self.built_on else ""
            raise UserError(f"TensorRT cannot load this engine{where} on {torch.cuda.get_device_name()} with "
                            f"TensorRT {trt.__version__}: engines are tied to the GPU and TensorRT version that "
                            "built them; rebuild it here by re-running atm-export")
        self.context = self.engine.create_execution_context()
        self.allocator = _make_output_allocator()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        for name in self.outputs:
            self.context.set_output_allocator(name, self.allocator)
        low, _, high = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.batch_range = (low[0], high[0])
        self.stream = torch.cuda.Stream()

    def infer_impl(self, feed_dict):
        import time
        from collections import OrderedDict

        import tensorrt as trt
        import torch

        images = feed_dict[INPUT_NAME]
        low, high = self.batch_range
        if not low <= images.shape[0] <= high:
            raise UserError(f"batch {images.shape[0]} is outside the engine's optimization profile ({low}..{high}); "
                            "rebuild the engine with a wider range")
        start = time.perf_counter()
        device_images = torch.from_numpy(images).cuda()
        self.context.set_input_shape(INPUT_NAME, tuple(device_images.shape))
        self.context.set_tensor_address(INPUT_NAME, device_images.data_ptr())
        with deferred():  # TensorRT calls the output allocator (Python) from C++ during execution
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
            self.stream.synchronize()
        if not ok:
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        results = OrderedDict()
        for name in self.outputs:
            shape = self.allocator.shapes[name]
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            count = int(np.prod(shape)) if shape else 1
            raw = self.allocator.buffers[name][: count * np.dtype(dtype).itemsize].cpu().numpy()
            results[name] = raw.view(dtype).reshape(shape)
        self.inference_time = time.perf_counter() - start
        return results

    def deactivate_impl(self):
        del self.context, self.engine, self.runtime, self.allocator, self.stream


def build_engine_from_model(model, spec: EngineSpec, plugin: str | Path | None = None,
                            weights_dir: str | Path | None = None) -> bytes:
    """Build an engine from an in-memory ONNX model (with TokenMerge nodes or without);
    weights_dir: where the side files of a weightless model lie (the parser reads it from a file
    beside them: atm_export.export.external_data.readable_file)."""
    from ..export.external_data import readable_file

    needs_plugin = any(contract.is_token_merge(n) for n in model.graph.node)
    with readable_file(model, weights_dir) as path:
        return build_engine(path, spec, plugin, needs_plugin=needs_plugin)
