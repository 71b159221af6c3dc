"""Traces kept on disk, so that a model exported once exports again without torch.export.

The block-by-block export (``blockwise.py``) makes one ``torch.onnx.export`` call, and that call
is most of an export's time: about 8.5 of DeiT-T's 10.5 s, seconds of it a fixed cost of the
exporter (docs/benchmarks.md). What it gives depends on the model's architecture and on which blocks
merge, not on the weights nor on a step's settings (threshold, split, weighting): ``stitch``
fills those in afterwards. So a trace is kept, without its parameters' bytes (0.4 MB for DeiT-T),
under a key of everything it depends on:

- the versions of atm-export, torch, timm and the ONNX packages, and atm-export's own source
  (any change to the code that is traced or translates it gives new keys);
- every module of the patched model: its path, its class, and its plain attributes (heads,
  eps, pooling, prefix tokens, flags: what the model code branches on);
- the source files that define those classes and their bases (a model of one's own, edited
  between two exports, is traced anew);
- every parameter's and buffer's name, shape and dtype;
- what the caller traced: opset, dtype, batch limit, image shape, which blocks merge, and which
  block stood for each kind.

A cached trace gives the same graph, byte for byte, as a fresh one (tests/export/test_trace_cache.py),
and every run still checks that graph against eager PyTorch. A cache that cannot be read is
traced anew; one that cannot be written costs only time.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

#: The file name's suffix of a cached trace (the key is its stem).
SUFFIX = ".trace.onnx"


def default_directory() -> Path:
    """Where runs keep their traces unless told otherwise: ``$XDG_CACHE_HOME/atm-export/traces``."""
    from ..artifacts import user_cache_dir

    return user_cache_dir() / "traces"


@dataclass
class TraceCache:
    """A directory of traces, and what one run found in it (the job reports hits)."""

    directory: Path
    hits: int = 0
    misses: int = 0
    write_errors: list[str] = field(default_factory=list)

    def key(self, model, **traced) -> str:
        """The key of ``model``'s trace (an nn.Module) made with the settings ``traced``."""
        digest = hashlib.sha256()
        digest.update(repr((_versions(), _source_digest(), sorted(traced.items()))).encode())
        for name, module in model.named_modules():
            digest.update(repr((name, type(module).__module__, type(module).__qualname__,
                                _plain_attributes(module))).encode())
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            digest.update(repr((name, tuple(tensor.shape), str(tensor.dtype))).encode())
        for path in _class_files(model):
            digest.update(_file_bytes(path))
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return Path(self.directory) / f"{key}{SUFFIX}"

    def load(self, key: str, inputs: list[str], outputs: list[str]) -> onnx.ModelProto | None:
        """The trace kept under ``key``, if it is there, parses, and has these graph inputs and
        outputs; else None (the caller traces, and ``store`` replaces a damaged file)."""
        try:
            model = onnx.load_from_string(self.path(key).read_bytes())
        except Exception:  # missing, unreadable or not a model: trace anew
            self.misses += 1
            return None
        if [i.name for i in model.graph.input] != inputs or [o.name for o in model.graph.output] != outputs:
            self.misses += 1
            return None
        self.hits += 1
        return model

    def store(self, key: str, model: onnx.ModelProto, is_parameter) -> None:
        """Keep ``model`` under ``key`` without the bytes of the initializers ``is_parameter``
        names (their names, shapes and types stay). Written whole or not at all."""
        kept = onnx.ModelProto()
        kept.CopyFrom(model)
        for init in kept.graph.initializer:
            if is_parameter(init.name):
                bare = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
                init.CopyFrom(bare)
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(kept.SerializeToString())
                os.replace(partial, path)
            except BaseException:
                Path(partial).unlink(missing_ok=True)
                raise
        except OSError as exc:
            self.write_errors.append(f"{path.parent}: {exc.strerror or exc}")


def _plain_attributes(module) -> list:
    """A module's attributes that are plain values (numbers, strings, flags, tuples of them),
    sorted: the settings its forward may branch on. Tensors, submodules and hooks are not, nor
    ``training``: the export traces every module in eval mode."""
    return [(name, value) for name, value in sorted(vars(module).items()) if _plain(value) and name != "training"]


def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and all(_plain(v) for v in value)


def _versions() -> tuple:
    import onnx_ir
    import onnxscript
    import timm
    import torch

    from .. import __version__

    return __version__, torch.__version__, timm.__version__, onnx.__version__, onnxscript.__version__, onnx_ir.__version__


def _class_files(model) -> list[str]:
    """The source files of the classes of ``model``'s modules and of their bases, sorted."""
    files = set()
    for module in model.modules():
        for cls in type(module).__mro__:
            path = getattr(sys.modules.get(cls.__module__), "__file__", None)
            if path:
                files.add(path)
    return sorted(files)


def _file_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:  # removed since it was imported: the loaded class is all there is
        return b""


@functools.cache
def _source_digest() -> str:
    """A digest of atm-export's Python source: the code that is traced, and that translates it."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
