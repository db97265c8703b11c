"""Index and layout helpers shared by the ops, the lowerings and the runner.

This module sits below :mod:`inductor_moe.ops`: it imports nothing of the package, so the ops, the lowerings
(which reuse the row-layout checks on fake values and the key narrowing and inverse permutation in the graphs
they build) and the runner all depend on it, and on nothing above them.
"""

from __future__ import annotations

import torch

MAX_INDEX = 2**31 - 1  # the kernels' 32-bit limits: rows, pairs, a dim's extent


def guard_or_false(cond) -> bool:
    """``cond`` if it is known without adding a guard on a symbolic size, else False."""
    # imported here: symbolic_shapes costs ~0.45 s at import, and only fake/CPU calls get here
    from torch.fx.experimental.symbolic_shapes import guard_or_false as _guard_or_false

    return _guard_or_false(cond)


def flat_row_stride(t: torch.Tensor, holds=guard_or_false):
    """Row stride of ``t`` viewed as [rows, t.shape[-1]], or None if its leading dims do not flatten.
    ``holds`` decides size conditions (the lowerings pass one that never guards)."""
    if t.dim() <= 1:
        return t.shape[-1]
    stride = expected = None
    for i in range(t.dim() - 2, -1, -1):
        if holds(t.shape[i] == 1):
            continue
        if stride is None:
            stride = t.stride(i)
        elif not holds(t.stride(i) == expected):
            return None
        expected = t.stride(i) * t.shape[i]
    return t.shape[-1] if stride is None else stride


def rows_layout_ok(t: torch.Tensor, holds=guard_or_false) -> bool:
    """Whether the kernels can read ``t`` as [rows, last dim]: a contiguous last dim, leading dims that flatten."""
    contiguous_last = holds(t.shape[-1] <= 1) or holds(t.stride(-1) == 1)
    return t.dim() >= 1 and contiguous_last and flat_row_stride(t, holds) is not None


def row_strides(t: torch.Tensor) -> tuple[int, int]:
    """(row stride, column stride) of ``t`` viewed as [rows, t.shape[-1]] (the Triton kernels' addressing)."""
    return flat_row_stride(t), (t.stride(-1) if t.dim() else 1)


def narrow_key_dtype(lo: int, hi: int, dtype: torch.dtype) -> torch.dtype | None:
    """The narrowest of uint8 / int16 / int32 that holds [lo, hi] and is narrower than ``dtype``, else None.

    A stable sort of keys in [lo, hi] cast to it returns the same indices, sooner: torch's sort takes longer the
    wider its keys (H200, 2048 pairs, stable argsort: int64 31.9 us, uint8 11.6)."""
    for narrow in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(narrow)
        if info.min <= lo and hi <= info.max:
            return narrow if narrow.itemsize < dtype.itemsize else None
    return None


def narrow_keys(key: torch.Tensor, top: int) -> torch.Tensor:
    """``key`` (values in [0, top]) in :func:`narrow_key_dtype`'s dtype for them, or as it is."""
    dtype = narrow_key_dtype(0, top, key.dtype)
    return key if dtype is None else key.to(dtype)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i`` for a permutation ``perm`` of range(n), 1-D: what ``torch.argsort(perm)``
    returns, by one scatter instead of a sort (H200, 2048 pairs, in a CUDA graph: argsort 32.2 us, this compiled
    1.4)."""
    return torch.empty_like(perm).index_put_((perm,), torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype))
