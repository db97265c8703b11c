"""JIT compilation of the CUDA kernels, with an on-disk cache.

Two artefacts, both built on first use and cached under ``config.cache_dir()``:

* the **host glue** (``csrc/*.cpp``): the CUDA implementations of the ops, registered with the dispatcher
  from C++ and launching through the driver API. Built once per torch/compiler with g++ (its files in
  parallel) and loaded with ``ctypes``.
* the **kernel variants** (``csrc/<family>.cu``): compiled by NVRTC, one per (family, compile-time switches,
  arch). The host glue asks for a variant the first time it launches it on a device, through the callback
  registered here.

Why this split (H100 VM): ``load_inline`` with ``torch/extension.h`` builds in 64 s cold and a .cu+.cpp nvcc
build in 27 s, while this glue builds in 6.8 s cold and an NVRTC variant in 14-66 ms (0.05 s warm); a C++ op
costs ~7.5 us of host time a call against ~52 us for a Python custom op launching through cuda-bindings.

Cache keys hash every source file, the compile options, the target arch and the toolchain version; files are
written under a unique temporary name and renamed into place, so processes compiling the same entry at once
each produce a complete file and the last rename wins.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from .. import config
from . import families

log = logging.getLogger("inductor_moe.jit")

CSRC = Path(__file__).parent / "csrc"

# Files every kernel family includes; a family's own source is csrc/<family>.cu plus its params header.
_COMMON_HEADERS = ("common.cuh",)


def _family_sources(family: str) -> list[Path]:
    return [CSRC / f"{family}.cu", CSRC / f"{family}_params.h"] + [CSRC / h for h in _COMMON_HEADERS]


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:24]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------
# NVRTC


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise RuntimeError(
            "inductor_moe compiles its CUDA kernels with NVRTC through cuda-bindings, which is not installed: "
            "pip install cuda-bindings nvidia-cuda-nvrtc (CUDA builds of torch usually bring both)"
        ) from e
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # cuda-bindings raises its own loader errors when libnvrtc is missing
        raise RuntimeError(
            f"inductor_moe could not load NVRTC ({e}); pip install nvidia-cuda-nvrtc matching your CUDA major version"
        ) from e
    _nvrtc_check(nvrtc, err, "nvrtcVersion")
    return nvrtc, (major, minor)


def _nvrtc_check(nvrtc, err, what: str, prog=None) -> None:
    if err == nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return
    detail = "" if prog is None else "\n" + _program_log(nvrtc, prog)
    raise RuntimeError(f"inductor_moe: {what} failed: {err.name}{detail}")


def supported_archs() -> list[int]:
    """Real architectures (e.g. 90 for sm_90) this NVRTC can emit machine code for."""
    nvrtc, _ = _nvrtc()
    err, archs = nvrtc.nvrtcGetSupportedArchs()
    _nvrtc_check(nvrtc, err, "nvrtcGetSupportedArchs")
    return list(archs)


def target_for(major: int, minor: int) -> str:
    """NVRTC target for a device: its own sm_XY when NVRTC knows it (a cubin), else PTX for the newest
    compute_XY it knows, which the driver compiles for the device at load."""
    cc = major * 10 + minor
    archs = supported_archs()
    if cc in archs:
        return f"sm_{cc}"
    older = [a for a in archs if a <= cc]
    if not older:
        raise RuntimeError(f"inductor_moe: NVRTC cannot target sm_{cc} (supports {archs})")
    return f"compute_{max(older)}"


def _variant_options(defines: dict[str, int], arch: str) -> list[str]:
    options = ["-std=c++17", f"-arch={arch}", f"-I{CSRC}", "-lineinfo"]
    return options + [f"-D{k}={v}" for k, v in sorted(defines.items())]


def _nvrtc_program(nvrtc, family: str, options: list[str]):
    """Compile csrc/<family>.cu with ``options``; the caller destroys the returned program."""
    source = CSRC / f"{family}.cu"
    err, prog = nvrtc.nvrtcCreateProgram(source.read_bytes(), source.name.encode(), 0, [], [])
    _nvrtc_check(nvrtc, err, "nvrtcCreateProgram")
    opts = [o.encode() for o in options]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    try:
        what = " ".join(o for o in options if not o.startswith("-I"))
        _nvrtc_check(nvrtc, err, f"compiling {family} with {what}", prog)
    except RuntimeError:
        nvrtc.nvrtcDestroyProgram(prog)
        raise
    return prog


def _program_log(nvrtc, prog) -> str:
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.rstrip(b"\0 ").decode(errors="replace")


def resource_usage(family: str, defines: dict[str, int], arch: str) -> str:
    """ptxas's report for one variant (registers, stack, spills), for tests and tuning; not cached."""
    nvrtc, _ = _nvrtc()
    prog = _nvrtc_program(nvrtc, family, _variant_options(defines, arch) + ["-Xptxas=-v"])
    try:
        return _program_log(nvrtc, prog)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_variant(family: str, defines: dict[str, int], arch: str) -> Path:
    """Compile one variant of ``csrc/<family>.cu`` for ``arch`` (``sm_90``, ``sm_90a``, ``compute_100``, ...)
    and return the path of the cached cubin (or PTX for a ``compute_`` target)."""
    nvrtc, version = _nvrtc()
    sources = _family_sources(family)
    options = _variant_options(defines, arch)
    # The -I path is left out of the key: the same sources installed elsewhere reuse the cache.
    key = _digest(
        *(p.read_bytes() for p in sources), *(o for o in options if not o.startswith("-I")), f"nvrtc{version}"
    )
    suffix = "ptx" if arch.startswith("compute_") else "cubin"
    path = config.cache_dir() / "kernels" / f"{family}-{arch}-{key}.{suffix}"
    if path.exists():
        return path

    start = time.perf_counter()
    prog = _nvrtc_program(nvrtc, family, options)
    try:
        get_size, get = (
            (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX)
            if suffix == "ptx"
            else (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN)
        )
        err, size = get_size(prog)
        _nvrtc_check(nvrtc, err, "reading the compiled kernel")
        image = b" " * size
        (err,) = get(prog, image)
        _nvrtc_check(nvrtc, err, "reading the compiled kernel")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    _atomic_write(path, image)
    log.info("compiled %s %s for %s in %.2f s -> %s", family, defines, arch, time.perf_counter() - start, path)
    return path


# --------------------------------------------------------------------------------------------------------
# Host glue


def cuda_include_dir() -> Path:
    """Directory holding cuda.h, the only CUDA header the host glue needs (the nvidia-cuda-runtime wheel
    ships it; else a toolkit's)."""
    candidates = []
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            candidates.append(Path(found))
    except ImportError:
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for c in candidates:
        if (c / "cuda.h").exists():
            return c
    raise RuntimeError(
        "inductor_moe needs the CUDA header cuda.h to build its host glue and found it in none of "
        f"{[str(c) for c in candidates]}; pip install nvidia-cuda-runtime or set CUDA_HOME"
    )


def _host_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def _host_flags() -> list[str]:
    torch_dir = Path(torch.__file__).parent
    return [
        "-std=c++20",  # what torch's own extension builds use since 2.10
        "-O2",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}",
        f"-I{cuda_include_dir()}",
        f"-I{CSRC}",
    ]


def build_host_library() -> Path:
    """Build (or find in the cache) the host glue shared library and return its path.

    Each csrc/*.cpp compiles in its own g++ process, all at once: registration.cpp alone (torch/library.h)
    takes ~6 s and bounds the build; the files in sequence took 14.7 s cold on the device VM."""
    cxx = config.cxx()
    flags = _host_flags()
    sources = _host_sources()
    headers = sorted(CSRC.glob("*.h"))
    generated = families.header()
    compiler = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    key = _digest(*(p.read_bytes() for p in sources + headers), generated, *flags, compiler, torch.__version__)
    path = config.cache_dir() / "host" / key / "libinductor_moe_host.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        (Path(tmp) / "families.h").write_text(generated)
        objects = [Path(tmp) / (src.stem + ".o") for src in sources]
        procs = [
            (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for cmd in ([cxx, *flags, f"-I{tmp}", "-c", str(src), "-o", str(obj)] for src, obj in zip(sources, objects))
        ]
        torch_lib = Path(torch.__file__).parent / "lib"
        link = [
            cxx,
            "-shared",
            *map(str, objects),
            "-o",
            str(Path(tmp) / path.name),
            f"-L{torch_lib}",
            "-lc10",
            "-ltorch_cpu",
            f"-Wl,-rpath,{torch_lib}",
        ]
        for cmd, proc in procs + [(link, None)]:
            proc = proc or subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output = proc.communicate()[0]
            if proc.returncode != 0:
                raise RuntimeError(f"inductor_moe: building the CUDA host glue failed:\n$ {' '.join(cmd)}\n{output}")
        os.replace(Path(tmp) / path.name, path)
    log.info("built host glue in %.1f s -> %s", time.perf_counter() - start, path)
    return path


_COMPILE_FN = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
)


@_COMPILE_FN
def _compile_callback(family, defines, major, minor, out, cap):
    """Called from launcher.cpp (ctypes takes the GIL) the first time a variant runs on a device."""
    try:
        parsed = dict(item.split("=") for item in defines.decode().split(";"))
        path = compile_variant(family.decode(), {k: int(v) for k, v in parsed.items()}, target_for(major, minor))
        message, rc = str(path).encode(), 0
    except Exception as e:  # the error crosses into C++, which raises it as a RuntimeError with this text
        message, rc = f"{type(e).__name__}: {e}".encode(), 1
    message = message[: cap - 1] + b"\0"
    ctypes.memmove(out, message, len(message))
    return rc


_host_lock = threading.Lock()
_host_library: ctypes.CDLL | None = None


def load_host_library(before_register=None) -> ctypes.CDLL:
    """Build and load the host glue once per process; loading registers the CUDA kernels of the ops.

    ``before_register`` runs after a successful build and before the library's registrations take effect
    (ops.py uses it to remove its first-call trampolines)."""
    global _host_library
    with _host_lock:
        if _host_library is None:
            path = build_host_library()
            if before_register is not None:
                before_register()
            lib = ctypes.CDLL(str(path))
            lib.inductor_moe_set_compiler(_compile_callback)
            _host_library = lib
        return _host_library
