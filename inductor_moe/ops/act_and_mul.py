"""``act_and_mul`` / ``act_and_mul_out``: the gated activation ``act(x[..., :d]) * x[..., d:]`` with the expert
filter. Schema, checks, fake, CPU (the reference), autograd and the public functions; the CUDA kernel is
csrc/act_and_mul.{cu,cpp}, registered from C++ (kernels/families.py)."""

from __future__ import annotations

import math

import torch

from .. import reference
from ..indexing import MAX_INDEX, rows_layout_ok
from .library import DTYPE_NAMES, DTYPES, INDEX_DTYPES, check, check_activation, define, expert_bounds, lib

_FILTER_ARGS = (
    "Tensor? expert_ids=None, int expert_step=1, int expert_lo=0, int expert_hi=2147483647, "
    "Tensor? expert_ids_index=None"
)
define(f"act_and_mul(Tensor input, str activation, {_FILTER_ARGS}) -> Tensor")
define(f"act_and_mul_out(Tensor input, Tensor(a!) out, str activation, {_FILTER_ARGS}) -> ()")


def _check(cond, msg: str) -> None:
    check(cond, msg, "act_and_mul")


def _check_layout(name: str, t: torch.Tensor) -> None:
    _check(
        rows_layout_ok(t),
        f"{name} must have a contiguous last dim and leading dims that flatten to one row stride; "
        f"got strides {list(t.stride())}",
    )


def check_args(input, out, activation, expert_ids, expert_step, index=None) -> None:
    check_activation(activation, "act_and_mul")
    _check(input.dim() >= 1, "input must have at least one dim")
    _check(input.dtype in DTYPES, f"input dtype must be {DTYPE_NAMES}, got {input.dtype}")
    two_d = input.shape[-1]
    _check(two_d % 2 == 0, f"the last dim of input must be even (gate and up halves), got {two_d}")
    _check(two_d <= MAX_INDEX, f"the last dim of input ({two_d}) must be below 2**31")
    _check_layout("input", input)
    rows = math.prod(input.shape[:-1])
    _check(rows <= MAX_INDEX, f"at most 2**31-1 rows are supported, got {rows}")
    if out is not None:
        _check(out.dtype == input.dtype, f"out dtype {out.dtype} must match input dtype {input.dtype}")
        _check(out.device == input.device, f"out must be on {input.device}, got {out.device}")
        expected = (*input.shape[:-1], two_d // 2)
        _check(tuple(out.shape) == expected, f"out must have shape {list(expected)}, got {list(out.shape)}")
        _check_layout("out", out)
    _check(expert_step >= 1, f"expert_step must be >= 1, got {expert_step}")
    if expert_ids is None:
        _check(index is None, "expert_ids_index needs expert_ids")
        return
    for name, t in (("expert_ids", expert_ids), ("expert_ids_index", index)):
        if t is None:
            continue
        _check(t.dtype in INDEX_DTYPES, f"{name} must be int32 or int64, got {t.dtype}")
        _check(t.device == input.device, f"{name} must be on {input.device}, got {t.device}")
        _check(t.is_contiguous(), f"{name} must be contiguous")
    if index is not None:
        _check(expert_ids.dim() == 1, f"with expert_ids_index, expert_ids must be 1-D, got {list(expert_ids.shape)}")
        _check(expert_ids.numel() <= MAX_INDEX, f"at most 2**31-1 expert_ids, got {expert_ids.numel()}")
    # the ids of the rows, one per row or per block: expert_ids, or the index that reaches them
    ids, name = (expert_ids, "expert_ids") if index is None else (index, "expert_ids_index")
    blocks = (rows + expert_step - 1) // expert_step
    msg = (
        f"{name} must have shape input.shape[:-1] (expert_step=1) or [{blocks}] "
        f"(= ceil(rows / expert_step)), got {list(ids.shape)}"
    )
    # One torch._check per size: on an unbacked batch each becomes a runtime assert instead of a guard.
    if expert_step == 1 and ids.dim() == input.dim() - 1:
        for have, want in zip(ids.shape, input.shape[:-1]):
            _check(have == want, msg)
    else:
        _check(ids.dim() == 1, msg)
        _check(ids.shape[0] == blocks, msg)


@torch.library.register_fake("inductor_moe::act_and_mul")
def _act_and_mul_fake(
    input, activation, expert_ids=None, expert_step=1, expert_lo=0, expert_hi=MAX_INDEX, expert_ids_index=None
):
    check_args(input, None, activation, expert_ids, expert_step, expert_ids_index)
    return input.new_empty((*input.shape[:-1], input.shape[-1] // 2))  # contiguous, as the kernel allocates


@torch.library.register_fake("inductor_moe::act_and_mul_out")
def _act_and_mul_out_fake(
    input, out, activation, expert_ids=None, expert_step=1, expert_lo=0, expert_hi=MAX_INDEX, expert_ids_index=None
):
    check_args(input, out, activation, expert_ids, expert_step, expert_ids_index)


@torch.library.impl(lib, "act_and_mul", "CPU")
def _act_and_mul_cpu(
    input, activation, expert_ids=None, expert_step=1, expert_lo=0, expert_hi=MAX_INDEX, expert_ids_index=None
):
    check_args(input, None, activation, expert_ids, expert_step, expert_ids_index)
    return reference.act_and_mul_ref(
        input, activation, expert_ids, expert_step, expert_lo, expert_hi, expert_ids_index=expert_ids_index
    )


@torch.library.impl(lib, "act_and_mul_out", "CPU")
def _act_and_mul_out_cpu(
    input, out, activation, expert_ids=None, expert_step=1, expert_lo=0, expert_hi=MAX_INDEX, expert_ids_index=None
):
    check_args(input, out, activation, expert_ids, expert_step, expert_ids_index)
    reference.act_and_mul_ref(
        input, activation, expert_ids, expert_step, expert_lo, expert_hi, out=out, expert_ids_index=expert_ids_index
    )


# ------------------------------------------------------------------------------------------------------------
# Autograd. The functional op: d/dg = dy * u * act'(g), d/du = dy * act(g), zero for dead rows, in fp32 and
# rounded once to input's dtype. The out= op writes into a buffer and has no gradient: a call that needs one
# is an error (below).

_ACT_BACKWARD = {
    "silu": lambda grad, g: torch.ops.aten.silu_backward(grad, g),
    "gelu": lambda grad, g: torch.ops.aten.gelu_backward(grad, g, approximate="none"),
    "gelu_tanh": lambda grad, g: torch.ops.aten.gelu_backward(grad, g, approximate="tanh"),
}


def _setup_context(ctx, inputs, output):
    input, activation, expert_ids, expert_step, expert_lo, expert_hi, expert_ids_index = inputs
    ctx.save_for_backward(input, expert_ids, expert_ids_index)
    ctx.filter = (activation, expert_step, expert_lo, expert_hi)


def _backward(ctx, grad):
    input, expert_ids, expert_ids_index = ctx.saved_tensors
    activation, expert_step, expert_lo, expert_hi = ctx.filter
    d = input.shape[-1] // 2
    g, u, dy = input[..., :d].float(), input[..., d:].float(), grad.float()
    if expert_ids is not None:
        rows = math.prod(input.shape[:-1])
        live = reference.live_rows_ref(
            expert_ids, rows, expert_step, expert_lo, expert_hi, expert_ids_index, check_index=False
        )
        dy = torch.where(live.reshape(*input.shape[:-1], 1), dy, 0.0)
    grad_input = torch.cat([_ACT_BACKWARD[activation](dy * u, g), dy * reference.activation_ref(g, activation)], -1)
    return grad_input.to(input.dtype), None, None, None, None, None, None


torch.library.register_autograd("inductor_moe::act_and_mul", _backward, setup_context=_setup_context)


def _act_and_mul_out_autograd(keyset, input, out, *args):
    _check(
        not (torch.is_grad_enabled() and (input.requires_grad or out.requires_grad)),
        "the out= form has no gradient; call it without out= (differentiable) or under torch.no_grad()",
    )
    return torch.ops.inductor_moe.act_and_mul_out.default.redispatch(
        keyset & torch._C._after_autograd_keyset, input, out, *args
    )


lib.impl("act_and_mul_out", _act_and_mul_out_autograd, "Autograd", with_keyset=True)


# ------------------------------------------------------------------------------------------------------------
# Public functions (drop-in for SGLang-style call sites)

_act_and_mul_op = torch.ops.inductor_moe.act_and_mul.default
_act_and_mul_out_op = torch.ops.inductor_moe.act_and_mul_out.default


def act_and_mul(
    activation: str,
    input: torch.Tensor,
    out: torch.Tensor | None = None,
    expert_ids: torch.Tensor | None = None,
    expert_step: int = 1,
    expert_range: tuple[int, int] | None = None,
    expert_ids_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(input[..., :d]) * input[..., d:]`` for activation ``silu``, ``gelu`` (erf) or ``gelu_tanh``.

    With ``expert_ids``, row ``r`` is computed only if ``lo <= expert_ids[r // expert_step] < hi`` where
    ``(lo, hi) = expert_range`` (default ``(0, 2**31 - 1)``: the id ``-1`` marks a dead row; pass
    ``(0, num_experts)`` to also treat ``id >= num_experts`` as dead, or a local expert range for expert
    parallelism; with ``lo > hi`` the range wraps around: live iff ``id >= lo or id < hi``). Without ``out``
    a new tensor is returned and dead rows are zero; with ``out`` the result is written there, dead rows are
    left untouched, and ``out`` is returned.

    With ``expert_ids_index`` (shaped as ``expert_ids`` would be), the ids are reached through it: row ``r``'s id
    is ``expert_ids[expert_ids_index[r // expert_step]]`` (1-D ``expert_ids``; an index outside
    ``[0, len(expert_ids))`` is an error). E.g. rows sorted by expert with ids kept in token order, without a
    gathered copy of the ids.

    Differentiable in ``input`` without ``out``; with ``out`` a call that needs a gradient is an error.
    """
    lo, hi = expert_bounds(expert_range)
    if out is None:
        return _act_and_mul_op(input, activation, expert_ids, expert_step, lo, hi, expert_ids_index)
    _act_and_mul_out_op(input, out, activation, expert_ids, expert_step, lo, hi, expert_ids_index)
    return out


def silu_and_mul(
    input, out=None, expert_ids=None, expert_step=1, expert_range=None, expert_ids_index=None
) -> torch.Tensor:
    """``silu(input[..., :d]) * input[..., d:]``; see :func:`act_and_mul`."""
    return act_and_mul("silu", input, out, expert_ids, expert_step, expert_range, expert_ids_index)


def gelu_and_mul(
    input, out=None, expert_ids=None, expert_step=1, expert_range=None, expert_ids_index=None
) -> torch.Tensor:
    """``gelu(input[..., :d]) * input[..., d:]`` with the erf GELU; see :func:`act_and_mul`."""
    return act_and_mul("gelu", input, out, expert_ids, expert_step, expert_range, expert_ids_index)


def gelu_tanh_and_mul(
    input, out=None, expert_ids=None, expert_step=1, expert_range=None, expert_ids_index=None
) -> torch.Tensor:
    """``gelu(input[..., :d], approximate="tanh") * input[..., d:]``; see :func:`act_and_mul`."""
    return act_and_mul("gelu_tanh", input, out, expert_ids, expert_step, expert_range, expert_ids_index)
