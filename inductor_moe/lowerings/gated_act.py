"""Lowering of the gated activation ``act(x[..., :d]) * x[..., d:]`` into ``inductor_moe::act_and_mul``, and of
the expert masks around it into the op's expert filter.

Stage 1 (arithmetic): the product of an activation of the gate half and the up half, in every spelling below,
per dtype. The spellings are traced; the activations are the reference's (``reference.activation_ref``), so a
pattern is exactly what the reference computes. The halves are matched as any two tensors and proven to be the
two halves of one input by :func:`_check_halves` (slices, narrow, chunk and split all reach it as slices; a
view of the input as [..., 2, d] with its two halves selected or unbound, as halves of that view).

Stage 2 (filter): a per-row mask applied to the op's result (``where``, ``masked_fill``, index assignment) or to
its input before the activation, with the dead value 0, becomes the op's expert filter (expert_mask.py).
Multiplying by a 0/1 mask is not folded: it keeps the NaN of dead rows (``0 * inf``), which the filter would
turn into 0. Ids gathered by a sort's indices (``s[argsort(...)]``: rows sorted by expert) are passed as
``s`` and the indices (``expert_ids_index``), so the gathered copy is never materialised; a gather by any other
index (which may wrap around) is passed as it is.

Rounding: the op computes in fp32 and rounds once. A bf16/fp16 model spelling rounds the activation to its
dtype before the product, so results may differ from eager by one ulp of the dtype (the same difference as
default Inductor's fused code, which also keeps the product in fp32).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
from torch._inductor.pattern_matcher import MULTIPLE, CallFunction, KeywordArg, Match, PatternMatcherPass

from .. import reference
from ..indexing import rows_layout_ok
from . import expert_mask, matching

aten = torch.ops.aten
OP = torch.ops.inductor_moe.act_and_mul.default
FAMILY = "gated_act"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _spellings(activation: str):
    """(name, function of gate and up) for every way of writing the product that is matched."""

    def act(t):
        return reference.activation_ref(t, activation)

    yield "act(gate) * up", lambda gate, up: act(gate) * up
    yield "up * act(gate)", lambda gate, up: up * act(gate)
    # the reference's own spelling: fp32 math, one rounding (what a careful model writes)
    yield "act(gate.float()) * up.float()", lambda gate, up: (act(gate.float()) * up.float()).to(gate.dtype)
    yield "up.float() * act(gate.float())", lambda gate, up: (up.float() * act(gate.float())).to(gate.dtype)
    if activation == "silu":  # silu as x * sigmoid(x), either way round, on either side
        yield "gate * sigmoid(gate) * up", lambda gate, up: gate * torch.sigmoid(gate) * up
        yield "sigmoid(gate) * gate * up", lambda gate, up: torch.sigmoid(gate) * gate * up
        yield "up * (gate * sigmoid(gate))", lambda gate, up: up * (gate * torch.sigmoid(gate))
        yield "up * (sigmoid(gate) * gate)", lambda gate, up: up * (torch.sigmoid(gate) * gate)


def register(arithmetic: PatternMatcherPass, filters: PatternMatcherPass) -> None:
    seen = set()
    for dtype in DTYPES:
        example = [torch.empty(2, 4, dtype=dtype), torch.empty(2, 4, dtype=dtype)]
        for activation in reference.ACTIVATIONS:
            for name, spelling in _spellings(activation):
                pattern = matching.trace(spelling, example)
                key = repr(pattern)  # in fp32 the .float() spellings trace to the plain ones
                if key in seen:
                    continue
                seen.add(key)
                matching.register(
                    arithmetic, FAMILY, f"{activation}: {name}", pattern, _check_halves, _replace(activation)
                )
    _register_filters(filters)


def _replace(activation: str):
    def replacement(match: Match, x: torch.fx.Node):
        return (lambda x: OP(x, activation)), [x]

    return replacement


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _half(node) -> tuple[torch.fx.Node, Any, Any] | str:
    """(x, start, length) if ``node`` is ``x[..., start:start + length]`` along x's last dim, else why not.

    Two forms reach the pass: a slice of x (slicing, ``narrow``, ``chunk``, ``split``), and the half ``h`` of a
    view that splits x's last dim into [2, d] (``x.view(..., 2, d)[..., h, :]``, ``x.unflatten(-1, (2, d))
    .unbind(-2)``), which is ``x[..., h * d:(h + 1) * d]`` element for element, a reshape's copy included."""
    if not isinstance(node, torch.fx.Node):
        return f"{node} is not a slice of the input"
    if node.target is aten.slice.Tensor:
        if len(node.args) > 4 and node.args[4] != 1:
            return f"{node.name} slices with a step"
        x = node.args[0]
        if not matching.is_last_dim(node.args[1], matching.val(x).dim()):
            return f"the halves are slices of dim {node.args[1]}, not of the last dim"
        return x, matching.val(node.args[2]), matching.val(node).shape[-1]
    if node.target is aten.select.int:
        split, dim, index = node.args
    elif node.target is operator.getitem and getattr(node.args[0], "target", None) is aten.unbind.int:
        split, index = node.args[0].args[0], node.args[1]
        dim = node.args[0].args[1] if len(node.args[0].args) > 1 else node.args[0].kwargs.get("dim", 0)
    else:
        return f"{node.name} is not a slice of the input"
    if not (isinstance(split, torch.fx.Node) and split.target in _VIEWS):
        return f"{node.name} selects from {getattr(split, 'name', split)}, not from a view of the input"
    x = split.args[0]
    xv, sv = matching.val(x), matching.val(split)
    splits_last_dim = (
        sv.dim() == xv.dim() + 1
        and matching.known(sv.shape[-2] == 2)
        and matching.known(2 * sv.shape[-1] == xv.shape[-1])
        and all(matching.known(a == b) for a, b in zip(sv.shape[:-2], xv.shape[:-1]))
    )
    if not splits_last_dim:
        return f"{split.name} (shape {list(sv.shape)}) does not split the last dim of {x.name} into [2, d]"
    if not (isinstance(dim, int) and dim in (-2, sv.dim() - 2) and isinstance(index, int) and -2 <= index < 2):
        return f"{node.name} selects index {index} of dim {dim} of {split.name}, not one of its two halves"
    d = sv.shape[-1]
    return x, (index % 2) * d, d


def _check_halves(match: Match) -> torch.fx.Node | str:
    """x, if gate and up are x[..., :d] and x[..., d:2d] of one x whose last dim is 2d, in a layout the op
    reads; else why not."""
    halves = [_half(match.kwargs[name]) for name in ("gate", "up")]
    for half in halves:
        if isinstance(half, str):
            return half
    (x, gate_start, d), (up_x, up_start, up_length) = halves
    if up_x is not x:
        return f"gate and up are halves of different tensors ({x.name}, {up_x.name})"
    xv = matching.val(x)
    if not (
        gate_start == 0
        and matching.known(2 * d == xv.shape[-1])
        and matching.known(up_start == d)
        and matching.known(up_length == d)
    ):
        return f"gate and up are not the first and second half of the last dim ({xv.shape[-1]})"
    if not rows_layout_ok(xv, holds=matching.known):
        return f"the input's layout (strides {list(xv.stride())}) is not rows of a contiguous last dim"
    return x


# ------------------------------------------------------------------------------------------------------------
# Stage 2: expert masks around the op

_UNFILTERED = CallFunction(OP, KeywordArg("x"), KeywordArg("activation"))


def _register_filters(filters: PatternMatcherPass) -> None:
    where, index_put = aten.where.self, aten.index_put.default
    cond, zero, x, act = KeywordArg("cond"), KeywordArg("zero"), KeywordArg("x"), KeywordArg("activation")
    # (spelling, pattern, whether cond is true on live rows, whether the mask applies to the op's input)
    cases = [
        ("where(dead, 0, y)", CallFunction(where, cond, zero, _UNFILTERED), False, False),
        ("where(live, y, 0)", CallFunction(where, cond, _UNFILTERED, zero), True, False),
        ("y[dead] = 0", CallFunction(index_put, _UNFILTERED, [cond], zero), False, False),
        ("y[dead] = 0", CallFunction(index_put, _UNFILTERED, [cond], zero, False), False, False),
        (
            "input: where(dead, 0, x)",
            CallFunction(OP, CallFunction(where, cond, zero, x, _users=MULTIPLE), act),
            False,
            True,
        ),
        (
            "input: where(live, x, 0)",
            CallFunction(OP, CallFunction(where, cond, x, zero, _users=MULTIPLE), act),
            True,
            True,
        ),
    ]
    for spelling, pattern, live_when_true, on_input in cases:
        matching.register(
            filters,
            FAMILY,
            f"filter: {spelling}",
            pattern,
            functools.partial(_filter_of, live_when_true=live_when_true, on_input=on_input),
            _replace_filter,
        )
    for order in ((_UNFILTERED, KeywordArg("mask")), (KeywordArg("mask"), _UNFILTERED)):
        matching.register(
            filters, FAMILY, "filter: y * mask", CallFunction(aten.mul.Tensor, *order), _mask_product, None
        )


def _op_node(match: Match) -> torch.fx.Node:
    return next(n for n in match.nodes if n.target is OP)


def _filter_of(match: Match, live_when_true: bool, on_input: bool) -> expert_mask.ExpertFilter | str:
    """The expert filter of a matched mask (the check's proof), or why there is none."""
    op = _op_node(match)
    out = matching.val(op)
    zero = match.kwargs["zero"]
    zero_val = matching.fill_value(zero, out if not on_input else matching.val(match.kwargs["x"]))
    # the dead rows of the rewrite are +0.0: the mask must write exactly that (any zero on the input: act(+-0)
    # * (+-0) is +0 for all three activations)
    if zero_val is None or zero_val != 0 or (not on_input and not matching.is_plus_zero(zero_val)):
        return f"dead rows get {zero_val if zero_val is not None else zero}, not 0"
    if not on_input and list(matching.val(match.output_node()).shape) != list(out.shape):
        return "the mask broadcasts the result to another shape"
    if on_input:
        masked = op.args[0]
        if list(matching.val(masked).shape) != list(matching.val(match.kwargs["x"]).shape):
            return "the mask broadcasts the input to another shape"
        if matching.val(masked).dtype != matching.val(match.kwargs["x"]).dtype:
            return "the masked input has another dtype"
    return expert_mask.expert_filter(match.kwargs["cond"], list(out.shape[:-1]), live_when_true)


def _replace_filter(match: Match, f: expert_mask.ExpertFilter):
    activation = _op_node(match).args[1]
    indexed = expert_mask.through_index(f.ids)
    if indexed is None:
        return (lambda x, ids: OP(x, activation, ids, f.step, f.lo, f.hi)), [match.kwargs["x"], f.ids]
    # ids gathered by a permutation (rows sorted by expert): read through it, no gathered copy
    return (lambda x, ids, index: OP(x, activation, ids, f.step, f.lo, f.hi, expert_ids_index=index)), [
        match.kwargs["x"],
        *indexed,
    ]


def _mask_product(match: Match) -> str:
    """A near miss: y * mask.float()[:, None] (recorded, never rewritten)."""
    node = match.kwargs["mask"]
    while isinstance(node, torch.fx.Node) and node.target in _LAYOUT_OR_CAST:
        node = node.args[0]
    if isinstance(matching.val(node), torch.Tensor) and matching.val(node).dtype == torch.bool:
        return "multiplying by a 0/1 mask keeps NaN/inf of dead rows (0 * inf is NaN); use where or masked_fill"
    return ""


_LAYOUT_OR_CAST = (aten.unsqueeze.default, aten.reshape.default, torch.ops.prims.convert_element_type.default)
