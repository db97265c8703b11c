"""Narrow keys for the stable sort that groups a MoE block's rows by expert.

Grouped-GEMM blocks sort their T*K (token, slot) pairs by a key that is the pair's local expert, or a sentinel
for the experts of other ranks: ``argsort(where((local >= 0) & (local < E), local, E), stable=True)``
(examples/moe_blocks.py, and the runner, moe.py). The key is int64 and torch's sort takes longer the wider its
keys. H200, CUDA graph, eager stable argsort of keys in [0, 16] by key dtype, int64 / int32 / int16 / uint8:
n = 2 10.7 / 8.1 / 6.8 / 6.3 us, n = 128 12.8 / 8.9 / 7.4 / 6.7, n = 2048 31.9 / 20.1 / 14.8 / 11.6,
n = 32768 64.7 / 39.9 / 26.0 / 17.1; compiled, this rewrite takes n = 2048 from 33.1 to 12.9 us and n = 32768
from 66.6 to 18.0 (benchmarks/bench_expert_sort.py; to 128 pairs with static shapes Inductor sorts in Triton).

When the key's values provably lie in a small range, the same stable sort over the key cast to the narrowest
integer dtype that holds the range returns the same indices: the cast keeps every value the key can take
distinct and in order, and a stable sort's indices depend on nothing else. The proof: the key is (a view of)
``where(cond, x, c)`` or ``where(cond, c, x)`` with ``c`` an integer constant and ``cond`` a predicate over
``x`` alone, which expert_mask.py evaluates as the exact set of values of x it holds for; the key's values are
then that set (or its complement) and c. Only the sort's indices may be used: its sorted values would change
dtype. An unstable sort is left alone (ties may come out in another order from another key dtype).
"""

from __future__ import annotations

import operator

import torch

from .. import config
from . import expert_mask, matching, report
from .matching import known, val

aten = torch.ops.aten
FAMILY = "expert_sort"
SPELLING = "argsort(where(x in range, x, c), stable=True)"

# narrowest first; the key's own dtype is never replaced by one as wide
_NARROW = (torch.uint8, torch.int16, torch.int32)
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
    source = key
    while isinstance(source, torch.fx.Node) and source.target in _SAME_VALUES:
        source = source.args[0]
    if not (isinstance(source, torch.fx.Node) and source.target is aten.where.self):
        return ""
    cond, a, b = source.args
    sv = val(source)
    if isinstance(_int_constant(b, sv), int):
        x, c, kept_when_true = a, _int_constant(b, sv), True
    elif isinstance(_int_constant(a, sv), int):
        x, c, kept_when_true = b, _int_constant(a, sv), False
    else:
        return "the key is a where with no integer constant branch"
    xv, cv = val(x), val(cond)
    if not all(
        isinstance(v, torch.Tensor) and v.dim() == sv.dim() and all(known(p == q) for p, q in zip(v.shape, sv.shape))
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
    lo = min([c] + [i[0] for i in kept])
    hi = max([c] + [i[1] for i in kept])
    for dtype in _NARROW:
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max and dtype.itemsize < kv.dtype.itemsize:
            return dtype
    return f"the key's values [{lo}, {hi}] need its own dtype {kv.dtype}"


def _int_constant(node, like) -> int | None:
    value = matching.fill_value(node, like)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
