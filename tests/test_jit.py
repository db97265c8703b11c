"""The JIT: every kernel variant compiles for sm_80, sm_90a and sm_100a (NVRTC, no GPU needed), the disk
cache, concurrent compiles, and clear errors when a toolchain piece is missing."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from inductor_moe import config
from inductor_moe.kernels import jit

ELF_MAGIC = b"\x7fELF"


def _element_size(dtype: int) -> int:
    """Bytes of an element of dtype code ``dtype`` (0 fp32, 1 fp16, 2 bf16: csrc/host_common.h dtype_code)."""
    return 4 if dtype == 0 else 2


def _widths(dtype: int, two: bool = False) -> tuple[int, ...]:
    """Access widths in elements the host asks for: one element, 4, and 8 (16 bytes) for half types; 2 where
    ``two`` (the unfiltered activation of small inputs, the combine's staged pairs)."""
    return tuple(w for w in (1, 2, 4, 8) if (w != 2 or two) and w * _element_size(dtype) <= 16)


# Every act_and_mul variant csrc/act_and_mul.cpp can ask for: dtype code (fp32, fp16, bf16) x activation x filter
# (none, int32 ids, int64 ids) x access width; and the ids reached through an index (int32, int64), whose code
# path does not depend on the activation, with one activation.
ACT_AND_MUL_VARIANTS = [
    dict(IM_DTYPE=dtype, IM_ACT=act, IM_FILTER=filt, IM_INDEX=0, IM_VEC=vec)
    for dtype, act, filt in itertools.product(range(3), range(3), range(3))
    for vec in _widths(dtype, two=filt == 0)
] + [
    dict(IM_DTYPE=dtype, IM_ACT=0, IM_FILTER=filt, IM_INDEX=index, IM_VEC=vec)
    for dtype, filt, index in itertools.product(range(3), (1, 2), (1, 2))
    for vec in _widths(dtype)
]


# Every combine variant csrc/combine.cpp can ask for: output dtype x weight dtype x filter (none, int32,
# int64 ids) x row source (token-major, int32, int64 src_rows) x access width; and renormalised weights and
# dead pairs weighing zero rows (filtered only), whose code paths depend on the weights' dtype and the filter,
# over fp32 and bf16.
COMBINE_VARIANTS = [
    dict(IM_DTYPE=dtype, IM_WDTYPE=wdtype, IM_FILTER=filt, IM_ROWS=rows, IM_RENORM=0, IM_ZERO_DEAD=0, IM_VEC=vec)
    for dtype, wdtype, filt, rows in itertools.product(range(3), range(3), range(3), range(3))
    for vec in _widths(dtype, two=bool(filt or rows))
] + [
    dict(
        IM_DTYPE=dtype, IM_WDTYPE=wdtype, IM_FILTER=filt, IM_ROWS=rows, IM_RENORM=renorm, IM_ZERO_DEAD=zero, IM_VEC=vec
    )
    for dtype, wdtype, filt, rows in itertools.product((0, 2), (0, 2), (0, 1), (0, 1))
    for renorm, zero in ((1, 0), (0, 1), (1, 1))
    if filt or not zero
    for vec in _widths(dtype, two=bool(filt or rows))
]

VARIANTS = {"act_and_mul": ACT_AND_MUL_VARIANTS, "combine": COMBINE_VARIANTS}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INDUCTOR_MOE_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("family", list(VARIANTS))
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a", "sm_100a"])
def test_every_variant_compiles(cache, family, arch):
    # NVRTC lets go of the GIL for part of a compile: two threads on CI's two cores take ~0.7 of the time
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        paths = set(pool.map(lambda v: jit.compile_variant(family, v, arch), VARIANTS[family]))
    assert len(paths) == len(VARIANTS[family])  # one cache entry per variant
    for p in paths:
        assert p.read_bytes()[:4] == ELF_MAGIC


@pytest.mark.parametrize("family", list(VARIANTS))
def test_pdl_instructions_only_on_sm90_and_later(cache, family):
    # griddepcontrol is sm90+: the same source must build for sm_80 without it, and keep it for sm_90.
    variant = next(v for v in reversed(VARIANTS[family]) if v["IM_VEC"] * _element_size(v["IM_DTYPE"]) == 16)
    ptx80 = jit.compile_variant(family, variant, "compute_80").read_text()
    ptx90 = jit.compile_variant(family, variant, "compute_90").read_text()
    assert "griddepcontrol" not in ptx80
    assert "griddepcontrol.wait" in ptx90 and "griddepcontrol.launch_dependents" in ptx90
    # the wait comes before the first global load (the expert id included)
    assert ptx90.index("griddepcontrol.wait") < ptx90.index("ld.global")
    # 16-byte accesses in the wide variant
    assert "ld.global.v4.u32" in ptx90 or "ld.global.v4.b32" in ptx90


def _sass(cubin: Path) -> list[str]:
    """The instructions of a cubin, disassembled by the cuobjdump that Triton's package carries."""
    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip(f"no cuobjdump at {tool}")
    text = subprocess.run([str(tool), "--dump-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    return re.findall(r"/\*[0-9a-f]{4}\*/\s+([^;]*);", text)


_FLOAT_MATH = re.compile(r"(@!?P\d+\s+)?(FFMA|FMUL|FADD|FSETP|MUFU)\b")


@pytest.mark.parametrize("variant", [v for v in ACT_AND_MUL_VARIANTS if v["IM_VEC"] > 1], ids=str)
def test_act_and_mul_loads_gate_and_up_back_to_back(variant):
    # A pack's gate and up loads are issued together, before any math: one memory latency a pack, not two.
    # ptxas delayed the up load past the gate's activation (to save registers under the 32-register cap)
    # in every bf16 variant until tie() in csrc/common.cuh. The loop's two loads are the last loads of the
    # access width in the kernel (an expert id of the same width, and a first pack read ahead of the id, are
    # loaded before them).
    lines = _sass(jit.compile_variant("act_and_mul", variant, "sm_90a"))
    width = _element_size(variant["IM_DTYPE"]) * variant["IM_VEC"]
    load = {4: "LDG.E ", 8: "LDG.E.64 ", 16: "LDG.E.128 "}[width]
    gate, up = [i for i, line in enumerate(lines) if line.startswith(load)][-2:]
    between = [line for line in lines[gate + 1 : up] if _FLOAT_MATH.match(line)]
    assert not between, (variant, lines[gate : up + 1])


_RENORM_TOKEN_MAJOR_8_BYTE = [
    v
    for v in COMBINE_VARIANTS
    if v["IM_RENORM"] and not v["IM_FILTER"] and not v["IM_ROWS"] and v["IM_DTYPE"] != 0 and v["IM_VEC"] == 4
]


@pytest.mark.parametrize("variant", _RENORM_TOKEN_MAJOR_8_BYTE, ids=str)
def test_combine_issues_its_row_loads_before_renormalising(variant):
    # The unstaged combine with renormalised weights issues all eight rows' loads before the first division
    # (MUFU.RCP starts the IEEE sequence). With the divisions first, each one's slow-path branch stood between
    # two row loads and waited for its weight, so a T=1 launch paid a memory latency a pair (K=8: 3.08 us, 1.95
    # with the loads first, H200).
    lines = _sass(jit.compile_variant("combine", variant, "sm_90a"))
    rows = [i for i, line in enumerate(lines) if re.match(r"(@!?P\d+\s+)?LDG\.E\.64 ", line)]
    divisions = [i for i, line in enumerate(lines) if re.match(r"(@!?P\d+\s+)?MUFU\.RCP\b", line)]
    assert len(rows) >= 8 and divisions, (variant, lines)
    assert max(rows[:8]) < min(divisions), (variant, lines)


# The staged variants of bf16 rows and fp32 weights, as the runner and the lowerings call them (every variant
# passes; this subset keeps CI's disassembly time at ~15 s of the ~140 s that all 262 take)
_STAGED = [
    v
    for v in COMBINE_VARIANTS
    if (v["IM_FILTER"] or v["IM_ROWS"]) and v["IM_DTYPE"] == 2 and v["IM_WDTYPE"] == 0 and v["IM_VEC"] > 1
]


@pytest.mark.parametrize("variant", _STAGED, ids=str)
def test_staged_combine_reads_its_pairs_before_the_row_loads(variant):
    # Past the barrier, a thread issues the row loads of a group of eight pairs without a branch between them:
    # their rows are read from shared memory first (ptxas may interleave those reads with the loads, which then
    # wait a shared-memory latency, not a global one). Read inside each pair's branch, every row load waited for
    # its own shared-memory read, one branch a pair (H200, K=8, H=7168 bf16 with half the pairs dead: T=8192
    # 184 us, 179 with the reads first).
    lines = _sass(jit.compile_variant("combine", variant, "sm_90a"))
    barrier = next(i for i, line in enumerate(lines) if line.startswith("BAR.SYNC"))
    after = lines[barrier + 1 :]
    rows = [i for i, line in enumerate(after) if re.match(r"(@!?P\d+\s+)?LDG\b", line)]
    first_read = next(i for i, line in enumerate(after) if re.match(r"(@!?P\d+\s+)?LDS\b", line))
    assert len(rows) >= 8 and first_read < rows[0], (variant, after)
    assert not [line for line in after[first_read : rows[7]] if re.match(r"(@!?P\d+\s+)?BRA\b", line)], (
        variant,
        after,
    )


def _sm90_register_cap(variant) -> int:
    # csrc/act_and_mul_params.h: __launch_bounds__(256, 8), a full SM of threads, except unfiltered silu's 6
    # blocks; more registers would cut occupancy (gelu at 42 ran 8% slower than Inductor at 8192x2048 on H100)
    blocks = 6 if variant["IM_ACT"] == 0 and variant["IM_FILTER"] == 0 else 8
    return 65536 // (blocks * 256) // 8 * 8


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
def test_no_act_and_mul_variant_spills_or_exceeds_its_register_cap(arch):
    # Everywhere: a spill would add local-memory traffic to a memory-bound kernel.
    for variant in ACT_AND_MUL_VARIANTS:
        report = jit.resource_usage("act_and_mul", variant, arch)
        registers = int(re.search(r"Used (\d+) registers", report).group(1))
        assert registers <= (_sm90_register_cap(variant) if arch == "sm_90a" else 255), (variant, report)
        assert "0 bytes spill stores, 0 bytes spill loads" in report, (variant, report)


def test_cache_hit_does_not_recompile(cache, monkeypatch):
    variant = ACT_AND_MUL_VARIANTS[0]
    first = jit.compile_variant("act_and_mul", variant, "sm_90a")
    stamp = first.stat().st_mtime_ns
    nvrtc, version = jit._nvrtc()

    class NoCompile:
        def __getattr__(self, name):
            if name == "nvrtcCompileProgram":
                raise AssertionError("cache miss: NVRTC compiled again")
            return getattr(nvrtc, name)

    monkeypatch.setattr(jit, "_nvrtc", lambda: (NoCompile(), version))
    assert jit.compile_variant("act_and_mul", variant, "sm_90a") == first
    assert first.stat().st_mtime_ns == stamp


def test_cache_key_separates_arch_and_defines(cache):
    a = jit.compile_variant("act_and_mul", ACT_AND_MUL_VARIANTS[0], "sm_90a")
    b = jit.compile_variant("act_and_mul", ACT_AND_MUL_VARIANTS[0], "sm_80")
    c = jit.compile_variant("act_and_mul", ACT_AND_MUL_VARIANTS[1], "sm_90a")
    assert len({a, b, c}) == 3


def test_concurrent_processes_share_the_cache(cache):
    script = textwrap.dedent(
        """
        from inductor_moe.kernels import jit
        variant = dict(IM_DTYPE=2, IM_ACT=1, IM_FILTER=1, IM_INDEX=0, IM_VEC=8)
        print(jit.compile_variant("act_and_mul", variant, "sm_90a"))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    files = list((cache / "kernels").iterdir())
    assert [f.name for f in files] == [Path(outs[0]).name]  # no temporaries left behind
    assert files[0].read_bytes()[:4] == ELF_MAGIC


def test_target_for_known_and_future_arch():
    archs = jit.supported_archs()
    assert 80 in archs and 90 in archs
    assert jit.target_for(9, 0) == "sm_90"
    # a device newer than this NVRTC: PTX for the newest arch it knows, JIT-compiled by the driver
    assert jit.target_for(99, 9) == f"compute_{max(archs)}"
    with pytest.raises(RuntimeError, match="cannot target"):
        jit.target_for(1, 0)


def test_compile_error_is_reported_with_log(cache):
    with pytest.raises(
        RuntimeError, match=r"(?s)compiling act_and_mul with .*-arch=sm_90a.*identifier \"IM_ACT\" is undefined"
    ):
        jit.compile_variant("act_and_mul", dict(IM_DTYPE=2, IM_FILTER=0, IM_INDEX=0, IM_VEC=8), "sm_90a")


def test_missing_nvrtc_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", None)
    with pytest.raises(RuntimeError, match="pip install cuda-bindings nvidia-cuda-nvrtc"):
        jit.compile_variant("act_and_mul", ACT_AND_MUL_VARIANTS[0], "sm_90a")


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("INDUCTOR_MOE_CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="'no-such-compiler-xyz' was not found"):
        config.cxx()
    with pytest.raises(RuntimeError, match="'no-such-compiler-xyz' was not found"):
        jit.build_host_library()


def test_host_glue_builds_and_registers_the_cuda_kernels(cache):
    """The host glue needs only device-generic torch headers and cuda.h, so it builds and loads against a CPU-only
    torch too: loading replaces the first-call trampolines with the C++ kernels in the CUDA slots."""
    script = textwrap.dedent(
        """
        import torch
        from inductor_moe import ops
        dump = lambda name: [l for l in torch._C._dispatch_dump(name).splitlines() if l.startswith("CUDA:")][0]
        print(dump("inductor_moe::act_and_mul"))
        ops.load_cuda_kernels()
        ops.load_cuda_kernels()  # idempotent
        print(dump("inductor_moe::act_and_mul"))
        print(dump("inductor_moe::act_and_mul_out"))
        print(dump("inductor_moe::moe_combine"))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before, *after = result.stdout.splitlines()
    assert "ops/library.py" in before and "[ boxed ]" in before  # the Python trampoline
    assert len(after) == 3
    for line in after:
        assert "registration.cpp" in line and "unboxed" in line, line
    assert len(list((cache / "host").glob("*/libinductor_moe_host.so"))) == 1
