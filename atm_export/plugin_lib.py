"""Build and locate the TokenMerge native libraries (plugins/, docs/tensorrt-plugin.md).

The sources live in the repository checkout under ``plugins/``; they are built with CMake into
``plugins/build`` (or ``$ATM_PLUGIN_BUILD_DIR``):

- ``libatm_token_merge_kernels.so``: the CUDA kernels, their CPU executor and the plugin's host
  logic (needs nvcc and cmake, not TensorRT); used by ``atm_export.cuda_kernels``.
- ``libatm_token_merge_plugin.so``: the TensorRT plugin, registering itself when loaded
  (``trtexec --staticPlugins``, ``polygraphy --plugins``, ``atm_export.backends.tensorrt.load_plugin``).
- ``libatm_token_merge_plugin_dynamic.so``: the same plugin with ``getCreators`` /
  ``setLoggerFinder`` entry points (``trtexec --dynamicPlugins``, ``IPluginRegistry.load_library``).

The plugin libraries need the TensorRT headers and ``libnvinfer``: point ``TENSORRT_ROOT`` (an
install with ``include/`` and ``lib/``) at them, or ``ATM_TRT_INCLUDE_DIR`` plus
``TENSORRT_LIB_DIR``. Without those, the libnvinfer of an installed pip TensorRT wheel is used
(the wheel has no headers: ``ATM_TRT_INCLUDE_DIR`` is still needed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

KERNELS = "atm_token_merge_kernels"
PLUGIN = "atm_token_merge_plugin"
PLUGIN_DYNAMIC = "atm_token_merge_plugin_dynamic"

#: Environment variables read here (all optional).
ENV_BUILD_DIR = "ATM_PLUGIN_BUILD_DIR"
ENV_CUDA_ARCHS = "ATM_CUDA_ARCHITECTURES"
ENV_TENSORRT_ROOT = "TENSORRT_ROOT"
ENV_TRT_INCLUDE = "ATM_TRT_INCLUDE_DIR"
ENV_TRT_LIB = "TENSORRT_LIB_DIR"


class PluginBuildError(UserError):
    """The native libraries cannot be built or found; the message says what to install or set."""


@dataclass(frozen=True)
class BuildResult:
    build_dir: Path
    kernels: Path
    plugin: Path | None  # None: TensorRT (headers and libnvinfer) not found
    plugin_dynamic: Path | None  # None: TensorRT headers not found
    log: str


def plugin_source_dir() -> Path:
    """``plugins/`` of the repository checkout this package runs from."""
    root = Path(__file__).resolve().parent.parent / "plugins"
    if not (root / "CMakeLists.txt").is_file():
        raise PluginBuildError(
            f"the TokenMerge plugin sources are not next to this package (looked for {root}/CMakeLists.txt); "
            "they ship with the git checkout only: clone the repository and `pip install -e .` it"
        )
    return root


def default_build_dir() -> Path:
    env = os.environ.get(ENV_BUILD_DIR)
    return Path(env) if env else plugin_source_dir() / "build"


def find_nvcc() -> str | None:
    """nvcc from $CUDACXX, $PATH, $CUDA_HOME/bin or /usr/local/cuda/bin."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def find_cmake() -> str | None:
    return shutil.which("cmake")


def check_build_tools() -> tuple[str, str]:
    """(cmake, nvcc) paths, or a PluginBuildError naming what to install."""
    cmake, nvcc = find_cmake(), find_nvcc()
    missing = []
    if cmake is None:
        missing.append("cmake >= 3.18 (e.g. `pip install cmake` or your package manager)")
    if nvcc is None:
        missing.append(
            "nvcc, the CUDA toolkit compiler (install the CUDA toolkit, then put its bin/ on PATH or set CUDA_HOME)"
        )
    if missing:
        raise PluginBuildError("cannot build the TokenMerge libraries: missing " + "; ".join(missing))
    return cmake, nvcc


def library_path(build_dir: Path, target: str) -> Path:
    return Path(build_dir) / f"lib{target}.so"


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Serialise builds of one build directory across processes (tests, CLI, benchmarks)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".atm-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pip_tensorrt_lib_dir() -> str | None:
    """Directory of libnvinfer from the pip TensorRT wheel (tensorrt_libs and its CUDA-suffixed
    variants), so that the plugin links the libnvinfer the Python bindings load. No headers there."""
    import importlib.util

    for name in ("tensorrt_libs", "tensorrt_cu13_libs", "tensorrt_cu12_libs"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                if any(Path(location).glob("libnvinfer.so*")):
                    return location
    return None


def _configure_args(
    source: Path,
    build_dir: Path,
    nvcc: str,
    cuda_architectures: str | None,
    tensorrt_root: str | None,
    trt_include_dir: str | None,
    trt_lib_dir: str | None,
) -> list[str]:
    args = ["-S", str(source), "-B", str(build_dir), f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_BUILD_TYPE=Release"]
    archs = cuda_architectures or os.environ.get(ENV_CUDA_ARCHS)
    if archs:
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
    for name, value, env in (
        ("TENSORRT_ROOT", tensorrt_root, ENV_TENSORRT_ROOT),
        ("ATM_TRT_INCLUDE_DIR", trt_include_dir, ENV_TRT_INCLUDE),
        ("TENSORRT_LIB_DIR", trt_lib_dir, ENV_TRT_LIB),
    ):
        value = value or os.environ.get(env)
        if name == "TENSORRT_LIB_DIR" and not value and not (tensorrt_root or os.environ.get(ENV_TENSORRT_ROOT)):
            value = pip_tensorrt_lib_dir()
        if value:
            args.append(f"-D{name}={value}")
    return args


def _run(cmd: list[str], log: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.append("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise PluginBuildError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")


def build(
    build_dir: str | Path | None = None,
    *,
    targets: tuple[str, ...] | None = None,
    cuda_architectures: str | None = None,
    tensorrt_root: str | None = None,
    trt_include_dir: str | None = None,
    trt_lib_dir: str | None = None,
    jobs: int | None = None,
) -> BuildResult:
    """Configure and build the native libraries (incremental: quick when up to date).

    targets: CMake targets to build (default: everything TensorRT allows, see the module doc);
    ``(KERNELS,)`` builds only the kernel library. cuda_architectures: e.g. "90" (default
    $ATM_CUDA_ARCHITECTURES, else plugins/CMakeLists.txt's default "75-real;80-real;86-real;89-real;90").
    """
    cmake, nvcc = check_build_tools()
    source = plugin_source_dir()
    build_dir = Path(build_dir) if build_dir is not None else default_build_dir()
    log: list[str] = []
    with _build_lock(build_dir):
        _run(
            [
                cmake,
                *_configure_args(
                    source, build_dir, nvcc, cuda_architectures, tensorrt_root, trt_include_dir, trt_lib_dir
                ),
            ],
            log,
        )
        cmd = [cmake, "--build", str(build_dir), "-j", str(jobs or max(1, min(4, os.cpu_count() or 1)))]
        for target in targets or ():
            cmd += ["--target", target]
        _run(cmd, log)
    plugin = library_path(build_dir, PLUGIN)
    dynamic = library_path(build_dir, PLUGIN_DYNAMIC)
    return BuildResult(
        build_dir=build_dir,
        kernels=library_path(build_dir, KERNELS),
        plugin=plugin if plugin.is_file() else None,
        plugin_dynamic=dynamic if dynamic.is_file() else None,
        log="\n".join(log),
    )


def kernels_library(build_dir: str | Path | None = None, *, rebuild: bool = True) -> Path:
    """Path of libatm_token_merge_kernels.so, building it first (incrementally) unless rebuild=False."""
    build_dir = Path(build_dir) if build_dir is not None else default_build_dir()
    path = library_path(build_dir, KERNELS)
    if rebuild or not path.is_file():
        build(build_dir, targets=(KERNELS,))
    return path


def find_plugin_library(build_dir: str | Path | None = None, *, dynamic: bool = False) -> Path | None:
    """The plugin library if it has been built (no build, no error), else None.

    Looks in ``build_dir`` (default: $ATM_PLUGIN_BUILD_DIR or plugins/build of the checkout).
    """
    try:
        build_dir = Path(build_dir) if build_dir is not None else default_build_dir()
    except PluginBuildError:  # not a checkout and no $ATM_PLUGIN_BUILD_DIR
        return None
    path = library_path(build_dir, PLUGIN_DYNAMIC if dynamic else PLUGIN)
    return path if path.is_file() else None


def plugin_library(
    build_dir: str | Path | None = None,
    *,
    dynamic: bool = False,
    rebuild: bool = True,
    tensorrt_root: str | None = None,
) -> Path:
    """Path of the TensorRT plugin library, building it first unless rebuild=False.

    dynamic=False: libatm_token_merge_plugin.so (self-registering; --staticPlugins, polygraphy
    --plugins, backends.tensorrt.load_plugin). dynamic=True: libatm_token_merge_plugin_dynamic.so (getCreators entry
    point; --dynamicPlugins, IPluginRegistry.load_library).
    """
    build_dir = Path(build_dir) if build_dir is not None else default_build_dir()
    target = PLUGIN_DYNAMIC if dynamic else PLUGIN
    path = library_path(build_dir, target)
    if rebuild or not path.is_file():
        result = build(build_dir, tensorrt_root=tensorrt_root)
        built = result.plugin_dynamic if dynamic else result.plugin
        if built is None:
            raise PluginBuildError(missing_tensorrt_message(dynamic))
    return path


def missing_tensorrt_message(dynamic: bool) -> str:
    needs = "the TensorRT headers (NvInferRuntime.h)" if dynamic else "both the TensorRT headers and libnvinfer.so"
    return (
        f"cannot build the TokenMerge TensorRT plugin: it needs {needs}, which CMake did not find. "
        f"Set {ENV_TENSORRT_ROOT}=/path/to/TensorRT (with include/ and lib/), or {ENV_TRT_INCLUDE}=<dir with "
        f"NvInferRuntime.h> and {ENV_TRT_LIB}=<dir with libnvinfer.so*>, then build again "
        "(TensorRT: https://developer.nvidia.com/tensorrt; the pip wheel has no headers)"
    )



# ---------------------------------------------------------------------------------------------
# What a built library holds for which GPUs (no cuobjdump needed).

FATBIN_MAGIC = 0xBA55ED50
_FATBIN_PTX, _FATBIN_ELF = 1, 2


def embedded_architectures(library: str | Path) -> dict[str, list[int]]:
    """The compute capabilities (e.g. 75 for 7.5) a shared library embeds code for:
    ``{"sass": [...], "ptx": [...]}``, read from its ``.nv_fatbin`` ELF section.

    A GPU runs the library if its capability has SASS, or is newer than a PTX entry (the driver
    compiles PTX at load time); otherwise CUDA fails with "no kernel image".
    """
    import struct

    data = Path(library).read_bytes()
    found: dict[str, set[int]] = {"sass": set(), "ptx": set()}
    for offset, size in _elf_sections(data, ".nv_fatbin"):
        pos, end = offset, offset + size
        while pos + 16 <= end:
            magic, _, header, length = struct.unpack_from("<IHHQ", data, pos)
            if magic != FATBIN_MAGIC:
                break
            entry, stop = pos + header, pos + header + length
            while entry < stop:
                kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, entry)
                arch = struct.unpack_from("<I", data, entry + 28)[0]
                if kind in (_FATBIN_PTX, _FATBIN_ELF):
                    found["ptx" if kind == _FATBIN_PTX else "sass"].add(arch)
                entry += entry_header + entry_size
            pos = stop
    return {kind: sorted(archs) for kind, archs in found.items()}


def _elf_sections(data: bytes, name: str) -> list[tuple[int, int]]:
    """(file offset, size) of every section called ``name`` in a 64-bit little-endian ELF file."""
    import struct

    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]

    def section_name(index: int) -> str:
        start = names_offset + index
        return data[start:data.index(b"\0", start)].decode()

    return [(h[4], h[5]) for h in headers if section_name(h[0]) == name]
