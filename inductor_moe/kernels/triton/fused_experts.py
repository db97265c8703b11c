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
  reads each pair's row once: the same bytes as weighting here, with one rounding fewer.

PDL on sm90+: ``gdc_wait`` before the first global read, ``launch_pdl=True``; the next kernel's own wait orders
it, so no early trigger. fp32 inputs take IEEE-precision dots (correct, slower); 16-bit ones the tensor cores
with fp32 accumulation.
Tile configs: ``fused_experts_configs.json`` beside this file (tuned on the device per shape and token bucket,
``benchmarks/bench_fused_experts.py --tune``, which also records where torch's grouped GEMM is faster), else
:func:`heuristic_config`. The same kernels run under
``TRITON_INTERPRET=1`` on the CPU with PDL off, which is how CI tests them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from ... import config

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


@dataclasses.dataclass(frozen=True)
class Config:
    """Both GEMMs' configs (each kernel blocks the sorted rows its own way), and the path: these kernels
    ("triton"), or torch's grouped GEMMs with our activation between them ("grouped_mm", where the table measured
    it faster: compute-bound shapes, hundreds of rows an expert; H100, Mixtral-8x7B at T=2048: 2878 us against
    3435)."""

    up: Tile
    down: Tile
    path: str = "triton"


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
    out_ptr,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # before the first global read: offs and order come from the kernel before
    pid_m, pid_n = _tile_ids(num_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    expert, row0, end = _row_block(offs_ptr, pid_m, num_experts, BLOCK_M, E_POW2)
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tokens = (tl.load(order_ptr + rows, mask=row_ok, other=0) // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = hidden_ptr + tokens[:, None] * stride_xm + ks[None, :] * stride_xk
    e = expert.to(tl.int64)
    g_ptrs = gate_ptr + e * stride_ge + cols[None, :].to(tl.int64) * stride_gn + ks[:, None] * stride_gk
    u_ptrs = up_ptr + e * stride_ue + cols[None, :].to(tl.int64) * stride_un + ks[:, None] * stride_uk
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_ok = ks < hidden_size - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            x = x.to(tl.float32)
            acc_g = tl.dot(x, g.to(tl.float32), acc_g, input_precision="ieee")
            acc_u = tl.dot(x, u.to(tl.float32), acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(x, g, acc_g)
            acc_u = tl.dot(x, u, acc_u)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_gk
        u_ptrs += BLOCK_K * stride_uk
    a = (_activation(acc_g, ACT) * acc_u).to(out_ptr.dtype.element_ty)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, a, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def fused_down_kernel(
    a_ptr,
    w_ptr,
    offs_ptr,
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
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    pid_m, pid_n = _tile_ids(num_m, tl.cdiv(hidden_size, BLOCK_N), GROUP_M)
    expert, row0, end = _row_block(offs_ptr, pid_m, num_experts, BLOCK_M, E_POW2)
    if expert >= num_experts:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden_size
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = ks < inter - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


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


def _pdl(device: torch.device) -> bool:
    return device.type == "cuda" and config.pdl_enabled() and torch.cuda.get_device_capability(device)[0] >= 9


def _ieee(t: torch.Tensor) -> bool:
    """fp32 dots of tiles upcast to fp32: for fp32 inputs (no TF32), and in Triton's interpreter (CPU tensors),
    whose dot of 16-bit tiles returns garbage (triton 3.6-3.9)."""
    return t.dtype == torch.float32 or t.device.type == "cpu"


def row_blocks(pairs: int, experts: int, block_m: int) -> int:
    """A bound on the non-empty row blocks, known without a sync: each expert's last block may be partial."""
    return min(pairs, experts) + pairs // block_m


def up(hidden, gate, up_w, order, offs, out, activation: str, top_k: int, tile: Tile) -> None:
    """``out[r] = act(hidden[t] @ gate[e].T) * (hidden[t] @ up_w[e].T)`` for every live sorted row r (expert e,
    token t = order[r] // top_k). gate and up_w: [E, I, H], any strides."""
    experts, inter, hidden_size = gate.shape
    num_m = row_blocks(order.numel(), experts, tile.block_m)
    grid = (num_m * triton.cdiv(inter, tile.block_n),)
    if grid[0] == 0:
        return
    pdl = _pdl(hidden.device)
    with contextlib.nullcontext() if hidden.device.type == "cpu" else torch.cuda.device(hidden.device):
        fused_up_kernel[grid](
            hidden,
            gate,
            up_w,
            order,
            offs,
            out,
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
            BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n,
            BLOCK_K=tile.block_k,
            GROUP_M=tile.group_m,
            E_POW2=triton.next_power_of_2(experts),
            USE_PDL=pdl,
            num_warps=tile.num_warps,
            num_stages=tile.num_stages,
            **({"launch_pdl": True} if pdl else {}),
        )


def down(a, w2, offs, out, tile: Tile) -> None:
    """``out[r] = a[r] @ w2[e].T`` for every live sorted row r of expert e. w2: [E, H, I], any strides."""
    experts, hidden_size, inter = w2.shape
    num_m = row_blocks(a.shape[0], experts, tile.block_m)
    grid = (num_m * triton.cdiv(hidden_size, tile.block_n),)
    if grid[0] == 0:
        return
    pdl = _pdl(a.device)
    with contextlib.nullcontext() if a.device.type == "cpu" else torch.cuda.device(a.device):
        fused_down_kernel[grid](
            a,
            w2,
            offs,
            out,
            inter,
            hidden_size,
            experts,
            num_m,
            a.stride(0),
            *w2.stride(),
            out.stride(0),
            IEEE=_ieee(a),
            BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n,
            BLOCK_K=tile.block_k,
            GROUP_M=tile.group_m,
            E_POW2=triton.next_power_of_2(experts),
            USE_PDL=pdl,
            num_warps=tile.num_warps,
            num_stages=tile.num_stages,
            **({"launch_pdl": True} if pdl else {}),
        )
