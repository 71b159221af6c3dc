"""The TensorRT adapter compiled against real TensorRT headers, and driven on the CPU.

Opt-in: TensorRT headers are not in CI. Set ATM_TEST_TRT_INCLUDE_DIRS to one directory with
NvInferRuntime.h, or several separated by ':' (e.g. the include/ of TensorRT 10.8 and 11.1), and
this builds, per directory and with warnings as errors: the adapter, the dynamic plugin library
(which needs no libnvinfer), the registration unit (compiled only), and the CPU harness
plugins/tests/tokenMergePluginHarness.cpp, which it then runs. See docs/tensorrt-plugin.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from atm_export import plugin_lib

ENV_HEADER_DIRS = "ATM_TEST_TRT_INCLUDE_DIRS"
HEADER_DIRS = [d for d in os.environ.get(ENV_HEADER_DIRS, "").split(os.pathsep) if d]

pytestmark = pytest.mark.skipif(
    not HEADER_DIRS,
    reason=f"TensorRT headers not available: set {ENV_HEADER_DIRS}=/path/to/TensorRT/include[:...] to "
    "compile-check the plugin adapter",
)


@pytest.fixture(scope="module", params=HEADER_DIRS or [None])
def adapter_build(request, tmp_path_factory):
    include = Path(request.param)
    if not (include / "NvInferRuntime.h").is_file():
        pytest.fail(f"{include} has no NvInferRuntime.h ({ENV_HEADER_DIRS})")
    if plugin_lib.find_nvcc() is None or plugin_lib.find_cmake() is None:
        pytest.skip("nvcc and cmake are needed to build the TokenMerge libraries")
    cmake = plugin_lib.find_cmake()
    build_dir = tmp_path_factory.mktemp("trt-adapter")
    configure = [
        cmake, "-S", str(plugin_lib.plugin_source_dir()), "-B", str(build_dir),
        f"-DCMAKE_CUDA_COMPILER={plugin_lib.find_nvcc()}", f"-DATM_TRT_INCLUDE_DIR={include}",
        "-DATM_WERROR=ON", "-DCMAKE_CUDA_ARCHITECTURES=80",
    ]  # fmt: skip
    for cmd in (configure, [cmake, "--build", str(build_dir), "-j", "2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return build_dir


def test_harness_passes(adapter_build):
    proc = subprocess.run([str(adapter_build / "atm_token_merge_plugin_harness")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 check(s) failed" in proc.stdout


def test_dynamic_library_exports_only_the_loader_entry_points(adapter_build):
    library = adapter_build / "libatm_token_merge_plugin_dynamic.so"
    assert library.is_file()
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is needed to list the exported symbols")
    out = subprocess.run([nm, "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True).stdout
    exported = sorted(line.split()[-1] for line in out.splitlines() if line.split()[1:2] == ["T"])
    assert exported == ["getCreators", "setLoggerFinder"]
    needed = subprocess.run(["ldd", str(library)], capture_output=True, text=True).stdout
    assert "libnvinfer" not in needed, "the dynamic plugin library must not need libnvinfer"


def test_registration_unit_compiles(adapter_build):
    objects = list(adapter_build.rglob("tokenMergePluginRegistration.cpp.o"))
    assert objects, "the self-registration unit was compiled"
