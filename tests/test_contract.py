"""The TokenMerge op contract: atm_export/contract.py and its C++ mirror agree, and the contract holds.

The C++ side states the contract once, in plugins/tokenMergePlugin/tokenMergeContract.h. These
tests read that header as text and compare every value with atm_export/contract.py, check that
the C++ sources take the contract's strings from it, check the built kernel library's defaults
and attribute parser against the contract, and check the contract module's own rules.
"""

from __future__ import annotations

import ctypes
import math
import re
from pathlib import Path

import pytest

from atm_export import contract, cuda_kernels, merge, plugin_lib
from atm_export.schedule import StepSpec

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "plugins"
CONTRACT_H = PLUGIN_DIR / "tokenMergePlugin" / "tokenMergeContract.h"
KERNEL_H = PLUGIN_DIR / "tokenMergePlugin" / "tokenMergeKernel.h"
STEPS_H = PLUGIN_DIR / "tokenMergePlugin" / "tokenMergeSteps.h"

# ---- reading the header ----------------------------------------------------------------------

_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(\S.*?)[ \t]*(?:/\*.*?\*/)?[ \t]*$", re.M)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[-+]?\d+\.\d*f?|[-+]?\d+|[A-Za-z_]\w*|[()]|\S')


def _evaluate(text: str, macros: dict[str, str], seen: tuple[str, ...] = ()):
    """A #define's value: an int, a float (1.0f), or string literals and string macros, joined."""
    tokens = [t for t in _TOKEN.findall(text) if t not in "()"]
    values = []
    for token in tokens:
        if token.startswith('"'):
            values.append(token[1:-1])
        elif re.fullmatch(r"[-+]?\d+", token):
            values.append(int(token))
        elif re.fullmatch(r"[-+]?\d+\.\d*f?", token):
            values.append(float(token.rstrip("f")))
        elif token in macros and token not in seen:
            values.append(_evaluate(macros[token], macros, seen + (token,)))
        else:
            raise AssertionError(f"cannot read {token!r} in the value {text!r} of a #define in {CONTRACT_H.name}")
    if len(values) == 1:
        return values[0]
    assert values and all(isinstance(v, str) for v in values), f"not a value or joined strings: {text!r}"
    return "".join(values)


def _macros(path: Path) -> dict[str, str]:
    return dict(_DEFINE.findall(path.read_text()))


@pytest.fixture(scope="module")
def header() -> dict:
    """Every ATM_TOKEN_MERGE_* macro of tokenMergeContract.h with a value, evaluated."""
    macros = _macros(CONTRACT_H)
    return {name: _evaluate(text, macros) for name, text in macros.items() if name.startswith("ATM_TOKEN_MERGE_")}


def _group(header: dict, prefix: str) -> dict:
    return {name[len(prefix):]: value for name, value in header.items() if name.startswith(prefix)}


# ---- (a) the header equals contract.py -------------------------------------------------------


def test_header_identity_equals_the_contract(header):
    assert header["ATM_TOKEN_MERGE_PLUGIN_NAME"] == contract.OP_TYPE
    assert header["ATM_TOKEN_MERGE_PLUGIN_VERSION"] == contract.PLUGIN_VERSION
    assert header["ATM_TOKEN_MERGE_PLUGIN_NAMESPACE"] == contract.PLUGIN_NAMESPACE == contract.DOMAIN
    assert header["ATM_TOKEN_MERGE_OP_VERSION"] == contract.VERSION
    assert header["ATM_TOKEN_MERGE_NODE_PREFIX"] == contract.NODE_PREFIX


def test_header_attribute_names_and_defaults_equal_the_contract(header):
    names = _group(header, "ATM_TOKEN_MERGE_ATTR_")
    defaults = _group(header, "ATM_TOKEN_MERGE_DEFAULT_")
    assert set(names.values()) == set(contract.DEFAULTS)
    assert len(names) == len(contract.DEFAULTS), "one macro per attribute name"
    assert set(defaults) == set(names), "one ATM_TOKEN_MERGE_DEFAULT_<X> per ATM_TOKEN_MERGE_ATTR_<X>"
    by_name = {names[key]: defaults[key] for key in names}
    assert by_name == contract.DEFAULTS
    for name, value in by_name.items():
        expected = type(contract.DEFAULTS[name])
        assert type(value) is expected, f"{name}: the header's {value!r} is not a {expected.__name__}"


def test_header_split_codes_equal_the_contract(header):
    codes = {key.lower(): value for key, value in _group(header, "ATM_TOKEN_MERGE_SPLIT_").items()}
    assert codes == contract.SPLIT_CODES


def test_header_weighting_codes_equal_the_contract(header):
    codes = {key.lower(): value for key, value in _group(header, "ATM_TOKEN_MERGE_WEIGHTING_").items()}
    assert codes == contract.WEIGHTING_CODES
    assert header["ATM_TOKEN_MERGE_DEFAULT_WEIGHTING"] == contract.WEIGHTING_CODES["size"]


def test_kernel_weighting_enum_takes_the_contract_codes():
    body = re.search(r"enum\s+atm_token_merge_weighting\s*\{(.*?)\}", KERNEL_H.read_text(), re.S)
    assert body is not None, "enum atm_token_merge_weighting not found in tokenMergeKernel.h"
    values = dict(re.findall(r"(ATM_WEIGHTING_\w+)\s*=\s*([^,}]+?)\s*[,}]", body.group(1) + "}"))
    enum = {name: _evaluate(value, _macros(CONTRACT_H)) for name, value in values.items()}
    codes = contract.WEIGHTING_CODES
    assert enum == {"ATM_WEIGHTING_SIZE": codes["size"], "ATM_WEIGHTING_SALIENCE": codes["salience"]}
    assert all(v.startswith("ATM_TOKEN_MERGE_WEIGHTING_") for v in values.values())


def test_kernel_salience_constants_equal_the_merge_math():
    """tokenMergeSteps.h's SALIENCE_EPS and SALIENCE_FLOOR are atm_export.merge's (float32)."""
    import struct

    text = STEPS_H.read_text()
    found = {name: float(value) for name, value in
             re.findall(r"constexpr\s+float\s+(kSalienceEps|kSalienceFloor)\s*=\s*([0-9.eE+-]+)f;", text)}
    f32 = lambda v: struct.unpack("f", struct.pack("f", v))[0]  # noqa: E731
    assert {k: f32(v) for k, v in found.items()} == {"kSalienceEps": f32(merge.SALIENCE_EPS),
                                                     "kSalienceFloor": f32(merge.SALIENCE_FLOOR)}


def test_kernel_split_enum_takes_the_contract_codes():
    """tokenMergeKernel.h's public enum names stand for the contract's codes (through its macros)."""
    body = re.search(r"enum\s+atm_token_merge_split_mode\s*\{(.*?)\}", KERNEL_H.read_text(), re.S)
    assert body is not None, "enum atm_token_merge_split_mode not found in tokenMergeKernel.h"
    macros = _macros(CONTRACT_H)
    values = dict(re.findall(r"(ATM_SPLIT_\w+)\s*=\s*([^,}]+?)\s*[,}]", body.group(1) + "}"))
    enum = {name: _evaluate(value, macros) for name, value in values.items()}
    codes = contract.SPLIT_CODES
    assert enum == {"ATM_SPLIT_ALTERNATE": codes["alternate"], "ATM_SPLIT_SIZE": codes["size"]}
    spelled = [value for value in values.values() if not value.startswith("ATM_TOKEN_MERGE_SPLIT_")]
    assert not spelled, f"the enum takes its values from tokenMergeContract.h, not numbers of its own: {spelled}"


_COMMENT_OR_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"|//[^\n]*|/\*.*?\*/', re.S)


def _code(text: str) -> str:
    """C++ source without its comments (each replaced by its newlines, so line numbers stay)."""
    keep = lambda m: m.group() if m.group().startswith('"') else "\n" * m.group().count("\n")  # noqa: E731
    return _COMMENT_OR_STRING.sub(keep, text)


def test_cpp_sources_take_the_contract_strings_from_the_header():
    """No C++ file but tokenMergeContract.h spells a contract string as a literal of its own."""
    strings = {contract.OP_TYPE, contract.DOMAIN, contract.NODE_PREFIX, *contract.DEFAULTS}
    literal = re.compile("|".join(f'"{re.escape(s)}"' for s in sorted(strings)))
    sources = [p for folder in ("tokenMergePlugin", "tests") for p in (PLUGIN_DIR / folder).iterdir()
               if p.suffix in {".h", ".cpp", ".cu"} and p != CONTRACT_H]  # fmt: skip
    assert len(sources) > 5, f"no C++ sources found under {PLUGIN_DIR}"
    found = [f"{p.relative_to(PLUGIN_DIR)}:{code.count(chr(10), 0, m.start()) + 1}: {m.group()}"
             for p in sorted(sources) for code in [_code(p.read_text())] for m in literal.finditer(code)]  # fmt: skip
    assert not found, "use the macros of tokenMergeContract.h:\n" + "\n".join(found)


# ---- (b) the built library follows the contract ----------------------------------------------

OK, INVALID = 0, 1
FLOAT32, INT32, CHAR = 1, 5, 6
#: A valid value other than the default for each attribute of the math.
OTHER_VALUES = {"threshold": 0.5, "fixed_r": 3, "split_mode": contract.SPLIT_CODES["size"], "num_protected": 2,
                "opt_num_tokens": 7, "max_num_tokens": 197, "weighting": contract.WEIGHTING_CODES["salience"],
                "salience_temperature": 0.25, "r_max": 12, "redundancy_mean": 0.75, "redundancy_std": 0.125,
                "redundancy_scale": 2.5}  # fmt: skip


@pytest.fixture(scope="module")
def lib():
    if plugin_lib.find_nvcc() is None or plugin_lib.find_cmake() is None:
        pytest.skip("nvcc and cmake are needed to build the TokenMerge kernel library (see docs/tensorrt-plugin.md)")
    return cuda_kernels.load_library()


def _as_dict(attrs: cuda_kernels.Attributes) -> dict:
    return {name: getattr(attrs, name) for name, _ in cuda_kernels.Attributes._fields_}


def _poisoned() -> cuda_kernels.Attributes:
    """Attributes with -9 in every field, to see which ones the library wrote."""
    return cuda_kernels.Attributes(*[-9] * len(cuda_kernels.Attributes._fields_))


def test_ctypes_struct_mirrors_the_attributes():
    """cuda_kernels.Attributes (atm_token_merge_attributes) has one field per attribute, in order."""
    assert [name for name, _ in cuda_kernels.Attributes._fields_] == list(contract.Attributes().__dict__)


def _parse(lib, values: dict) -> tuple[int, dict]:
    """Parse {name: value} as the ONNX parser passes it (float FLOAT32, int INT32, str CHAR)."""
    keep, fields = [], []
    for name, value in values.items():
        if isinstance(value, str):
            buf, kind, length = ctypes.create_string_buffer(value.encode()), CHAR, len(value) + 1
        elif isinstance(value, float):
            buf, kind, length = ctypes.c_float(value), FLOAT32, 1
        else:
            buf, kind, length = ctypes.c_int32(value), INT32, 1
        keep.append(buf)
        fields.append(cuda_kernels.PluginField(name.encode(), ctypes.addressof(buf), kind, length))
    array = (cuda_kernels.PluginField * max(1, len(fields)))(*fields)
    out = _poisoned()
    status = lib.atm_token_merge_parse_attributes(array, len(fields), ctypes.byref(out))
    return status, _as_dict(out)


def test_library_defaults_equal_the_contract(lib):
    out = _poisoned()
    lib.atm_token_merge_default_attributes(ctypes.byref(out))
    expected = {k: v for k, v in contract.DEFAULTS.items() if k not in contract.LOOKUP_KEYS}
    assert _as_dict(out) == expected
    assert _parse(lib, {}) == (OK, expected), "no fields: the defaults"


def test_library_accepts_every_contract_attribute_at_its_default(lib):
    status, parsed = _parse(lib, dict(contract.DEFAULTS))
    assert status == OK, lib.atm_token_merge_last_error().decode()
    assert parsed == contract.Attributes().__dict__


@pytest.mark.parametrize("name", sorted(set(contract.DEFAULTS) - set(contract.LOOKUP_KEYS)))
def test_library_reads_each_contract_attribute_into_its_field(lib, name):
    assert set(OTHER_VALUES) == set(contract.DEFAULTS) - set(contract.LOOKUP_KEYS)
    status, parsed = _parse(lib, {name: OTHER_VALUES[name]})
    assert status == OK, lib.atm_token_merge_last_error().decode()
    assert parsed == contract.Attributes(**{name: OTHER_VALUES[name]}).__dict__


@pytest.mark.parametrize("name", ["fixed_rr", "Threshold", "r", "split", "plugin_name", "domain"])
def test_library_rejects_names_outside_the_contract(lib, name):
    assert name not in contract.DEFAULTS
    status, parsed = _parse(lib, {name: 1})
    message = lib.atm_token_merge_last_error().decode()
    assert status == INVALID and f"unknown attribute {name}" in message
    assert all(attr in message for attr in OTHER_VALUES), f"the message lists the contract's attributes: {message}"
    assert parsed == _as_dict(_poisoned()), "nothing written"


# ---- (c) contract.py's own rules -------------------------------------------------------------


def test_attributes_default_to_the_defaults_without_lookup_keys():
    expected = {k: v for k, v in contract.DEFAULTS.items() if k not in contract.LOOKUP_KEYS}
    assert contract.Attributes().__dict__ == expected
    assert set(contract.LOOKUP_KEYS) == {"plugin_version", "plugin_namespace"}
    assert contract.DEFAULTS["plugin_version"] == contract.PLUGIN_VERSION == str(contract.VERSION)
    assert contract.DEFAULTS["plugin_namespace"] == contract.PLUGIN_NAMESPACE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split_mode": 2}, "split_mode"),
        ({"num_protected": -1}, "num_protected"),
        ({"opt_num_tokens": -2}, "opt_num_tokens"),
        ({"max_num_tokens": -2}, "max_num_tokens"),
        ({"threshold": math.nan, "fixed_r": -1}, "NaN"),
        ({"weighting": 2}, "weighting"),
        ({"weighting": 1, "salience_temperature": 0.0}, "salience_temperature"),
        ({"r_max": -2}, "r_max"),
        ({"r_max": 4, "redundancy_std": 0.0}, "redundancy_std"),
    ],
)
def test_invalid_attributes_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        contract.Attributes(**kwargs)


#: The contract's invalid AdaMerge values, as plugin fields, and the library's reason.
INVALID_ADAMERGE = [
    ({"weighting": 2}, "weighting must be"),
    ({"weighting": 1, "salience_temperature": 0.0}, "salience_temperature must be > 0"),
    ({"r_max": -2}, "r_max must be >= -1"),
    ({"r_max": 4, "redundancy_std": 0.0}, "redundancy_std must be > 0"),
]


@pytest.mark.parametrize(("values", "message"), INVALID_ADAMERGE)
def test_library_rejects_what_the_contract_rejects(lib, values, message):
    with pytest.raises(ValueError):
        contract.Attributes(**values)
    status, parsed = _parse(lib, values)
    assert status == INVALID and message in lib.atm_token_merge_last_error().decode()
    assert parsed == _as_dict(_poisoned()), "nothing written"


def test_nan_threshold_is_fine_with_a_fixed_r():
    attrs = contract.Attributes(threshold=math.nan, fixed_r=3)
    assert attrs.fixed_r == 3 and math.isnan(attrs.threshold)


def test_node_names_round_trip():
    assert contract.node_name(7) == "TokenMerge_b7"
    assert contract.node_block(contract.node_name(7)) == 7
    assert contract.node_block(contract.node_name(12)) == 12
    assert contract.node_block("TokenMerge_b7/Add_3") is None
    assert contract.node_block("blocks.7/TokenMerge_b7") is None
    assert contract.node_block("TokenMerge_b") is None


def test_attributes_for_a_step():
    attrs = contract.Attributes.for_step(StepSpec("size", threshold=0.9), num_protected=2)
    assert (attrs.split_mode, attrs.fixed_r, attrs.threshold, attrs.num_protected) == (1, -1, 0.9, 2)
    assert attrs.opt_num_tokens == -1 and attrs.split == "size"
    assert attrs.max_num_tokens == -1
    fixed = contract.Attributes.for_step(StepSpec("alternate", r=8), num_protected=1, opt_num_tokens=100,
                                         max_num_tokens=197)
    assert (fixed.split_mode, fixed.fixed_r, fixed.threshold, fixed.opt_num_tokens) == (0, 8, 1.0, 100)
    assert fixed.max_num_tokens == 197
    assert fixed.merge_kwargs() == {"threshold": None, "r": 8, "intensity": None, "weighting": "size",
                                    "salience_temperature": 1.0, "split_mode": "alternate", "num_protected": 1}


def test_weighting_codes_name_the_merge_weightings():
    assert set(contract.WEIGHTING_CODES) == set(merge.WEIGHTINGS)
    assert sorted(contract.WEIGHTING_CODES.values()) == list(range(len(merge.WEIGHTINGS)))
    assert contract.WEIGHTING_NAMES == {code: name for name, code in contract.WEIGHTING_CODES.items()}


def test_split_codes_name_the_merge_split_modes():
    assert set(contract.SPLIT_CODES) == set(merge.SPLIT_MODES)
    assert sorted(contract.SPLIT_CODES.values()) == list(range(len(merge.SPLIT_MODES))), "codes 0, 1, ..."
    assert contract.SPLIT_NAMES == {code: name for name, code in contract.SPLIT_CODES.items()}


def test_attributes_from_node_values_take_each_attribute_type():
    """ONNX gives ints as int and floats as float; from_values also converts numpy-like values."""
    values = {**contract.DEFAULTS, "threshold": 1, "fixed_r": 4.0, "max_num_tokens": 197, "opt_num_tokens": 150}
    attrs = contract.Attributes.from_values(values)
    assert attrs == contract.Attributes(threshold=1.0, fixed_r=4, opt_num_tokens=150, max_num_tokens=197)
    assert type(attrs.threshold) is float and type(attrs.fixed_r) is int and type(attrs.max_num_tokens) is int
    assert contract.Attributes.from_values({}) == contract.Attributes()
