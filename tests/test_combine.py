"""moe_combine: reference semantics against an independent float64 loop, the op against the reference on
every device (token-major and gathered rows, the expert filter, odd sizes), bad inputs, opcheck,
torch.compile, and on the GPU: PDL, CUDA graphs and the device-side check of src_rows."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import inductor_moe as im
from inductor_moe import reference

from helpers import (
    DEVICES,
    DTYPES,
    FILTER_RANGES,
    TOL,
    assert_compiles_once,
    captured,
    extreme_ids,
    id_in_range,
    poison_allocator,
    randn,
)

INDEX_DTYPES = [torch.int32, torch.int64]


def combine_loop(expert_out, w, ids, lo, hi, src_rows):
    """The definition, one pair at a time, in float64."""
    t_count, k = w.shape
    out = torch.zeros(t_count, expert_out.shape[1], dtype=torch.float64)
    for t in range(t_count):
        for j in range(k):
            if ids is not None and not id_in_range(int(ids[t, j]), lo, hi):
                continue
            row = int(src_rows[t, j]) if src_rows is not None else t * k + j
            out[t] += float(w[t, j]) * expert_out[row].double()
    return out


def make_case(tokens, k, h, dtype, w_dtype, ids_dtype, rows_dtype, device, dead=0.5):
    """Expert outputs whose unread rows are NaN (a kernel that reads one fails), ids with ~``dead`` of the pairs
    outside [0, 8), and, with rows_dtype, src_rows that gather rows from a shuffled, larger expert_out."""
    ids = None
    if ids_dtype is not None:
        ids = torch.randint(0, 8, (tokens, k), device=device)
        ids = torch.where(torch.rand(tokens, k, device=device) < dead, -1, ids).to(ids_dtype)
    live = torch.ones(tokens, k, dtype=torch.bool, device=device) if ids is None else ids >= 0
    if rows_dtype is None:
        src_rows = None
        expert_out = randn(tokens * k, h, device=device)
        rows = torch.arange(tokens * k, device=device).view(tokens, k)
    else:
        total = tokens * k + 5
        src_rows = torch.randperm(total, device=device)[: tokens * k].view(tokens, k)
        # a dead pair's row may be anything, even an invalid index: it must never be read
        src_rows = torch.where(live, src_rows, -7).to(rows_dtype)
        expert_out = randn(total, h, device=device)
        rows = src_rows.long()
    read = torch.zeros(expert_out.shape[0], dtype=torch.bool, device=device)
    read[rows[live]] = True
    expert_out[~read] = float("nan")  # every row no live pair names
    w = torch.rand(tokens, k, device=device).to(w_dtype)
    return expert_out.to(dtype), w, ids, src_rows


def test_reference_against_loop():
    for ids_dtype, rows_dtype in [(None, None), (torch.int32, None), (torch.int64, torch.int32)]:
        eo, w, ids, rows = make_case(5, 4, 6, torch.float64, torch.float64, ids_dtype, rows_dtype, "cpu")
        ref = reference.moe_combine_ref(eo, w, ids, 0, 8, rows)
        assert not ref.isnan().any()
        torch.testing.assert_close(ref, combine_loop(eo, w, ids, 0, 8, rows), rtol=1e-12, atol=1e-12)


def test_reference_token_with_no_live_pair_is_zero():
    eo = torch.full((6, 4), float("nan"))
    out = reference.moe_combine_ref(eo, torch.ones(2, 3), torch.full((2, 3), -1))
    assert torch.equal(out, torch.zeros(2, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids_dtype", [None, torch.int32, torch.int64])
@pytest.mark.parametrize("rows_dtype", [None, torch.int32, torch.int64])
# k: the kernel's groups of 8, 4, 2 and 1 pairs (15 = all four), and past one 64-pair stage (70 = 64 + 4 + 2)
@pytest.mark.parametrize(
    "tokens,k,h", [(0, 8, 64), (1, 8, 7168), (7, 1, 13), (37, 9, 264), (3, 15, 24), (5, 70, 40), (300, 8, 512)]
)
def test_op_matches_reference(device, dtype, w_dtype, ids_dtype, rows_dtype, tokens, k, h):
    eo, w, ids, rows = make_case(tokens, k, h, dtype, w_dtype, ids_dtype, rows_dtype, device)
    poison_allocator((tokens, h), dtype, device)
    out = im.moe_combine(eo, w, ids, (0, 8), rows)
    ref = reference.moe_combine_ref(eo, w, ids, 0, 8, rows)
    assert out.shape == (tokens, h) and out.dtype == dtype and out.is_contiguous()
    assert not out.isnan().any(), "a dead row was read, or an output element was not written"
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
# token-major decode sizes whose one-wave launch takes blocks of 160, 192, 224 and 256 threads on 132 SMs
# (combine.cpp), the first two with a partial last chunk in each token's row
@pytest.mark.parametrize("tokens,k,h", [(12, 8, 7000), (24, 8, 3000), (16, 8, 7168), (16, 2, 4096)])
def test_token_major_block_sizes(dtype, tokens, k, h):
    eo, w, _, _ = make_case(tokens, k, h, dtype, torch.float32, None, None, "cuda")
    poison_allocator((tokens, h), dtype, "cuda")
    out = im.moe_combine(eo, w)
    assert not out.isnan().any(), "an output element was not written"
    torch.testing.assert_close(out, reference.moe_combine_ref(eo, w), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_accumulation(device):
    # 64 bf16 terms of 1 + 2**-7 (exact in bf16) with weight 1: fp32 accumulation gives exactly 64.5, which
    # bf16 holds; a bf16 accumulator loses the 2**-7 once the sum passes 2 (ties round to even) and drifts.
    eo = torch.full((64, 8), 1 + 2**-7, dtype=torch.bfloat16, device=device)
    out = im.moe_combine(eo, torch.ones(1, 64, device=device))
    assert torch.equal(out, torch.full((1, 8), 64.5, dtype=torch.bfloat16, device=device))
    # weights in another dtype are converted, not reinterpreted as expert_out's dtype
    out = im.moe_combine(eo[:2].float(), torch.tensor([[0.5, 0.25]], dtype=torch.bfloat16, device=device))
    assert torch.equal(out, torch.full((1, 8), 0.75 * (1 + 2**-7), device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("filtered", [False, True])
def test_live_pair_of_weight_zero_still_reads_its_row(device, filtered):
    # 0 * NaN is NaN: a live pair is summed whatever its weight (only dead pairs are skipped)
    eo = randn(4, 16, device=device)
    eo[1, 3] = float("nan")
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5]], device=device)
    ids = torch.zeros(2, 2, dtype=torch.int32, device=device) if filtered else None
    out = im.moe_combine(eo, w, ids)
    ref = reference.moe_combine_ref(eo, w, ids)
    assert out[0, 3].isnan() and ref[0, 3].isnan()
    torch.testing.assert_close(out, ref, equal_nan=True, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows_dtype", [None, torch.int64])
@pytest.mark.parametrize("tokens,k,h", [(1, 8, 8), (37, 8, 100), (7, 66, 36)])  # K past one 64-pair stage
def test_zero_dead_rows(device, rows_dtype, tokens, k, h):
    # A dead pair adds w * 0: the same sum as skipping it (bit for bit) for finite weights of either sign, NaN
    # for a NaN or infinite weight; its row is still never read (NaN there).
    eo, w, ids, src_rows = make_case(tokens, k, h, torch.bfloat16, torch.float32, torch.int32, rows_dtype, device)
    w = w - 0.5  # negative weights too: w * 0 is -0 there, which must not change the sum
    skipped = im.moe_combine(eo, w, ids, (0, 8), src_rows)
    zeroed = im.moe_combine(eo, w, ids, (0, 8), src_rows, zero_dead_rows=True)
    assert torch.equal(zeroed, skipped) and not zeroed.isnan().any()
    assert torch.equal(zeroed.view(torch.int16), skipped.view(torch.int16))  # +0 stays +0
    # with the weights renormalised first (what the lowerings emit for grouped-GEMM blocks): the same
    both = im.moe_combine(eo, w.abs(), ids, (0, 8), src_rows, zero_dead_rows=True, renormalize=True)
    assert torch.equal(both, im.moe_combine(eo, w.abs(), ids, (0, 8), src_rows, renormalize=True))
    ref = reference.moe_combine_ref(eo, w.abs(), ids, 0, 8, src_rows, zero_dead_rows=True, renormalize=True)
    torch.testing.assert_close(both, ref, **TOL[torch.bfloat16])
    dead = ids < 0
    poisoned = torch.where(
        dead,
        torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)[
            torch.arange(tokens * k, device=device).view(tokens, k) % 3
        ],
        w,
    )
    hit = dead.any(1)  # tokens with a dead pair, now of non-finite weight
    out = im.moe_combine(eo, poisoned, ids, (0, 8), src_rows, zero_dead_rows=True)
    ref = reference.moe_combine_ref(eo, poisoned, ids, 0, 8, src_rows, zero_dead_rows=True)
    assert out[hit].isnan().all() and ref[hit].isnan().all()
    assert torch.equal(out[~hit], skipped[~hit])
    assert not im.moe_combine(eo, poisoned, ids, (0, 8), src_rows)[~hit].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("ids_dtype,rows_dtype", [(None, None), (torch.int32, torch.int64)])
@pytest.mark.parametrize("tokens,k,h", [(1, 8, 8), (37, 2, 100), (7, 66, 36)])
def test_renormalize(device, w_dtype, ids_dtype, rows_dtype, tokens, k, h):
    # renormalize divides the weights by their sum over k (dead pairs included) in their dtype: the op equals
    # itself on the weights the reference renormalises, bit for bit
    eo, w, ids, src_rows = make_case(tokens, k, h, torch.bfloat16, w_dtype, ids_dtype, rows_dtype, device)
    out = im.moe_combine(eo, w, ids, (0, 8), src_rows, renormalize=True)
    total = w[:, :1].float()
    for j in range(1, k):
        total = total + w[:, j : j + 1].float()
    normalized = w / total.to(w_dtype)
    assert torch.equal(out, im.moe_combine(eo, normalized, ids, (0, 8), src_rows))
    ref = reference.moe_combine_ref(eo, w, ids, 0, 8, src_rows, renormalize=True)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
    # what a model spells, summed in another order: the same within the weights' last bit
    spelled = im.moe_combine(eo, w / w.sum(-1, keepdim=True), ids, (0, 8), src_rows)
    torch.testing.assert_close(out, spelled, **TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("lo,hi", FILTER_RANGES)
def test_filter_range_edges(device, ids_dtype, lo, hi):
    # ids at the edges of their dtype, two tokens of K = 7, against plain, empty and wrapped ranges
    ids = extreme_ids(ids_dtype, device).view(2, 7)
    eo = randn(14, 24, device=device)
    w = torch.rand(2, 7, device=device)
    out = im.moe_combine(eo, w, ids, expert_range=(lo, hi))
    expected = combine_loop(eo.cpu(), w.cpu(), ids.cpu(), lo, hi, None)
    torch.testing.assert_close(out.cpu(), expected.float(), **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    eo_big = randn(40, 96, device=device)
    eo = eo_big[:, 16:80]  # row stride 96
    w = torch.rand(8, 5, device=device).t()  # [5, 8] with strides (1, 5)
    ids = torch.randint(-1, 4, (8, 5), device=device).t()
    out = im.moe_combine(eo, w, ids)
    torch.testing.assert_close(out, reference.moe_combine_ref(eo, w, ids), **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    other = "cpu" if device == "cuda" else "meta"
    eo = randn(32, 16, device=device)
    w = torch.rand(4, 8, device=device)
    ids = torch.zeros(4, 8, dtype=torch.int32, device=device)
    cases = [
        (lambda: im.moe_combine(eo[:31], w), r"tokens \* k = 32 rows"),  # K mismatch
        (lambda: im.moe_combine(eo, w[:, :7]), r"tokens \* k = 28 rows"),
        (lambda: im.moe_combine(eo.view(4, 8, 16), w), "expert_out must be 2-D"),
        (lambda: im.moe_combine(eo.double(), w), "expert_out dtype must be"),
        (lambda: im.moe_combine(randn(16, 32, device=device).t(), w), "contiguous last dim"),
        (lambda: im.moe_combine(eo, w.view(-1)), "topk_weights must be 2-D"),
        (lambda: im.moe_combine(eo, w.to(torch.int32)), "topk_weights dtype must be"),
        (lambda: im.moe_combine(eo, w.to(other)), "topk_weights must be on"),
        (lambda: im.moe_combine(eo, w, ids[:, :7]), r"topk_ids must have topk_weights' shape \[4, 8\]"),
        (lambda: im.moe_combine(eo, w, ids.float()), "topk_ids must be int32 or int64"),
        (lambda: im.moe_combine(eo, w, ids.to(other)), "topk_ids must be on"),
        (lambda: im.moe_combine(eo, w, src_rows=ids[:3]), r"src_rows must have topk_weights' shape"),
        (lambda: im.moe_combine(eo, w, src_rows=ids.view(-1)), r"src_rows must have topk_weights' shape"),
        (lambda: im.moe_combine(eo, w, src_rows=ids.half()), "src_rows must be int32 or int64"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for ids_dtype, rows_dtype in [(None, None), (torch.int32, None), (torch.int64, torch.int32)]:
        eo, w, ids, rows = make_case(6, 4, 24, torch.bfloat16, torch.float32, ids_dtype, rows_dtype, device)
        eo = eo.nan_to_num()  # opcheck compares eager runs with each other; NaN != NaN
        torch.library.opcheck(torch.ops.inductor_moe.moe_combine.default, (eo, w, ids, 0, 8, rows))
        torch.library.opcheck(torch.ops.inductor_moe.moe_combine.default, (eo, w, ids, 0, 8, rows, True))
        torch.library.opcheck(torch.ops.inductor_moe.moe_combine.default, (eo, w, ids, 0, 8, rows, False, True))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_gathered_renormalized_no_recompile_across_batch(device):
    def f(expert_out, w, ids):
        src_rows = torch.argsort(ids.view(-1), stable=True).view(ids.shape)
        return im.moe_combine(expert_out, w, ids, (0, 8), src_rows, zero_dead_rows=True, renormalize=True)

    assert_compiles_once(
        f,
        lambda t: (
            randn(t * 4, 32, device=device),
            torch.rand(t, 4, device=device),
            torch.randint(-1, 8, (t, 4), device=device),
        ),
        (1, 2, 37, 1000),
        lambda out, ref: torch.testing.assert_close(out, ref, rtol=0, atol=0),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_compile_no_recompile_across_batch(device):
    def f(expert_out, w, ids):
        return im.moe_combine(expert_out * 2, w.softmax(-1), ids, (0, 8))

    assert_compiles_once(
        f,
        lambda t: (
            randn(t * 4, 32, device=device),
            randn(t, 4, device=device),
            torch.randint(-1, 8, (t, 4), device=device),
        ),
        (1, 2, 37, 1000),
        lambda out, ref: torch.testing.assert_close(out, ref, **TOL[torch.float32]),
    )


# ------------------------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("pdl", ["0", "1"])
def test_cuda_graph_and_pdl(monkeypatch, pdl):
    monkeypatch.setenv("INDUCTOR_MOE_PDL", pdl)
    eo, w, ids, rows = make_case(64, 8, 7168, torch.bfloat16, torch.float32, torch.int32, torch.int32, "cuda")
    eo = eo.nan_to_num()

    def step():
        y = im.moe_combine(eo, w, ids, (0, 8), rows)
        # dependent launch: combine the combined rows again, token-major, two "experts" per token
        return y, im.moe_combine(y, torch.ones(32, 2, device="cuda"))

    graph, (y, z) = captured(step)
    for _ in range(3):
        eo.copy_(randn(*eo.shape, dtype=torch.bfloat16, device="cuda"))
        w.copy_(torch.rand(64, 8, device="cuda"))
        graph.replay()
        ref = reference.moe_combine_ref(eo, w, ids, 0, 8, rows)
        torch.testing.assert_close(y, ref, **TOL[torch.bfloat16])
        torch.testing.assert_close(
            z, reference.moe_combine_ref(y, torch.ones(32, 2, device="cuda")), **TOL[torch.bfloat16]
        )


@pytest.mark.cuda
def test_one_wave_combine_orders_its_dependents():
    # A combine of one wave lets the next PDL grid launch at once (combine.cpp), so that grid runs its wait while
    # the combine still reads its rows: the wait alone must order its reads after the combine's writes. A slow
    # producer (64 rows a thread) into NaN-poisoned memory, and a consumer that reads every element of it.
    eo = randn(16 * 64, 7168, dtype=torch.bfloat16, device="cuda")
    w = torch.rand(16, 64, device="cuda")

    def step():
        poison_allocator((16, 7168), torch.bfloat16, "cuda")
        y = im.moe_combine(eo, w)
        return y, im.moe_combine(y, torch.ones(8, 2, device="cuda"))

    graph, (y, z) = captured(step)
    for _ in range(5):
        eo.copy_(randn(*eo.shape, dtype=torch.bfloat16, device="cuda"))
        graph.replay()
        torch.testing.assert_close(y, reference.moe_combine_ref(eo, w), **TOL[torch.bfloat16])
        assert torch.equal(z, reference.moe_combine_ref(y, torch.ones(8, 2, device="cuda")))


@pytest.mark.cuda
def test_src_rows_out_of_range_is_a_device_error():
    # A live pair naming a row outside expert_out cannot be checked on the host without a sync: the kernel
    # reports it and traps, which poisons the CUDA context, so this runs in a child process.
    script = textwrap.dedent(
        """
        import torch, inductor_moe as im
        eo = torch.randn(16, 64, device="cuda")
        rows = torch.arange(16, device="cuda").view(8, 2)
        rows[3, 1] = 99
        im.moe_combine(eo, torch.ones(8, 2, device="cuda"), src_rows=rows)
        torch.cuda.synchronize()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "src_rows[3, 1] = 99 is outside expert_out's 16 rows" in result.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("k", [2, 70])
def test_filtered_src_rows_out_of_range_names_the_live_pair(k):
    # The kernel reads a bad live pair as dead and reports it after its writes, finding it again among the pairs
    # its thread staged (k=70: the second round of 64). A dead pair's bad row is never read, nor reported.
    script = textwrap.dedent(
        f"""
        import torch, inductor_moe as im
        k = {k}
        eo = torch.randn(8 * k, 64, device="cuda")
        rows = torch.arange(8 * k, device="cuda").view(8, k)
        ids = torch.zeros(8, k, dtype=torch.int32, device="cuda")
        ids[5, 0] = -1
        rows[5, 0] = -4  # dead
        rows[5, k - 1] = 8 * k + 3  # live
        im.moe_combine(eo, torch.ones(8, k, device="cuda"), topk_ids=ids, expert_range=(0, 8), src_rows=rows)
        torch.cuda.synchronize()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    message = f"inductor_moe.moe_combine: src_rows[5, {k - 1}] = {8 * k + 3} is outside expert_out's {8 * k} rows"
    assert message in result.stdout and "= -4" not in result.stdout


def test_sizes_past_32_bit_indexing_rejected():
    # Meta tensors reach the fake function without allocating.
    w = torch.rand(4, 2, device="meta")
    with pytest.raises(RuntimeError, match=r"must be below 2\*\*31, got 2147483648"):
        im.moe_combine(torch.empty(8, 2**31, dtype=torch.bfloat16, device="meta"), w)
    # large but legal: more than 2**31 elements in expert_out needs 64-bit row offsets, not an error
    out = im.moe_combine(
        torch.empty(2**20, 2**12, dtype=torch.bfloat16, device="meta"), torch.rand(2**17, 8, device="meta")
    )
    assert out.shape == (2**17, 2**12)
