"""Triton kernels of ``inductor_moe::fused_experts``: the two grouped GEMMs of a MoE layer's routed experts.

The routed pairs come grouped by local expert (the ``expert_sort`` op: ``order`` maps a sorted row to its pair,
``offs`` holds each expert's end row), and each kernel is one grid over (blocks of ``BLOCK_M`` sorted rows of
one expert) x (blocks of ``BLOCK_N`` output columns). A program finds its expert and rows from ``offs`` itself
(the experts' block counts, a prefix sum over at most 512 of them), so no block-aligned copy of the sort is
built, and a program past the last expert's blocks returns before it reads anything but ``offs``. The grid's
row-block count is a bound known on the host without a sync: at most ``min(pairs, E) + pairs // BLOCK_M``
blocks are non-empty. Dead pairs (sorted after every live one) are never read, and only the routed experts'
weights are.

- ``up``: ``a[r] = act(x @ gate_e.T) * (x @ up_e.T)`` for sorted row r of expert e, x its token's hidden row.
  The gate and up tiles of the same output columns are accumulated side by side in fp32 from the weights as
  stored (the halves of ``w13 [E, 2I, H]``, or ``w13`` and ``w3``, any strides), and the filtered gated
  activation is the epilogue, rounded once to the input dtype.
- ``down``: ``y[r] = a[r] @ w2[e].T``, fp32 accumulation, rounded to the input dtype. The routed weights and the
  sum over k are the combine's (``moe_combine`` with ``src_rows``: fp32, the renormalisation folded in), which
  reads each pair's row once: the same bytes as weighting here, with one rounding fewer. On rows in pair order
  the combine can run in the down GEMM itself (``COMBINE``): each program counts its arrival on its token's
  column block, and the last of the K to arrive sums their rows as ``moe_combine`` does, one launch fewer.
- ``decode`` (rows in pair order): both GEMMs in one kernel, each program the up GEMM of a block of
  intermediate columns and the down GEMM of those columns alone, a partial row in fp32; the combine sums a
  pair's partial rows in one fixed order, rounds the sum as the down GEMM rounds its rows, and weighs them.

PDL on sm90+: ``gdc_wait`` before the first global read, ``launch_pdl=True``; the next kernel's own wait orders
it, so no early trigger. fp32 inputs take IEEE-precision dots (correct, slower); 16-bit ones the tensor cores
with fp32 accumulation.
Tile configs: ``fused_experts_configs.json`` beside this file (tuned on the device per shape and token bucket,
``benchmarks/bench_fused_experts.py --tune``, which also records where torch's grouped GEMM is faster), else
:func:`heuristic_config`. The same kernels run under
``TRITON_INTERPRET=1`` on the CPU with PDL off, which is how CI tests them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import launch

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
MAX_EXPERTS = 512
CONFIGS = Path(__file__).with_name("fused_experts_configs.json")


@dataclasses.dataclass(frozen=True)
class Tile:
    """One GEMM's launch config."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # the weight tiles (and the down GEMM's rows) by TMA boxes, where the layout allows


@dataclasses.dataclass(frozen=True)
class Config:
    """Both GEMMs' configs (each kernel blocks the sorted rows its own way), and the path: these kernels
    ("triton"), these kernels on rows in pair order without the grouping kernel ("pairs": a row block a pair,
    for decode, where the chain of dependent launches is most of the time: with 1/8 of Qwen3's experts local,
    T=1 takes 16.0 us for a 3.9 us weight-read floor on the H100), the same with the combine in the down GEMM
    ("pairs_combine": the last of a token's K programs of a column block to finish sums their rows, one launch
    fewer), both GEMMs in one kernel ("decode": :func:`decode`; ``up`` is its tile, ``down.block_n`` the hidden
    columns a step of its down GEMM: on the H100 a read-only kernel takes 18.9 us for Qwen3's up weights at T=1
    and another 11.3 for its down weights, together 1.21x their copy-rate floor of 24.9), or torch's grouped
    GEMMs with our activation between them ("grouped_mm", where the table measured it faster: compute-bound
    shapes, hundreds of rows an expert; H100, Mixtral-8x7B at T=2048: 2830 us against 2879)."""

    up: Tile
    down: Tile
    path: str = "triton"

    @property
    def by_pair(self) -> bool:
        """Rows in pair order, no grouping kernel."""
        return self.path in ("pairs", "pairs_combine", "decode")


PATHS = ("triton", "pairs", "pairs_combine", "decode", "grouped_mm")


@triton.jit
def _local_expert(ids, expert_lo, experts):
    """The expert filter: an id's local expert, or ``experts`` (dead) outside [expert_lo, expert_lo + experts),
    computed in the ids' dtype (an int64 id far outside the range cannot wrap into it)."""
    local = ids - expert_lo
    return tl.where((local >= 0) & (local < experts), local, experts).to(tl.int32)


@triton.jit
def _pdl_wait(USE_PDL: tl.constexpr, EARLY_TRIGGER: tl.constexpr):
    """A GEMM program's PDL wait (its inputs come from the kernels before), then, with EARLY_TRIGGER (the
    module's, which says why), the next grid let launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if EARLY_TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _dot(x, w, acc, IEEE: tl.constexpr):
    """``acc + x @ w`` in fp32: IEEE-precision dots of fp32 tiles (fp32 inputs, the interpreter), else the tensor
    cores on the 16-bit tiles."""
    if IEEE:
        acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _row_block(offs_ptr, pid_m, num_experts, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, first sorted row, the expert's end row) of row block ``pid_m``; expert == num_experts past the
    last block. Blocks are numbered expert after expert, ceil(count / BLOCK_M) an expert."""
    e = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + e, mask=e < num_experts, other=0)
    starts = tl.load(offs_ptr + e - 1, mask=(e >= 1) & (e < num_experts), other=0)
    blocks = tl.where(e < num_experts, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    block_end = tl.cumsum(blocks, 0)
    expert = tl.sum((block_end <= pid_m).to(tl.int32), 0)
    mine = e == expert
    first_block = tl.sum(tl.where(mine, block_end - blocks, 0), 0)
    start = tl.sum(tl.where(mine, starts, 0), 0)
    end = tl.sum(tl.where(mine, ends, 0), 0)
    return expert, start + (pid_m - first_block) * BLOCK_M, end


@triton.jit
def _tile_ids(num_m, num_n, GROUP_M: tl.constexpr):
    """(row block, column block) of this program: row blocks fastest within groups of GROUP_M, so programs that
    run together share weight tiles (the row blocks of one expert) and input rows (a group's columns)."""
    pid = tl.program_id(0)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size, (pid % in_group) // size


@triton.jit
def _program(
    offs_ptr,
    ids_ptr,
    expert_lo,
    n_cols,
    num_experts,
    num_m,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr,
    PAIRS: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY_TRIGGER: tl.constexpr,
):
    """What every GEMM program does first: the PDL wait (offs and the rows come from the kernels before), then
    its (expert, first row, the expert's end row, first column); expert == num_experts: nothing to do. Rows are
    sorted by expert (``offs``), or with ``PAIRS`` in pair order, a row block a pair (its one row), the expert
    read from the flat ids: no grouping kernel (decode, where a token's K pairs name K distinct experts)."""
    _pdl_wait(USE_PDL, EARLY_TRIGGER)
    pid_m, pid_n = _tile_ids(num_m, tl.cdiv(n_cols, BLOCK_N), GROUP_M)
    if PAIRS:
        expert = _local_expert(tl.load(ids_ptr + pid_m), expert_lo, num_experts)
        row0 = pid_m
        end = pid_m + 1
    else:
        expert, row0, end = _row_block(offs_ptr, pid_m, num_experts, BLOCK_M, E_POW2)
    return expert, row0, end, pid_n * BLOCK_N


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:
        return x / (1.0 + tl.exp(-x))
    elif ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))  # 1 + tanh(inner)


@triton.jit
def fused_up_kernel(
    hidden_ptr,
    gate_ptr,
    up_ptr,
    order_ptr,
    offs_ptr,
    ids_ptr,
    expert_lo,
    out_ptr,
    counts_ptr,
    count_cols,
    hidden_size,
    inter,
    num_experts,
    num_m,
    top_k,
    stride_xm,
    stride_xk,
    stride_ge,
    stride_gn,
    stride_gk,
    stride_ue,
    stride_un,
    stride_uk,
    stride_om,
    ACT: tl.constexpr,
    IEEE: tl.constexpr,
    WEIGHT_TMA: tl.constexpr,
    PAIRS: tl.constexpr,
    ZERO_COUNTS: tl.constexpr,
    COUNT_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY_TRIGGER: tl.constexpr,
):
    expert, row0, end, n0 = _program(
        offs_ptr, ids_ptr, expert_lo, inter, num_experts, num_m, BLOCK_M, BLOCK_N, GROUP_M, E_POW2, PAIRS, USE_PDL,
        EARLY_TRIGGER,
    )  # fmt: skip
    if ZERO_COUNTS:  # the down GEMM's arrival counts of this token, by its first pair's first program (PAIRS)
        if (n0 == 0) & (row0 % top_k == 0):
            c = tl.arange(0, COUNT_POW2)
            tl.store(counts_ptr + (row0 // top_k).to(tl.int64) * count_cols + c, tl.zeros_like(c), mask=c < count_cols)
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    if PAIRS:
        tokens = (rows // top_k).to(tl.int64)
    else:
        tokens = (tl.load(order_ptr + rows, mask=row_ok, other=0) // top_k).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    a = _gated_rows(
        hidden_ptr, gate_ptr, up_ptr, expert, tokens, row_ok, n0, hidden_size, inter, stride_xm, stride_xk,
        stride_ge, stride_gn, stride_gk, stride_ue, stride_un, stride_uk, ACT, IEEE, WEIGHT_TMA, BLOCK_M, BLOCK_N,
        BLOCK_K,
    ).to(out_ptr.dtype.element_ty)  # fmt: skip
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, a, mask=row_ok[:, None] & (cols < inter)[None, :])


@triton.jit
def _gated_rows(
    hidden_ptr,
    gate_ptr,
    up_ptr,
    expert,
    tokens,
    row_ok,
    n0,
    hidden_size,
    inter,
    stride_xm,
    stride_xk,
    stride_ge,
    stride_gn,
    stride_gk,
    stride_ue,
    stride_un,
    stride_uk,
    ACT: tl.constexpr,
    IEEE: tl.constexpr,
    WEIGHT_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``act(x @ gate_e[n0:n0 + BLOCK_N].T) * (x @ up_e[n0:n0 + BLOCK_N].T)`` in fp32 for the hidden rows
    ``tokens`` (where ``row_ok``): gate and up accumulated side by side over the hidden size; 0 in the rows and
    columns past the live ones."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = hidden_ptr + tokens[:, None] * stride_xm + ks[None, :] * stride_xk
    if not WEIGHT_TMA:
        e = expert.to(tl.int64)
        g_ptrs = gate_ptr + e * stride_ge + cols[None, :].to(tl.int64) * stride_gn + ks[:, None] * stride_gk
        u_ptrs = up_ptr + e * stride_ue + cols[None, :].to(tl.int64) * stride_un + ks[:, None] * stride_uk
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_ok = ks < hidden_size - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if WEIGHT_TMA:  # [1, BLOCK_N, BLOCK_K] boxes, zero past the expert's columns and the hidden size
            g = gate_ptr.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
            u = up_ptr.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
        else:
            g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            g_ptrs += BLOCK_K * stride_gk
            u_ptrs += BLOCK_K * stride_uk
        acc_g = _dot(x, g, acc_g, IEEE)
        acc_u = _dot(x, u, acc_u, IEEE)
        x_ptrs += BLOCK_K * stride_xk
    return _activation(acc_g, ACT) * acc_u


@triton.jit
def _combine_columns(
    y_ptr,
    stride_ym,
    splits,
    stride_ys,
    weights_ptr,
    stride_wt,
    stride_wk,
    ids_ptr,
    expert_lo,
    num_experts,
    out_ptr,
    stride_om,
    token,
    cols,
    col_ok,
    TOP_K: tl.constexpr,
    RENORM: tl.constexpr,
    ZERO_DEAD: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
):
    """``out[token, cols]``: moe_combine's sum over k of token-major rows ``y``, in k order in fp32 (its
    rounding: weights renormalised in their dtype by their fp32 sum, dead pairs not read, or adding w * 0).
    With ``SPLITS_POW2`` > 1 each row is the fp32 sum of ``splits`` partial rows (``y`` + s * ``stride_ys``),
    read at once and summed in one fixed order, rounded to the output dtype: a pair's row as the down GEMM
    would round it."""
    token = token.to(tl.int64)
    w_row = weights_ptr + token * stride_wt
    divisor = 1.0
    if RENORM:
        total = tl.load(w_row).to(tl.float32)
        for k in tl.static_range(1, TOP_K):
            total += tl.load(w_row + k * stride_wk).to(tl.float32)
        divisor = total.to(weights_ptr.dtype.element_ty).to(tl.float32)
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        live = _local_expert(tl.load(ids_ptr + token * TOP_K + k), expert_lo, num_experts) < num_experts
        w = tl.load(w_row + k * stride_wk).to(tl.float32)
        if RENORM:
            w = tl.math.div_rn(w, divisor).to(weights_ptr.dtype.element_ty).to(tl.float32)
        # L2, not L1: the rows were stored by other programs (ordered before this one by the arrival count)
        read = tl.where(live, col_ok, False)  # (col_ok & live: ints, not a mask, in the interpreter)
        row_ptrs = y_ptr + (token * TOP_K + k) * stride_ym + cols
        if SPLITS_POW2 > 1:  # one load of every split (a loop of loads waited for each in turn)
            s = tl.arange(0, SPLITS_POW2)
            ptrs = row_ptrs[None, :] + s[:, None].to(tl.int64) * stride_ys
            parts = tl.load(ptrs, mask=(s < splits)[:, None] & read[None, :], other=0.0, cache_modifier=".cg")
            row = tl.sum(parts, 0).to(out_ptr.dtype.element_ty)
        else:
            row = tl.load(row_ptrs, mask=read, other=0.0, cache_modifier=".cg")
        if ZERO_DEAD:
            acc += tl.where(live, row.to(tl.float32) * w, w * 0.0)
        else:
            acc += tl.where(live, row.to(tl.float32) * w, 0.0)
    tl.store(out_ptr + token * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def fused_down_kernel(
    a_ptr,
    w_ptr,
    offs_ptr,
    ids_ptr,
    expert_lo,
    out_ptr,
    inter,
    hidden_size,
    num_experts,
    num_m,
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    weights_ptr,
    stride_wt,
    stride_wtk,
    counts_ptr,
    combined_ptr,
    stride_cm,
    IEEE: tl.constexpr,
    TMA: tl.constexpr,
    PAIRS: tl.constexpr,
    COMBINE: tl.constexpr,
    TOP_K: tl.constexpr,
    RENORM: tl.constexpr,
    ZERO_DEAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY_TRIGGER: tl.constexpr,
):
    expert, row0, end, n0 = _program(
        offs_ptr, ids_ptr, expert_lo, hidden_size, num_experts, num_m, BLOCK_M, BLOCK_N, GROUP_M, E_POW2, PAIRS,
        USE_PDL, EARLY_TRIGGER,
    )  # fmt: skip
    if not COMBINE:
        if expert >= num_experts:
            return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden_size
    if expert < num_experts:  # with COMBINE a dead pair's programs skip the GEMM but still arrive below
        ks = tl.arange(0, BLOCK_K)
        if not TMA:
            a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :]
            w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn
            w_ptrs += ks[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            if TMA:  # rows past the expert's (the next expert's, or zeros) only reach columns never stored
                a = a_ptr.load([row0, k0])
                w = w_ptr.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
            else:
                k_ok = ks < inter - k0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                a_ptrs += BLOCK_K
                w_ptrs += BLOCK_K * stride_wk
            acc = _dot(a, w, acc, IEEE)
        out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if COMBINE:  # PAIRS: row0 is the pair; its token's K programs of this column block each arrive once
        token = row0 // TOP_K
        count = counts_ptr + token.to(tl.int64) * tl.cdiv(hidden_size, BLOCK_N) + n0 // BLOCK_N
        # a barrier, so every thread's rows are stored before the (one thread's) release; the arrival's result
        # reaches the other threads through shared memory after a barrier, which orders their reads after the
        # acquire: the last program to arrive reads all K rows
        tl.debug_barrier()
        if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == TOP_K - 1:
            _combine_columns(
                out_ptr, stride_om, 1, 0, weights_ptr, stride_wt, stride_wtk, ids_ptr, expert_lo, num_experts,
                combined_ptr, stride_cm, token, cols, col_ok, TOP_K, RENORM, ZERO_DEAD, 1,
            )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Decode: both GEMMs in one kernel


@triton.jit
def fused_decode_kernel(
    hidden_ptr,
    gate_ptr,
    up_ptr,
    w2_ptr,
    ids_ptr,
    pairs,
    expert_lo,
    partial_ptr,
    hidden_size,
    inter,
    num_experts,
    top_k,
    stride_xm,
    stride_xk,
    stride_ge,
    stride_gn,
    stride_gk,
    stride_ue,
    stride_un,
    stride_uk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ps,
    stride_pm,
    ACT: tl.constexpr,
    IEEE: tl.constexpr,
    WEIGHT_TMA: tl.constexpr,
    PAIRS_POW2: tl.constexpr,
    BINS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY_TRIGGER: tl.constexpr,
):
    """Program (slot, s): the slot-th of the live local experts (by id) and its pairs, found among the flat ids
    (each program reads them all, at most DECODE_MAX_PAIRS: no grouping kernel), BLOCK_M at a time: their
    activations over the intermediate columns [s * BLOCK_N, (s + 1) * BLOCK_N), rounded to the input dtype
    (``_gated_rows``), times those columns of the expert's down projection: ``partial[s, pair] = a[pair, cols] @
    w2_e[:, cols].T`` in fp32, the down GEMM split over the intermediate dimension. Every program streams its up
    and down weights in one go, so the layer's weights are one grid's read (a down GEMM of its own starts
    reading only once the up GEMM's last program is done), each expert's once (BLOCK_M at least the most pairs
    an expert has). A slot past the live experts returns at once."""
    _pdl_wait(USE_PDL, EARLY_TRIGGER)
    splits = tl.cdiv(inter, BLOCK_N)
    slot = tl.program_id(0) // splits
    n0 = (tl.program_id(0) % splits) * BLOCK_N
    p = tl.arange(0, PAIRS_POW2)
    local = _local_expert(tl.load(ids_ptr + p, mask=p < pairs, other=0), expert_lo, num_experts)
    local = tl.where(p < pairs, local, num_experts)  # the padding with the dead pairs
    e = tl.arange(0, BINS)
    present = (tl.histogram(local, BINS) > 0) & (e < num_experts)
    if slot >= tl.sum(present.to(tl.int32), 0):
        return
    rank = tl.cumsum(present.to(tl.int32), 0) - 1
    expert = tl.sum(tl.where(present & (rank == slot), e, 0), 0)
    mine = local == expert
    position = tl.cumsum(mine.to(tl.int32), 0) - 1
    count = tl.sum(mine.to(tl.int32), 0)
    cols = n0 + tl.arange(0, BLOCK_N)
    hs = tl.arange(0, BLOCK_H)
    for m0 in range(0, count, BLOCK_M):
        i = m0 + tl.arange(0, BLOCK_M)
        row_ok = i < count
        rows = tl.sum(tl.where(mine[None, :] & (position[None, :] == i[:, None]), p[None, :], 0), 1)
        a = _gated_rows(
            hidden_ptr, gate_ptr, up_ptr, expert, (rows // top_k).to(tl.int64), row_ok, n0, hidden_size, inter,
            stride_xm, stride_xk, stride_ge, stride_gn, stride_gk, stride_ue, stride_un, stride_uk, ACT, IEEE,
            WEIGHT_TMA, BLOCK_M, BLOCK_N, BLOCK_K,
        ).to(hidden_ptr.dtype.element_ty)  # fmt: skip
        if not WEIGHT_TMA:
            w_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + hs[None, :] * stride_wn + cols[:, None] * stride_wk
        out_ptrs = partial_ptr + (n0 // BLOCK_N) * stride_ps + rows[:, None].to(tl.int64) * stride_pm + hs[None, :]
        for h0 in range(0, hidden_size, BLOCK_H):
            h_ok = hs < hidden_size - h0
            if WEIGHT_TMA:  # [1, BLOCK_H, BLOCK_N] boxes, zero past the hidden size and the intermediate columns
                w = w2_ptr.load([expert, h0, n0]).reshape(BLOCK_H, BLOCK_N).T
            else:
                w = tl.load(w_ptrs, mask=(cols < inter)[:, None] & h_ok[None, :], other=0.0)
                w_ptrs += BLOCK_H * stride_wn
            part = _dot(a, w, tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), IEEE)
            tl.store(out_ptrs, part, mask=row_ok[:, None] & h_ok[None, :])
            out_ptrs += BLOCK_H


@triton.jit
def decode_combine_kernel(
    partial_ptr,
    splits,
    stride_ps,
    stride_pm,
    weights_ptr,
    stride_wt,
    stride_wk,
    ids_ptr,
    expert_lo,
    num_experts,
    out_ptr,
    stride_om,
    hidden_size,
    TOP_K: tl.constexpr,
    RENORM: tl.constexpr,
    ZERO_DEAD: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
    BLOCK_H: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (token, column block): each live pair's row, the sum of its ``splits`` partial rows rounded to
    the output dtype, then moe_combine's weighted sum over k (``_combine_columns``)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    _combine_columns(
        partial_ptr, stride_pm, splits, stride_ps, weights_ptr, stride_wt, stride_wk, ids_ptr, expert_lo,
        num_experts, out_ptr, stride_om, tl.program_id(0), cols, cols < hidden_size, TOP_K, RENORM, ZERO_DEAD,
        SPLITS_POW2,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Grouping by counting


@triton.jit
def _group_of(ids_ptr, pair, valid, ids_row_stride, ids_col_stride, expert_lo, experts, K: tl.constexpr):
    """Each pair's group: its local expert, or ``experts`` (dead)."""
    ids = tl.load(ids_ptr + (pair // K) * ids_row_stride + (pair % K) * ids_col_stride, mask=valid, other=0)
    return _local_expert(ids, expert_lo, experts)


@triton.jit
def group_count_kernel(
    ids_ptr,
    counts_ptr,
    cursor_ptr,
    numel,
    ids_row_stride,
    ids_col_stride,
    expert_lo,
    experts,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    BINS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program p: the group counts of pairs [p * BLOCK, (p + 1) * BLOCK) into ``counts[p]``, and its row of
    ``cursor`` zeroed for the scatter's atomics."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the scatter's wait still orders it after these stores
    pid = tl.program_id(0)
    pair = pid * BLOCK + tl.arange(0, BLOCK)
    valid = pair < numel
    group = _group_of(ids_ptr, pair, valid, ids_row_stride, ids_col_stride, expert_lo, experts, K)
    counts = tl.histogram(tl.where(valid, group, BINS - 1), BINS)  # padding in the last bin, never read
    bins = tl.arange(0, BINS)
    tl.store(counts_ptr + pid * BINS + bins, counts)
    tl.store(cursor_ptr + pid * BINS + bins, tl.zeros((BINS,), dtype=tl.int32))


@triton.jit
def group_scatter_kernel(
    ids_ptr,
    counts_ptr,
    cursor_ptr,
    order_ptr,
    src_rows_ptr,
    offs_ptr,
    numel,
    programs,
    ids_row_stride,
    ids_col_stride,
    expert_lo,
    experts,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    BINS: tl.constexpr,
    P_POW2: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program p places pairs [p * BLOCK, (p + 1) * BLOCK): group g's rows start after every group before it and
    after group g's pairs in programs before p; a live pair takes the next of those rows by an atomic on its
    program's cursor of g, a dead one its rank among the program's dead pairs (no atomics on the dead group,
    which holds most pairs when few experts are local). ``order[row] = pair``, ``src_rows[pair] = row``;
    program 0 writes ``offs``."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    p = tl.arange(0, P_POW2)
    bins = tl.arange(0, BINS)
    counts = tl.load(counts_ptr + p[:, None] * BINS + bins[None, :], mask=(p < programs)[:, None], other=0)
    total = tl.sum(counts, 0)
    ends = tl.cumsum(total, 0)
    base = ends - total + tl.sum(tl.where((p < pid)[:, None], counts, 0), 0)
    if pid == 0:
        tl.store(offs_ptr + bins, ends, mask=bins < experts)
    pair = pid * BLOCK + tl.arange(0, BLOCK)
    valid = pair < numel
    group = _group_of(ids_ptr, pair, valid, ids_row_stride, ids_col_stride, expert_lo, experts, K)
    live = valid & (group < experts)
    dead = (valid & (group == experts)).to(tl.int32)
    slot = tl.atomic_add(cursor_ptr + pid * BINS + group, 1, mask=live, sem="relaxed")
    dead_base = tl.sum(tl.where(bins == experts, base, 0), 0)
    row = tl.where(live, tl.gather(base, group, 0) + slot, dead_base + tl.cumsum(dead, 0) - dead)
    tl.store(order_ptr + row, pair, mask=valid)
    tl.store(src_rows_ptr + pair, row, mask=valid)


# ------------------------------------------------------------------------------------------------------------
# Configs


def token_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens`` (at least 1): the configs' token key."""
    return 1 << max(0, (max(tokens, 1) - 1).bit_length())


def shape_key(experts: int, inter: int, hidden_size: int, top_k: int) -> str:
    return f"E={experts},I={inter},H={hidden_size},K={top_k}"


def heuristic_config(tokens: int, experts: int, top_k: int, dtype: torch.dtype) -> Config:
    """Tiles for a shape not tuned, by the mean rows an expert gets: one-row-ish blocks of 16 with narrow, deep
    tiles while the weights stream (decode), 64-row blocks with grouped ordering once a tile's weights are reused
    across rows."""
    rows = tokens * top_k / max(experts, 1)
    fp32 = dtype == torch.float32
    if rows <= 16:
        tile = Tile(16, 64, 64 if fp32 else 128, 1, 4, 3 if fp32 else 4)
        return Config(tile, tile)
    if rows <= 96:
        tile = Tile(32 if fp32 else 64, 64, 32 if fp32 else 64, 4, 4, 3)
        return Config(tile, tile)
    big = Tile(64, 64 if fp32 else 128, 32 if fp32 else 64, 8, 4 if fp32 else 8, 3)
    return Config(big, big)


@functools.cache
def _tuned() -> dict:
    return json.loads(CONFIGS.read_text()) if CONFIGS.exists() else {}


# Devices without their own table take that of a tuned device of the same architecture: the H200 has the H100's
# SMs and tensor cores (its faster memory only moves points towards the compute-bound tiles).
SAME_ARCH = {(9, 0): "NVIDIA H100 80GB HBM3"}


@functools.cache
def _device_tables(device: torch.device) -> tuple[dict, ...]:
    """This device's table, then that of the tuned device of its architecture."""
    if device.type != "cuda":
        return ()
    tables = _tuned()
    own = torch.cuda.get_device_name(device)
    same = SAME_ARCH.get(torch.cuda.get_device_capability(device))
    return tuple(tables[name] for name in dict.fromkeys((own, same)) if name in tables)


def config_for(tokens, experts, inter, hidden_size, top_k, dtype, device) -> Config:
    """The tuned config of this shape and token bucket (16-bit inputs) from this device's table or its
    architecture's, else the heuristic's."""
    if dtype != torch.float32:
        for table in _device_tables(device):
            found = table.get(shape_key(experts, inter, hidden_size, top_k), {}).get(str(token_bucket(tokens)))
            if found is not None:
                return Config(Tile(**found["up"]), Tile(**found["down"]), found.get("path", "triton"))
    return heuristic_config(tokens, experts, top_k, dtype)


# ------------------------------------------------------------------------------------------------------------
# Launchers


def _ieee(t: torch.Tensor) -> bool:
    """fp32 dots of tiles upcast to fp32: for fp32 inputs (no TF32), and in Triton's interpreter (CPU tensors),
    whose dot of 16-bit tiles returns garbage (triton 3.6-3.9)."""
    return t.dtype == torch.float32 or t.device.type == "cpu"


def _descriptor(t: torch.Tensor, block: list[int]):
    """A TMA descriptor of ``t`` read in ``block`` boxes, or None where TMA does not read it: before sm90, fp32
    (its IEEE dots take pointer loads), a strided last dim, an unaligned base or stride. (The interpreter reads
    descriptors too, for CI.)"""
    if t.dtype == torch.float32 or (t.device.type == "cuda" and torch.cuda.get_device_capability(t.device)[0] < 9):
        return None
    size = t.element_size()
    if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]) or 0 in t.shape:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def row_blocks(pairs: int, experts: int, block_m: int) -> int:
    """A bound on the non-empty row blocks, known without a sync: each expert's last block may be partial."""
    return min(pairs, experts) + pairs // block_m


# Whether the GEMMs let the next kernel launch once every program has passed its wait (its CTAs then fill the
# SMs this grid's tail leaves idle; its own wait still orders it after this one), or only as they exit.
EARLY_TRIGGER = True
GROUP_BLOCK = 2048  # pairs a program of the grouping kernels takes
GROUP_MAX_CELLS = 1 << 14  # the scatter's programs each hold every program's counts (programs x bins) in registers
STABLE_SORT_MAX_PAIRS = 256  # up to this many pairs expert_sort's one program is as fast as counting


def group_fits(numel: int, experts: int) -> bool:
    """Whether the counting kernels take ``numel`` pairs over ``experts`` local experts."""
    programs = triton.cdiv(numel, GROUP_BLOCK)
    return triton.next_power_of_2(programs) * triton.next_power_of_2(experts + 2) <= GROUP_MAX_CELLS


def group(ids, ids_strides, expert_lo: int, experts: int, order, offs, src_rows) -> None:
    """The routed pairs grouped by local expert by counting, in two launches over blocks of pairs: ``offs``
    (int32 [E], each expert's end row), ``order`` (sorted row -> pair) and ``src_rows`` (pair -> sorted row),
    int32 [pairs], the dead pairs after every live one. Unlike ``expert_sort``'s stable order, an expert's rows
    from one block of pairs come in the order of the scatter's atomics; nothing fused_experts computes depends on
    it (each row's GEMM results are its own, and the combine sums a token's rows in k order). Where a stable
    sort's one program or a radix sort's ~10 launches take 13-19 us (H100, 2048-16384 pairs), these take a few."""
    numel = order.numel()
    programs = triton.cdiv(numel, GROUP_BLOCK)
    bins = triton.next_power_of_2(experts + 2)  # the experts, the dead group, the padding's bin
    pdl = launch.pdl(ids.device)
    counts = torch.empty(programs, bins, dtype=torch.int32, device=ids.device)
    cursor = torch.empty_like(counts)
    common = dict(K=ids.shape[-1], BLOCK=GROUP_BLOCK, BINS=bins, USE_PDL=pdl, num_warps=8)
    common |= launch.pdl_options(pdl)
    with launch.on(ids.device):
        group_count_kernel[(programs,)](ids, counts, cursor, numel, *ids_strides, expert_lo, experts, **common)
        group_scatter_kernel[(programs,)](
            ids, counts, cursor, order, src_rows, offs, numel, programs, *ids_strides, expert_lo, experts,
            P_POW2=triton.next_power_of_2(programs), **common,
        )  # fmt: skip


def up(hidden, gate, up_w, order, offs, out, activation: str, top_k: int, tile: Tile, pairs=None, counts=None) -> None:
    """``out[r] = act(hidden[t] @ gate[e].T) * (hidden[t] @ up_w[e].T)`` for every live sorted row r (expert e,
    token t = order[r] // top_k); with ``pairs`` = (flat ids, expert_lo) instead of order and offs, for every
    live pair r in pair order (t = r // top_k). gate and up_w: [E, I, H], any strides. ``counts`` (int32 [T,
    column blocks], with ``pairs``): the arrival counts of the down GEMM that combines, zeroed here."""
    experts, inter, hidden_size = gate.shape
    ids, expert_lo = pairs or (offs, 0)  # sorted rows: the kernel does not read ids (offs stands in)
    num_m = ids.numel() if pairs else row_blocks(order.numel(), experts, tile.block_m)
    grid = (num_m * triton.cdiv(inter, tile.block_n),)
    if grid[0] == 0:
        return
    pdl = launch.pdl(hidden.device)
    box = [1, tile.block_n, tile.block_k]
    descs = (_descriptor(gate, box), _descriptor(up_w, box)) if tile.tma else (None, None)
    tma = None not in descs
    with launch.on(hidden.device):
        fused_up_kernel[grid](
            hidden,
            *(descs if tma else (gate, up_w)),
            ids if pairs else order,  # pairs: the kernel reads neither order nor offs (ids stand in)
            ids if pairs else offs,
            ids,
            expert_lo,
            out,
            ids if counts is None else counts,
            1 if counts is None else counts.shape[1],
            hidden_size,
            inter,
            experts,
            num_m,
            top_k,
            *hidden.stride(),
            *gate.stride(),
            *up_w.stride(),
            out.stride(0),
            ACT=ACTIVATION_CODES[activation],
            IEEE=_ieee(hidden),
            WEIGHT_TMA=tma,
            PAIRS=pairs is not None,
            ZERO_COUNTS=counts is not None,
            COUNT_POW2=1 if counts is None else triton.next_power_of_2(counts.shape[1]),
            BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n,
            BLOCK_K=tile.block_k,
            GROUP_M=tile.group_m,
            E_POW2=triton.next_power_of_2(experts),
            USE_PDL=pdl,
            EARLY_TRIGGER=EARLY_TRIGGER,
            num_warps=tile.num_warps,
            num_stages=tile.num_stages,
            **launch.pdl_options(pdl),
        )


DECODE_COMBINE_COLUMNS = 64  # the decode combine's column block (T=1, H=2048: 32 programs)
DECODE_MAX_PAIRS = 256  # the decode kernel's programs each read every pair's id
DECODE_MAX_SPLITS = 64  # the combine reads a pair's partial rows at once, [splits, DECODE_COMBINE_COLUMNS] fp32
# The partial rows (fp32 [I / block_n, pairs, H]) go to memory and back once: at most this, which the L2 mostly
# holds (Mixtral's I = 14336 in 32 columns a program would take 235 MB at T=16)
DECODE_MAX_PARTIAL_BYTES = 32 << 20


def decode_fits(pairs: int, inter: int, hidden_size: int, config: Config) -> bool:
    """Whether the decode path takes ``pairs`` pairs with these tiles."""
    splits = triton.cdiv(inter, config.up.block_n)
    return (
        pairs <= DECODE_MAX_PAIRS
        and splits <= DECODE_MAX_SPLITS
        and splits * pairs * hidden_size * 4 <= DECODE_MAX_PARTIAL_BYTES
    )


def decode(
    hidden, gate, up_w, w2, ids, expert_lo, weights, out, activation, config: Config, renormalize, zero_dead_rows
) -> None:
    """The "decode" path into ``out``, for at most DECODE_MAX_PAIRS pairs: ``fused_decode_kernel`` (both GEMMs,
    the down one split over the intermediate dimension; ``config.up``: its tile, ``block_m`` rows of an expert
    at a time, ``block_n`` intermediate columns a program, ``block_k`` of the hidden size a step of the up GEMM;
    ``config.down.block_n``: hidden columns a step of the down GEMM), then ``decode_combine_kernel``. ids: the
    flat ids [pairs], contiguous."""
    tokens, hidden_size = hidden.shape
    experts, inter, _ = gate.shape
    pairs, top_k = ids.numel(), weights.shape[1]
    tile, block_h = config.up, config.down.block_n
    splits = triton.cdiv(inter, tile.block_n)
    slots = min(pairs, experts)
    partial = torch.empty(splits, pairs, hidden_size, dtype=torch.float32, device=hidden.device)
    pdl = launch.pdl(hidden.device)
    descs = (None,) * 3
    if tile.tma:
        up_box, down_box = [1, tile.block_n, tile.block_k], [1, block_h, tile.block_n]
        descs = (_descriptor(gate, up_box), _descriptor(up_w, up_box), _descriptor(w2, down_box))
    tma = None not in descs
    with launch.on(hidden.device):
        fused_decode_kernel[(slots * splits,)](
            hidden,
            *(descs if tma else (gate, up_w, w2)),
            ids,
            pairs,
            expert_lo,
            partial,
            hidden_size,
            inter,
            experts,
            top_k,
            *hidden.stride(),
            *gate.stride(),
            *up_w.stride(),
            *w2.stride(),
            *partial.stride()[:2],
            ACT=ACTIVATION_CODES[activation],
            IEEE=_ieee(hidden),
            WEIGHT_TMA=tma,
            PAIRS_POW2=triton.next_power_of_2(pairs),
            BINS=triton.next_power_of_2(experts + 1),
            BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n,
            BLOCK_K=tile.block_k,
            BLOCK_H=block_h,
            USE_PDL=pdl,
            EARLY_TRIGGER=EARLY_TRIGGER,
            num_warps=tile.num_warps,
            num_stages=tile.num_stages,
            **launch.pdl_options(pdl),
        )
        decode_combine_kernel[(tokens, triton.cdiv(hidden_size, DECODE_COMBINE_COLUMNS))](
            partial,
            splits,
            *partial.stride()[:2],
            weights,
            *weights.stride(),
            ids,
            expert_lo,
            experts,
            out,
            out.stride(0),
            hidden_size,
            TOP_K=top_k,
            RENORM=renormalize,
            ZERO_DEAD=zero_dead_rows,
            SPLITS_POW2=max(2, triton.next_power_of_2(splits)),
            BLOCK_H=DECODE_COMBINE_COLUMNS,
            USE_PDL=pdl,
            num_warps=4,
            **launch.pdl_options(pdl),
        )


@dataclasses.dataclass(frozen=True)
class Combine:
    """The combine folded into the down GEMM (with ``pairs``): ``out = moe_combine(rows, weights, ids, ...)``
    written by the last of each token's K programs of a column block to arrive on ``counts`` (zeroed by the up
    GEMM: :func:`up`'s ``counts``)."""

    weights: torch.Tensor
    counts: torch.Tensor
    out: torch.Tensor
    renormalize: bool
    zero_dead_rows: bool


def combine_counts(tokens: int, hidden_size: int, tile: Tile, device) -> torch.Tensor:
    """The arrival counts of a combining down GEMM: one per token and column block."""
    return torch.empty(tokens, triton.cdiv(hidden_size, tile.block_n), dtype=torch.int32, device=device)


def down(a, w2, offs, out, tile: Tile, pairs=None, combine: Combine | None = None) -> None:
    """``out[r] = a[r] @ w2[e].T`` for every live sorted row r of expert e (or, with ``pairs`` as in :func:`up`,
    every live pair r). w2: [E, H, I], any strides. With ``combine`` (and ``pairs``) the rows' combine too."""
    experts, hidden_size, inter = w2.shape
    ids, expert_lo = pairs or (offs, 0)  # as in up()
    num_m = ids.numel() if pairs else row_blocks(a.shape[0], experts, tile.block_m)
    grid = (num_m * triton.cdiv(hidden_size, tile.block_n),)
    if grid[0] == 0:
        return
    pdl = launch.pdl(a.device)
    descs = (None, None)
    if tile.tma:
        descs = (_descriptor(a, [tile.block_m, tile.block_k]), _descriptor(w2, [1, tile.block_n, tile.block_k]))
    tma = None not in descs
    with launch.on(a.device):
        fused_down_kernel[grid](
            *(descs if tma else (a, w2)),
            ids if pairs else offs,  # as in up()
            ids,
            expert_lo,
            out,
            inter,
            hidden_size,
            experts,
            num_m,
            a.stride(0),
            *w2.stride(),
            out.stride(0),
            *((combine.weights, *combine.weights.stride()) if combine else (out, 0, 0)),
            *((combine.counts, combine.out, combine.out.stride(0)) if combine else (out, out, 0)),
            IEEE=_ieee(a),
            TMA=tma,
            PAIRS=pairs is not None,
            COMBINE=combine is not None,
            TOP_K=1 if combine is None else combine.weights.shape[1],
            RENORM=bool(combine and combine.renormalize),
            ZERO_DEAD=bool(combine and combine.zero_dead_rows),
            BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n,
            BLOCK_K=tile.block_k,
            GROUP_M=tile.group_m,
            E_POW2=triton.next_power_of_2(experts),
            USE_PDL=pdl,
            EARLY_TRIGGER=EARLY_TRIGGER,
            num_warps=tile.num_warps,
            num_stages=tile.num_stages,
            **launch.pdl_options(pdl),
        )
