"""``expert_sort``: the routed pairs grouped by local expert, ``(order, offs, src_rows)``. Schema, checks, fake,
CPU (the reference), CUDA (kernels/triton/expert_sort.py up to one program's pairs, the ATen chain past it)
and the public function. Integers only: no gradient."""

from __future__ import annotations

import torch

from .. import reference
from ..indexing import MAX_INDEX, flat_row_stride, inverse_permutation, narrow_keys, row_strides
from .library import INDEX_DTYPES, check, define, lib

define("expert_sort(Tensor topk_ids, int expert_lo, int expert_hi) -> (Tensor order, Tensor offs, Tensor src_rows)")


def check_args(topk_ids, expert_lo, expert_hi):
    def _check(cond, msg):
        check(cond, msg, "expert_sort")

    _check(topk_ids.dtype in INDEX_DTYPES, f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    _check(topk_ids.dim() >= 1, "topk_ids must have at least one dim")
    _check(
        flat_row_stride(topk_ids) is not None,
        f"topk_ids' leading dims must flatten to one row stride; got strides {list(topk_ids.stride())}",
    )
    _check(
        0 <= expert_lo <= expert_hi <= MAX_INDEX,
        f"expert_range must satisfy 0 <= lo <= hi < 2**31 (a range that wraps around has no group order), "
        f"got ({expert_lo}, {expert_hi})",
    )
    _check(topk_ids.numel() <= MAX_INDEX, f"at most 2**31-1 routed pairs are supported, got {topk_ids.numel()}")


@torch.library.register_fake("inductor_moe::expert_sort")
def _fake(topk_ids, expert_lo, expert_hi):
    check_args(topk_ids, expert_lo, expert_hi)
    pairs = topk_ids.numel()
    return (
        topk_ids.new_empty(pairs, dtype=torch.int64),
        topk_ids.new_empty(expert_hi - expert_lo, dtype=torch.int32),
        topk_ids.new_empty(pairs, dtype=torch.int64),
    )


@torch.library.impl(lib, "expert_sort", "CPU")
def _cpu(topk_ids, expert_lo, expert_hi):
    check_args(topk_ids, expert_lo, expert_hi)
    return reference.expert_sort_ref(topk_ids, expert_lo, expert_hi)


def expert_sort_aten(topk_ids: torch.Tensor, expert_lo: int, expert_hi: int):
    """expert_sort as a chain of ATen ops, for inputs larger than one program of the kernel holds: the key
    sorted in the narrowest integer dtype that holds it, the inverse scattered instead of sorted
    (:mod:`inductor_moe.indexing` says what each saves). The same values as the reference."""
    groups = expert_hi - expert_lo
    ids = topk_ids.reshape(-1)
    local = ids - expert_lo
    key = torch.where((local >= 0) & (local < groups), local, groups)  # [n], the dead group last
    order = torch.argsort(narrow_keys(key, groups), stable=True)
    counts = torch.zeros(groups + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, key.long(), torch.ones_like(key, dtype=torch.int32))
    return order, counts[:groups].cumsum(0, dtype=torch.int32), inverse_permutation(order)


@torch.library.impl(lib, "expert_sort", "CUDA")
def _cuda(topk_ids, expert_lo, expert_hi):
    from ..kernels.triton import expert_sort as kernel

    check_args(topk_ids, expert_lo, expert_hi)
    pairs, groups = topk_ids.numel(), expert_hi - expert_lo
    if not kernel.fits(pairs, groups):
        return expert_sort_aten(topk_ids, expert_lo, expert_hi)
    order = torch.empty(pairs, dtype=torch.int64, device=topk_ids.device)
    src_rows = torch.empty_like(order)
    offs = torch.empty(groups, dtype=torch.int32, device=topk_ids.device)
    kernel.expert_sort(topk_ids, row_strides(topk_ids), expert_lo, groups, order, offs, src_rows)
    return order, offs, src_rows


_expert_sort_op = torch.ops.inductor_moe.expert_sort.default


def expert_sort(
    topk_ids: torch.Tensor, expert_range: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed pairs grouped by local expert, for grouped GEMMs: ``(order, offs, src_rows)``.

    Pair ``p`` is ``topk_ids.reshape(-1)[p]``; with ``(lo, hi) = expert_range`` its group is ``id - lo`` when
    ``lo <= id < hi`` (this rank's experts) and ``hi - lo`` otherwise (dead: sorted after every live pair).
    ``order`` (int64 [n]) is the stable sort of the pairs by group (sorted row -> pair), ``offs`` (int32
    [hi - lo]) each group's end row (its cumulative count, as ``torch._grouped_mm`` takes it; dead rows start
    at ``offs[-1]``), and ``src_rows`` (int64 [n]) the inverse of ``order`` (pair -> sorted row). Exactly
    :func:`inductor_moe.reference.expert_sort_ref`: integers only, nothing rounded.
    """
    return _expert_sort_op(topk_ids, *expert_range)
