"""Every Triton kernel of the package compiled for the GPUs it runs on, on a machine without one: what the
interpreter runs in CI (tests/test_*.py) is the kernels' semantics; this is what it cannot see, that Triton lowers
them for the real target (sm90: PDL, TMA boxes, 16-bit tensor-core dots; sm80: none of those) and that every
tile fits the SM's shared memory. It goes through each kernel's own launcher, with meta tensors of the real
shapes (so the arguments specialise as on the device), a driver that names the target, and launches turned into
compiles: every tuned tile config in fused_experts_configs.json, the heuristic's tiles, the grouping kernels,
route's launch configs, topk_pack and expert_sort. On a CUDA machine the GPU tests compile and run them
instead."""

from __future__ import annotations

import contextlib

import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from inductor_moe.kernels.triton import expert_sort, launch, route, topk_pack
from inductor_moe.kernels.triton import fused_experts as fe

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a CUDA machine the GPU tests compile and run these kernels"
)

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): H100 227 KiB, A100 163 KiB.
SHARED_BYTES = {90: 232448, 80: 166912}
META = torch.device("meta")


class _Target:
    """A Triton driver that only names its target: enough for JITFunction.run to specialise and compile."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # a device per target: each JITFunction caches its binder by device

    def get_current_stream(self, device=None):
        return 0


class Compiled(list):
    """(kernel name, compiled kernel) of every launch, for target ``arch``."""

    def __init__(self, arch: int):
        super().__init__()
        self.arch = arch


@pytest.fixture(params=[90, 80], ids=lambda arch: f"sm{arch}")
def compiled(request, monkeypatch):
    """The list every launch appends (kernel name, compiled kernel) to, compiling for sm90 or sm80."""
    arch = request.param
    compiled, touched = Compiled(arch), set()
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        touched.add(self)
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    def descriptor(t, block, real=fe._descriptor):  # TMA from sm90, as on the device
        return real(t, block) if arch >= 90 else None

    monkeypatch.setattr(JITFunction, "run", compile_only)
    monkeypatch.setattr(launch, "on", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(launch, "pdl", lambda device: arch >= 90)
    monkeypatch.setattr(fe, "_ieee", lambda t: t.dtype == torch.float32)  # not the interpreter's workaround
    monkeypatch.setattr(fe, "_descriptor", descriptor)
    active = driver._active
    driver.set_active(_Target(arch))
    try:
        yield compiled
    finally:
        driver._active = active
        for fn in touched:
            fn.device_caches.pop(arch, None)


def assert_fits(compiled, count: int) -> None:
    assert len(compiled) == count, [name for name, _ in compiled]
    for name, kernel in compiled:
        assert kernel.metadata.target.arch == compiled.arch
        assert kernel.asm.get("cubin"), name
        assert kernel.metadata.shared <= SHARED_BYTES[compiled.arch], (name, kernel.metadata.shared)


def _tuned_points() -> list[tuple[str, str]]:
    tables = fe._tuned()
    return sorted({(shape, bucket) for table in tables.values() for shape in table for bucket in table[shape]})


def _shape(key: str) -> tuple[int, int, int, int]:
    fields = dict(part.split("=") for part in key.split(","))
    return int(fields["E"]), int(fields["I"]), int(fields["H"]), int(fields["K"])


def _launch_gemms(config: fe.Config, tokens: int, experts: int, inter: int, hidden: int, top_k: int, dtype):
    """Both GEMM launchers over meta tensors in transformers' layouts (w13 [E, 2I, H], w2 [E, H, I]), on sorted
    rows or, for the pair-order paths, in pair order (with the combine in the down GEMM for "pairs_combine",
    renormalising bf16 weights)."""
    pairs = tokens * top_k
    w13 = torch.empty(experts, 2 * inter, hidden, dtype=dtype, device=META)
    w2 = torch.empty(experts, hidden, inter, dtype=dtype, device=META)
    x = torch.empty(tokens, hidden, dtype=dtype, device=META)
    order, offs, by_pair, combine = None, None, None, None
    if config.by_pair:
        by_pair = (torch.empty(pairs, dtype=torch.int64, device=META), 0)
    else:
        order = torch.empty(pairs, dtype=torch.int32, device=META)
        offs = torch.empty(experts, dtype=torch.int32, device=META)
    if config.path == "pairs_combine":
        weights = torch.empty(tokens, top_k, dtype=torch.bfloat16, device=META)
        counts = fe.combine_counts(tokens, hidden, config.down, META)
        combine = fe.Combine(weights, counts, torch.empty_like(x), True, False)
    if config.path == "decode":
        weights = torch.empty(tokens, top_k, dtype=torch.bfloat16, device=META)
        ids, out = by_pair[0], torch.empty_like(x)
        fe.decode(x, w13[:, :inter], w13[:, inter:], w2, ids, 0, weights, out, "silu", config, True, False)
        return
    a = torch.empty(pairs, inter, dtype=dtype, device=META)
    fe.up(x, w13[:, :inter], w13[:, inter:], order, offs, a, "silu", top_k, config.up, by_pair, combine and counts)
    fe.down(a, w2, offs, torch.empty(pairs, hidden, dtype=dtype, device=META), config.down, by_pair, combine)


@pytest.mark.parametrize("shape, bucket", _tuned_points())
def test_tuned_tiles(compiled, shape, bucket):
    """Every tile the shipped tables hold (all tuned on sm90; an sm80 device would take them only through the
    heuristic, so sm80 compiles them without TMA)."""
    experts, inter, hidden, top_k = _shape(shape)
    entries = [table[shape][bucket] for table in fe._tuned().values() if bucket in table.get(shape, {})]
    for entry in entries:
        config = fe.Config(fe.Tile(**entry["up"]), fe.Tile(**entry["down"]))
        _launch_gemms(config, int(bucket), experts, inter, hidden, top_k, torch.bfloat16)
    assert_fits(compiled, 2 * len(entries))
    tma = [bool(entry[gemm].get("tma")) and compiled.arch >= 90 for entry in entries for gemm in ("up", "down")]
    assert [_reads_tma(kernel) for _, kernel in compiled] == tma


def _reads_tma(kernel) -> bool:
    return any(str(kind).startswith("tensordesc") for kind in kernel.src.signature.values())


def test_an_oversized_tile_is_caught(compiled):
    """The bound above is a real one: 128 x 256 tiles of 128-deep k steps in 4 stages need more than either SM
    has, which the launch on the device would refuse."""
    big = fe.Tile(128, 256, 128, 8, 8, 4)
    _launch_gemms(fe.Config(big, big), 4096, 8, 4096, 4096, 2, torch.bfloat16)
    assert min(kernel.metadata.shared for _, kernel in compiled) > SHARED_BYTES[compiled.arch]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_heuristic_tiles(compiled, dtype):
    """The heuristic's three tile sizes (decode, tens of rows an expert, hundreds), 16-bit dots and fp32's IEEE
    ones, on a shape no table holds whose dims are not multiples of the tiles."""
    configs = {fe.heuristic_config(tokens, 64, 4, dtype): tokens for tokens in (1, 512, 8192)}
    assert len(configs) == 3
    for config, tokens in configs.items():
        _launch_gemms(config, tokens, 64, 1000, 1500, 4, dtype)
    assert_fits(compiled, 6)


@pytest.mark.parametrize("path", ["pairs", "pairs_combine", "decode"])
def test_pairs_path(compiled, path):
    """The GEMMs on rows in pair order (decode), with the Qwen3 shape's decode tiles, pointers and TMA boxes
    (the "decode" path: its one GEMM kernel, then its combine)."""
    for tma in (False, True):
        tile = fe.Tile(16, 64, 128, 1, 4, 4, tma=tma)
        _launch_gemms(fe.Config(tile, tile, path), 1, 128, 768, 2048, 8, torch.bfloat16)
    assert_fits(compiled, 4)
    if path == "decode":
        names = [name for name, _ in compiled]
        assert names == ["fused_decode_kernel", "decode_combine_kernel"] * 2, names
        assert [_reads_tma(kernel) for _, kernel in compiled[::2]] == [False, compiled.arch >= 90]
        return
    assert [_reads_tma(kernel) for _, kernel in compiled] == [False, False] + [compiled.arch >= 90] * 2
    if path == "pairs_combine":
        for name, kernel in compiled:
            if name == "fused_down_kernel":
                _assert_arrival_orders_rows(kernel.asm["ptx"])


def test_decode_path(compiled):
    """The decode kernel at the points its tuning tries, its programs reading every pair's id: Qwen3's shape at
    T=1 and at T=16 with 16 experts local, Mixtral's at T=16; its deepest tiles, TMA boxes from sm90."""
    tiles = (fe.Tile(16, 32, 256, 1, 4, 3, tma=True), fe.Tile(16, 64, 128, 1, 4, 4, tma=True))
    for tokens, experts, inter, hidden, top_k in (
        (1, 128, 768, 2048, 8),
        (16, 16, 768, 2048, 8),
        (16, 8, 14336, 4096, 2),
    ):
        for tile in tiles:
            _launch_gemms(
                fe.Config(tile, fe.Tile(16, 128, 64), "decode"), tokens, experts, inter, hidden, top_k, torch.bfloat16
            )
    assert_fits(compiled, 12)
    assert all(
        _reads_tma(kernel) == (compiled.arch >= 90) for name, kernel in compiled if name == "fused_decode_kernel"
    )


def _assert_arrival_orders_rows(ptx: str) -> None:
    """The combining down GEMM's memory order: its rows stored, a barrier, one acq_rel arrival at GPU scope, a
    barrier (its result through shared memory), then the other programs' rows read from L2."""
    lines = [line.strip() for line in ptx.splitlines()]
    arrivals = [i for i, line in enumerate(lines) if line.startswith("@") and "atom.global.gpu.acq_rel.add" in line]
    assert len(arrivals) == 1, arrivals
    (arrival,) = arrivals
    before, after = lines[:arrival], lines[arrival + 1 :]
    last_store = max(i for i, line in enumerate(before) if "st.global" in line)
    assert any(line.startswith("bar.sync") for line in before[last_store:])
    first_row = next(i for i, line in enumerate(after) if "ld.global.cg" in line)
    assert any(line.startswith("bar.sync") for line in after[:first_row])


def test_grouping(compiled):
    """The counting kernels at the most experts, int64 and int32 ids."""
    for ids_dtype, experts in ((torch.int64, fe.MAX_EXPERTS), (torch.int32, 8)):
        ids = torch.empty(4096, 8, dtype=ids_dtype, device=META)
        order, src_rows = (torch.empty(ids.numel(), dtype=torch.int32, device=META) for _ in range(2))
        offs = torch.empty(experts, dtype=torch.int32, device=META)
        assert fe.group_fits(ids.numel(), experts)
        fe.group(ids, ids.stride(), 0, experts, order, offs, src_rows)
    assert_fits(compiled, 4)


# (experts, top_k, n_group, topk_group, tokens): Qwen3-MoE, Mixtral, DeepSeek-V3, E not a power of two, one group
# of several chosen, the limits
ROUTERS = [
    (128, 8, 1, 1, 1),
    (8, 2, 1, 1, 4096),
    (256, 8, 8, 4, 16),
    (60, 3, 4, 2, 37),
    (96, 6, 4, 1, 11),
    (512, 16, 1, 1, 256),
]


@pytest.mark.parametrize("router", ROUTERS, ids=str)
def test_route(compiled, router):
    """route's kernel at its launch configs: softmax from bf16 logits, sigmoid with a bias from fp32 ones."""
    experts, top_k, n_group, topk_group, tokens = router
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=META)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=META)
    for dtype, scoring, bias in ((torch.bfloat16, "softmax", None), (torch.float32, "sigmoid", experts)):
        logits = torch.empty(tokens, experts, dtype=dtype, device=META)
        bias = None if bias is None else torch.empty(bias, dtype=torch.float32, device=META)
        groups = (n_group, topk_group) if scoring == "sigmoid" else (1, 1)
        route.route(logits, bias, weights, ids, scoring, True, *groups, 1e-20, 2.5)
    assert_fits(compiled, 2)


def test_topk_pack_and_expert_sort(compiled):
    ids = torch.empty(37, 8, dtype=torch.int64, device=META)
    weights = torch.empty(37, 8, dtype=torch.bfloat16, device=META)
    topk_pack.topk_pack(
        ids, weights, ids.stride(), weights.stride(), torch.empty(37, 8, dtype=torch.int32, device=META)
    )
    order, src_rows = (torch.empty(ids.numel(), dtype=torch.int64, device=META) for _ in range(2))
    expert_sort.expert_sort(
        ids, ids.stride(), 0, 128, order, torch.empty(128, dtype=torch.int32, device=META), src_rows
    )
    assert_fits(compiled, 2)
