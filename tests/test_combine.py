"""moe_combine: reference semantics against an independent float64 loop, the op against the reference on
every device (token-major and gathered rows, the expert filter, odd sizes), bad inputs, opcheck,
torch.compile, and on the GPU: PDL, CUDA graphs and the device-side check of src_rows."""

from __future__ import annotations

import pytest
import torch

import inductor_moe as im
from inductor_moe import reference

from helpers import (
    DEVICES,
    DTYPES,
    FILTER_RANGES,
    TOL,
    captured,
    combine_case,
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


def test_reference_against_loop():
    for ids_dtype, rows_dtype in [(None, None), (torch.int32, None), (torch.int64, torch.int32)]:
        eo, w, ids, rows = combine_case(5, 4, 6, torch.float64, torch.float64, ids_dtype, rows_dtype, "cpu")
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
    eo, w, ids, rows = combine_case(tokens, k, h, dtype, w_dtype, ids_dtype, rows_dtype, device)
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
    eo, w, _, _ = combine_case(tokens, k, h, dtype, torch.float32, None, None, "cuda")
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
    eo, w, ids, src_rows = combine_case(tokens, k, h, torch.bfloat16, torch.float32, torch.int32, rows_dtype, device)
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
    eo, w, ids, src_rows = combine_case(tokens, k, h, torch.bfloat16, w_dtype, ids_dtype, rows_dtype, device)
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


# ------------------------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("pdl", ["0", "1"])
def test_cuda_graph_and_pdl(monkeypatch, pdl):
    monkeypatch.setenv("INDUCTOR_MOE_PDL", pdl)
    eo, w, ids, rows = combine_case(64, 8, 7168, torch.bfloat16, torch.float32, torch.int32, torch.int32, "cuda")
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
