"""ONNX files of any size: weights in a side file next to the graph when they would not fit.

Protobuf cannot serialize a message of 2 GiB or more, so a ViT-H (632M parameters, 2.5 GB in
fp32) cannot be one ``.onnx`` file. ONNX's external-data form keeps the graph in ``NAME.onnx``
and the weights in ``NAME.onnx.data`` beside it; each weight records the side file's name
(relative to the graph's directory), an offset and a length.

Once saved in that form, the in-memory ModelProto is *weightless*: its initializers hold those
references instead of the bytes (``onnx.save`` drops them), so the run keeps no copy of the
weights per graph. Graphs derived from a weightless one (the lowering, a fixed-schedule replay)
reference the same side file and are opened against the directory that holds it: ONNX Runtime
from bytes with that folder, OpenVINO and TensorRT through :func:`readable_file`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from ..artifacts import SIDE_FILE_SUFFIX
#: Graphs whose serialized size would pass this go external. Protobuf's hard limit is 2 GiB; the
#: margin covers the estimate (initializers and nodes; the rest of the proto is small).
THRESHOLD_BYTES = 1_800_000_000
#: Weights below this size stay in the graph (shapes, small constants), as ONNX's tools do.
_MIN_EXTERNAL_BYTES = 1024


def side_file(name: str) -> str:
    """The side file's name of graph file ``name``."""
    return name + SIDE_FILE_SUFFIX


def serialized_bytes(model: onnx.ModelProto) -> int:
    """About the size ``model`` serializes to (its initializers and nodes), without serializing
    it whole: a tensor or node alone stays far below protobuf's limit."""
    graph = model.graph
    return sum(t.ByteSize() for t in graph.initializer) + sum(n.ByteSize() for n in graph.node)


def too_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` cannot be saved as one file (its weights must go to a side file)."""
    return serialized_bytes(model) > THRESHOLD_BYTES


def is_weightless(model: onnx.ModelProto) -> bool:
    """Whether any of ``model``'s weights lie in a side file rather than in the proto."""
    return any(uses_external_data(t) for t in model.graph.initializer)


def locations(model: onnx.ModelProto) -> list[str]:
    """The side files ``model``'s weights reference (relative to its directory), in order."""
    seen = [ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)]
    return list(dict.fromkeys(seen))


def save(model: onnx.ModelProto, path: Path, external: bool, weights_dir: Path | None = None) -> list[Path]:
    """Write ``model`` to ``path``; with ``external``, its weights to ``path``'s side file.
    Returns the files written (the graph, then the side file).

    A ``model`` with weights in memory gives them up: after an external save its initializers
    reference the side file (``onnx.save`` converts in place), so the weights are no longer held
    twice. A weightless ``model`` (its one side file in ``weights_dir``, as this function writes
    it) gets a copy of that file under this graph's name, and its references renamed: each graph
    its own pair of files. Copied, not hard-linked: ONNX's checker refuses a side file with more
    than one link. ValueError when a weightless ``model`` is to be saved without external data.
    """
    path = Path(path)
    data = path.parent / side_file(path.name)
    if is_weightless(model):
        if not external:
            raise ValueError(f"{path.name}: a graph whose weights lie in a side file cannot be saved as one file")
        sources = locations(model)
        if len(sources) != 1 or weights_dir is None:
            raise ValueError(f"{path.name}: expected one side file in a known directory, got {sources}")
        source = Path(weights_dir) / sources[0]
        if source != data:
            copy_file(source, data)
            _relocate(model, sources[0], data.name)
        onnx.save(model, str(path))
        return [path, data]
    if not external:
        onnx.save(model, str(path))
        return [path]
    data.unlink(missing_ok=True)  # onnx appends to a side file that exists
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=_MIN_EXTERNAL_BYTES, convert_attribute=False)
    shutil.copymode(path, data)  # onnx creates it owner-only; it is as readable as its graph
    return [path, data]


def copy_file(source: Path, target: Path) -> None:
    """``target`` holds ``source``'s bytes (copied in the kernel where it can: no pass through Python)."""
    shutil.copyfile(source, target)


def _relocate(model: onnx.ModelProto, old: str, new: str) -> None:
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value == old:
                    entry.value = new


def load(path: Path) -> onnx.ModelProto:
    """``path``'s graph without its external weights (weightless when it has a side file)."""
    return onnx.load(str(path), load_external_data=False)


def missing_side_files(model: onnx.ModelProto, weights_dir: Path) -> list[str]:
    """The side files ``model`` references that ``weights_dir`` lacks."""
    return [name for name in locations(model) if not (Path(weights_dir) / name).is_file()]


def tensor_bytes(tensor: onnx.TensorProto, weights_dir: Path | None) -> bytes:
    """The serialized data of one weight, read from its side file where it lies there (the
    tensor's other fields as they are): two weights are equal when these bytes are."""
    header = onnx.TensorProto()
    header.CopyFrom(tensor)
    header.ClearField("data_location")  # set or not, embedded or external: the same weight
    if uses_external_data(tensor):
        info = ExternalDataInfo(tensor)
        if weights_dir is None:
            raise ValueError(f"weight {tensor.name} lies in {info.location}, and no directory was given")
        with open(Path(weights_dir) / info.location, "rb") as f:
            f.seek(info.offset or 0)
            header.raw_data = f.read(info.length) if info.length else f.read()
        del header.external_data[:]
    return header.SerializeToString()


@contextmanager
def readable_file(model: onnx.ModelProto, weights_dir: Path | None) -> Iterator[Path]:
    """A file a runtime can read ``model`` from, its side files beside it, for the ``with``.

    For runtimes that read external data only relative to a model file (OpenVINO, TensorRT's
    parser): the graph goes to a hidden temporary file in ``weights_dir`` itself, removed after
    the ``with``. Links will not do (OpenVINO refuses a side file that resolves outside the
    model's directory, ONNX's checker one with several hard links); where ``weights_dir`` is
    read-only, a temporary directory gets copies of the side files. A model that holds its
    weights goes to a temporary directory.
    """
    names = locations(model)
    missing = missing_side_files(model, weights_dir) if weights_dir is not None else names
    if missing:
        raise FileNotFoundError(f"the graph's side file{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(missing)} not found in {weights_dir}")
    if names:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".atm-export-graph-", suffix=".onnx", dir=weights_dir)
        except OSError:
            pass
        else:
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(model.SerializeToString())
                yield Path(tmp)
            finally:
                os.unlink(tmp)
            return
    with tempfile.TemporaryDirectory(prefix="atm_export_graph_") as tmp:
        for name in names:
            copy_file(Path(weights_dir) / name, Path(tmp) / name)
        path = Path(tmp) / "model.onnx"
        if not names and too_large(model):  # held whole in memory, too large for one file: a copy gives its up
            held = onnx.ModelProto()
            held.CopyFrom(model)
            save(held, path, True)
        else:
            onnx.save(model, str(path))
        yield path
