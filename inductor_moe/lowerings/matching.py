"""What every lowering family shares: spellings traced into patterns, registration with the exactness check
and the record of what was rewritten or rejected, and proofs about (possibly symbolic) sizes.

A *spelling* is a plain PyTorch function, e.g. ``F.silu(x[..., :d]) * x[..., d:]``. It is traced the way
Inductor traces its own patterns (``fwd_only``: ATen after Inductor's decompositions), put in the canonical form
of canonicalize.py, and turned into a pattern in which arithmetic (ops, float and integer constants, dtypes) must
match exactly, while arguments that depend on sizes (slice bounds, view shapes, dims that depend on the rank)
match anything. The family's ``check`` then proves from the matched nodes' shapes that those arguments mean what
the op computes; a check that fails names its reason, and the reason is recorded.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch._inductor.pattern_matcher import (
    CallFunction,
    Ignored,
    KeywordArg,
    Match,
    PatternExpr,
    PatternMatcherPass,
    fwd_only,
    register_graph_pattern,
)

from .. import config
from . import canonicalize, report

aten = torch.ops.aten

# Arguments (by position) that depend on sizes or rank and are proven by the family's check instead.
_SIZE_ARGS = {
    aten.slice.Tensor: (1, 2, 3, 4),
    aten.reshape.default: (1,),
    aten.unsqueeze.default: (1,),
    aten.squeeze.dim: (1,),
    aten.sum.dim_IntList: (1,),
    aten.expand.default: (1,),
}


def trace(spelling: Callable[..., torch.Tensor], example_args: list[torch.Tensor]) -> PatternExpr:
    """The pattern of ``spelling`` traced with ``example_args`` (their dtypes become part of the pattern)."""
    gm = fwd_only(spelling, example_args)
    canonicalize.canonicalize(gm.graph)
    names = iter(_argnames(spelling))
    env: dict[torch.fx.Node, Any] = {}

    def convert(arg):
        if isinstance(arg, torch.fx.Node):
            return env[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(convert(a) for a in arg)
        return arg

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = KeywordArg(next(names))
        elif node.op == "call_function":
            free = _SIZE_ARGS.get(node.target, ())
            args = [Ignored() if i in free else convert(a) for i, a in enumerate(node.args)]
            kwargs = {k: convert(v) for k, v in node.kwargs.items()}
            env[node] = CallFunction(node.target, *args, _users=len(node.users), **kwargs)
        elif node.op == "output":
            (result,) = node.args[0] if isinstance(node.args[0], (list, tuple)) else (node.args[0],)
            return env[result]
        else:
            raise AssertionError(f"unexpected node {node.format_node()} in a traced spelling")
    raise AssertionError("a traced spelling has no output")


def _argnames(fn: Callable) -> list[str]:
    import inspect

    return list(inspect.signature(fn).parameters)


def register(
    patterns: PatternMatcherPass,
    family: str,
    spelling: str,
    pattern: PatternExpr,
    check: Callable[[Match], Any],
    replacement: Callable[[Match, Any], tuple[Callable[..., Any], list[Any]]] | None,
) -> None:
    """Rewrite every match of ``pattern`` that ``check`` proves exact into what ``replacement(match, proof)``
    returns: a function of tensors and the matched nodes to call it with. ``check`` returns the reason a match
    is rejected (a str, recorded; "" rejects silently) or its proof (anything else, e.g. the input it found),
    which the replacement receives. Without a replacement the pattern only diagnoses a near miss."""
    proofs: dict[int, Any] = {}  # extra_check and the handler see the same Match object, one after the other

    def extra_check(match: Match) -> bool:
        if family not in config.families():
            return False
        out = match.output_node()
        device = val(out).device.type if isinstance(val(out), torch.Tensor) else None
        if device not in config.devices():
            report.rejected(family, spelling, out, f"{device} graphs are not rewritten (INDUCTOR_MOE_DEVICES)")
            return False
        proof = check(match)
        if isinstance(proof, str):
            if proof:
                report.rejected(family, spelling, out, proof)
            return False
        if replacement is None:
            return False
        proofs[id(match)] = proof
        return True

    def handler(match: Match, *args, **kwargs) -> None:
        out = match.output_node()
        fn, fn_args = replacement(match, proofs.pop(id(match)))
        name, shape = out.name, _shape_str(out)
        match.replace_by_example(fn, fn_args)
        report.rewritten(family, spelling, name, shape)

    register_graph_pattern(pattern, extra_check=extra_check, pass_dict=patterns)(handler)


def walk(
    graph: torch.fx.Graph,
    family: str,
    spellings: dict[str, tuple[Any, Callable[[torch.fx.Node], Any]]],
    replace: Callable[..., None],
) -> int:
    """The driver of the graph-walk families: every node that is the anchor (a call target) of one of
    ``spellings`` (name -> (anchor, match)) is offered to its ``match``, which returns the rewrite's arguments
    (a tuple, passed to ``replace(graph, name, *found)``) or why not (a str; "" when the node is not that
    spelling at all). A node no spelling took records every spelling's reason. Returns the rewrites made."""
    if family not in config.families():
        return 0
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        misses = []
        for spelling, (anchor, match) in spellings.items():
            if node.target is not anchor:
                continue
            found = match(node)
            if isinstance(found, str):
                misses += [(spelling, found)] if found else []
                continue
            replace(graph, spelling, *found)
            count += 1
            break
        else:
            for spelling, reason in misses:
                report.rejected(family, spelling, node, reason)
    return count


def _shape_str(node: torch.fx.Node) -> str:
    v = val(node)
    return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}" if isinstance(v, torch.Tensor) else "?"


def is_call(node, *targets) -> bool:
    """Whether ``node`` is a graph node calling one of ``targets``."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def val(node) -> Any:
    """The value a node stands for at compile time: a FakeTensor, a SymInt or a constant."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def scalar_constant(node):
    """The value of a scalar constant node (``full`` / ``scalar_tensor`` of shape []) or number, else None."""
    if isinstance(node, (int, float)):
        return node
    if isinstance(node, torch.fx.Node) and node.target in (aten.full.default, aten.scalar_tensor.default):
        value = node.args[1] if node.target is aten.full.default else node.args[0]
        shape = node.args[0] if node.target is aten.full.default else []
        if list(shape) == [] and isinstance(value, (int, float)):
            return value
    return None


def fill_value(node, like) -> Any:
    """The value ``node`` fills a result like ``like`` (a FakeTensor) with: a scalar constant, or a ``full``
    (``zeros_like``, ``new_zeros``, ...) of like's dtype whose shape broadcasts to like's, so that putting it in
    a ``where`` changes neither the result's dtype nor its shape; else None."""
    value = scalar_constant(node)
    if value is not None or not (isinstance(node, torch.fx.Node) and node.target is aten.full.default):
        return value
    fill, v = node.args[1], val(node)
    if not (isinstance(fill, (int, float)) and isinstance(v, torch.Tensor) and v.dtype == like.dtype):
        return None
    if v.dim() > like.dim() or not all(known(a == 1) or known(a == b) for a, b in zip(v.shape[::-1], like.shape[::-1])):
        return None
    return fill


def is_plus_zero(value) -> bool:
    """True for an exact +0 (0, 0.0), not for -0.0."""
    import math

    return value is not None and value == 0 and math.copysign(1.0, value) > 0


def sort_indices(node) -> tuple[torch.fx.Node, bool] | None:
    """(x, descending) if ``node`` is the indices of a sort (``sort``/``argsort`` after decomposition) of the 1-D
    ``x``: then its values are a permutation of range(len(x)), never negative nor out of range."""
    import operator

    if not (isinstance(node, torch.fx.Node) and node.target is operator.getitem and node.args[1] == 1):
        return None
    sort = node.args[0]
    if not isinstance(sort, torch.fx.Node) or sort.target not in (aten.sort.default, aten.sort.stable):
        return None
    x = sort.args[0]
    if not isinstance(val(x), torch.Tensor) or val(x).dim() != 1:
        return None
    if sort.target is aten.sort.default:
        descending = sort.args[2] if len(sort.args) > 2 else sort.kwargs.get("descending", False)
    else:
        descending = sort.kwargs.get("descending", False)
    return x, bool(descending)


def known(cond) -> bool:
    """True only if ``cond`` (an expression of possibly symbolic sizes) holds for every size the graph serves;
    never adds a guard, so a proof never specialises the compiled graph."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(cond)


def is_last_dim(dim, rank: int) -> bool:
    return isinstance(dim, int) and dim in (-1, rank - 1)
