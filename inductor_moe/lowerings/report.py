"""What the lowerings did to a graph: every rewrite and every rejected candidate with its reason.

Each is logged through the ``inductor_moe`` logger (rewrites at INFO, rejections at DEBUG), counted in
``torch._dynamo.utils.counters["inductor_moe"]`` (our own namespace: Inductor's ``pattern_matcher_count`` also
counts its own patterns), and appended to every :class:`Report` being collected (``inductor_moe.explain``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

log = logging.getLogger("inductor_moe")


@dataclasses.dataclass(frozen=True)
class Rewrite:
    family: str  # gated_act, topk_pack, combine
    spelling: str  # which way of writing it was matched
    node: str  # the graph node that now comes from our op
    shape: str  # its dtype and shape


@dataclasses.dataclass(frozen=True)
class Rejection:
    family: str
    spelling: str
    node: str
    reason: str


@dataclasses.dataclass
class Report:
    rewrites: list[Rewrite] = dataclasses.field(default_factory=list)
    rejected: list[Rejection] = dataclasses.field(default_factory=list)
    graphs: list[str] = dataclasses.field(default_factory=list)  # each graph after the pass, see render()

    def __str__(self) -> str:
        lines = [f"{len(self.rewrites)} rewrite(s), {len(self.rejected)} rejected candidate(s)"]
        lines += [f"  rewrote  {r.family:<9} {r.node} ({r.shape}) <- {r.spelling}" for r in self.rewrites]
        lines += [f"  rejected {r.family:<9} {r.node} ({r.spelling}): {r.reason}" for r in self.rejected]
        return "\n".join(lines)


_collecting: list[Report] = []


@contextlib.contextmanager
def collect():
    """Collect what the lowerings do inside the block (nested collections each see everything)."""
    report = Report()
    _collecting.append(report)
    try:
        yield report
    finally:
        _collecting.remove(report)


def rewritten(family: str, spelling: str, node: str, shape: str) -> None:
    from torch._dynamo.utils import counters

    counters["inductor_moe"][family] += 1
    log.info("inductor_moe: rewrote %s (%s) into the %s op, from the spelling %r", node, shape, family, spelling)
    for report in _collecting:
        report.rewrites.append(Rewrite(family, spelling, node, shape))


def rejected(family: str, spelling: str, node, reason: str) -> None:
    name = getattr(node, "name", str(node))
    entry = Rejection(family, spelling, name, reason)
    log.debug("inductor_moe: not rewriting %s as %s (%s): %s", name, family, spelling, reason)
    for report in _collecting:
        if entry not in report.rejected:  # several patterns may reject one candidate for one reason
            report.rejected.append(entry)


def graph_done(graph) -> None:
    """Keep the graph as it leaves the pass, for the reports being collected."""
    if _collecting:
        text = render(graph)
        for report in _collecting:
            report.graphs.append(text)


def render(graph) -> str:
    """The graph's computation, one line per node, with names independent of the torch version: inputs are
    in0, in1, ..., the other nodes v0, v1, ... in order (what the tests snapshot)."""
    import torch

    names: dict = {}
    lines = []

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return names[a]
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(arg(x) for x in a) + "]"
        if isinstance(a, torch.dtype):
            return str(a).removeprefix("torch.")
        return repr(a)

    inputs = values = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            names[node], inputs = f"in{inputs}", inputs + 1
        elif node.op == "call_function":
            names[node], values = f"v{values}", values + 1
            target = getattr(node.target, "__name__", str(node.target))
            if isinstance(node.target, torch._ops.OpOverload):
                target = f"{node.target.namespace}.{node.target._opname}"
            args = [arg(a) for a in node.args] + [f"{k}={arg(v)}" for k, v in node.kwargs.items()]
            lines.append(f"{names[node]} = {target}({', '.join(args)})")
        elif node.op == "output":
            lines.append(f"return {arg(node.args[0])}")
    return "\n".join(lines)
