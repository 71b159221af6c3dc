"""A Triton Inference Server model repository for the exported ViT (docs/serving.md).

``write_repository(dest, flavours, max_batch_size=...)`` writes::

    dest/
      README.md                         how to start tritonserver (with the plugin for TensorRT)
      libatm_token_merge_plugin.so      the TokenMerge plugin, when a TensorRT model is present
      atm_vit_onnx/config.pbtxt         ONNX Runtime backend, the portable graph
      atm_vit_onnx/1/model.onnx
      atm_vit_trt/config.pbtxt          TensorRT backend, a plan built from the plugin graph
      atm_vit_trt/1/model.plan
      atm_vit_openvino/config.pbtxt     OpenVINO backend (CPU), the portable graph (``openvino=True``)
      atm_vit_openvino/1/model.onnx

Triton takes every subdirectory of a repository for a model, so the plugin library and the
README are files at the top level. Each flavour is a :class:`Flavour` (a model name, an ONNX
graph, and an :class:`~atm_export.backends.tensorrt.EngineSpec` for a TensorRT plan, or
``openvino=True`` for the OpenVINO backend), so that further variants (the static-schedule
models) are further entries of the same list.

Triton batching needs every input and output to lead with the batch dimension when
``max_batch_size > 0``; the exported ``tokens_per_layer`` is ``[depth]`` (one vector for the
whole batch), so each served graph goes through :func:`with_batched_outputs` first, which
repeats it per row (``[B, depth]``). A TensorRT plan is built from that transformed graph,
never taken from ``model.engine`` (whose output has no batch dimension). The OpenVINO model is
the exception to Triton batching: ``max_batch_size: 0``, each request run as sent (see RUNTIMES).

Configs are ``inference.ModelConfig`` protobuf messages (tritonclient ships the compiled
schema; ``pip install 'atm-export[triton]'``) written in protobuf text format, and
:func:`check_repository` parses them back and compares them with the graphs' inputs and outputs.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import contract
from ..artifacts import open_output
from ..backends.base import TOKENS
from ..errors import UserError
from ..export import external_data

if TYPE_CHECKING:
    from ..backends.tensorrt import EngineSpec

ONNX_MODEL = "atm_vit_onnx"
TRT_MODEL = "atm_vit_trt"
OPENVINO_MODEL = "atm_vit_openvino"
VERSION = "1"
CONFIG = "config.pbtxt"
README = "README.md"
README_TITLE = "# Triton model repository written by atm-export"
PLUGIN_FILE = "libatm_token_merge_plugin.so"
#: The prefix of the tensors and nodes with_batched_outputs adds.
BATCH_PREFIX = "triton_batch"


@dataclass(frozen=True)
class Runtime:
    """How Triton runs one kind of model: the config field naming it, the file written, the
    instance kind it runs on, its name in messages. batched: whether Triton may batch requests
    for it (max_batch_size > 0); default_file: what the backend loads when the config names no
    default_model_filename, where that is not ``filename``."""

    field: str
    value: str
    filename: str
    instance_kind: str
    title: str
    batched: bool = True
    default_file: str | None = None


RUNTIMES = {
    # KIND_AUTO: the GPU where Triton has one, else the CPU (the portable graph runs on both)
    "onnxruntime": Runtime("backend", "onnxruntime", "model.onnx", "KIND_AUTO", "ONNX Runtime"),
    "tensorrt": Runtime("platform", "tensorrt_plan", "model.plan", "KIND_GPU", "TensorRT"),
    # Not batched: with max_batch_size > 0 the backend fixes the model's batch to it (ov::set_batch) and refuses
    # smaller batches, or pads them with zero images (ENABLE_BATCH_PADDING) that would join ATM's merge counts.
    # Source: github.com/triton-inference-server/openvino_backend src/openvino.cc (ValidateInputs, ReadModel)
    "openvino": Runtime("backend", "openvino", "model.onnx", "KIND_CPU", "OpenVINO", batched=False,
                        default_file="model.xml"),
}
#: The other spellings Triton accepts in a config, for reading configs written elsewhere.
_RUNTIME_ALIASES = {("platform", "onnxruntime_onnx"): "onnxruntime", ("backend", "tensorrt"): "tensorrt"}

#: ONNX element types -> Triton DataType names.
_DATA_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.DOUBLE: "TYPE_FP64",
               TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32", TensorProto.UINT8: "TYPE_UINT8",
               TensorProto.BOOL: "TYPE_BOOL"}

#: The config parameters Triton's OpenVINO backend reads, with the values it accepts (any case); it
#: ignores other keys, so a misspelt one would go unnoticed. HINT_BF16 is its only precision setting.
#: Source: github.com/triton-inference-server/openvino_backend src/openvino.cc (ParseParameters*)
OPENVINO_PARAMETERS = {
    "PERFORMANCE_HINT": "latency|throughput|cumulative_throughput", "NUM_STREAMS": r"auto|numa|\d+",
    "INFERENCE_NUM_THREADS": r"\d+", "COMPILATION_NUM_THREADS": r"\d+", "HINT_BF16": "yes",
    "CPU_EXTENSION_PATH": ".+", "TARGET_DEVICE": ".+",
    "SKIP_OV_DYNAMIC_BATCHSIZE": ".*", "ENABLE_BATCH_PADDING": ".*", "RESHAPE_IO_LAYERS": ".*",  # on with "yes"
}
#: The inference precisions an OpenVINO model can be written for.
OPENVINO_PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Flavour:
    """One Triton model to write.

    name: the Triton model name (its directory); model: the exported ONNX graph (a ModelProto or
    a path), with ``tokens_per_layer`` as exported; engine: None serves the graph with ONNX
    Runtime (it must hold standard ops only: the portable ``model.onnx``); an ``EngineSpec``
    builds a TensorRT plan from the graph (the plugin flavour) with that batch profile.
    openvino: serve the (portable) graph with Triton's OpenVINO backend instead, at
    ``precision`` (fp32 or bf16; docs/serving.md says what the backend can pin).
    weights_dir: where the side files of a weightless ``model`` lie (ONNX external data; a path's
    own directory by default); an ONNX model is written with them beside it.
    """

    name: str
    model: "onnx.ModelProto | str | Path"
    engine: "EngineSpec | None" = None
    openvino: bool = False
    precision: str = "fp32"
    weights_dir: "Path | None" = None

    def __post_init__(self):
        if self.openvino and self.engine is not None:
            raise ValueError(f"Triton model {self.name}: a TensorRT engine spec and openvino=True exclude each other")
        if self.precision not in OPENVINO_PRECISIONS or (self.precision != "fp32" and not self.openvino):
            raise UserError(f"Triton model {self.name}: precision {self.precision!r}: an OpenVINO model takes one of "
                            f"{OPENVINO_PRECISIONS}, other models fp32 (a TensorRT plan takes its engine spec's)")

    @property
    def runtime(self) -> str:
        if self.engine is not None:
            return "tensorrt"
        return "openvino" if self.openvino else "onnxruntime"


@dataclass(frozen=True)
class Batching:
    """How Triton schedules requests of every model in the repository.

    dynamic: Triton's dynamic batcher groups queued requests into one batch, whose merge
    counts ATM then computes together (docs/serving.md); False: each request runs as sent.
    preferred_batch_sizes, max_queue_delay_us: the dynamic batcher's settings.
    instances: model instances per device (instance_group count).
    """

    dynamic: bool = True
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    instances: int = 1


@dataclass(frozen=True)
class Repository:
    """What write_repository wrote: ``models`` maps each model name to its runtime; ``skipped``
    maps each flavour left out to the reason (TensorRT missing, no plugin library)."""

    path: Path
    models: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)


def bundle_flavours(bundle, engine_spec: "EngineSpec | None", *, openvino: bool = False,
                    precision: str = "fp32") -> list[Flavour]:
    """The Triton models of a run's ``atm_export.export.bundle.Bundle``: its portable graph on
    ONNX Runtime, with ``openvino`` on OpenVINO as well (at ``precision``), and, with
    ``engine_spec``, a TensorRT plan of its plugin graph; the same again for its static-schedule
    models (``bundle.static``, where the run made them)."""
    flavours = []
    for prefix, models in (("atm_vit", bundle), ("atm_vit_static", getattr(bundle, "static", None))):
        if models is None:
            continue
        weights = getattr(models, "directory", None)
        if models.portable is not None:
            flavours.append(Flavour(f"{prefix}_onnx", models.portable, weights_dir=weights))
            if openvino:
                flavours.append(Flavour(f"{prefix}_openvino", models.portable, openvino=True, precision=precision,
                                        weights_dir=weights))
        if models.plugin is not None and engine_spec is not None:
            flavours.append(Flavour(f"{prefix}_trt", models.plugin, engine_spec, weights_dir=weights))
    return flavours


# ---------------------------------------------------------------- the graph transform

def with_batched_outputs(model: onnx.ModelProto, names: Sequence[str] = (TOKENS,)) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs ``names`` are repeated once per batch row.

    The exported ``tokens_per_layer`` is [depth], one vector for the whole batch; Triton's
    batching splits every output along its first dimension, so the served graph gives
    [B, depth] (B taken from the first input) with each row the original vector. Outputs that
    already lead with the first input's batch dimension are left as they are, so applying the
    transform twice changes nothing.
    """
    batched = onnx.ModelProto()
    batched.CopyFrom(model)
    graph = batched.graph
    source = graph.input[0]
    batch_dim = source.type.tensor_type.shape.dim[0]
    outputs = {o.name: o for o in graph.output}
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ValueError(f"the graph has no output {missing} (its outputs: {sorted(outputs)})")
    todo = [n for n in names if not _leads_with(outputs[n], batch_dim)]
    if not todo:
        return batched
    if any(n.name.startswith(BATCH_PREFIX) for n in graph.node):
        raise ValueError(f"the graph already holds {BATCH_PREFIX}* nodes but output(s) {todo} lack the batch dimension")
    rows, ones, shape = (f"{BATCH_PREFIX}_{s}" for s in ("rows", "ones", "shape"))
    nodes = [
        helper.make_node("Shape", [source.name], [rows], name=f"{BATCH_PREFIX}_Shape", start=0, end=1),
        helper.make_node("Constant", [], [ones], name=f"{BATCH_PREFIX}_Constant",
                         value=numpy_helper.from_array(np.array([1], dtype=np.int64), ones)),
        # [B, 1]: Expand broadcasts a [depth] vector to [B, depth]
        helper.make_node("Concat", [rows, ones], [shape], name=f"{BATCH_PREFIX}_Concat", axis=0),
    ]
    for name in todo:
        inner = f"{BATCH_PREFIX}_{name}_unbatched"
        _rename_tensor(graph, name, inner)
        nodes.append(helper.make_node("Expand", [inner, shape], [name], name=f"{BATCH_PREFIX}_Expand_{name}"))
        _prepend_dim(outputs[name], batch_dim)
    graph.node.extend(nodes)
    return batched


def _leads_with(value: onnx.ValueInfoProto, batch_dim) -> bool:
    dims = value.type.tensor_type.shape.dim
    return bool(dims) and bool(batch_dim.dim_param) and dims[0].dim_param == batch_dim.dim_param


def _prepend_dim(value: onnx.ValueInfoProto, first) -> None:
    dims = value.type.tensor_type.shape.dim
    rest = [type(first)() for _ in dims]
    for copy, dim in zip(rest, dims):
        copy.CopyFrom(dim)
    del dims[:]  # protobuf's repeated fields have no insert
    for dim in (first, *rest):
        dims.add().CopyFrom(dim)


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor ``old`` wherever the graph (and its subgraphs, which may read it) uses it;
    the graph output of that name is left for a new producer."""
    for init in graph.initializer:
        if init.name == old:
            init.name = new
    for info in graph.value_info:
        if info.name == old:
            info.name = new
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
        for attr in node.attribute:
            for sub in (*attr.graphs, *([attr.g] if attr.HasField("g") else [])):
                _rename_tensor(sub, old, new)


# ---------------------------------------------------------------- configs

def _model_config_pb2():
    """tritonclient's compiled ModelConfig schema (the `triton` extra)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError) as exc:  # tritonclient without grpc raises RuntimeError
        raise UserError(f"writing Triton configs needs tritonclient's ModelConfig schema ({exc}); "
                        "install it with pip install 'atm-export[triton]' (tritonclient[grpc])") from None
    return model_config_pb2


def tensor_dims(value: onnx.ValueInfoProto) -> list[int]:
    """A graph input's or output's dimensions, -1 for each dynamic one."""
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def triton_data_type(value: onnx.ValueInfoProto) -> str:
    elem = value.type.tensor_type.elem_type
    if elem not in _DATA_TYPES:
        raise ValueError(f"{value.name}: ONNX element type {TensorProto.DataType.Name(elem)} has no Triton type here")
    return _DATA_TYPES[elem]


def openvino_parameters(precision: str, instances: int) -> dict[str, str]:
    """The parameters of an OpenVINO model: one stream per model instance (the backend compiles
    the model once for all instances, and OpenVINO's default, one stream, would run their
    requests one after another) and, for bf16, HINT_BF16. The backend has no way to ask for
    f32, so fp32 adds nothing (docs/serving.md)."""
    parameters = {"NUM_STREAMS": str(instances)}
    if precision == "bf16":
        parameters["HINT_BF16"] = "YES"
    return parameters


def model_config(name: str, graph: onnx.ModelProto, runtime: str, max_batch_size: int, batching: Batching,
                 parameters: Mapping[str, str] | None = None):
    """The ``inference.ModelConfig`` of one model: I/O from the graph (without the batch
    dimension when max_batch_size > 0), the runtime, dynamic batching, one instance group, the
    backend's ``parameters``."""
    pb = _model_config_pb2()
    rt = RUNTIMES[runtime]
    config = pb.ModelConfig(name=name, max_batch_size=max_batch_size, default_model_filename=rt.filename)
    setattr(config, rt.field, rt.value)
    skip = 1 if max_batch_size > 0 else 0
    for values, add in ((graph.graph.input, config.input.add), (graph.graph.output, config.output.add)):
        for value in values:
            add(name=value.name, data_type=pb.DataType.Value(triton_data_type(value)), dims=tensor_dims(value)[skip:])
    if batching.dynamic:
        config.dynamic_batching.SetInParent()  # present even with every setting at its default
        config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    config.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value(rt.instance_kind), count=batching.instances)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config


def config_text(config) -> str:
    """config.pbtxt: the message in protobuf text format."""
    from google.protobuf import text_format

    return text_format.MessageToString(config, use_short_repeated_primitives=True)


def parse_config(text: str):
    """config.pbtxt -> inference.ModelConfig (google.protobuf.text_format.ParseError if invalid)."""
    from google.protobuf import text_format

    return text_format.Parse(text, _model_config_pb2().ModelConfig())


# ---------------------------------------------------------------- checks

def settings_problems(max_batch_size: int, batching: Batching) -> list[str]:
    """What Triton would refuse (or silently ignore) in these batch settings."""
    problems = []
    if max_batch_size < 0:
        problems.append(f"max_batch_size must be >= 0, got {max_batch_size}")
    if batching.dynamic and max_batch_size == 0:
        problems.append("dynamic batching needs max_batch_size > 0")
    bad = [b for b in batching.preferred_batch_sizes if not 1 <= b <= max_batch_size]
    if bad:
        problems.append(f"preferred batch sizes {bad} are outside 1..max_batch_size ({max_batch_size})")
    if batching.instances < 1:
        problems.append(f"instances must be >= 1, got {batching.instances}")
    if batching.max_queue_delay_us < 0:
        problems.append(f"max_queue_delay_us must be >= 0, got {batching.max_queue_delay_us}")
    return problems


def has_token_merge(graph: onnx.ModelProto) -> bool:
    """Whether the graph holds TokenMerge nodes (it then needs the plugin under TensorRT)."""
    return any(contract.is_token_merge(n) for n in graph.graph.node)


def runtime_problems(runtime: str, graph: onnx.ModelProto) -> list[str]:
    """Why ``graph`` cannot be served on ``runtime``: only TensorRT (with the plugin) has a
    TokenMerge kernel, so Triton's ONNX Runtime and OpenVINO backends need the portable
    (lowered) graph."""
    merges = sum(contract.is_token_merge(n) for n in graph.graph.node)
    if runtime != "tensorrt" and merges:
        return [f"the graph has {merges} {contract.OP_TYPE} nodes, which Triton's {RUNTIMES[runtime].title} backend "
                "cannot run: serve the portable model.onnx, or build a TensorRT plan from the plugin graph"]
    return []


def backend_problems(runtime: str, config) -> list[str]:
    """What the runtime's backend would refuse in a config, or run otherwise than ATM needs:
    batching where the backend fixes the batch (RUNTIMES), OpenVINO parameters it does not read
    or does not accept."""
    problems = []
    if not RUNTIMES[runtime].batched and config.max_batch_size > 0:
        problems.append(f"max_batch_size {config.max_batch_size}: Triton's {RUNTIMES[runtime].title} backend would fix "
                        "the batch to it, refusing smaller batches or padding them with zero images that change "
                        "ATM's merge counts; use 0 (each request runs as sent)")
    if runtime == "openvino":
        for key, value in sorted(config.parameters.items()):
            accepted = OPENVINO_PARAMETERS.get(key)
            if accepted is None:
                problems.append(f"parameter {key} is not one the OpenVINO backend reads (it would be ignored)")
            elif not re.fullmatch(accepted, value.string_value, re.IGNORECASE):
                problems.append(f"parameter {key}: the OpenVINO backend accepts {accepted}, "
                                f"not {value.string_value!r}")
    return problems


def io_problems(config, graph: onnx.ModelProto) -> list[str]:
    """Where the config's inputs and outputs disagree with the graph's (names, types, dims), and
    where the graph cannot be batched by Triton (an input or output without a leading batch
    dimension while max_batch_size > 0)."""
    problems = []
    batched = config.max_batch_size > 0
    pb = _model_config_pb2()
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    sides = (("input", config.input, graph.graph.input), ("output", config.output, graph.graph.output))
    for kind, entries, values in sides:
        declared = {e.name: e for e in entries}
        extra = sorted(set(declared) - {v.name for v in values})
        if extra:
            problems.append(f"config {kind}s {extra} are not in the graph")
        for value in values:
            entry = declared.get(value.name)
            if entry is None:
                problems.append(f"graph {kind} {value.name} is missing from the config")
                continue
            dims = tensor_dims(value)
            if batched and not _leads_with(value, batch_dim):
                problems.append(f"{kind} {value.name} {dims} does not lead with the batch dimension, which "
                                "max_batch_size > 0 needs (see with_batched_outputs)")
            expected = dims[1:] if batched else dims
            if list(entry.dims) != expected:
                problems.append(f"{kind} {value.name}: config dims {list(entry.dims)}, graph {expected}")
            if pb.DataType.Name(entry.data_type) != triton_data_type(value):
                problems.append(f"{kind} {value.name}: config type {pb.DataType.Name(entry.data_type)}, "
                                f"graph {triton_data_type(value)}")
    return problems


def _runtime_of(config) -> str | None:
    for name, rt in RUNTIMES.items():
        if getattr(config, rt.field) == rt.value:
            return name
    for (field_name, value), name in _RUNTIME_ALIASES.items():
        if getattr(config, field_name) == value:
            return name
    return None


def model_problems(model_dir: Path, graph: onnx.ModelProto | None = None) -> list[str]:
    """Check one model directory: its config parses into ModelConfig, names this directory and
    a known runtime, its model file exists, its I/O and batch settings agree with the graph
    (the directory's model.onnx, or ``graph`` for a plan, whose I/O cannot be read without
    TensorRT), and the backend takes its settings (:func:`backend_problems`)."""
    from google.protobuf import text_format

    path = model_dir / CONFIG
    if not path.is_file():
        return [f"no {CONFIG}"]
    try:
        config = parse_config(path.read_text())
    except text_format.ParseError as exc:
        return [f"{CONFIG} is not a valid ModelConfig: {exc}"]
    problems = [] if config.name == model_dir.name else [f"config name {config.name!r} is not the directory's"]
    runtime = _runtime_of(config)
    if runtime is None:
        return problems + [f"unknown platform/backend {config.platform or config.backend!r}"]
    rt = RUNTIMES[runtime]
    model_file = model_dir / VERSION / (config.default_model_filename or rt.default_file or rt.filename)
    if not model_file.is_file():
        return problems + [f"no model file {model_file.relative_to(model_dir)}"]
    if graph is None and model_file.suffix == ".onnx":
        graph = external_data.load(model_file)
        missing = external_data.missing_side_files(graph, model_file.parent)
        if missing:
            return problems + [f"no side file {', '.join(missing)} next to {model_file.relative_to(model_dir)}"]
    dynamic = config.WhichOneof("scheduling_choice") == "dynamic_batching"
    batching = Batching(dynamic=dynamic, preferred_batch_sizes=tuple(config.dynamic_batching.preferred_batch_size))
    problems += settings_problems(config.max_batch_size, batching) + backend_problems(runtime, config)
    if graph is not None:
        problems += runtime_problems(runtime, graph) + io_problems(config, graph)
    needs_plugin = graph is None or has_token_merge(graph)
    if runtime == "tensorrt" and needs_plugin and not (model_dir.parent / PLUGIN_FILE).is_file():
        problems.append(f"a TensorRT model with {contract.OP_TYPE} nodes, but no {PLUGIN_FILE} in the repository")
    return problems


def check_repository(root: str | Path, graphs: Mapping[str, onnx.ModelProto] | None = None) -> list[str]:
    """Problems of a Triton repository, each prefixed with its model's name; [] when consistent.

    graphs: per model name, the ONNX graph a plan was built from (a plan's inputs and outputs
    cannot be read without TensorRT); ONNX Runtime and OpenVINO models are checked against their
    own file.
    """
    root = Path(root)
    graphs = graphs or {}
    model_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not model_dirs:
        return [f"{root} holds no model directory"]
    return [f"{d.name}: {problem}" for d in model_dirs for problem in model_problems(d, graphs.get(d.name))]


# ---------------------------------------------------------------- writing

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class _Model:
    """A model ready to be written: its served graph, the file's bytes, its batch settings, its
    backend parameters, the side files of weights to write beside it."""

    name: str
    runtime: str
    graph: onnx.ModelProto
    payload: bytes
    max_batch_size: int
    batching: Batching
    parameters: dict[str, str] = field(default_factory=dict)
    side_files: tuple[Path, ...] = ()


def _load(flavour: Flavour) -> tuple[onnx.ModelProto, Path | None]:
    """The flavour's graph (weightless where its weights lie in side files) and their directory."""
    if isinstance(flavour.model, onnx.ModelProto):
        return flavour.model, flavour.weights_dir
    path = Path(flavour.model)
    return external_data.load(path), flavour.weights_dir or path.parent


def _tensorrt_unavailable(graph: onnx.ModelProto, plugin_library: Path | None) -> str | None:
    from ..backends.tensorrt import unavailable_reason

    reason = unavailable_reason()
    if reason is None and has_token_merge(graph) and plugin_library is None:
        reason = "the TokenMerge plugin library is not built: run `atm-export build-plugin` or pass its path"
    return reason


def _served(flavour: Flavour, max_batch_size: int, batching: Batching) -> tuple[int, Batching]:
    """A model's batch limit and scheduling: a TensorRT model takes its engine profile's limit,
    an ONNX Runtime model the given one; a model Triton must not batch (OpenVINO) gets 0 and
    no batcher, so that each request runs as sent."""
    if not RUNTIMES[flavour.runtime].batched:
        return 0, replace(batching, dynamic=False, preferred_batch_sizes=(), max_queue_delay_us=0)
    return (max_batch_size if flavour.engine is None else flavour.engine.max_batch), batching


def _prepare(flavour: Flavour, max_batch_size: int, batching: Batching, plugin_library: Path | None) -> _Model | str:
    """The model to write for ``flavour``, or why it is left out."""
    graph, weights_dir = _load(flavour)
    graph = with_batched_outputs(graph)
    problems = runtime_problems(flavour.runtime, graph)
    missing = external_data.locations(graph) if weights_dir is None else \
        external_data.missing_side_files(graph, weights_dir)
    if missing:
        problems.append(f"its weights lie in {', '.join(missing)}, not found in {weights_dir}")
    if problems:
        raise UserError(f"Triton model {flavour.name}: {problems[0]}")
    served = _served(flavour, max_batch_size, batching)
    if flavour.engine is None:  # the graph itself is the model file (ONNX Runtime, OpenVINO)
        parameters = openvino_parameters(flavour.precision, batching.instances) if flavour.openvino else {}
        side_files = tuple(Path(weights_dir) / n for n in external_data.locations(graph))
        return _Model(flavour.name, flavour.runtime, graph, graph.SerializeToString(), *served, parameters,
                      side_files)
    reason = _tensorrt_unavailable(graph, plugin_library)
    if reason is not None:
        return reason
    from ..backends.tensorrt import build_engine_from_model

    # Triton sends any batch from 1 to max_batch_size: the profile must start at 1
    plan = build_engine_from_model(graph, replace(flavour.engine, min_batch=1), plugin_library, weights_dir)
    return _Model(flavour.name, "tensorrt", graph, plan, *served)


def _check_flavours(flavours: Sequence[Flavour]) -> None:
    names = [f.name for f in flavours]
    bad = [n for n in names if not _NAME.fullmatch(n)]
    if bad:
        raise UserError(f"Triton model names must be letters, digits, '_', '.' or '-': {bad}")
    if len(set(names)) != len(names):
        raise UserError(f"Triton model names must be unique: {names}")
    if not flavours:
        raise UserError("no model to write into the Triton repository")


def check_destination(dest: Path, force: bool) -> None:
    """Refuse to replace anything but an earlier repository of ours (and that only with force):
    --force must never delete a directory it did not write."""
    if not dest.exists():
        return
    ours = dest.is_dir() and (dest / README).is_file() and (dest / README).read_text().startswith(README_TITLE)
    if not ours and not (dest.is_dir() and not any(dest.iterdir())):
        raise UserError(f"--triton {dest} exists and is not a repository atm-export wrote; choose another directory")
    if ours and not force:
        raise UserError(f"--triton {dest} holds an earlier Triton repository; pass --force to replace it")


def write_repository(dest: str | Path, flavours: Sequence[Flavour], *, max_batch_size: int,
                     batching: Batching = Batching(), plugin_library: str | Path | None = None,
                     force: bool = False) -> Repository:
    """Write a Triton model repository at ``dest``; returns what it holds and what was left out.

    max_batch_size: Triton's limit for the ONNX Runtime models (a TensorRT model takes its
    engine profile's max_batch; an OpenVINO model is not batched by Triton, see RUNTIMES, and
    takes only ``batching.instances``). plugin_library: the TokenMerge plugin for TensorRT models
    (default: the one `atm-export build-plugin` built); it is copied into the repository.
    A TensorRT flavour is left out, with the reason in ``skipped``, where TensorRT, a GPU or the
    plugin library is missing. Everything is staged next to ``dest``, checked with
    :func:`check_repository`, and moved into place in one rename (atm_export.artifacts).
    """
    _check_flavours(flavours)
    settings = [(max_batch_size, batching), *(_served(f, max_batch_size, batching) for f in flavours)]
    problems = [p for limit, served in settings for p in settings_problems(limit, served)]
    if problems:
        raise UserError(f"Triton settings: {'; '.join(dict.fromkeys(problems))}")
    dest = Path(dest).resolve()
    check_destination(dest, force)
    if plugin_library is None and any(f.engine is not None for f in flavours):
        from .. import plugin_lib

        plugin_library = plugin_lib.find_plugin_library()
    plugin_library = Path(plugin_library) if plugin_library else None
    prepared, skipped = [], {}
    for flavour in flavours:
        result = _prepare(flavour, max_batch_size, batching, plugin_library)
        if isinstance(result, str):
            skipped[flavour.name] = result
        else:
            prepared.append(result)
    if not prepared:
        raise UserError("no model could be written into the Triton repository: "
                        + "; ".join(f"{name}: {reason}" for name, reason in skipped.items()))
    with open_output(dest.parent, force=True, names=(dest.name,)) as writer:  # force: check_destination decided
        root = writer.path(dest.name)
        _write_models(root, prepared, plugin_library)
        problems = check_repository(root, {m.name: m.graph for m in prepared})
        if problems:
            raise RuntimeError(f"the Triton repository written is inconsistent: {problems}")
        if dest.exists():  # an earlier repository: into the staging directory, deleted with it
            os.replace(dest, writer.staging / f"{dest.name}.replaced")
    return Repository(dest, {m.name: m.runtime for m in prepared}, skipped)


def _write_models(root: Path, models: Sequence[_Model], plugin_library: Path | None) -> None:
    """The model directories, the plugin library (for TensorRT models with TokenMerge nodes), the README."""
    root.mkdir()
    for model in models:
        model_dir = root / model.name
        (model_dir / VERSION).mkdir(parents=True)
        (model_dir / VERSION / RUNTIMES[model.runtime].filename).write_bytes(model.payload)
        for source in model.side_files:  # the weights of a graph too large for one file, as it names them
            external_data.copy_file(source, model_dir / VERSION / source.name)
        config = model_config(model.name, model.graph, model.runtime, model.max_batch_size, model.batching,
                              model.parameters)
        (model_dir / CONFIG).write_text(config_text(config))
    with_plugin = any(m.runtime == "tensorrt" and has_token_merge(m.graph) for m in models)
    if with_plugin:
        shutil.copy2(plugin_library, root / PLUGIN_FILE)
    (root / README).write_text(readme_text({m.name: m.runtime for m in models}, with_plugin))


def readme_text(models: Mapping[str, str], with_plugin: bool) -> str:
    """The repository's README: what it holds and how to start tritonserver on it."""
    lines = [README_TITLE, "", "Models:", ""]
    lines += [f"- `{name}`: {RUNTIMES[runtime].field} `{RUNTIMES[runtime].value}`" for name, runtime in models.items()]
    preload = f"LD_PRELOAD=/models/{PLUGIN_FILE}:${{LD_PRELOAD}} " if with_plugin else ""
    lines += ["", "Start Triton with this directory mounted at /models:", "", "```",
              "docker run --gpus all --rm -p8000:8000 -p8001:8001 -p8002:8002 -v \"$PWD\":/models \\",
              "  nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\",
              f"  bash -c '{preload}tritonserver --model-repository=/models'", "```", ""]
    if "tensorrt" in models.values():
        lines += ["A TensorRT plan (and the plugin) only loads with the TensorRT version that built it: pick the "
                  "Triton container release that ships that version (Triton's release notes list it).", ""]
    if "openvino" in models.values():
        lines += ["The OpenVINO models (Triton's OpenVINO backend) run on the CPU and take each request as sent "
                  "(`max_batch_size: 0`). They need no GPU: without one, start Triton with `docker run --rm "
                  "-p8000:8000 -p8001:8001 -p8002:8002 -v \"$PWD\":/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 "
                  "tritonserver --model-repository=/models`. The backend cannot pin f32: on CPUs with bf16 "
                  "instructions OpenVINO computes an fp32 model in bf16 (docs/serving.md of atm-export).", ""]
    if with_plugin:
        lines += [f"The TensorRT model needs the TokenMerge plugin: `{PLUGIN_FILE}` is loaded into the server "
                  "with LD_PRELOAD (Triton's documented way for TensorRT custom layers), or with "
                  f"`--backend-config=tensorrt,plugins=/models/{PLUGIN_FILE}`.", ""]
    lines += ["ATM's merge counts are computed over the whole batch Triton forms, so requests batched together "
              "influence each other's token counts: see docs/serving.md of atm-export.", ""]
    return "\n".join(lines)
