"""Narrow keys for the stable sort that groups a MoE block's rows by expert.

Grouped-GEMM blocks sort their T*K (token, slot) pairs by a key that is the pair's local expert, or a sentinel
for the experts of other ranks: ``argsort(where((local >= 0) & (local < E), local, E), stable=True)``
(inductor_moe/testing.py's GroupedMoE). The key is int64 and torch's sort takes longer the wider its keys
(H200, CUDA graph, a compiled block's stable argsort of 2048 keys: 33.1 us in int64, 12.9 in uint8;
benchmarks/bench_expert_sort.py).

When the key's values provably lie in a small range, the same stable sort over the key cast to the narrowest
integer dtype that holds the range returns the same indices: the cast keeps every value the key can take
distinct and in order, and a stable sort's indices depend on nothing else. The proofs, through views and integer
casts that hold the range: the key is ``where(cond, x, c)`` or ``where(cond, c, x)`` with ``c`` an integer
constant and ``cond`` a predicate over ``x`` alone, which expert_mask.py evaluates as the exact set of values of
x it holds for, so the key's values are that set (or its complement) and c; or the key is the expert ids
themselves, the indices of a ``topk`` over E experts (``argsort(topk_ids.view(-1), stable=True)``, as
torchtitan groups its tokens), in [0, E) when E is static. Only the sort's indices may be used: its sorted
values would change dtype. An unstable sort is left alone (ties may come out in another order from another key
dtype).
"""

from __future__ import annotations

import operator

import torch

from .. import config
from ..indexing import narrow_key_dtype
from . import expert_mask, matching, report
from .matching import known, val

aten = torch.ops.aten
FAMILY = "expert_sort"
SPELLING = "argsort(key in a small range, stable=True)"

_INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# ops that move a tensor's values without changing them: the key may be a view of the where
_SAME_VALUES = (aten.reshape.default, aten.view.default, aten.clone.default)


def narrow_sort_keys(graph: torch.fx.Graph) -> int:
    """Narrow the key of every provable stable sort in ``graph``; returns how many were narrowed."""
    if FAMILY not in config.families():
        return 0
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.sort.stable:
            found = _narrow_dtype(node)
            if isinstance(found, str):
                if found:
                    report.rejected(FAMILY, SPELLING, node, found)
                continue
            key = node.args[0]
            with graph.inserting_before(node):
                cast = graph.call_function(torch.ops.prims.convert_element_type.default, (key, found))
            cast.meta["val"] = torch.ops.prims.convert_element_type.default(val(key), found)
            node.args = (cast, *node.args[1:])
            values, indices = val(node)
            node.meta["val"] = (values.to(found), indices)
            report.rewritten(FAMILY, SPELLING, node.name, f"{str(found).removeprefix('torch.')}{list(values.shape)}")
            count += 1
    return count


def _narrow_dtype(sort: torch.fx.Node) -> torch.dtype | str:
    """The narrowest dtype the sort's key can be cast to with the same indices; or why none ("": not a candidate)."""
    key = sort.args[0]
    kv = val(key)
    if not (isinstance(kv, torch.Tensor) and kv.dtype in (torch.int64, torch.int32)):
        return ""
    if kv.device.type not in config.devices():
        return ""
    if sort.kwargs.get("stable") is not True:
        return ""
    if not all(u.target is operator.getitem and u.args[1] == 1 for u in sort.users):
        return "the sorted values are used, not only the indices"
    bounds = _key_bounds(key)
    if not isinstance(bounds, tuple):
        return bounds
    lo, hi = bounds
    dtype = narrow_key_dtype(lo, hi, kv.dtype)
    return dtype if dtype is not None else f"the key's values [{lo}, {hi}] need its own dtype {kv.dtype}"


def _key_bounds(key: torch.fx.Node) -> tuple[int, int] | str:
    """[lo, hi] holding every value ``key`` can take, or why there is none ("": not a spelling this knows).

    Through ops that keep values (views, clone) and integer casts (each checked to hold the bounds, so none
    wraps), the key is either ``where(cond, x, c)`` / ``where(cond, c, x)`` (see the module docstring) or the
    indices of a ``topk`` over a dim of static size E, which lie in [0, E)."""
    source, casts = key, []
    while isinstance(source, torch.fx.Node):
        if source.target in _SAME_VALUES:
            source = source.args[0]
        elif source.target is torch.ops.prims.convert_element_type.default and source.args[1] in _INTEGER:
            casts.append(source.args[1])
            source = source.args[0]
        else:
            break
    if not isinstance(source, torch.fx.Node):
        return ""
    if source.target is operator.getitem and source.args[1] == 1 and source.args[0].target is aten.topk.default:
        bounds = _topk_bounds(source.args[0])
    elif source.target is operator.getitem and source.args[1] == 1 and source.args[0].target is aten.max.dim:
        bounds = _index_bounds(source.args[0].args[0], source.args[0].args[1])
    elif source.target is aten.argmax.default and len(source.args) > 1 and source.args[1] is not None:
        bounds = _index_bounds(source.args[0], source.args[1])
    elif source.target is aten.cat.default:  # indices side by side (PhiMoE's two argmax choices)
        parts = [_key_bounds(part) for part in source.args[0]]
        if not parts or not all(isinstance(b, tuple) for b in parts):
            return next((b for b in parts if isinstance(b, str) and b), "")
        bounds = (min(b[0] for b in parts), max(b[1] for b in parts))
    elif source.target is aten.where.self:
        bounds = _where_bounds(source)
    else:
        return ""
    if isinstance(bounds, tuple) and not all(
        torch.iinfo(d).min <= bounds[0] and bounds[1] <= torch.iinfo(d).max for d in casts
    ):
        return f"a cast of the key to {casts} could wrap its values {list(bounds)} around"
    return bounds


def _topk_bounds(topk: torch.fx.Node) -> tuple[int, int] | str:
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    return _index_bounds(topk.args[0], dim)


def _index_bounds(x: torch.fx.Node, dim: int) -> tuple[int, int] | str:
    """The bounds of indices into ``x`` along ``dim`` (a top-k's, a max's, an argmax's): [0, size - 1]."""
    x = val(x)
    size = x.shape[dim] if x.dim() else 1
    if not isinstance(size, int):
        return f"the indices run over a dim of symbolic size {size}"
    return (0, size - 1)


def _where_bounds(where: torch.fx.Node) -> tuple[int, int] | str:
    cond, a, b = where.args
    wv = val(where)
    if isinstance(_int_constant(b, wv), int):
        x, c, kept_when_true = a, _int_constant(b, wv), True
    elif isinstance(_int_constant(a, wv), int):
        x, c, kept_when_true = b, _int_constant(a, wv), False
    else:
        return "the key is a where with no integer constant branch"
    xv, cv = val(x), val(cond)
    if not all(
        isinstance(v, torch.Tensor) and v.dim() == wv.dim() and all(known(p == q) for p, q in zip(v.shape, wv.shape))
        for v in (xv, cv)
    ):
        return "the key's where broadcasts its condition or its tensor branch"
    found = expert_mask.values_where_true(cond)
    if isinstance(found, str):
        return found
    ids, kept, domain = found
    if ids is not x:
        return "the where's condition is not a predicate over the values it keeps"
    if not kept_when_true:
        kept = expert_mask.complement(kept, domain)
    return min([c] + [i[0] for i in kept]), max([c] + [i[1] for i in kept])


def _int_constant(node, like) -> int | None:
    value = matching.fill_value(node, like)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
