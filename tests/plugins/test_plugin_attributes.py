"""Host logic of the TensorRT plugin that needs no TensorRT: attribute parsing and validation,
shape checks, output token bounds, workspace size, and the kernel API's error paths.

The plugin (plugins/tokenMergePlugin/tokenMergePlugin.cpp) only converts TensorRT types to the
functions tested here (tokenMergeAttributes.h, tokenMergeKernel.h).
"""

from __future__ import annotations

import ctypes
import math

import pytest

from atm_export import cuda_kernels, plugin_lib
from atm_export.cuda_kernels import Attributes, Params, PluginField

# TensorRT's PluginFieldType codes (the library uses the same numbers).
FLOAT16, FLOAT32, FLOAT64, INT8, INT16, INT32, CHAR, INT64 = 0, 1, 2, 3, 4, 5, 6, 10
OK, INVALID, UNSUPPORTED, WORKSPACE_TOO_SMALL, CUDA_ERROR = 0, 1, 2, 3, 4
MAX_UNPROTECTED = 4096


@pytest.fixture(scope="session")
def lib():
    if plugin_lib.find_nvcc() is None or plugin_lib.find_cmake() is None:
        pytest.skip("nvcc and cmake are needed to build the TokenMerge kernel library (see docs/tensorrt-plugin.md)")
    return cuda_kernels.load_library()


def last_error(lib) -> str:
    return lib.atm_token_merge_last_error().decode()


_C_TYPES = {FLOAT32: ctypes.c_float, FLOAT64: ctypes.c_double, INT8: ctypes.c_int8, INT16: ctypes.c_int16,
            INT32: ctypes.c_int32, INT64: ctypes.c_int64}


def field(name: str, value, kind: int):
    """A plugin field and the buffer that must outlive it."""
    if kind == CHAR:
        buf = ctypes.create_string_buffer(value.encode())
        return PluginField(name.encode(), ctypes.cast(buf, ctypes.c_void_p), CHAR, len(buf)), buf
    buf = _C_TYPES[kind](value)
    return PluginField(name.encode(), ctypes.cast(ctypes.pointer(buf), ctypes.c_void_p), kind, 1), buf


def parse(lib, *specs):
    """Parse (name, value, type) specs; returns (status, Attributes)."""
    made = [field(*s) for s in specs]
    array = (PluginField * max(1, len(made)))(*[f for f, _ in made])
    out = Attributes(-9.0, -9, -9, -9)
    status = lib.atm_token_merge_parse_attributes(array, len(made), ctypes.byref(out))
    return status, out


def as_tuple(a: Attributes):
    return (a.threshold, a.fixed_r, a.split_mode, a.num_protected)


# ---- attributes ----------------------------------------------------------------------------


def test_defaults_match_the_op_contract(lib):
    out = Attributes()
    lib.atm_token_merge_default_attributes(ctypes.byref(out))
    assert as_tuple(out) == (1.0, -1, 0, 1)
    status, parsed = parse(lib)
    assert status == OK and as_tuple(parsed) == (1.0, -1, 0, 1)


def test_fields_as_the_onnx_parser_passes_them(lib):
    """ONNX float attributes arrive as FLOAT32, int attributes as INT32."""
    status, a = parse(
        lib,
        ("threshold", 0.8125, FLOAT32),
        ("fixed_r", 12, INT32),
        ("split_mode", 1, INT32),
        ("num_protected", 2, INT32),
    )
    assert status == OK, last_error(lib)
    assert as_tuple(a) == (0.8125, 12, 1, 2)


def test_missing_fields_keep_their_defaults(lib):
    status, a = parse(lib, ("fixed_r", 3, INT32))
    assert status == OK and as_tuple(a) == (1.0, 3, 0, 1)


@pytest.mark.parametrize("kind", [INT8, INT16, INT32, INT64])
def test_integer_fields_of_any_width(lib, kind):
    status, a = parse(lib, ("num_protected", 3, kind), ("fixed_r", -1, kind))
    assert status == OK and a.num_protected == 3 and a.fixed_r == -1


@pytest.mark.parametrize(("value", "kind", "expected"), [(0.25, FLOAT64, 0.25), (1, INT32, 1.0), (-2, INT64, -2.0)])
def test_threshold_from_double_or_integer_fields(lib, value, kind, expected):
    status, a = parse(lib, ("threshold", value, kind))
    assert status == OK and a.threshold == expected


@pytest.mark.parametrize("version", ["2", "1"])
def test_plugin_lookup_keys_are_ignored(lib, version):
    """TensorRT matches plugin_version ("2") when it looks the creator up; the parser ignores it."""
    status, a = parse(lib, ("plugin_version", version, CHAR), ("plugin_namespace", "atm_export", CHAR),
                      ("fixed_r", 5, INT32))
    assert status == OK and as_tuple(a) == (1.0, 5, 0, 1)


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ((("fixed_rr", 3, INT32),), "unknown attribute fixed_rr"),
        ((("split_mode", 2, INT32),), "split_mode must be 0"),
        ((("num_protected", -1, INT32),), "num_protected must be >= 0"),
        ((("threshold", math.nan, FLOAT32),), "threshold is NaN"),
        ((("fixed_r", 2**40, INT64),), "does not fit in int32"),
        ((("fixed_r", 1.5, FLOAT32),), "fixed_r must be an integer"),
        ((("threshold", "0.5", CHAR),), "threshold must be a float"),
    ],
)
def test_invalid_fields_are_rejected_with_a_reason(lib, specs, message):
    status, a = parse(lib, *specs)
    assert status == INVALID
    assert message in last_error(lib)
    assert as_tuple(a) == (-9.0, -9, -9, -9), "the output is untouched on failure"


def test_nan_threshold_is_fine_with_a_fixed_r(lib):
    status, a = parse(lib, ("threshold", math.nan, FLOAT32), ("fixed_r", 4, INT32))
    assert status == OK and math.isnan(a.threshold) and a.fixed_r == 4


def test_empty_field_is_rejected(lib):
    empty = PluginField(b"fixed_r", None, INT32, 0)
    out = Attributes()
    assert lib.atm_token_merge_parse_attributes((PluginField * 1)(empty), 1, ctypes.byref(out)) == INVALID
    assert "has no value" in last_error(lib)


# ---- shapes --------------------------------------------------------------------------------


def check_shapes(lib, x, size, metric, num_protected=1):
    arr = lambda dims: (ctypes.c_int64 * max(1, len(dims)))(*dims)  # noqa: E731
    attrs = Attributes(1.0, -1, 0, num_protected)
    return lib.atm_token_merge_check_shapes(
        arr(x), len(x), arr(size), len(size), arr(metric), len(metric), ctypes.byref(attrs)
    )


def test_shapes_consistent_or_unknown_are_accepted(lib):
    assert check_shapes(lib, [64, 197, 384], [64, 197], [64, 197, 64]) == OK
    assert check_shapes(lib, [-1, 197, 384], [-1, 197], [-1, 197, 64]) == OK  # dynamic batch
    assert check_shapes(lib, [-1, -1, 384], [-1, -1], [-1, -1, 64]) == OK  # N from an earlier merge


@pytest.mark.parametrize(
    ("x", "size", "metric", "p", "status", "message"),
    [
        ([64, 197], [64, 197], [64, 197, 64], 1, INVALID, "got ranks 2, 2, 3"),
        ([64, 197, 384], [32, 197], [64, 197, 64], 1, INVALID, "disagree on B or N"),
        ([64, 197, 384], [64, 197], [64, 196, 64], 1, INVALID, "disagree on B or N"),
        ([2, 3, 8], [2, 3], [2, 3, 8], 3, INVALID, "leave nothing to merge"),
        ([2, MAX_UNPROTECTED + 2, 8], [2, -1], [2, -1, 8], 1, UNSUPPORTED, "exceeds the kernels' limit"),
        ([2, 9, 0], [2, 9], [2, 9, 8], 1, INVALID, "must be >= 1"),
    ],
)
def test_bad_shapes_are_rejected(lib, x, size, metric, p, status, message):
    assert check_shapes(lib, x, size, metric, p) == status
    assert message in last_error(lib)


def test_make_params_from_concrete_shapes(lib):
    x = (ctypes.c_int64 * 3)(64, 197, 384)
    metric = (ctypes.c_int64 * 3)(64, 197, 64)
    attrs = Attributes(0.9, -1, 1, 1)
    out = Params()
    assert lib.atm_token_merge_make_params(x, metric, ctypes.byref(attrs), 1, ctypes.byref(out)) == OK
    assert (out.batch, out.num_tokens, out.channels, out.metric_dim) == (64, 197, 384, 64)
    assert (out.num_protected, out.split_mode, out.fixed_r, out.dtype) == (1, 1, -1, 1)
    assert out.threshold == pytest.approx(0.9)


# ---- output bounds (the size tensor's opt and upper) ---------------------------------------


def bounds(lib, n, *, fixed_r=-1, num_protected=1, n_constant=True, opt_num_tokens=-1, max_num_tokens=-1):
    opt, upper = ctypes.c_int64(), ctypes.c_int64()
    attrs = Attributes(0.9, fixed_r, 0, num_protected, opt_num_tokens, max_num_tokens)
    status = lib.atm_token_merge_token_bounds(n, int(n_constant), ctypes.byref(attrs), ctypes.byref(opt),
                                              ctypes.byref(upper))
    return status, opt.value, upper.value


@pytest.mark.parametrize(
    ("n", "fixed_r", "p", "opt"),
    [
        (197, -1, 1, 148),  # threshold: expect half the cap to merge (floor(98 / 2) = 49)
        (198, -1, 2, 149),  # distilled DeiT: P = 2
        (6, -1, 0, 5),  # M = 6: cap 3, floor(3 / 2) = 1
        (4, -1, 1, 4),  # M = 3: cap 1, floor(1 / 2) = 0
    ],
)
def test_token_bounds_of_a_threshold(lib, n, fixed_r, p, opt):
    status, got_opt, upper = bounds(lib, n, fixed_r=fixed_r, num_protected=p)
    assert status == OK
    assert upper == n, "no merge at all keeps every token"
    assert got_opt == opt
    assert 0 < got_opt <= upper


@pytest.mark.parametrize(
    ("n", "fixed_r", "p", "k"),
    [
        (197, 16, 1, 181),  # DeiT-S, ToMe r = 16
        (197, 500, 1, 99),  # r capped at floor(M / 2) = 98
        (198, 500, 1, 100),  # M = 197 odd: still 98 (ceil would give 99)
        (577, 0, 1, 577),
        (4, 3, 3, 4),  # one unprotected token, P odd (A empty): nothing to merge
        (3, 3, 2, 3),  # one unprotected token, P even (B empty)
        (4, 5, 1, 3),  # M = 3: a fixed r is capped at 1
    ],
)
def test_token_bounds_of_a_fixed_r_are_the_count(lib, n, fixed_r, p, k):
    """A fixed r: the plugin declares K itself (no size tensor), opt = upper = K, for any N."""
    for n_constant in (True, False):
        assert bounds(lib, n, fixed_r=fixed_r, num_protected=p, n_constant=n_constant, max_num_tokens=600) == (OK, k, k)


@pytest.mark.parametrize("p", [0, 1, 2, 5])
@pytest.mark.parametrize("fixed_r", [0, 1, 3, 16, 98, 99, 500])
def test_fixed_r_count_is_the_python_rule(lib, fixed_r, p):
    """The plugin's K for a fixed r is atm_export.merge.tokens_after_fixed_r (the custom op's fake)."""
    from atm_export.merge import tokens_after_fixed_r

    for n in range(p + 1, 240):
        assert bounds(lib, n, fixed_r=fixed_r, num_protected=p)[1] == tokens_after_fixed_r(n, fixed_r, p)


@pytest.mark.parametrize(
    ("opt_num_tokens", "max_num_tokens", "opt", "upper"),
    [
        (-1, -1, 2, 150),  # no hints: opt a constant (P + 1), never N; upper N
        (120, -1, 120, 150),  # the exporter's recorded count
        (120, 197, 120, 197),  # upper: the model's input count, a constant
        (-1, 197, 2, 197),
    ],
)
def test_token_bounds_when_n_is_an_earlier_size_tensor(lib, opt_num_tokens, max_num_tokens, opt, upper):
    got = bounds(lib, 150, n_constant=False, opt_num_tokens=opt_num_tokens, max_num_tokens=max_num_tokens)
    assert got == (OK, opt, upper)


def test_token_bounds_with_a_constant_n_ignore_max_num_tokens(lib):
    assert bounds(lib, 197, max_num_tokens=197, opt_num_tokens=120) == (OK, 120, 197)


def max_input_tokens(lib, reported_max, max_num_tokens):
    out = ctypes.c_int64(-7)
    attrs = Attributes(0.9, -1, 0, 1, -1, max_num_tokens)
    return lib.atm_token_merge_max_input_tokens(reported_max, ctypes.byref(attrs), ctypes.byref(out)), out.value


@pytest.mark.parametrize(
    ("reported_max", "max_num_tokens", "expected"),
    [
        (197, -1, 197),  # TensorRT knows it: as reported
        (150, 197, 150),  # a reported max below the model's count is tighter
        (300, 197, 197),  # N never exceeds the model's input count
        (-1, 197, 197),  # TensorRT reports none (N an earlier size tensor): the attribute bounds it
        (-1, 0, None),  # neither: an error
        (-1, -1, None),
    ],
)
def test_max_input_tokens_bound_the_workspace(lib, reported_max, max_num_tokens, expected):
    status, n = max_input_tokens(lib, reported_max, max_num_tokens)
    if expected is None:
        assert status == INVALID and "max_num_tokens" in last_error(lib) and n == -7
    else:
        assert (status, n) == (OK, expected)


def test_shapes_above_max_num_tokens_are_rejected(lib):
    dims = lambda *d: (ctypes.c_int64 * len(d))(*d)  # noqa: E731
    attrs = Attributes(1.0, -1, 0, 1, -1, 197)
    check = lambda n: lib.atm_token_merge_check_shapes(dims(2, n, 8), 3, dims(2, n), 2, dims(2, n, 4), 3,  # noqa: E731
                                                       ctypes.byref(attrs))
    assert check(197) == OK and check(-1) == OK
    assert check(198) == INVALID and "exceeds max_num_tokens" in last_error(lib)


def test_token_bounds_reject_no_unprotected_tokens(lib):
    assert bounds(lib, 2, num_protected=2)[0] == INVALID


# ---- kernel API: workspace and error paths (no GPU needed: they fail before any launch) ----


def params(**overrides) -> Params:
    base = dict(batch=64, num_tokens=197, channels=384, metric_dim=64, num_protected=1, split_mode=0,
                fixed_r=-1, threshold=0.9, dtype=0)
    base.update(overrides)
    return Params(**base)


def test_params_struct_matches_the_library(lib):
    assert lib.atm_token_merge_params_size() == ctypes.sizeof(Params)


def test_workspace_grows_with_batch_and_tokens_only(lib):
    ws = lambda **kw: lib.atm_token_merge_workspace_size(ctypes.byref(params(**kw)))  # noqa: E731
    base = ws()
    assert base > 0
    assert ws(batch=128) > base and ws(num_tokens=577) > base
    assert ws(channels=1024) == base and ws(metric_dim=128) == base and ws(dtype=1) == base
    assert ws(split_mode=1) > base, "the size split keeps the sorted token order"
    assert ws(fixed_r=8) == base and ws(threshold=0.1) == base


def test_workspace_of_invalid_params_is_zero_with_a_reason(lib):
    assert lib.atm_token_merge_workspace_size(ctypes.byref(params(num_protected=197))) == 0
    assert "must exceed num_protected" in last_error(lib)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch": 0}, "batch must be in"),
        ({"batch": 70000}, "batch must be in"),
        ({"channels": 0}, "channels and metric_dim"),
        ({"split_mode": 3}, "split_mode must be"),
        ({"dtype": 7}, "dtype must be"),
        ({"num_tokens": MAX_UNPROTECTED + 2}, "exceeds the kernels' limit"),
        ({"threshold": math.nan}, "threshold is NaN"),
    ],
)
def test_check_rejects_bad_params(lib, overrides, message):
    assert lib.atm_token_merge_check(ctypes.byref(params(**overrides))) == INVALID
    assert message in last_error(lib)


def test_status_strings(lib):
    assert lib.atm_token_merge_status_string(OK) == b"ok"
    assert lib.atm_token_merge_status_string(WORKSPACE_TOO_SMALL) == b"workspace too small"
    assert lib.atm_token_merge_status_string(99) == b"unknown status"


def enqueue(lib, p: Params, workspace_bytes: int, workspace_ptr: int = 4096):
    fake = ctypes.c_void_p(4096)  # never dereferenced: these calls fail before launching
    return lib.atm_token_merge_enqueue(
        ctypes.byref(p), fake, fake, fake, fake, fake, fake, ctypes.c_void_p(workspace_ptr), workspace_bytes, None
    )


def test_enqueue_checks_params_and_workspace_before_launching(lib):
    p = params()
    needed = lib.atm_token_merge_workspace_size(ctypes.byref(p))
    assert enqueue(lib, params(num_protected=500), needed) == INVALID
    assert enqueue(lib, p, needed - 1) == WORKSPACE_TOO_SMALL
    assert f"needs {needed}" in last_error(lib)
    assert enqueue(lib, p, needed, workspace_ptr=4097) == INVALID
    assert "aligned" in last_error(lib)


def test_enqueue_without_a_gpu_reports_a_cuda_error(lib):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present (this checks the error path without one)")
    p = params()
    assert enqueue(lib, p, lib.atm_token_merge_workspace_size(ctypes.byref(p))) == CUDA_ERROR
    assert "kernel launch failed" in last_error(lib)


# ---- AdaMerge's attributes -------------------------------------------------------------------

ADAMERGE_DEFAULTS = {"weighting": 0, "salience_temperature": 1.0, "r_max": -1, "redundancy_mean": 0.0,
                     "redundancy_std": 1.0, "redundancy_scale": 1.0}


def adamerge_of(a: Attributes) -> dict:
    return {name: getattr(a, name) for name in ADAMERGE_DEFAULTS}


def test_adamerge_defaults_are_the_contract(lib):
    from atm_export import contract

    out = Attributes(*[-9] * len(Attributes._fields_))
    lib.atm_token_merge_default_attributes(ctypes.byref(out))
    assert adamerge_of(out) == ADAMERGE_DEFAULTS == {k: contract.DEFAULTS[k] for k in ADAMERGE_DEFAULTS}
    assert adamerge_of(Attributes()) == ADAMERGE_DEFAULTS, "the ctypes struct defaults to the contract too"


def test_adamerge_fields_as_the_onnx_parser_passes_them(lib):
    status, a = parse(lib, ("weighting", 1, INT32), ("salience_temperature", 0.5, FLOAT32), ("r_max", 12, INT32),
                      ("redundancy_mean", 0.25, FLOAT32), ("redundancy_std", 0.125, FLOAT32),
                      ("redundancy_scale", 2.0, FLOAT32))
    assert status == OK, last_error(lib)
    assert adamerge_of(a) == {"weighting": 1, "salience_temperature": 0.5, "r_max": 12, "redundancy_mean": 0.25,
                              "redundancy_std": 0.125, "redundancy_scale": 2.0}
    assert as_tuple(a) == (1.0, -1, 0, 1), "the other attributes keep their defaults"


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ((("weighting", 2, INT32),), "weighting must be 0 (size) or 1 (salience), got 2"),
        ((("weighting", 1, INT32), ("salience_temperature", 0.0, FLOAT32)), "salience_temperature must be > 0"),
        ((("weighting", 1, INT32), ("salience_temperature", math.inf, FLOAT32)), "salience_temperature must be > 0"),
        ((("r_max", -2, INT32),), "r_max must be >= -1, got -2"),
        ((("r_max", 4, INT32), ("redundancy_std", 0.0, FLOAT32)), "redundancy_std must be > 0"),
        ((("r_max", 4, INT32), ("redundancy_mean", math.nan, FLOAT32)), "redundancy_mean and redundancy_scale"),
        ((("r_max", 4, INT32), ("redundancy_scale", math.inf, FLOAT32)), "redundancy_mean and redundancy_scale"),
        ((("r_max", 1.5, FLOAT32),), "r_max must be an integer"),
        ((("redundancy_std", "1", CHAR),), "redundancy_std must be a float"),
    ],
)
def test_invalid_adamerge_fields_are_rejected_with_a_reason(lib, specs, message):
    status, a = parse(lib, *specs)
    assert status == INVALID
    assert message in last_error(lib)
    assert as_tuple(a) == (-9.0, -9, -9, -9), "the output is untouched on failure"


@pytest.mark.parametrize(
    "specs",
    [
        (("salience_temperature", 0.0, FLOAT32),),  # read only with weighting = 1
        (("redundancy_std", 0.0, FLOAT32),),  # read only under the intensity rule
        (("r_max", 4, INT32), ("fixed_r", 3, INT32), ("redundancy_std", 0.0, FLOAT32)),  # fixed_r wins
        (("r_max", 4, INT32), ("threshold", math.nan, FLOAT32)),  # the intensity rule needs no threshold
    ],
)
def test_adamerge_values_that_are_not_read_are_not_checked(lib, specs):
    status, _ = parse(lib, *specs)
    assert status == OK, last_error(lib)


def test_make_params_carries_the_adamerge_attributes(lib):
    x = (ctypes.c_int64 * 3)(64, 197, 384)
    metric = (ctypes.c_int64 * 3)(64, 197, 64)
    attrs = Attributes(0.9, -1, 1, 1, weighting=1, salience_temperature=0.5, r_max=9, redundancy_mean=0.3,
                       redundancy_std=0.2, redundancy_scale=3.0)
    out = Params()
    assert lib.atm_token_merge_make_params(x, metric, ctypes.byref(attrs), 0, ctypes.byref(out)) == OK
    assert (out.weighting, out.r_max) == (1, 9)
    assert (out.salience_temperature, out.redundancy_std, out.redundancy_scale) == (0.5, pytest.approx(0.2), 3.0)
    assert out.redundancy_mean == pytest.approx(0.3)


def test_workspace_grows_by_what_adamerge_needs(lib):
    ws = lambda **kw: lib.atm_token_merge_workspace_size(ctypes.byref(params(**kw)))  # noqa: E731
    base = ws()
    salience = ws(weighting=1)
    assert salience > base, "the salience arrays"
    assert ws(weighting=1, batch=128) > salience and ws(weighting=1, num_tokens=577) > salience
    assert ws(weighting=1, channels=1024, metric_dim=128) == salience
    assert ws(r_max=8) > base, "the intensity rule's tile score sums"
    assert ws(r_max=8, fixed_r=4) == base, "a fixed r does not count"
    assert ws(weighting=1, salience_temperature=0.1) == salience


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"weighting": 2}, "weighting must be"),
        ({"weighting": 1, "salience_temperature": 0.0}, "salience_temperature must be > 0"),
        ({"r_max": -2}, "r_max must be >= -1"),
        ({"r_max": 3, "redundancy_std": -1.0}, "redundancy_std must be > 0"),
        ({"r_max": 3, "redundancy_mean": math.inf}, "must be finite"),
    ],
)
def test_check_rejects_bad_adamerge_params(lib, overrides, message):
    assert lib.atm_token_merge_check(ctypes.byref(params(**overrides))) == INVALID
    assert message in last_error(lib)


@pytest.mark.parametrize(("n", "r_max", "opt"), [(197, 8, 193), (197, 500, 148), (197, 0, 197), (4, 3, 4)])
def test_token_bounds_of_the_intensity_rule(lib, n, r_max, opt):
    """A size tensor (the count is data-dependent); opt = N - floor(min(r_max, floor(M/2)) / 2)."""
    got_opt, upper = ctypes.c_int64(), ctypes.c_int64()
    attrs = Attributes(0.9, -1, 0, 1, r_max=r_max)
    assert lib.atm_token_merge_token_bounds(n, 1, ctypes.byref(attrs), ctypes.byref(got_opt),
                                            ctypes.byref(upper)) == OK
    assert (got_opt.value, upper.value) == (opt, n)
