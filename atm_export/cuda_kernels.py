"""ctypes binding of the TokenMerge kernel library (plugins/tokenMergePlugin/tokenMergeKernel.h).

One merge step of docs/token-merge-op.md on torch tensors:

- :func:`token_merge_cuda`: the CUDA kernels on CUDA tensors (3 launches, +1 with the size split,
  +3 with AdaMerge's salience weighting; one fewer when A is empty),
- :func:`token_merge_host`: the same block programs run on the CPU, on CPU tensors (bitwise
  equal to the CUDA path; used where there is no GPU, e.g. CI),
- :func:`launch`: the CUDA kernels into preallocated buffers, without synchronising (for
  benchmarks and CUDA graphs).

Both convenience functions take the keyword arguments of :func:`atm_export.merge.token_merge`
(exactly one of ``threshold``, ``r`` and ``intensity``; ``weighting`` and ``salience_temperature``)
and return ``KernelMerge(x, size, num_tokens)``, the outputs sliced to the data-dependent token
count.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import NamedTuple

import torch

from . import contract, plugin_lib
from .merge import ALTERNATE, SIZE_DISTINCTIVE, SIZE_WEIGHTS, Intensity

_SPLIT_MODES = {ALTERNATE: 0, SIZE_DISTINCTIVE: 1}
_WEIGHTINGS = dict(contract.WEIGHTING_CODES)
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

STATUS_OK = 0


class TokenMergeKernelError(RuntimeError):
    """A kernel library call failed; the message carries the library's status and reason."""


class _ContractDefaults(ctypes.Structure):
    """A struct whose fields named in ``_defaulted`` take the contract's defaults when not given
    (ctypes would zero them, and r_max = 0 is the intensity rule, not "off")."""

    _defaulted: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        positional = {name for name, _ in self._fields_[: len(args)]}
        defaults = {name: contract.DEFAULTS[name] for name in self._defaulted if name not in positional}
        super().__init__(*args, **{**defaults, **kwargs})


#: AdaMerge's attributes, the tail of both structs (after ATM's), in the C headers' order.
_ADAMERGE_FIELDS = [
    ("weighting", ctypes.c_int32),
    ("salience_temperature", ctypes.c_float),
    ("r_max", ctypes.c_int32),
    ("redundancy_mean", ctypes.c_float),
    ("redundancy_std", ctypes.c_float),
    ("redundancy_scale", ctypes.c_float),
]


class Params(_ContractDefaults):
    """atm_token_merge_params."""

    _fields_ = [
        ("batch", ctypes.c_int64),
        ("num_tokens", ctypes.c_int64),
        ("channels", ctypes.c_int64),
        ("metric_dim", ctypes.c_int64),
        ("num_protected", ctypes.c_int32),
        ("split_mode", ctypes.c_int32),
        ("fixed_r", ctypes.c_int32),
        ("threshold", ctypes.c_float),
        ("dtype", ctypes.c_int32),
        *_ADAMERGE_FIELDS,
    ]

    _defaulted = tuple(name for name, _ in _ADAMERGE_FIELDS)


class Attributes(_ContractDefaults):
    """atm_token_merge_attributes (fields in contract.Attributes' order).

    Fields not given take the contract's defaults, not ctypes' zeros.
    """

    _fields_ = [
        ("threshold", ctypes.c_float),
        ("fixed_r", ctypes.c_int32),
        ("split_mode", ctypes.c_int32),
        ("num_protected", ctypes.c_int32),
        ("opt_num_tokens", ctypes.c_int32),
        ("max_num_tokens", ctypes.c_int32),
        *_ADAMERGE_FIELDS,
    ]


Attributes._defaulted = tuple(name for name, _ in Attributes._fields_)


class PluginField(ctypes.Structure):
    """atm_plugin_field (TensorRT's PluginField layout)."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("data", ctypes.c_void_p),
        ("type", ctypes.c_int32),
        ("length", ctypes.c_int32),
    ]


class KernelMerge(NamedTuple):
    x: torch.Tensor  # [B, K, C]
    size: torch.Tensor  # [B, K]
    num_tokens: int  # K = N - r


_P = ctypes.POINTER
_SIGNATURES = {
    "atm_token_merge_params_size": ([], ctypes.c_size_t),
    "atm_token_merge_check": ([_P(Params)], ctypes.c_int),
    "atm_token_merge_workspace_size": ([_P(Params)], ctypes.c_size_t),
    "atm_token_merge_enqueue": (
        [_P(Params)] + [ctypes.c_void_p] * 7 + [ctypes.c_size_t, ctypes.c_void_p],
        ctypes.c_int,
    ),
    "atm_token_merge_host": ([_P(Params)] + [ctypes.c_void_p] * 6, ctypes.c_int),
    "atm_token_merge_status_string": ([ctypes.c_int], ctypes.c_char_p),
    "atm_token_merge_last_error": ([], ctypes.c_char_p),
    "atm_token_merge_default_attributes": ([_P(Attributes)], None),
    "atm_token_merge_parse_attributes": ([_P(PluginField), ctypes.c_int32, _P(Attributes)], ctypes.c_int),
    "atm_token_merge_validate_attributes": ([_P(Attributes)], ctypes.c_int),
    "atm_token_merge_check_shapes": (
        [_P(ctypes.c_int64), ctypes.c_int32] * 3 + [_P(Attributes)],
        ctypes.c_int,
    ),
    "atm_token_merge_make_params": (
        [_P(ctypes.c_int64), _P(ctypes.c_int64), _P(Attributes), ctypes.c_int32, _P(Params)],
        ctypes.c_int,
    ),
    "atm_token_merge_token_bounds": (
        [ctypes.c_int64, ctypes.c_int32, _P(Attributes), _P(ctypes.c_int64), _P(ctypes.c_int64)],
        ctypes.c_int,
    ),
    "atm_token_merge_max_input_tokens": ([ctypes.c_int64, _P(Attributes), _P(ctypes.c_int64)], ctypes.c_int),
}


@functools.lru_cache(maxsize=None)
def load_library(path: str | None = None) -> ctypes.CDLL:
    """The kernel library, built on first use (see atm_export.plugin_lib) unless a path is given."""
    library = Path(path) if path is not None else plugin_lib.kernels_library()
    lib = ctypes.CDLL(str(library))
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype
    if lib.atm_token_merge_params_size() != ctypes.sizeof(Params):
        raise TokenMergeKernelError(
            f"{library} was built from another version of tokenMergeKernel.h "
            f"(params struct {lib.atm_token_merge_params_size()} bytes, expected {ctypes.sizeof(Params)}); rebuild it"
        )
    return lib


def raise_for_status(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status != STATUS_OK:
        reason = lib.atm_token_merge_status_string(status).decode()
        detail = lib.atm_token_merge_last_error().decode()
        raise TokenMergeKernelError(f"{what}: {reason}: {detail}")


def make_params(
    x: torch.Tensor,
    metric: torch.Tensor,
    *,
    threshold: float | None = None,
    r: int | None = None,
    intensity: Intensity | None = None,
    weighting: str = SIZE_WEIGHTS,
    salience_temperature: float = 1.0,
    split_mode: str = ALTERNATE,
    num_protected: int = 1,
) -> Params:
    """Kernel parameters for x [B, N, C] and metric [B, N, D] (exactly one of threshold, r and
    intensity, as atm_export.merge.token_merge)."""
    if sum(v is not None for v in (threshold, r, intensity)) != 1:
        raise ValueError("give exactly one of threshold (adaptive), r (fixed) and intensity (AdaMerge)")
    if split_mode not in _SPLIT_MODES:
        raise ValueError(f"unknown split mode {split_mode!r}; expected one of {tuple(_SPLIT_MODES)}")
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {tuple(_WEIGHTINGS)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    batch, n, c = x.shape
    return Params(
        batch=batch,
        num_tokens=n,
        channels=c,
        metric_dim=metric.shape[-1],
        num_protected=num_protected,
        split_mode=_SPLIT_MODES[split_mode],
        fixed_r=-1 if r is None else max(0, min(int(r), 2**31 - 1)),
        threshold=float("nan") if threshold is None else float(threshold),
        dtype=_DTYPES[x.dtype],
        weighting=_WEIGHTINGS[weighting],
        salience_temperature=float(salience_temperature),
        r_max=-1 if intensity is None else max(0, min(int(intensity.r_max), 2**31 - 1)),
        redundancy_mean=0.0 if intensity is None else float(intensity.mean),
        redundancy_std=1.0 if intensity is None else float(intensity.std),
        redundancy_scale=1.0 if intensity is None else float(intensity.scale),
    )


def _check_inputs(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, device_type: str) -> None:
    if x.dim() != 3 or metric.dim() != 3 or size.dim() != 2:
        raise ValueError(f"expected x [B, N, C], size [B, N], metric [B, N, D]; got {x.shape}, {size.shape}, {metric.shape}")
    if x.shape[:2] != metric.shape[:2] or tuple(size.shape) != tuple(x.shape[:2]):
        raise ValueError(f"x {tuple(x.shape)}, size {tuple(size.shape)} and metric {tuple(metric.shape)} disagree on B or N")
    if metric.dtype != x.dtype:
        raise TypeError(f"metric must have x's dtype {x.dtype}, got {metric.dtype}")
    if size.dtype != torch.float32:
        raise TypeError(f"size must be float32, got {size.dtype}")
    for name, t in (("x", x), ("size", size), ("metric", metric)):
        if t.device.type != device_type:
            raise ValueError(f"{name} must be a {device_type} tensor, got {t.device}")


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _compact(buffer: torch.Tensor, batch: int, k: int, *trailing: int) -> torch.Tensor:
    """The first batch*k*... elements of an output buffer, viewed as [batch, k, ...]."""
    count = batch * k
    for t in trailing:
        count *= t
    return buffer.reshape(-1)[:count].view(batch, k, *trailing)


def workspace_size(params: Params) -> int:
    lib = load_library()
    size = lib.atm_token_merge_workspace_size(ctypes.byref(params))
    if size == 0:
        raise_for_status(lib, lib.atm_token_merge_check(ctypes.byref(params)), "workspace_size")
    return size


def launch(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    x_out: torch.Tensor,
    size_out: torch.Tensor,
    num_tokens: torch.Tensor,
    workspace: torch.Tensor,
    params: Params,
    stream: torch.cuda.Stream | None = None,
) -> None:
    """Enqueue the kernels into preallocated CUDA buffers on `stream` (default: the current one).

    x_out holds >= B*N*C elements of x's dtype, size_out >= B*N float32, num_tokens one int64,
    workspace >= workspace_size(params) bytes. Outputs are compact: see _compact / token_merge_cuda.
    Inputs must be contiguous. Does not synchronise.
    """
    lib = load_library()
    stream = stream if stream is not None else torch.cuda.current_stream(x.device)
    status = lib.atm_token_merge_enqueue(
        ctypes.byref(params),
        _ptr(x),
        _ptr(size),
        _ptr(metric),
        _ptr(x_out),
        _ptr(size_out),
        _ptr(num_tokens),
        _ptr(workspace),
        workspace.numel() * workspace.element_size(),
        ctypes.c_void_p(stream.cuda_stream),
    )
    raise_for_status(lib, status, "atm_token_merge_enqueue")


def _prepare(x, size, metric, device_type: str, **merge_kwargs):
    """Checked contiguous inputs, the kernel parameters, and output buffers for the upper bound N."""
    _check_inputs(x, size, metric, device_type)
    x, size, metric = x.contiguous(), size.contiguous(), metric.contiguous()
    params = make_params(x, metric, **merge_kwargs)
    outputs = (torch.empty_like(x), torch.empty_like(size), torch.empty((), dtype=torch.int64, device=x.device))
    return x, size, metric, params, outputs


def token_merge_cuda(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    *,
    threshold: float | None = None,
    r: int | None = None,
    intensity: Intensity | None = None,
    weighting: str = SIZE_WEIGHTS,
    salience_temperature: float = 1.0,
    split_mode: str = ALTERNATE,
    num_protected: int = 1,
) -> KernelMerge:
    """One merge step with the CUDA kernels. Synchronises once, to read the token count."""
    x, size, metric, params, (x_out, size_out, num_tokens) = _prepare(
        x, size, metric, "cuda", threshold=threshold, r=r, intensity=intensity, weighting=weighting,
        salience_temperature=salience_temperature, split_mode=split_mode, num_protected=num_protected)
    workspace = torch.empty(workspace_size(params), dtype=torch.uint8, device=x.device)
    launch(x, size, metric, x_out, size_out, num_tokens, workspace, params)
    k = int(num_tokens.item())
    return KernelMerge(_compact(x_out, x.shape[0], k, x.shape[2]), _compact(size_out, x.shape[0], k), k)


def token_merge_host(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    *,
    threshold: float | None = None,
    r: int | None = None,
    intensity: Intensity | None = None,
    weighting: str = SIZE_WEIGHTS,
    salience_temperature: float = 1.0,
    split_mode: str = ALTERNATE,
    num_protected: int = 1,
) -> KernelMerge:
    """One merge step with the kernels' CPU executor (CPU tensors)."""
    x, size, metric, params, (x_out, size_out, num_tokens) = _prepare(
        x, size, metric, "cpu", threshold=threshold, r=r, intensity=intensity, weighting=weighting,
        salience_temperature=salience_temperature, split_mode=split_mode, num_protected=num_protected)
    lib = load_library()
    status = lib.atm_token_merge_host(
        ctypes.byref(params), _ptr(x), _ptr(size), _ptr(metric), _ptr(x_out), _ptr(size_out), _ptr(num_tokens)
    )
    raise_for_status(lib, status, "atm_token_merge_host")
    k = int(num_tokens.item())
    return KernelMerge(_compact(x_out, x.shape[0], k, x.shape[2]), _compact(size_out, x.shape[0], k), k)
