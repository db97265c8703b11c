"""``moe_combine``: the weighted sum over each token's k routed pairs, ``out[t] = sum_k live * w * row``.
Schema, checks, fake, CPU (the reference), autograd and the public function; the CUDA kernel is
csrc/combine.{cu,cpp}, registered from C++ (kernels/families.py)."""

from __future__ import annotations

import torch

from .. import reference
from ..indexing import MAX_INDEX, guard_or_false
from .library import DTYPE_NAMES, DTYPES, INDEX_DTYPES, check, define, expert_bounds, lib

define(
    "moe_combine(Tensor expert_out, Tensor topk_weights, Tensor? topk_ids=None, int expert_lo=0, "
    "int expert_hi=2147483647, Tensor? src_rows=None, bool zero_dead_rows=False, bool renormalize=False) -> Tensor"
)


def check_args(expert_out, topk_weights, topk_ids, src_rows):
    def _check(cond, msg):
        check(cond, msg, "moe_combine")

    _check(expert_out.dim() == 2, f"expert_out must be 2-D [rows, hidden], got shape {list(expert_out.shape)}")
    _check(expert_out.dtype in DTYPES, f"expert_out dtype must be {DTYPE_NAMES}, got {expert_out.dtype}")
    _check(
        guard_or_false(expert_out.shape[1] <= 1) or guard_or_false(expert_out.stride(1) == 1),
        f"expert_out must have a contiguous last dim; got strides {list(expert_out.stride())}",
    )
    _check(topk_weights.dim() == 2, f"topk_weights must be 2-D [tokens, k], got shape {list(topk_weights.shape)}")
    _check(topk_weights.dtype in DTYPES, f"topk_weights dtype must be {DTYPE_NAMES}, got {topk_weights.dtype}")
    _check(
        topk_weights.device == expert_out.device,
        f"topk_weights must be on {expert_out.device}, got {topk_weights.device}",
    )
    for name, t in (("topk_ids", topk_ids), ("src_rows", src_rows)):
        if t is None:
            continue
        _check(t.dtype in INDEX_DTYPES, f"{name} must be int32 or int64, got {t.dtype}")
        _check(t.device == topk_weights.device, f"{name} must be on {topk_weights.device}, got {t.device}")
        msg = f"{name} must have topk_weights' shape {list(topk_weights.shape)}, got {list(t.shape)}"
        _check(t.dim() == 2, msg)
        _check(t.shape[0] == topk_weights.shape[0], msg)
        _check(t.shape[1] == topk_weights.shape[1], msg)
    tokens, k = topk_weights.shape
    if src_rows is None:
        _check(
            expert_out.shape[0] == tokens * k,
            f"without src_rows, expert_out must have tokens * k = {tokens * k} rows (token-major), "
            f"got {expert_out.shape[0]}",
        )
    _check(
        expert_out.shape[1] <= MAX_INDEX and tokens <= MAX_INDEX and k <= MAX_INDEX,
        f"hidden size, tokens and k must be below 2**31, got {expert_out.shape[1]}, {tokens}, {k}",
    )


@torch.library.register_fake("inductor_moe::moe_combine")
def _fake(
    expert_out,
    topk_weights,
    topk_ids=None,
    expert_lo=0,
    expert_hi=MAX_INDEX,
    src_rows=None,
    zero_dead_rows=False,
    renormalize=False,
):
    check_args(expert_out, topk_weights, topk_ids, src_rows)
    return expert_out.new_empty((topk_weights.shape[0], expert_out.shape[1]))


@torch.library.impl(lib, "moe_combine", "CPU")
def _cpu(
    expert_out,
    topk_weights,
    topk_ids=None,
    expert_lo=0,
    expert_hi=MAX_INDEX,
    src_rows=None,
    zero_dead_rows=False,
    renormalize=False,
):
    check_args(expert_out, topk_weights, topk_ids, src_rows)
    return reference.moe_combine_ref(
        expert_out, topk_weights, topk_ids, expert_lo, expert_hi, src_rows, zero_dead_rows, renormalize
    )


# ------------------------------------------------------------------------------------------------------------
# Autograd, in fp32, each gradient rounded once to its input's dtype. With w' the weights the sum uses (w, or
# w / sum_k w with renormalize) and live the filter: d expert_out[row(t, k)] += live * w'[t, k] * dout[t] (rows
# no live pair reads get zero), d w'[t, k] = live * <dout[t], expert_out[row(t, k)]>, and through the
# renormalisation d w[t, j] = (d w'[t, j] - sum_k d w'[t, k] * w'[t, k]) / sum_k w[t, k]. A dead pair adds
# nothing (or w * 0 with zero_dead_rows), so it gets no gradient.


def _setup_context(ctx, inputs, output):
    expert_out, topk_weights, topk_ids, expert_lo, expert_hi, src_rows, _zero_dead_rows, renormalize = inputs
    ctx.save_for_backward(expert_out, topk_weights, topk_ids, src_rows)
    ctx.filter = (expert_lo, expert_hi, renormalize)


def _backward(ctx, grad):
    expert_out, w, topk_ids, src_rows = ctx.saved_tensors
    expert_lo, expert_hi, renormalize = ctx.filter
    w_dtype = w.dtype
    tokens, k = w.shape
    device = expert_out.device
    rows = torch.arange(tokens * k, device=device).view(tokens, k) if src_rows is None else src_rows.long()
    live = torch.ones(tokens, k, dtype=torch.bool, device=device)
    if topk_ids is not None:
        live = reference.live_ids_ref(topk_ids, expert_lo, expert_hi)
    rows = torch.where(live, rows, 0)  # a dead pair's row may be anything: never read
    total = None
    if renormalize:
        total = w.float().sum(-1, keepdim=True)
        w = w / total.to(w.dtype)
    dout = grad.float()
    live_w = torch.where(live, w.float(), 0.0)  # [T, K]
    grad_eo = torch.zeros(expert_out.shape, dtype=torch.float32, device=device)
    grad_eo.index_add_(0, rows.reshape(-1), (live_w.unsqueeze(-1) * dout.unsqueeze(1)).reshape(tokens * k, -1))
    gathered = expert_out[rows.reshape(-1)].view(tokens, k, -1).float()
    grad_w = torch.where(live, (gathered * dout.unsqueeze(1)).sum(-1), 0.0)
    if renormalize:
        grad_w = (grad_w - (grad_w * w.float()).sum(-1, keepdim=True)) / total
    return grad_eo.to(expert_out.dtype), grad_w.to(w_dtype), None, None, None, None, None, None


torch.library.register_autograd("inductor_moe::moe_combine", _backward, setup_context=_setup_context)


_combine_op = torch.ops.inductor_moe.moe_combine.default


def moe_combine(
    expert_out: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor | None = None,
    expert_range: tuple[int, int] | None = None,
    src_rows: torch.Tensor | None = None,
    zero_dead_rows: bool = False,
    renormalize: bool = False,
) -> torch.Tensor:
    """``out[t] = sum_k live(t, k) * topk_weights[t, k] * expert_out[row(t, k)]`` accumulated in fp32, in
    expert_out's dtype: [tokens, hidden].

    ``row(t, k)`` is ``src_rows[t, k]`` when given (rows gathered from anywhere in ``expert_out``), else
    ``t * K + k`` (token-major). With ``topk_ids``, pair ``(t, k)`` is live only if
    ``lo <= topk_ids[t, k] < hi`` for ``(lo, hi) = expert_range`` (default ``(0, 2**31 - 1)``; wrapping around
    when ``lo > hi``, as in :func:`act_and_mul`); dead pairs' rows are not read, and a token with no live pair
    is zero. With ``zero_dead_rows`` a dead pair adds ``topk_weights[t, k] * 0``, as if its row were zeros: the
    same sum for finite weights, NaN for a NaN or infinite one (what zeroing rows, then weighting them computes).
    With ``renormalize`` the weights are first divided by their sum over k (dead pairs included), in their dtype:
    ``topk_weights / topk_weights.sum(-1, keepdim=True)``, the top-k renormalisation, without a kernel of its own.

    Differentiable in ``expert_out`` and ``topk_weights``.
    """
    lo, hi = expert_bounds(expert_range)
    return _combine_op(expert_out, topk_weights, topk_ids, lo, hi, src_rows, zero_dead_rows, renormalize)
