"""Triton kernel of ``inductor_moe::pack_topk_ids_weights``: int32 ``(id << 16) | bf16_bits(weight)``.

Launched by ops/topk_pack.py inside an opaque custom op (not ``triton_op``: Inductor would re-launch the kernel
without ``launch_pdl``). PDL on sm90+: ``gdc_wait`` before the first load, then at once
``gdc_launch_dependents``. The same kernel runs under ``TRITON_INTERPRET=1`` on the CPU with PDL off, which
is how CI tests it: there ``.to(tl.bfloat16)`` truncates, so the rounding is done in integers, everywhere.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import launch

# bf16 bits of a NaN weight as torch's own conversion produces them, which the rounding below cannot derive.
# CUDA's cvt.rn.bf16.f32 returns the canonical 0x7FFF whatever the sign or source dtype; torch's CPU
# conversion differs by source dtype (seen: 0xFFFF from fp32, 0x7FC0 from fp16, x86 torch 2.13), so it is probed.
_CUDA_NAN_BITS = 0x7FFF


@functools.cache
def nan_bits(device_type: str, dtype: torch.dtype) -> tuple[int, int]:
    """(bits for +NaN, bits for -NaN) of ``torch.tensor(nan, dtype=dtype).to(bfloat16)`` on this device type."""
    if device_type == "cuda":
        return _CUDA_NAN_BITS, _CUDA_NAN_BITS
    nans = torch.tensor([float("nan"), -float("nan")], dtype=dtype).to(torch.bfloat16)
    nans = nans.view(torch.int16).to(torch.int32) & 0xFFFF
    return int(nans[0]), int(nans[1])


@triton.jit
def topk_pack_kernel(
    ids_ptr,
    weights_ptr,
    out_ptr,
    numel,
    ids_row_stride,
    ids_col_stride,
    w_row_stride,
    w_col_stride,
    nan_pos_bits,
    nan_neg_bits,
    K: tl.constexpr,
    WEIGHTS_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # before the first global read
        # Trigger at once, not after the store: the next grid's own wait still orders it after this one, and
        # these grids (at most 256 blocks of 4 warps at T=8192, K=8) leave room on the SMs for it to launch early.
        # H100, chain of 32 in a CUDA graph: 1.18 -> 0.95 us a kernel at T=64, 1.30 -> 1.15 at T=8192; T=1
        # unchanged.
        # (The activation kernel, whose grids fill the GPU, triggers at the end; see act_and_mul.cu.)
        tl.extra.cuda.gdc_launch_dependents()
    # 32-bit offsets (numel < 2**31 is checked by the op) and K a compile-time constant: a 64-bit division by
    # a run-time k made this kernel 2.0 us at every T on H100, against Inductor's 1.3.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row = offs // K
    col = offs % K
    ids = tl.load(ids_ptr + row * ids_row_stride + col * ids_col_stride, mask=mask, other=0)
    w = tl.load(weights_ptr + row * w_row_stride + col * w_col_stride, mask=mask, other=0)
    if WEIGHTS_BF16:
        bits = w.to(tl.uint16, bitcast=True).to(tl.uint32)
    else:
        # fp16 widens to fp32 exactly; fp32 -> bf16 rounds to nearest even on the integer bits.
        u = w.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        nan = tl.where((u >> 31) != 0, nan_neg_bits, nan_pos_bits).to(tl.uint32)
        bits = tl.where(is_nan, nan, rounded)
    packed = (ids.to(tl.int32) << 16) | (bits & 0xFFFF).to(tl.int32)
    tl.store(out_ptr + offs, packed, mask=mask)


# 256 elements a program (two a thread; T=8192, K=8 is 256 programs), and one element a thread for
# small inputs: a thread's chain of masked loads is the latency of the launch (H100, T=1: 0.80 us with 32
# elements over one warp, 1.35 with 1024 over 4). Past 32 such programs (T > 1024, K=8), 512 elements a program
# over 8 warps (H200, T=32768: 1.02 us against 1.51 with 256 over 4).
_MAX_BLOCK = 256
_LARGE_BLOCK = 512


def _block(numel: int) -> tuple[int, int]:
    """(elements, warps) of one program."""
    if numel > 32 * _MAX_BLOCK:
        return _LARGE_BLOCK, 8
    block = min(_MAX_BLOCK, max(32, triton.next_power_of_2(numel)))
    return block, max(1, min(4, block // 32))


def topk_pack(ids: torch.Tensor, weights: torch.Tensor, ids_strides, w_strides, out: torch.Tensor) -> None:
    """Launch over ``out`` (contiguous [rows, k] int32) with [rows, k] row/column strides of the inputs."""
    numel = out.numel()
    if numel == 0:
        return
    rows, k = numel // out.shape[-1], out.shape[-1]
    for name, (row_stride, col_stride) in (("topk_ids", ids_strides), ("topk_weights", w_strides)):
        # the kernel's offsets are 32-bit (numel < 2**31 is checked by the op; a strided view can reach further)
        last = (rows - 1) * row_stride + (k - 1) * col_stride
        if last > 2**31 - 1:
            raise RuntimeError(
                f"inductor_moe.pack_topk_ids_weights: {name}'s layout reaches element offset {last}, past 2**31-1; "
                "pass a contiguous tensor"
            )
    pdl = launch.pdl(ids.device)
    nan_pos, nan_neg = nan_bits(ids.device.type, weights.dtype)
    block, warps = _block(numel)
    with launch.on(ids.device):
        topk_pack_kernel[(triton.cdiv(numel, block),)](
            ids,
            weights,
            out,
            numel,
            *ids_strides,
            *w_strides,
            nan_pos,
            nan_neg,
            K=out.shape[-1],
            WEIGHTS_BF16=weights.dtype == torch.bfloat16,
            BLOCK=block,
            USE_PDL=pdl,
            num_warps=warps,
            **launch.pdl_options(pdl),
        )
