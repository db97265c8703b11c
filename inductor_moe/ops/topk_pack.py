"""``pack_topk_ids_weights``: int32 ``(id << 16) | bf16_bits(weight)`` per routed pair. Schema, checks, fake,
CPU (the reference), CUDA (kernels/triton/topk_pack.py, launched here to keep PDL) and the public function.
The result is integer: no gradient flows through it."""

from __future__ import annotations

import torch

from .. import reference
from ..indexing import MAX_INDEX, flat_row_stride, row_strides
from .library import DTYPE_NAMES, DTYPES, INDEX_DTYPES, check, define, lib

define("pack_topk_ids_weights(Tensor topk_ids, Tensor topk_weights) -> Tensor")


def check_args(ids, weights):
    def _check(cond, msg):
        check(cond, msg, "pack_topk_ids_weights")

    _check(ids.dtype in INDEX_DTYPES, f"topk_ids must be int32 or int64, got {ids.dtype}")
    _check(weights.dtype in DTYPES, f"topk_weights dtype must be {DTYPE_NAMES}, got {weights.dtype}")
    _check(ids.device == weights.device, f"topk_weights must be on {ids.device}, got {weights.device}")
    _check(ids.dim() >= 1, "topk_ids must have at least one dim")
    _check(
        ids.shape == weights.shape, f"topk_ids {list(ids.shape)} and topk_weights {list(weights.shape)} differ in shape"
    )
    for name, t in (("topk_ids", ids), ("topk_weights", weights)):
        _check(
            flat_row_stride(t) is not None,
            f"{name}'s leading dims must flatten to one row stride; got strides {list(t.stride())}",
        )
    _check(ids.numel() <= MAX_INDEX, f"at most 2**31-1 (id, weight) pairs are supported, got {ids.numel()}")


@torch.library.register_fake("inductor_moe::pack_topk_ids_weights")
def _fake(topk_ids, topk_weights):
    check_args(topk_ids, topk_weights)
    return topk_ids.new_empty(topk_ids.shape, dtype=torch.int32)


@torch.library.impl(lib, "pack_topk_ids_weights", "CPU")
def _cpu(topk_ids, topk_weights):
    check_args(topk_ids, topk_weights)
    return reference.pack_topk_ids_weights_ref(topk_ids, topk_weights).contiguous()


@torch.library.impl(lib, "pack_topk_ids_weights", "CUDA")
def _cuda(topk_ids, topk_weights):
    from ..kernels.triton.topk_pack import topk_pack

    check_args(topk_ids, topk_weights)
    out = torch.empty(topk_ids.shape, dtype=torch.int32, device=topk_ids.device)
    topk_pack(topk_ids, topk_weights, row_strides(topk_ids), row_strides(topk_weights), out)
    return out


_pack_op = torch.ops.inductor_moe.pack_topk_ids_weights.default


def pack_topk_ids_weights(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """int32 ``(id << 16) | bf16_bits(weight)`` per (token, k) pair; see reference.pack_topk_ids_weights_ref for
    the id range the format holds. Any shape (ids and weights alike); int32/int64 ids, fp32/bf16/fp16 weights."""
    return _pack_op(topk_ids, topk_weights)
