"""atm_export.plugin_lib: locating, configuring and building the TokenMerge native libraries."""

from __future__ import annotations

from pathlib import Path

import pytest

from atm_export import plugin_lib
from atm_export.errors import UserError


def test_sources_are_found_in_the_checkout():
    source = plugin_lib.plugin_source_dir()
    assert (source / "CMakeLists.txt").is_file()
    assert (source / "tokenMergePlugin" / "tokenMergeKernel.cu").is_file()


def test_missing_sources_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(plugin_lib, "__file__", str(tmp_path / "site-packages" / "atm_export" / "plugin_lib.py"))
    with pytest.raises(plugin_lib.PluginBuildError, match="pip install -e"):
        plugin_lib.plugin_source_dir()


def test_build_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(plugin_lib.ENV_BUILD_DIR, str(tmp_path / "b"))
    assert plugin_lib.default_build_dir() == tmp_path / "b"
    monkeypatch.delenv(plugin_lib.ENV_BUILD_DIR)
    assert plugin_lib.default_build_dir() == plugin_lib.plugin_source_dir() / "build"


@pytest.mark.parametrize(("cmake", "nvcc", "expected"), [(None, "/x/nvcc", "cmake"), ("/x/cmake", None, "nvcc")])
def test_missing_tools_name_what_to_install(monkeypatch, cmake, nvcc, expected):
    monkeypatch.setattr(plugin_lib, "find_cmake", lambda: cmake)
    monkeypatch.setattr(plugin_lib, "find_nvcc", lambda: nvcc)
    with pytest.raises(plugin_lib.PluginBuildError, match=expected) as info:
        plugin_lib.build()
    assert isinstance(info.value, UserError), "the CLI prints it as a one-line user error"


def test_nvcc_found_through_cuda_home(monkeypatch, tmp_path):
    fake = tmp_path / "cuda" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.delenv("CUDACXX", raising=False)
    monkeypatch.setattr(plugin_lib.shutil, "which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert plugin_lib.find_nvcc() == str(fake)


def test_configure_arguments_carry_tensorrt_locations(monkeypatch, tmp_path):
    monkeypatch.setenv(plugin_lib.ENV_TENSORRT_ROOT, "/opt/TensorRT-10.8")
    monkeypatch.setenv(plugin_lib.ENV_CUDA_ARCHS, "90")
    monkeypatch.delenv(plugin_lib.ENV_TRT_INCLUDE, raising=False)
    args = plugin_lib._configure_args(Path("/src"), tmp_path, "/usr/bin/nvcc", None, None, "/hdr", None)
    assert "-DTENSORRT_ROOT=/opt/TensorRT-10.8" in args
    assert "-DATM_TRT_INCLUDE_DIR=/hdr" in args
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in args
    assert "-DCMAKE_CUDA_COMPILER=/usr/bin/nvcc" in args


@pytest.fixture(scope="module")
def built():
    if plugin_lib.find_nvcc() is None or plugin_lib.find_cmake() is None:
        pytest.skip("nvcc and cmake are needed to build the TokenMerge libraries (see docs/tensorrt-plugin.md)")
    return plugin_lib.build(targets=(plugin_lib.KERNELS,))


def test_build_produces_the_kernel_library(built):
    assert built.kernels.is_file()
    assert built.kernels == plugin_lib.kernels_library(rebuild=False)


def test_plugin_library_without_tensorrt_names_the_fix(built, monkeypatch):
    """Without TensorRT the plugin cannot be built; the error says which variables to set."""
    for env in (plugin_lib.ENV_TENSORRT_ROOT, plugin_lib.ENV_TRT_INCLUDE, plugin_lib.ENV_TRT_LIB):
        monkeypatch.delenv(env, raising=False)
    result = plugin_lib.build()
    if result.plugin is not None:
        pytest.skip(f"TensorRT was found ({result.plugin}); this checks the message for when it is not")
    with pytest.raises(plugin_lib.PluginBuildError, match="TENSORRT_ROOT"):
        plugin_lib.plugin_library()
    assert plugin_lib.find_plugin_library() is None


def test_find_plugin_library_looks_without_building(tmp_path, monkeypatch):
    assert plugin_lib.find_plugin_library(tmp_path) is None
    (tmp_path / "libatm_token_merge_plugin_dynamic.so").write_bytes(b"")
    assert plugin_lib.find_plugin_library(tmp_path, dynamic=True) == tmp_path / "libatm_token_merge_plugin_dynamic.so"
    assert plugin_lib.find_plugin_library(tmp_path) is None
    monkeypatch.setattr(plugin_lib, "__file__", str(tmp_path / "site-packages" / "atm_export" / "plugin_lib.py"))
    monkeypatch.delenv(plugin_lib.ENV_BUILD_DIR, raising=False)
    assert plugin_lib.find_plugin_library() is None, "outside a checkout: nothing, and no exception"


def test_pip_tensorrt_libnvinfer_is_used_when_nothing_is_set(monkeypatch, tmp_path):
    import importlib.util
    import types

    (tmp_path / "libnvinfer.so.10").write_bytes(b"")
    fake = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: fake if name == "tensorrt_libs" else real_find_spec(name))
    for env in (plugin_lib.ENV_TENSORRT_ROOT, plugin_lib.ENV_TRT_LIB):
        monkeypatch.delenv(env, raising=False)
    args = plugin_lib._configure_args(Path("/src"), tmp_path, "/usr/bin/nvcc", None, None, None, None)
    assert f"-DTENSORRT_LIB_DIR={tmp_path}" in args
    monkeypatch.setenv(plugin_lib.ENV_TENSORRT_ROOT, "/opt/trt")
    args = plugin_lib._configure_args(Path("/src"), tmp_path, "/usr/bin/nvcc", None, None, None, None)
    assert not any(a.startswith("-DTENSORRT_LIB_DIR") for a in args), "an explicit TensorRT install wins"


def test_the_default_build_runs_on_every_common_gpu(built, monkeypatch):
    """SASS for 7.5 (T4), 8.0 (A100), 8.6 (A10, RTX 30), 8.9 (L4, RTX 40), 9.0 (H100), and PTX
    for newer GPUs: read from the library the build wrote (CMakeLists.txt's default)."""
    import os

    if os.environ.get(plugin_lib.ENV_CUDA_ARCHS):
        pytest.skip(f"${plugin_lib.ENV_CUDA_ARCHS} chooses other architectures")
    assert plugin_lib.embedded_architectures(built.kernels) == {"sass": [75, 80, 86, 89, 90], "ptx": [90]}


def test_a_library_without_cuda_code_embeds_nothing():
    import sys

    assert plugin_lib.embedded_architectures(sys.executable) == {"sass": [], "ptx": []}
