"""Triton kernel of ``inductor_moe::expert_sort``: routed pairs grouped by local expert, in one launch.

One program holds every pair: it maps each id to its group (the local expert, or the dead group after them),
sorts ``(group << LOG) | pair`` (distinct values, so the order is the stable sort by group, ties by pair), and
writes the permutation, its inverse and the groups' end rows. What this replaces in the runner is a chain of
~10 ATen launches (the key's elementwise ops, a radix sort, a histogram, a cumsum, the inverse's arange and
scatter). Larger inputs than one program holds take that chain instead (ops/expert_sort.py), which is where a
radix sort over many blocks wins.

No PDL: in the runner the kernel sits between ATen launches (the router's top-k before it, the gather of the
rows after), all plain, and a PDL launch after a plain one costs ~0.2 µs (csrc/launcher.h). The same kernel
runs under ``TRITON_INTERPRET=1`` on the CPU, which is how CI tests it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch

# Past this many pairs (or groups) the op takes the ATen chain: a one-program bitonic sort runs on one SM.
# H200, CUDA graph, 16 of 128 experts local, µs of this kernel against the eager chain: 1024 pairs 10.3 / 33.7,
# 2048 pairs 32.1 / 35.2.
MAX_PAIRS = 1024
MAX_GROUPS = 1022  # histogram bins: the groups, the dead group, the padding's bin, in 1024


def fits(numel: int, groups: int) -> bool:
    """Whether one program of this kernel holds ``numel`` pairs in ``groups`` local experts."""
    return numel <= MAX_PAIRS and groups <= MAX_GROUPS


@triton.jit
def expert_sort_kernel(
    ids_ptr,
    order_ptr,
    offs_ptr,
    src_rows_ptr,
    numel,
    ids_row_stride,
    ids_col_stride,
    expert_lo,
    groups,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    LOG_BLOCK: tl.constexpr,
    BINS: tl.constexpr,
):
    pair = tl.arange(0, BLOCK)
    valid = pair < numel
    ids = tl.load(ids_ptr + (pair // K) * ids_row_stride + (pair % K) * ids_col_stride, mask=valid, other=0)
    local = ids - expert_lo  # in ids' dtype: an int64 id far outside the range cannot wrap into it
    group = tl.where((local >= 0) & (local < groups), local, groups).to(tl.int32)
    # padding takes the last bin, above every real group (groups + 1 < BINS), so it sorts after them all and
    # counts toward no group's end row
    group = tl.where(valid, group, BINS - 1)
    # groups + 2 <= BINS <= 2**10 and BLOCK <= 2**21 keep the packed value under 2**31
    packed = tl.sort((group << LOG_BLOCK) | pair)
    source = packed & (BLOCK - 1)  # the pair at each sorted row; the first numel are real pairs
    tl.store(order_ptr + pair, source.to(tl.int64), mask=valid)
    tl.store(src_rows_ptr + source, pair.to(tl.int64), mask=valid)
    ends = tl.cumsum(tl.histogram(group, BINS), 0)
    bins = tl.arange(0, BINS)
    tl.store(offs_ptr + bins, ends, mask=bins < groups)


def _warps(block: int) -> int:
    return 1 if block <= 256 else (4 if block <= 2048 else 8)


def expert_sort(
    ids: torch.Tensor,
    ids_strides: tuple[int, int],
    expert_lo: int,
    groups: int,
    order: torch.Tensor,
    offs: torch.Tensor,
    src_rows: torch.Tensor,
) -> None:
    """Launch one program over ``ids`` ([rows, k] with the given row/column strides; the benchmark goes up to
    8192 pairs, past the op's MAX_PAIRS, and 2**21 would keep the packed values in 31 bits) into
    ``order`` / ``src_rows`` (int64 [rows * k]) and ``offs`` (int32 [groups]); the op checks the limits."""
    numel = order.numel()
    if numel == 0:
        offs.zero_()
        return
    block = max(32, triton.next_power_of_2(numel))
    with launch.on(ids.device):
        expert_sort_kernel[(1,)](
            ids,
            order,
            offs,
            src_rows,
            numel,
            *ids_strides,
            expert_lo,
            groups,
            K=ids.shape[-1],
            BLOCK=block,
            LOG_BLOCK=block.bit_length() - 1,
            BINS=triton.next_power_of_2(groups + 2),
            num_warps=_warps(block),
        )
