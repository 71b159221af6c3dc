"""Traces kept on disk, so that a model exported once exports again without torch.export.

The block-by-block export (``blockwise.py``) makes one ``torch.onnx.export`` call, and that call
is most of an export's time: about 8.5 of DeiT-T's 10.5 s, seconds of it a fixed cost of the
exporter (docs/benchmarks.md). What it gives depends on the model's architecture and on which blocks
merge, not on the weights nor on a step's settings (threshold, split, weighting): ``stitch``
fills those in afterwards. So a trace is kept, without its parameters' bytes (0.4 MB for DeiT-T),
under a key of everything it depends on:

- the versions of atm-export, torch, timm and the ONNX packages, and atm-export's own source
  (any change to the code that is traced or translates it gives new keys);
- every module of the patched model: its path, its class, and its settings as data (heads,
  eps, pooling, prefix tokens, flags, configuration dicts: what the model code branches on);
- the source of those classes and their bases (a model of one's own, edited between two
  exports, is traced anew);
- every parameter's and buffer's name, shape and dtype;
- what the caller traced: opset, dtype, batch limit, image shape, which blocks merge, and which
  block stood for each kind.

A model the key cannot follow (hooks, a function or an object among a module's attributes, a
class whose source cannot be read) is traced and not kept (:class:`Uncacheable`). An entry
carries its own digest; one that is missing, damaged or for other inputs is traced anew and
replaced, and only a trace that stitched is kept. A cached trace gives the same graph, byte for
byte, as a fresh one (tests/export/test_trace_cache.py); a run of the CLI also checks that
graph against eager PyTorch. A cache that cannot be written costs only time.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from torch import nn

from ..artifacts import user_cache_dir, write_atomic
from ..errors import UserError

#: The file name's suffix of a cached trace (the key is its stem).
SUFFIX = ".trace.onnx"


def default_directory() -> Path:
    """Where runs keep their traces unless told otherwise: ``$XDG_CACHE_HOME/atm-export/traces``."""
    return user_cache_dir() / "traces"


class Uncacheable(Exception):
    """The model holds something the key cannot follow (a hook, a function, a class without
    source): its trace is neither looked up nor kept."""


#: A cached trace's own digest, in its metadata: a file that parses but is not what was written
#: (cut at a field boundary, edited) is traced anew.
DIGEST_KEY = "atm_export.trace_sha256"


@dataclass
class TraceCache:
    """A directory of traces, and what one run found in it (the job reports it)."""

    directory: Path
    hits: int = 0
    misses: int = 0
    unused: str | None = None  # why a model's trace could not be cached (Uncacheable)
    write_errors: list[str] = field(default_factory=list)

    def key(self, model, refilled: frozenset = frozenset(), **traced) -> str:
        """The key of ``model``'s trace (an nn.Module) made with the settings ``traced``.
        ``refilled``: attributes of ``model`` itself that the trace does not depend on (the
        caller fills them in afterwards). Uncacheable when the key cannot follow the model."""
        if any(_hooks(m) for m in model.modules()) or _global_hooks():
            raise Uncacheable("a module has hooks")
        digest = hashlib.sha256()
        digest.update(repr((_versions(), _source_digest(), sorted(traced.items()))).encode())
        for name, module in model.named_modules():
            digest.update(repr((name, type(module).__module__, type(module).__qualname__,
                                settings(module, refilled if module is model else ()))).encode())
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            digest.update(repr((name, tuple(tensor.shape), str(tensor.dtype))).encode())
        for source in _class_sources(model):
            digest.update(source)
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return Path(self.directory) / f"{key}{SUFFIX}"

    def load(self, key: str, inputs: list[str], outputs: list[str]) -> onnx.ModelProto | None:
        """The trace kept under ``key``, if it is there, is what was written, and has these
        graph inputs and outputs; else None (the caller traces, and ``store`` replaces it).
        The caller counts a hit (``hits``) once the trace has served."""
        try:
            model = onnx.load_from_string(self.path(key).read_bytes())
            written = _pop_digest(model)
            intact = written == hashlib.sha256(model.SerializeToString()).hexdigest()
        except Exception:  # missing, unreadable or not a model: trace anew
            intact = False
        if not intact or [i.name for i in model.graph.input] != inputs or \
                [o.name for o in model.graph.output] != outputs:
            self.misses += 1
            return None
        return model

    def store(self, key: str, model: onnx.ModelProto, is_parameter) -> None:
        """Keep ``model`` under ``key`` without the bytes of the initializers ``is_parameter``
        names (their names, shapes and types stay). Written whole or not at all; a failure is
        recorded in ``write_errors``, not raised."""
        path = self.path(key)
        try:
            kept = _without_parameter_bytes(model, is_parameter)
            kept.metadata_props.add(key=DIGEST_KEY, value=hashlib.sha256(kept.SerializeToString()).hexdigest())
            write_atomic(path, kept.SerializeToString())
        except Exception as exc:  # a cache that cannot keep a trace costs time, not the run
            self.write_errors.append(str(exc) if isinstance(exc, UserError)  # "cannot write PATH: why"
                                     else f"{path}: {type(exc).__name__}: {exc}")


def settings(module, ignored=()) -> tuple:
    """What ``module``'s forward may branch on, as data: its attributes that are numbers,
    strings, flags and containers of them (heads, eps, pooling, configuration dicts), sorted.
    Not ``training`` (the export traces in eval mode), nor nn.Module's own machinery, nor
    ``ignored``. Uncacheable for anything else (a function, an object) the key cannot follow."""
    found = []
    for name, value in sorted(vars(module).items()):
        if name in _MODULE_MACHINERY or name == "training" or name in ignored:
            continue
        if not _data(value):
            raise Uncacheable(f"{type(module).__qualname__}.{name} is a {type(value).__name__}")
        found.append((name, value))
    return tuple(found)


def _data(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_data(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _data(v) for k, v in value.items())


#: Attributes every nn.Module has (parameters, buffers, submodules, hooks); hooks are checked apart.
_MODULE_MACHINERY = frozenset(vars(nn.Module()))


def _hooks(module) -> bool:
    return any(isinstance(value, dict) and value for name, value in vars(module).items()
               if name.startswith("_") and "hooks" in name)


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return any(getattr(module, name) for name in dir(module) if name.startswith("_global_") and "hook" in name
               and isinstance(getattr(module, name), dict))


def _without_parameter_bytes(model: onnx.ModelProto, is_parameter) -> onnx.ModelProto:
    """A copy of ``model`` whose parameters keep name, type and shape only (their bytes are
    never copied: a large model's trace holds hundreds of MB of them)."""
    kept = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            _copy_field(kept, descriptor, value)
    for descriptor, value in model.graph.ListFields():
        if descriptor.name != "initializer":
            _copy_field(kept.graph, descriptor, value)
    for init in model.graph.initializer:
        if is_parameter(init.name):
            kept.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
        else:
            kept.graph.initializer.add().CopyFrom(init)
    return kept


def _copy_field(target, descriptor, value) -> None:
    if descriptor.label == descriptor.LABEL_REPEATED:
        getattr(target, descriptor.name).extend(value)
    elif descriptor.type == descriptor.TYPE_MESSAGE:
        getattr(target, descriptor.name).CopyFrom(value)
    else:
        setattr(target, descriptor.name, value)


def _pop_digest(model: onnx.ModelProto) -> str | None:
    props = [p for p in model.metadata_props if p.key != DIGEST_KEY]
    digest = next((p.value for p in model.metadata_props if p.key == DIGEST_KEY), None)
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    return digest


def _versions() -> tuple:
    import onnx_ir
    import onnxscript
    import timm
    import torch

    from .. import __version__

    return __version__, torch.__version__, timm.__version__, onnx.__version__, onnxscript.__version__, onnx_ir.__version__


def _class_sources(model) -> list[bytes]:
    """The source of the classes of ``model``'s modules and of their bases: each defining file,
    or the class's own source where it has no file (a notebook); Uncacheable where neither is
    there to compare."""
    files, sources = set(), []
    for cls in {c for module in model.modules() for c in type(module).__mro__ if c is not object}:
        path = getattr(sys.modules.get(cls.__module__), "__file__", None)
        if path:
            files.add(path)
            continue
        try:
            sources.append(inspect.getsource(cls).encode())
        except (OSError, TypeError):
            raise Uncacheable(f"the source of {cls.__qualname__} cannot be read") from None
    for path in sorted(files):
        try:
            sources.append(Path(path).read_bytes())
        except OSError:
            raise Uncacheable(f"{path} cannot be read") from None
    return sorted(sources)


@functools.cache
def _source_digest() -> str:
    """A digest of atm-export's Python source: the code that is traced, and that translates it."""
    root = Path(__file__).resolve().parents[1]
    paths = sorted(root.rglob("*.py"))
    if not paths:  # installed without its source: changes to the code could not be followed
        raise Uncacheable("atm-export's source is not installed")
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
