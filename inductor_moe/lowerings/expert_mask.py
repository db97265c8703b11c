"""From a mask a model computes over its rows to the expert filter of our ops, or the reason there is none.

Models spell "this row's expert is not local" in many ways: ``ids == -1``, ``ids < 0``, ``ids >= E``,
``(ids < lo) | (ids >= hi)``, ``~((ids >= lo) & (ids < hi))``, per row or per block of rows
(``ids.repeat_interleave(BLOCK_M)``), before or after a ``[:, None]``. :func:`expert_filter` evaluates such a
predicate symbolically, as the exact set of id values it keeps, and answers the (ids, expert_step, expert_lo,
expert_hi) that keeps the same rows, for every id value of the ids' dtype: the filter's range may wrap around
(``expert_lo > expert_hi``), so ``ids != c`` is a range too. A predicate whose live set is not one (wrapping)
range, that mixes several id tensors, or that compares against a tensor or a float, is not folded.
"""

from __future__ import annotations

import dataclasses

import torch

from . import matching
from .matching import known, val

aten = torch.ops.aten

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

Intervals = list[tuple[int, int]]  # sorted, disjoint, inclusive


@dataclasses.dataclass(frozen=True)
class ExpertFilter:
    ids: torch.fx.Node
    step: int
    lo: int
    hi: int


def expert_filter(mask: torch.fx.Node, rows_shape: list, live_when_true: bool) -> ExpertFilter | str:
    """The filter that keeps the rows where ``mask`` is ``live_when_true``, or why there is none. ``mask`` has
    one value per row of ``rows_shape`` (the leading dims of the gated activation), with an optional trailing
    dim of 1, which may be expanded over the row (``mask[:, None].expand_as(y)``)."""
    mask_val = val(mask)
    if isinstance(mask, torch.fx.Node) and mask.target is aten.expand.default:
        source = val(mask.args[0])
        if (
            isinstance(source, torch.Tensor)
            and source.dim() == len(rows_shape) + 1 == mask_val.dim()
            and known(source.shape[-1] == 1)
            and all(known(a == b) for a, b in zip(source.shape[:-1], rows_shape))
        ):
            mask, mask_val = mask.args[0], source
    if not isinstance(mask_val, torch.Tensor) or mask_val.dtype != torch.bool:
        return "the mask is not a bool tensor"
    shape = list(mask_val.shape)
    if shape not in (list(rows_shape), [*rows_shape, 1]) or not all(
        known(a == b) for a, b in zip(shape, [*rows_shape, 1])
    ):
        return f"the mask has shape {shape}, not one value per row {list(rows_shape)}"
    state = _Eval()
    live = state.evaluate(mask)
    if isinstance(live, str):
        return live
    if not live_when_true:
        live = _complement(live, state.domain)
    if state.ids is None:
        return "the mask does not depend on expert ids"
    ids, step = state.ids, state.step
    ids_val = val(ids)
    if not ids_val.is_contiguous():
        return "the expert ids are not contiguous"
    rows = 1
    for s in rows_shape:
        rows = rows * s
    if step == 1:
        if not (ids_val.dim() in (1, len(rows_shape)) and known(ids_val.numel() == rows)):
            return f"the expert ids have shape {list(ids_val.shape)}, not one per row"
        if ids_val.dim() != len(rows_shape) and len(rows_shape) != 1:
            return f"the expert ids have shape {list(ids_val.shape)}, not the rows' {list(rows_shape)}"
    elif not (len(rows_shape) == 1 and ids_val.dim() == 1 and known(ids_val.shape[0] == (rows + step - 1) // step)):
        return f"{list(ids_val.shape)} ids at one per {step} rows do not cover {list(rows_shape)} rows"
    bounds = _as_range(live, state.domain)
    if isinstance(bounds, str):
        return bounds
    return ExpertFilter(ids, step, *bounds)


def values_where_true(mask: torch.fx.Node) -> tuple[torch.fx.Node, Intervals, tuple[int, int]] | str:
    """(x, the values of x for which ``mask`` holds, x's dtype range) if ``mask`` is a predicate over one int32 or
    int64 tensor x alone, value by value (no per-block expansion); else why not."""
    state = _Eval()
    live = state.evaluate(mask)
    if isinstance(live, str):
        return live
    if state.ids is None or state.step != 1:
        return "the mask is not a predicate over one tensor's values"
    return state.ids, live, state.domain


def complement(intervals: Intervals, domain: tuple[int, int]) -> Intervals:
    """The values of ``domain`` outside ``intervals``."""
    return _complement(intervals, domain)


def through_index(ids: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(s, perm) if ``ids`` is ``s[perm]`` for a 1-D ``s`` and ``perm`` the indices of a sort (so every index is in
    range and none wraps around): the ops then read ``s`` through ``perm`` instead of a gathered copy."""
    if ids.target is not aten.index.Tensor or len(ids.args[1]) != 1:
        return None
    s, (perm,) = ids.args
    if matching.sort_indices(perm) is None:
        return None
    sv = val(s)
    if not (isinstance(sv, torch.Tensor) and sv.dim() == 1 and sv.is_contiguous()):
        return None
    if not (known(val(perm).shape[0] <= sv.shape[0])):
        return None
    return s, perm


class _Eval:
    """Evaluates a bool predicate over one ids tensor as the set of id values for which it is true."""

    def __init__(self):
        self.ids: torch.fx.Node | None = None
        self.step = 1
        self.domain = (_INT64_MIN, _INT64_MAX)

    def _rows_of(self, node):
        """The node under the row layout (see _strip_row_layout), recording its expansion step; or why not."""
        node, step = _strip_row_layout(node)
        if isinstance(step, str):
            return step
        if step != 1:
            if self.step not in (1, step):
                return "the mask expands ids to rows twice"
            self.step = step
        return node

    def evaluate(self, node) -> Intervals | str:
        node = self._rows_of(node)
        if isinstance(node, str):
            return node
        if not isinstance(node, torch.fx.Node) or node.op != "call_function":
            return f"the mask comes from {getattr(node, 'name', node)}, not from a comparison of expert ids"
        target, args = node.target, node.args
        if target in _COMPARISONS:
            return self._compare(node, target, args)
        if target in (aten.bitwise_not.default, aten.logical_not.default):
            inner = self.evaluate(args[0])
            return inner if isinstance(inner, str) else _complement(inner, self.domain)
        if target in _COMBINE:
            a, b = self.evaluate(args[0]), self.evaluate(args[1])
            if isinstance(a, str):
                return a
            if isinstance(b, str):
                return b
            return _COMBINE[target](a, b, self.domain)
        return f"the mask uses {target}, which is not a comparison, and, or, or not of expert ids"

    def _compare(self, node, target, args) -> Intervals | str:
        ids, bound = args[0], args[1]
        if not isinstance(bound, int) or isinstance(bound, bool):
            return f"{node.name} compares the ids with {bound!r}, not with an integer constant"
        ids = self._rows_of(ids)
        if isinstance(ids, str):
            return ids
        ids_val = val(ids)
        if not isinstance(ids_val, torch.Tensor) or ids_val.dtype not in (torch.int32, torch.int64):
            return f"{node.name} compares {getattr(ids, 'name', ids)}, which is not int32 or int64 expert ids"
        if self.ids is not None and ids is not self.ids:
            return f"the mask combines two id tensors ({self.ids.name} and {ids.name})"
        self.ids = ids
        info = torch.iinfo(ids_val.dtype)
        self.domain = lo, hi = info.min, info.max
        if target is aten.eq.Scalar:
            intervals = [(bound, bound)]
        elif target is aten.ne.Scalar:
            return _complement(_clip([(bound, bound)], self.domain), self.domain)
        elif target is aten.lt.Scalar:
            intervals = [(lo, bound - 1)]
        elif target is aten.le.Scalar:
            intervals = [(lo, bound)]
        elif target is aten.gt.Scalar:
            intervals = [(bound + 1, hi)]
        else:  # ge
            intervals = [(bound, hi)]
        return _clip(intervals, self.domain)


_COMPARISONS = (aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar, aten.le.Scalar, aten.gt.Scalar, aten.ge.Scalar)


def _strip_row_layout(node) -> tuple[object, int | str]:
    """Undo what only moves one value per row into place: a trailing unsqueeze / reshape to [..., 1], and the
    per-block expansion of ``repeat_interleave(step)`` (unsqueeze, expand, clone, reshape), optionally cut to
    the row count with a slice. Returns the node underneath and the expansion step."""
    step = 1
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        t = node.target
        v, src = val(node), node.args[0]
        if not isinstance(v, torch.Tensor) or not isinstance(val(src), torch.Tensor):
            break
        s = val(src)
        if t is aten.unsqueeze.default and v.dim() >= 1 and known(v.shape[-1] == 1) and v.dim() == s.dim() + 1:
            node = src  # [..., 1] from [...]
        elif t is aten.reshape.default and v.dim() == s.dim() + 1 and known(v.shape[-1] == 1):
            if not all(known(a == b) for a, b in zip(v.shape[:-1], s.shape)):
                break
            node = src
        elif t is aten.slice.Tensor and s.dim() == 1 and node.args[1] in (0, -1) and node.args[2] == 0:
            node = src  # ids cut to the row count; the shape check compares ceil(rows / step) with the ids
        elif t is aten.reshape.default and v.dim() == 1 and s.dim() == 2 and _block_values(src) is not None:
            width = val(src).shape[1]
            if not isinstance(width, int):
                return node, "the rows per block is not a constant"
            if step != 1:
                return node, "the mask expands ids to rows twice"
            step = width
            node = _block_values(src)
        else:
            break
    return node, step


def _block_values(expanded):
    """v if ``expanded`` is [clone of] expand(unsqueeze(v, 1), [n, step]): each value of the 1-D v repeated
    step times along a new inner dim (repeat_interleave's decomposition; no clone when step is 1)."""
    if expanded.target is aten.clone.default:
        expanded = expanded.args[0]
    if not isinstance(expanded, torch.fx.Node) or expanded.target is not aten.expand.default:
        return None
    unsq = expanded.args[0]
    if (
        isinstance(unsq, torch.fx.Node)
        and unsq.target is aten.unsqueeze.default
        and unsq.args[1] in (1, -1)
        and val(unsq.args[0]).dim() == 1
    ):
        return unsq.args[0]
    return None


def _clip(intervals: Intervals, domain) -> Intervals:
    lo, hi = domain
    return [(max(a, lo), min(b, hi)) for a, b in intervals if max(a, lo) <= min(b, hi)]


def _complement(intervals: Intervals, domain) -> Intervals:
    out, start = [], domain[0]
    for a, b in intervals:
        if a > start:
            out.append((start, a - 1))
        start = b + 1
    if start <= domain[1]:
        out.append((start, domain[1]))
    return out


def _intersect(a: Intervals, b: Intervals, domain) -> Intervals:
    return _complement(_union(_complement(a, domain), _complement(b, domain), domain), domain)


def _union(a: Intervals, b: Intervals, domain) -> Intervals:
    out: Intervals = []
    for lo, hi in sorted(a + b):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _xor(a: Intervals, b: Intervals, domain) -> Intervals:
    return _union(_intersect(a, _complement(b, domain), domain), _intersect(b, _complement(a, domain), domain), domain)


_COMBINE = {
    aten.bitwise_and.Tensor: _intersect,
    aten.logical_and.default: _intersect,
    aten.bitwise_or.Tensor: _union,
    aten.logical_or.default: _union,
    aten.bitwise_xor.Tensor: _xor,
    aten.logical_xor.default: _xor,
}


def _as_range(live: Intervals, domain) -> tuple[int, int] | str:
    """(expert_lo, expert_hi) whose (possibly wrapping) range keeps exactly the ids in ``live``."""
    lo, hi = domain
    if live == [(lo, hi)]:
        return "the mask never kills a row"
    if not live:
        return (0, 0)
    if len(live) == 1:
        a, b = live[0]
        return (a, b + 1 if b < _INT64_MAX else _INT64_MIN)  # [a, 2**63) wraps to "id >= a or id < -2**63"
    if len(live) == 2 and live[0][0] == lo and live[1][1] == hi:
        return (live[1][0], live[0][1] + 1)  # both ends of the domain: a range that wraps around
    return f"the live ids {live} are not one range (possibly wrapping around)"
