"""The canonical form both the patterns and the graphs they search are put in before matching.

Each step rewrites a spelling into an equal one, so a pattern traced from one spelling also matches the others:

- ``x << n`` becomes ``torch.bitwise_left_shift(x, n)``;
- ``view`` becomes ``reshape`` (Inductor's post-grad passes already did that to the graph; patterns are traced
  with views);
- consecutive ``permute`` nodes fold into one, and a ``permute`` by the identity disappears (einsum leaves
  both);
- a two-way ``split`` / ``split_with_sizes`` (``chunk(2)``, ``split(d)``, ``split([d, d])``) followed by
  ``getitem`` becomes two ``slice`` nodes, the spelling of ``x[..., :d]`` / ``x[..., d:]`` and ``narrow``;
- a ``reshape`` that only appends a dim of size 1 becomes ``unsqueeze`` (``w.view(T, K, 1)`` is
  ``w[..., None]``), and an ``expand`` to its input's own shape disappears (``matmul`` leaves one on each
  operand of its ``bmm``), and so does a ``reshape`` of ``unsqueeze(v, i)`` back to v's shape. All three are
  decided on the nodes' shapes, symbolic ones only where they are known equal.

Nothing here changes what the graph computes.
"""

from __future__ import annotations

import operator

import torch

aten = torch.ops.aten

_OPEN_END = 2**63 - 1  # what an open slice end (x[..., d:]) is in a traced graph

# Python operators that trace to an overload of their own, and the named op they are
_OPERATOR_ALIASES = {
    aten.__lshift__.Scalar: aten.bitwise_left_shift.Tensor_Scalar,
    aten.__lshift__.Tensor: aten.bitwise_left_shift.Tensor,
}


def canonicalize(graph: torch.fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _OPERATOR_ALIASES:
            node.target = _OPERATOR_ALIASES[node.target]
        if node.target is aten.view.default:
            node.target = aten.reshape.default
        if node.target is aten.reshape.default:
            _simplify_reshape(graph, node)
        elif node.target is aten.expand.default:
            _drop_identity_expand(graph, node)
        elif node.target is aten.permute.default:
            _simplify_permute(graph, node)
        elif node.target in (aten.split.Tensor, aten.split_with_sizes.default):
            _split_to_slices(graph, node)
    graph.eliminate_dead_code()  # a folded permute may leave its input with a dead second user


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same_sizes(a: tuple, b: tuple) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _simplify_reshape(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    inner = node.args[0]
    if isinstance(inner, torch.fx.Node) and inner.target is aten.unsqueeze.default:
        base, out = _shape(inner.args[0]), _shape(node)
        if base is not None and out is not None and _same_sizes(base, out):
            # reshape(unsqueeze(v, i), v.shape) is v (repeat_interleave(1) leaves one once its expand is gone)
            node.replace_all_uses_with(inner.args[0])
            graph.erase_node(node)
            return
    source, out = _shape(inner), _shape(node)
    if source is None or out is None or len(out) != len(source) + 1:
        return
    # A trailing 1 only: a 1 inserted before the last dim stays a reshape, which is how the combine's patterns
    # see expert_out viewed as [tokens, k, hidden], k = 1 included.
    if _same_sizes(out[-1:], (1,)) and _same_sizes(out[:-1], source):
        node.target, node.args, node.kwargs = aten.unsqueeze.default, (node.args[0], len(source)), {}


def _drop_identity_expand(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    source, out = _shape(node.args[0]), _shape(node)
    if source is not None and out is not None and _same_sizes(source, out):
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)


def _simplify_permute(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    source, dims = node.args[0], list(node.args[1])
    if isinstance(source, torch.fx.Node) and source.target is aten.permute.default:
        inner = list(source.args[1])
        source, dims = source.args[0], [inner[d] for d in dims]  # permute(permute(x, p), q) = permute(x, p[q])
        node.args = (source, dims)
    if dims == list(range(len(dims))):
        node.replace_all_uses_with(source)
        graph.erase_node(node)


def _split_to_slices(graph: torch.fx.Graph, split: torch.fx.Node) -> None:
    x, sizes = split.args[0], split.args[1]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if isinstance(sizes, (list, tuple)):
        if len(sizes) != 2:
            return
        first = sizes[0]
    else:
        first = sizes
        val = split.meta.get("val")
        if val is None or len(val) != 2:  # chunk(2) of an odd or symbolic size may still be two pieces
            return
    getitems = list(split.users)
    if not all(u.target is operator.getitem and u.op == "call_function" for u in getitems):
        return
    for item in getitems:
        start, end = (0, first) if item.args[1] == 0 else (first, _OPEN_END)
        with graph.inserting_before(item):
            piece = graph.call_function(aten.slice.Tensor, (x, dim, start, end))
        piece.meta.update(item.meta)
        item.replace_all_uses_with(piece)
        graph.erase_node(item)
    graph.erase_node(split)
