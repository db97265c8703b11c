"""fused_experts: the reference against an independent float64 loop; the op against the reference on every
device (every weight layout, dtype, activation and filter convention, odd sizes, all pairs dead, none dead);
the Triton kernels under TRITON_INTERPRET=1 on the CPU (a child process) and on the GPU into poisoned outputs,
with every tile config the table and the heuristic give; the runner on top of the op. Bad inputs, opcheck,
compiles and CUDA graphs: tests/contracts.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import inductor_moe as im
from inductor_moe import reference
from inductor_moe.kernels.triton import fused_experts as kernel
from inductor_moe.ops.fused_experts import group

from helpers import DEVICES, interpreter_results

LAYOUTS = ["w13", "w13 transposed", "w13 + w3", "w2 transposed"]
FILTERS = ["-1 dead", "id >= E sentinel", "local range", "all dead", "none dead"]
# one rounding of the activation and one of each pair's row, both to the input dtype, on top of summation orders
# that differ from torch's matmul: a few ulps of the output's magnitude
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def layer(tokens, hidden, inter, experts, top_k, dtype, device, layout="w13", filt="-1 dead", seed=0):
    """(hidden, w13, w2, weights, ids, expert_range, w3): random weights in the given layout, ids by filter."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    x = rand(tokens, hidden)
    w13 = rand(experts, 2 * inter, hidden, scale=hidden**-0.5)
    w2 = rand(experts, hidden, inter, scale=inter**-0.5)
    w3 = None
    if layout == "w13 transposed":  # stored [E, H, 2I], passed as a view
        w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "w13 + w3":
        w13, w3 = w13[:, :inter].contiguous(), w13[:, inter:].contiguous()
    elif layout == "w2 transposed":
        w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
    lo = 3 if filt == "local range" else 0
    span = experts + 6 if filt in ("id >= E sentinel", "local range") else experts
    weights, ids = torch.topk(torch.randn(tokens, max(span, top_k), generator=gen).softmax(-1), top_k)
    if filt == "-1 dead":
        ids = torch.where(torch.rand(tokens, top_k, generator=gen) < 0.3, -1, ids)
    elif filt == "all dead":
        ids = torch.full_like(ids, -1)
    elif filt == "none dead":
        ids = ids % experts
    return x, w13, w2, weights.to(device), ids.to(device), (lo, lo + experts), w3


def loop64(x, w13, w2, weights, ids, expert_range, w3, activation):
    """The definition, one pair at a time, in float64."""
    lo, hi = expert_range
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not lo <= e < hi:
                continue
            gate = w13[e - lo, :inter] if w3 is None else w13[e - lo]
            up = w13[e - lo, inter:] if w3 is None else w3[e - lo]
            xt = x[t].double()
            h = reference.activation_ref(gate.double() @ xt, activation) * (up.double() @ xt)
            out[t] += float(weights[t, j]) * (w2[e - lo].double() @ h)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("filt", FILTERS)
@pytest.mark.parametrize("activation", list(reference.ACTIVATIONS))
def test_reference_against_loop(layout, filt, activation):
    x, w13, w2, w, ids, rng, w3 = layer(9, 24, 10, 5, 3, torch.float32, "cpu", layout, filt)
    ref = reference.fused_experts_ref(x, w13, w2, w, ids, activation, rng[0], False, w3)
    torch.testing.assert_close(ref.double(), loop64(x, w13, w2, w, ids, rng, w3, activation), rtol=1e-5, atol=1e-6)
    if filt == "all dead":
        assert not ref.any()


def test_reference_renormalizes_over_every_pair():
    x, w13, w2, w, ids, rng, w3 = layer(6, 16, 8, 4, 2, torch.float32, "cpu", filt="-1 dead")
    got = reference.fused_experts_ref(x, w13, w2, w, ids, "silu", 0, True)
    want = reference.fused_experts_ref(x, w13, w2, w / w.sum(-1, keepdim=True), ids, "silu", 0, False)
    torch.testing.assert_close(got, want)


def assert_close_to_reference(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any()
    scale = max(ref.abs().max().item(), 1e-3) if ref.numel() else 1.0
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("filt", FILTERS)
@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k", [(1, 64, 32, 8, 2), (37, 100, 52, 9, 4)])
def test_op_matches_reference(device, dtype, layout, filt, tokens, hidden, inter, experts, top_k):
    x, w13, w2, w, ids, rng, w3 = layer(tokens, hidden, inter, experts, top_k, dtype, device, layout, filt)
    for activation in reference.ACTIVATIONS:
        out = im.fused_experts(x, w13, w2, w, ids, activation, rng, False, w3)
        ref = reference.fused_experts_ref(x, w13, w2, w, ids, activation, rng[0], False, w3)
        assert_close_to_reference(out, ref, dtype)
        if filt == "all dead":
            assert not out.any()


@pytest.mark.parametrize("device", DEVICES)
def test_zero_dead_rows_propagates_non_finite_dead_weights(device):
    # a dead pair adds w * 0: nothing for a finite weight, NaN for a NaN or infinite one (what zeroing the dead
    # rows, then weighting them computes); live pairs as without the flag
    x, w13, w2, w, ids, rng, _ = layer(6, 64, 32, 8, 3, torch.bfloat16, device, filt="id >= E sentinel")
    dead = (ids < rng[0]) | (ids >= rng[1])
    assert dead.any() and (~dead).any()
    plain = im.fused_experts(x, w13, w2, w, ids, "silu", rng)
    assert torch.equal(im.fused_experts(x, w13, w2, w, ids, "silu", rng, zero_dead_rows=True), plain)
    w = w.clone()
    t, j = [int(i) for i in dead.nonzero()[0]]
    w[t, j] = float("inf")
    out = im.fused_experts(x, w13, w2, w, ids, "silu", rng, zero_dead_rows=True)
    assert out[t].isnan().all()
    others = torch.arange(6, device=device) != t
    assert torch.equal(out[others], plain[others])
    assert torch.equal(im.fused_experts(x, w13, w2, w, ids, "silu", rng)[others], plain[others])
    assert not im.fused_experts(x, w13, w2, w, ids, "silu", rng)[t].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [0, 1, 7, 37, 300])
@pytest.mark.parametrize("renormalize", [False, True])
def test_sizes_and_renormalize(device, tokens, renormalize):
    x, w13, w2, w, ids, rng, _ = layer(tokens, 72, 40, 16, 6, torch.bfloat16, device, filt="local range", seed=tokens)
    out = im.fused_experts(x, w13, w2, w, ids, "silu", rng, renormalize)
    ref = reference.fused_experts_ref(x, w13, w2, w, ids, "silu", rng[0], renormalize)
    assert out.shape == (tokens, 72)
    assert_close_to_reference(out, ref, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_many_experts_and_top_k(device):
    # E = 512 and K = 16, the op's limits; H and I odd
    x, w13, w2, w, ids, rng, _ = layer(33, 33, 17, 512, 16, torch.bfloat16, device, filt="none dead")
    out = im.fused_experts(x, w13, w2, w, ids, "gelu", rng)
    assert_close_to_reference(out, reference.fused_experts_ref(x, w13, w2, w, ids, "gelu"), torch.bfloat16)


def test_expert_range_must_span_the_experts():
    x, w13, w2, w, ids, _, _ = layer(4, 16, 8, 4, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"expert_range \(0, 8\) must span w13's 4 experts"):
        im.fused_experts(x, w13, w2, w, ids, expert_range=(0, 8))


# ------------------------------------------------------------------------------------------------------------
# The kernels themselves: every config, outputs poisoned, dead rows never written


def configs():
    """(dtype, tile) for every distinct tile the op can take: the shipped tables' and the heuristic's in bf16,
    each with and without TMA boxes, and the heuristic's fp32 tiles (the tables serve 16-bit inputs only: fp32's
    tiles are twice the bytes, past the shared memory of the widest)."""
    tiles = set()
    for tokens in (1, 256, 4096):
        c = kernel.heuristic_config(tokens, 8, 2, torch.bfloat16)
        tiles |= {c.up, c.down}
    for shapes in kernel._tuned().values():
        for buckets in shapes.values():
            for c in buckets.values():
                tiles |= {kernel.Tile(**c["up"]), kernel.Tile(**c["down"])}
    tiles |= {dataclasses.replace(t, tma=not t.tma) for t in tiles}  # each with and without TMA boxes
    fp32 = set()
    for tokens in (1, 256, 4096):
        c = kernel.heuristic_config(tokens, 8, 2, torch.float32)
        fp32 |= {c.up, c.down}
    return [(torch.bfloat16, t) for t in sorted(tiles, key=dataclasses.astuple)] + [
        (torch.float32, t) for t in sorted(fp32, key=dataclasses.astuple)
    ]


def run_poisoned(x, w13, w2, ids, rng, w3, activation, tile):
    """up and down into NaN-filled buffers: (a, y, order, live sorted rows), grouped as the op groups them."""
    top_k = ids.shape[1]
    gate, up = w13.chunk(2, dim=1) if w3 is None else (w13, w3)
    order, offs, _ = group(ids, rng[0], rng[1] - rng[0])
    n = ids.numel()
    a = torch.full((n, gate.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
    y = torch.full((n, x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
    kernel.up(x, gate, up, order, offs, a, activation, top_k, tile)
    kernel.down(a, w2, offs, y, tile)
    return a, y, order, int(offs[-1])


def check_poisoned(x, w13, w2, ids, rng, w3, activation, tile, dtype):
    a, y, order, live = run_poisoned(x, w13, w2, ids, rng, w3, activation, tile)
    assert not a[:live].isnan().any() and not y[:live].isnan().any(), "a live row was not written"
    assert a[live:].isnan().all() and y[live:].isnan().all(), "a dead row was written"
    inter = w2.shape[2]
    pairs = order[:live].long()
    experts_of = ids.reshape(-1)[pairs].long() - rng[0]
    xs = x[pairs // ids.shape[1]].float()
    gate = (w13[:, :inter] if w3 is None else w13)[experts_of].float()
    up = (w13[:, inter:] if w3 is None else w3)[experts_of].float()
    want_a = (
        reference.activation_ref(torch.einsum("rh,rih->ri", xs, gate), activation) * torch.einsum("rh,rih->ri", xs, up)
    ).to(dtype)
    assert_close_to_reference(a[:live], want_a, dtype)
    want_y = torch.einsum("ri,rhi->rh", a[:live].float(), w2[experts_of].float()).to(dtype)
    assert_close_to_reference(y[:live], want_y, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype, tile",
    configs(),
    ids=lambda c: "x".join(map(str, dataclasses.astuple(c))) if isinstance(c, kernel.Tile) else str(c),
)
def test_every_config_writes_live_rows_only(dtype, tile):
    # 300 tokens x 4 of 12 local experts: several row blocks an expert, partial last blocks, dead rows sorted last
    x, w13, w2, _, ids, rng, w3 = layer(300, 200, 88, 12, 4, dtype, "cuda", "w13 + w3", "local range")
    check_poisoned(x, w13, w2, ids, rng, w3, "silu", tile, dtype)


def check_group(ids, rng):
    """The op's grouping of ``ids``: a permutation putting each local expert's pairs together in expert order
    and the dead ones last, ``offs`` the experts' end rows, ``src_rows`` its inverse."""
    order, offs, src_rows = group(ids, rng[0], rng[1] - rng[0])
    flat = ids.reshape(-1).long().cpu()
    n, experts = flat.numel(), rng[1] - rng[0]
    order, offs, src_rows = order.long().cpu(), offs.long().cpu(), src_rows.long().cpu()
    assert torch.equal(order.sort().values, torch.arange(n)), "order is not a permutation"
    assert torch.equal(src_rows[order], torch.arange(n)), "src_rows is not order's inverse"
    local = flat - rng[0]
    groups = torch.where((local >= 0) & (local < experts), local, experts)
    assert torch.equal(offs, torch.bincount(groups, minlength=experts + 1)[:experts].cumsum(0))
    assert bool((groups[order].diff() >= 0).all()), "a group's rows are not together, in expert order"


GROUP_CASES = [  # (tokens, k, experts, expert_range, ids dtype, ids transposed): both grouping kernels
    (1, 8, 128, (0, 128), torch.int64, False),
    (37, 8, 128, (0, 16), torch.int32, False),
    (300, 8, 128, (0, 128), torch.int64, True),
    (700, 2, 16, (5, 9), torch.int32, True),
    (1500, 4, 4, (0, 4), torch.int64, False),
    (3000, 8, 128, (0, 16), torch.int32, False),  # 12 blocks of pairs, most of them dead
    (40000, 8, 512, (0, 512), torch.int64, False),  # more than the counting kernels hold: expert_sort's
]


def group_case(tokens, top_k, experts, rng, dtype, transposed, device):
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(-1, experts + 1, (top_k, tokens) if transposed else (tokens, top_k), generator=gen)
    return (ids.t() if transposed else ids).to(dtype).to(device)


@pytest.mark.cuda
@pytest.mark.parametrize("case", GROUP_CASES, ids=str)
def test_grouping(case):
    check_group(group_case(*case, "cuda"), case[3])


INTERPRETER_CASES = [
    (dtype, layout, filt, activation)
    for dtype in ("float32", "bfloat16", "float16")
    for layout, filt, activation in (
        ("w13", "-1 dead", "silu"),
        ("w13 transposed", "local range", "gelu"),
        ("w13 + w3", "id >= E sentinel", "gelu_tanh"),
        ("w2 transposed", "none dead", "silu"),
    )
]


def run_interpreter_cases() -> dict[str, str]:
    """Every INTERPRETER_CASES entry through the interpreted kernels into poisoned buffers, then the whole CUDA
    sequence on CPU tensors against the reference: "ok" or what failed. Called in a child process that set
    TRITON_INTERPRET=1 before importing triton."""
    from inductor_moe.ops.fused_experts import run_kernels

    assert type(kernel.fused_up_kernel).__name__ == "InterpretedFunction"
    results = {}
    for dtype_name, layout, filt, activation in INTERPRETER_CASES:
        dtype = getattr(torch, dtype_name)
        try:
            x, w13, w2, w, ids, rng, w3 = layer(7, 40, 24, 6, 3, dtype, "cpu", layout, filt)
            for tma in (False, True):  # TMA boxes where the layout allows them, pointers where not
                check_poisoned(x, w13, w2, ids, rng, w3, activation, kernel.Tile(16, 16, 16, tma=tma), dtype)
            out = run_kernels(
                x, w13, w2, w, ids, activation, rng[0], True, w3, tiles=kernel.heuristic_config(7, 6, 3, dtype)
            )
            ref = reference.fused_experts_ref(x, w13, w2, w, ids, activation, rng[0], True, w3)
            # the interpreter truncates to bf16 where the GPU rounds: one more ulp
            assert_close_to_reference(out, ref, dtype)
            # the "pairs" path: no grouping, rows in pair order (sentinels adding w * 0 where they are the filter)
            zero_dead = filt == "id >= E sentinel"
            ref = reference.fused_experts_ref(x, w13, w2, w, ids, activation, rng[0], True, w3, zero_dead)
            # ids through a view with a stride (the flat ids the pair programs read are a copy then)
            strided = torch.stack([ids, torch.full_like(ids, -7)], -1)[..., 0]
            for path in ("pairs", "pairs_combine", "decode"):
                pairs = kernel.Config(kernel.Tile(16, 16, 16), kernel.Tile(16, 16, 16, tma=True), path)
                out = run_kernels(x, w13, w2, w, strided, activation, rng[0], True, w3, zero_dead, tiles=pairs)
                assert_close_to_reference(out, ref, dtype)
            results[repr((dtype_name, layout, filt, activation))] = "ok"
        except AssertionError as e:
            results[repr((dtype_name, layout, filt, activation))] = str(e)[-500:]
    for case in GROUP_CASES:
        try:
            check_group(group_case(*case, "cpu"), case[3])
            results[repr(case)] = "ok"
        except AssertionError as e:
            results[repr(case)] = str(e)[-500:]
    try:  # the decode kernel with more pairs of one expert than its tile's rows (ids repeated within tokens)
        x, w13, w2, w, ids, rng, _ = layer(20, 40, 24, 6, 3, torch.float32, "cpu", filt="none dead")
        ids = torch.stack([torch.full_like(ids[:, 0], 2), torch.full_like(ids[:, 0], 4), ids[:, 2]], 1)
        args = (x, w13, w2, w, ids, "gelu", rng[0], True, None, False)
        tiles = kernel.Config(kernel.Tile(16, 16, 16), kernel.Tile(16, 32, 16), "decode")
        assert_close_to_reference(run_kernels(*args, tiles=tiles), reference.fused_experts_ref(*args), torch.float32)
        results["decode, 20 pairs of one expert"] = "ok"
    except AssertionError as e:
        results["decode, 20 pairs of one expert"] = str(e)[-500:]
    return results


def test_triton_kernels_in_interpreter():
    results = interpreter_results("test_fused_experts", "run_interpreter_cases")
    assert len(results) == len(INTERPRETER_CASES) + len(GROUP_CASES) + 1
    failed = {case: why for case, why in results.items() if why != "ok"}
    assert not failed, failed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("filt", ["local range", "none dead"])
def test_grouped_mm_path(device, filt):
    # where the config table says torch's grouped GEMM is faster: the same sort and combine, gate and up rounded to
    # bf16 before the activation (as the GEMM returns them), so within the op's bf16 bound of the reference
    from inductor_moe.ops.fused_experts import grouped_mm_fits, run_kernels

    x, w13, w2, w, ids, rng, _ = layer(37, 64, 48, 6, 2, torch.bfloat16, device, filt=filt)
    assert grouped_mm_fits(x, w13, w2, None)
    tile = kernel.Tile(16, 16, 16)
    for activation in reference.ACTIVATIONS:
        out = run_kernels(
            x, w13, w2, w, ids, activation, rng[0], True, None, tiles=kernel.Config(tile, tile, "grouped_mm")
        )
        ref = reference.fused_experts_ref(x, w13, w2, w, ids, activation, rng[0], True)
        assert_close_to_reference(out, ref, torch.bfloat16)
    # layouts and dtypes torch's grouped GEMM does not take as they are stay on the Triton kernels
    assert not grouped_mm_fits(x.float(), w13.float(), w2.float(), None)
    assert not grouped_mm_fits(x, w13[:, :48], w2, w13[:, 48:])
    assert not grouped_mm_fits(x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, None)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 7, 37])
@pytest.mark.parametrize("filt", ["-1 dead", "id >= E sentinel", "local range", "all dead", "none dead"])
@pytest.mark.parametrize("path", ["pairs", "pairs_combine", "decode"])
def test_pairs_path(tokens, filt, path):
    # rows in pair order without the grouping kernel (decode): the same results as the sorted rows' path, with
    # pairs of one expert from several tokens (T=37 over 6 experts) each reading the expert's weights; with the
    # combine in the down GEMM, a token's last program of a column block sums rows other programs stored, in
    # k order; with both GEMMs in one kernel, the down GEMM's partial rows summed in order: the same bits every
    # call
    from inductor_moe.ops.fused_experts import run_kernels

    x, w13, w2, w, ids, rng, _ = layer(tokens, 64, 40, 6, 8, torch.bfloat16, "cuda", filt=filt)
    zero_dead = filt == "id >= E sentinel"
    for renormalize, tma in ((False, False), (True, True)):
        tile = kernel.Tile(16, 16, 32, tma=tma)
        for activation in reference.ACTIVATIONS:
            args = (x, w13, w2, w, ids, activation, rng[0], renormalize, None, zero_dead)
            out = run_kernels(*args, tiles=kernel.Config(tile, tile, path))
            assert_close_to_reference(out, reference.fused_experts_ref(*args), torch.bfloat16)
            for _ in range(3):
                assert torch.equal(run_kernels(*args, tiles=kernel.Config(tile, tile, path)), out)


@pytest.mark.cuda
def test_deterministic_across_calls():
    # the counting grouping orders an expert's rows as its atomics land; each row's results are its own, so the
    # output is the same bits every call
    x, w13, w2, w, ids, rng, _ = layer(600, 128, 64, 16, 8, torch.bfloat16, "cuda", filt="local range")
    assert ids.numel() > kernel.STABLE_SORT_MAX_PAIRS
    first = im.fused_experts(x, w13, w2, w, ids, "silu", rng)
    for _ in range(5):
        assert torch.equal(im.fused_experts(x, w13, w2, w, ids, "silu", rng), first)


def test_decode_fits():
    # the decode path: at most DECODE_MAX_PAIRS pairs and DECODE_MAX_SPLITS splits, its fp32 partial rows within
    # DECODE_MAX_PARTIAL_BYTES
    tile = kernel.Tile(16, 32, 128)
    decode = kernel.Config(tile, kernel.Tile(16, 64, 64), "decode")
    assert kernel.decode_fits(8, 768, 2048, decode)  # Qwen3 at T=1: 24 splits x 8 pairs x 8 KB
    assert kernel.decode_fits(128, 768, 2048, decode)  # T=16: 24 MB
    assert not kernel.decode_fits(256, 768, 2048, decode)  # T=32: 48 MB
    assert not kernel.decode_fits(32, 14336, 4096, decode)  # Mixtral at T=16: 448 splits, 235 MB
    assert not kernel.decode_fits(1, 14336, 4096, decode)  # T=1: 448 splits, more than the combine reads at once
    wide = kernel.Config(kernel.Tile(16, 64, 128), kernel.Tile(16, 64, 64), "decode")
    assert kernel.decode_fits(256, 768, 2048, wide) and not kernel.decode_fits(257, 768, 2048, wide)


def test_config_table_and_heuristic():
    # every shipped config is well-formed, keyed by a power-of-two token bucket; unknown shapes get the heuristic
    for shapes in kernel._tuned().values():
        for key, buckets in shapes.items():
            assert key.startswith("E=")
            for bucket, entry in buckets.items():
                assert int(bucket) == kernel.token_bucket(int(bucket))
                for tile in (kernel.Tile(**entry["up"]), kernel.Tile(**entry["down"])):
                    assert tile.block_m >= 16 and tile.block_n >= 16 and tile.block_k >= 16
                assert entry.get("path", "triton") in kernel.PATHS
    assert set(kernel.SAME_ARCH.values()) <= set(kernel._tuned()), "an architecture's fallback table is missing"
    assert kernel.token_bucket(1) == 1 and kernel.token_bucket(17) == 32 and kernel.token_bucket(0) == 1
    small = kernel.config_for(1, 3, 40, 24, 2, torch.bfloat16, torch.device("cpu"))
    assert small == kernel.heuristic_config(1, 3, 2, torch.bfloat16) and small.up.block_m == 16
    assert kernel.heuristic_config(4096, 8, 2, torch.bfloat16).up.block_m == 64


# ------------------------------------------------------------------------------------------------------------
# The runner


@pytest.mark.parametrize("device", DEVICES)
def test_runner_is_the_op(device):
    x, w13, w2, w, ids, rng, _ = layer(20, 64, 32, 8, 2, torch.bfloat16, device, filt="local range")
    logits = torch.randn(20, 14, device=device)
    out = im.moe.moe(x, logits, w13, w2, top_k=2, expert_range=rng)
    weights, topk = im.moe.route(logits, 2, renormalize=False)
    want = im.fused_experts(x, w13, w2, weights, topk, "silu", rng, renormalize=True)
    assert torch.equal(out, want)
