"""The lowerings: pattern rewrites of the FX graphs Inductor compiles into the inductor_moe ops.

One file per family (gated_act.py, topk_pack.py, combine.py, expert_sort.py, experts.py, route.py), the
canonical form they share (canonicalize.py), spellings traced into patterns (matching.py), masks turned into
expert filters (expert_mask.py), and the record of what was done (report.py). :func:`apply` is the whole pass;
backend.py installs it into Inductor.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import config, ops  # noqa: F401  (ops: defines torch.ops.inductor_moe, which the rewrites emit)
from . import canonicalize, combine, expert_sort, experts, gated_act, report, route, topk_pack

SOURCES = tuple(sorted(str(p) for p in Path(__file__).parent.glob("*.py")))


@functools.cache
def _passes():
    """Two pattern passes, built once: the arithmetic into the ops, then the masks around the ops into their
    filters (those match the ops the first created)."""
    from torch._inductor.pattern_matcher import PatternMatcherPass

    arithmetic, filters = PatternMatcherPass(), PatternMatcherPass()
    gated_act.register(arithmetic, filters)
    topk_pack.register(arithmetic)
    combine.register(arithmetic)
    return arithmetic, filters


def apply(graph: torch.fx.Graph) -> int:
    """Rewrite ``graph`` in place; returns how many rewrites were made."""
    if not config.families():
        return 0
    arithmetic, filters = _passes()
    canonicalize.canonicalize(graph)
    count = expert_sort.narrow_sort_keys(graph)
    count += arithmetic.apply(graph)
    count += filters.apply(graph)
    count += experts.rewrite(graph)
    count += route.rewrite(graph)  # last: the experts family proves its ids from the router's top-k
    if count:
        graph.eliminate_dead_code()
        _drop_unread_scatters(graph)
    report.graph_done(graph)
    return count


def _drop_unread_scatters(graph: torch.fx.Graph) -> None:
    """Remove ``index_put_`` into a fresh ``empty`` whose result nothing reads any more (an inverse permutation
    the rewritten ops no longer use). FX's dead-code pass keeps every in-place op, and with it the sort, and
    through a symbolic size even the GEMM outputs it was sized from."""
    aten = torch.ops.aten
    while True:
        dead = [
            n
            for n in graph.nodes
            if n.op == "call_function"
            and n.target is aten.index_put_.default
            and not n.users
            and n.args[0].op == "call_function"
            and n.args[0].target is aten.empty.memory_format
            and set(n.args[0].users) == {n}
        ]
        if not dead:
            return
        for n in dead:
            graph.erase_node(n)
        graph.eliminate_dead_code()


__all__ = ["apply", "report", "SOURCES"]
