"""Lowering of the top-k id/weight packing ``(ids.to(int32) << 16) | (w.to(bfloat16).view(int16).to(int32) &
0xFFFF)`` into ``inductor_moe::pack_topk_ids_weights``.

The pattern is the reference itself (``reference.pack_topk_ids_weights_ref``), traced per ids dtype (int32,
int64) and weights dtype (fp32, fp16, bf16), with the ``|`` either way round, as a ``+`` (which never carries
there), or with the bits read through a ``uint16`` view (no mask needed); the op is bit-exact with each.
``torch.bitwise_left_shift`` and ``<<`` are one spelling (canonicalize.py).
Without the ``& 0xFFFF`` a negative weight's sign extension overwrites the id bits: that spelling computes
something else, so it is only recorded as a near miss, never rewritten.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass

from .. import reference
from ..indexing import flat_row_stride
from . import matching

OP = torch.ops.inductor_moe.pack_topk_ids_weights.default
FAMILY = "topk_pack"


def _weight_bits(topk_weights):
    return topk_weights.to(torch.bfloat16).view(torch.int16).to(torch.int32)


def _weights_first(topk_ids, topk_weights):
    return (_weight_bits(topk_weights) & 0xFFFF) | (topk_ids.to(torch.int32) << 16)


def _added(topk_ids, topk_weights):
    # the id's low 16 bits are 0 and the masked bits below 2**16: the sum never carries, so it is the |
    return (topk_ids.to(torch.int32) << 16) + (_weight_bits(topk_weights) & 0xFFFF)


def _unsigned_bits(topk_ids, topk_weights):
    # a uint16 view widens without sign extension: the & 0xFFFF of the int16 spelling
    return (topk_ids.to(torch.int32) << 16) | topk_weights.to(torch.bfloat16).view(torch.uint16).to(torch.int32)


def _no_mask(topk_ids, topk_weights):
    return (topk_ids.to(torch.int32) << 16) | _weight_bits(topk_weights)


def register(arithmetic: PatternMatcherPass) -> None:
    for ids_dtype in (torch.int64, torch.int32):  # int64 first: the op then reads the ids without a cast kernel
        for w_dtype in (torch.float32, torch.float16, torch.bfloat16):
            example = [torch.zeros(2, 4, dtype=ids_dtype), torch.zeros(2, 4, dtype=w_dtype)]
            for spelling, fn, check, replacement in (
                ("(ids << 16) | (bits(w) & 0xFFFF)", reference.pack_topk_ids_weights_ref, _check, _replace),
                ("(bits(w) & 0xFFFF) | (ids << 16)", _weights_first, _check, _replace),
                ("(ids << 16) + (bits(w) & 0xFFFF)", _added, _check, _replace),
                ("(ids << 16) | uint16_bits(w)", _unsigned_bits, _check, _replace),
                ("(ids << 16) | bits(w)", _no_mask, _near_miss, None),
            ):
                matching.register(arithmetic, FAMILY, spelling, matching.trace(fn, example), check, replacement)


def _check(match: Match) -> bool | str:
    ids, w = matching.val(match.kwargs["topk_ids"]), matching.val(match.kwargs["topk_weights"])
    if ids.dim() == 0 or list(ids.shape) != list(w.shape):
        return f"ids {list(ids.shape)} and weights {list(w.shape)} do not have one shape (broadcasting)"
    if ids.device != w.device:
        return f"ids on {ids.device}, weights on {w.device}"
    for name, t in (("ids", ids), ("weights", w)):
        if flat_row_stride(t, holds=matching.known) is None:
            return f"the {name}' leading dims do not flatten to one row stride (strides {list(t.stride())})"
    # A symbolic count is allowed: past 2**31-1 pairs (16 GB of int64 ids) the op raises its clear error
    # at run time instead of computing, as the other families' ops do past their 32-bit limits.
    if matching.known(ids.numel() > 2**31 - 1):
        return "more than 2**31-1 pairs"
    return True


def _replace(match: Match, proof: bool):
    return OP, [match.kwargs["topk_ids"], match.kwargs["topk_weights"]]


def _near_miss(match: Match) -> str:
    return "no '& 0xFFFF': a negative weight's sign extension overwrites the id bits, which the op does not"
