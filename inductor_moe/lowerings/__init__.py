"""The lowerings: pattern rewrites of the FX graphs Inductor compiles into the inductor_moe ops.

One file per family (gated_act.py, topk_pack.py, combine.py, expert_sort.py), the canonical form they share
(canonicalize.py), spellings traced into patterns (matching.py), masks turned into expert filters
(expert_mask.py), and the record of what was done (report.py). :func:`apply` is the whole pass; backend.py
installs it into Inductor.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .. import config, ops  # noqa: F401  (ops: defines torch.ops.inductor_moe, which the rewrites emit)
from . import canonicalize, combine, expert_sort, gated_act, report, topk_pack

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
    if count:
        graph.eliminate_dead_code()
    report.graph_done(graph)
    return count


__all__ = ["apply", "report", "SOURCES"]
