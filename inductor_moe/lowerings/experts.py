"""Lowering of a MoE layer's whole expert computation into ``inductor_moe::fused_experts``.

A graph walk, anchored at the sum over k that ends the computation (or the ``moe_combine`` the combine family
made of it), run after the other families: the gated activation between the two GEMMs is then an
``act_and_mul``. Spellings (:data:`SPELLINGS`): transformers 5.x ``batched_mm_experts_forward`` (see
:func:`_match_batched`), grouped GEMMs whose sum is already a ``moe_combine`` (:func:`_match_combined`), and
transformers 5.x ``grouped_mm_experts_forward`` (``integrations/moe.py``), which every model on its experts
interface runs (Qwen3-MoE, Mixtral, ...), in its post-grad form::

    ids_g, perm = sort(topk_ids.view(-1))                    # stable or not: each pair's row is its own
    rows = where(ids_g >= E, 0, x[perm // K])                 # the where optional
    offs = cumsum(histc(ids_g, bins=E, min=0, max=E - 1), dtype=int32)
    h = _grouped_mm(rows, w13.transpose(1, 2), offs)          # w13 [E, 2I, H], or stored [E, H, 2I]
    a = act_and_mul(h, act)                                   # any filter that keeps ids in [0, E) live
    y = where(ids_g >= E, 0, _grouped_mm(a, w2.transpose(1, 2), offs))
    y = y * w.view(-1)[perm][:, None]
    out = y[inv].view(T, K, H).sum(1)                         # inv = empty.index_put_([perm], arange(T * K))

What it computes, proven from the nodes: the sort groups the pairs by id; histc's E unit bins over [0, E - 1]
count the ids in [0, E) (each integer v lands in bin v), so ``offs`` are the group ends and the grouped GEMMs
run every pair with an id in [0, E) through its expert; ``inv`` is ``perm``'s inverse, so the sum adds pair
(t, k)'s weighted row to token t. That is ``fused_experts`` with live pairs those of ids in [0, E), provided
the ids are never negative (histc drops a negative id but the sort puts it first, where the grouped GEMM reads
it as one of expert 0's rows): they must be the indices of a top-k, or a where of them with an integer constant
(expert_sort.py's bounds). Where an id can be E or more (expert parallelism's sentinel), its rows are zeroed
before they are weighted, so it adds ``w * 0``: the op's ``zero_dead_rows``; when the bounds show every id is
below E, no pair is dead.

Rounding: the op accumulates both GEMMs in fp32, rounds ``act(gate) * up`` once to the input dtype (the
spelling rounds gate and up, then the activation, then the product), and weights and sums the k rows in fp32
(the spelling rounds each product to the rows' dtype first). A result that stays fp32 (fp32 routing weights
with no cast back) is not rewritten: the op returns the hidden states' dtype.
"""

from __future__ import annotations

import operator

import torch

from . import matching, report
from .expert_sort import _key_bounds
from .matching import is_call, known, val

aten = torch.ops.aten
FAMILY = "experts"
ACT_AND_MUL = torch.ops.inductor_moe.act_and_mul.default
OP = torch.ops.inductor_moe.fused_experts.default
_VIEWS = (aten.reshape.default, aten.view.default)


def rewrite(graph: torch.fx.Graph) -> int:
    """Replace every proven expert computation in ``graph`` by one ``fused_experts``; returns how many."""
    return matching.walk(graph, FAMILY, SPELLINGS, _replace)


def _replace(graph, spelling, out, args) -> None:
    with graph.inserting_before(out):
        w13, w2 = (_transposed(graph, w) if transposed else w for w, transposed in (args["w13"], args["w2"]))
        renormalize = args.get("renormalize", False)
        call = (args["x"], w13, w2, args["w"], args["ids"], args["act"], 0, renormalize, None, args["zero_dead_rows"])
        fused = graph.call_function(OP, call)
    fused.meta["val"] = OP(*[val(a) if isinstance(a, torch.fx.Node) else a for a in call])
    out.replace_all_uses_with(fused)
    report.rewritten(FAMILY, spelling, fused.name, matching._shape_str(fused))


def _transposed(graph, node):
    new = graph.call_function(aten.permute.default, (node, [0, 2, 1]))
    new.meta["val"] = val(node).permute(0, 2, 1)
    return new


def _match_grouped(total: torch.fx.Node) -> tuple[torch.fx.Node, dict] | str:
    """(the node the op replaces, the op's arguments) or why not ("": not this spelling at all)."""
    rows3, dims = total.args[0], total.args[1]
    if list(dims) != [1] or (len(total.args) > 2 and total.args[2]) or not is_call(rows3, *_VIEWS):
        return ""
    back = rows3.args[0]
    if not (is_call(back, aten.index.Tensor) and len(back.args[1]) == 1):
        return ""
    weighted, inv = back.args[0], back.args[1][0]
    perm = _inverse_of(inv)
    if perm is None:
        return ""
    sort = perm.args[0] if is_call(perm, operator.getitem) and perm.args[1] == 1 else None
    if not is_call(sort, aten.sort.default, aten.sort.stable):
        return ""
    # from here on the computation is this spelling's: what does not hold is a near miss, with its reason
    if _descending(sort):
        return "the pairs are sorted by descending id"
    ids_g = next((u for u in sort.users if is_call(u, operator.getitem) and u.args[1] == 0), None)
    flat = sort.args[0]
    ids = flat.args[0] if is_call(flat, *_VIEWS) else None
    if ids_g is None or ids is None or val(ids).dim() != 2 or val(flat).dim() != 1:
        return "the sort is not over the flattened [tokens, k] ids"
    tokens, top_k = val(ids).shape
    if not isinstance(top_k, int):
        return f"k is symbolic ({top_k})"
    if not (is_call(weighted, aten.mul.Tensor)):
        return "the rows are not weighted in sorted order"
    y, w = _rows_and_weights(weighted, perm)
    if y is None:
        return "the rows' weights are not the routing weights gathered by the sort's permutation"
    down = y.args[2] if is_call(y, aten.where.self) else y
    if _biased(down):
        return BIAS
    if not (is_call(down, aten._grouped_mm.default) and len(down.args) == 3 and not down.kwargs):
        return "the weighted rows are not a grouped GEMM's"
    act, w2t, offs = down.args
    experts = _histc_experts(offs, ids_g)
    if isinstance(experts, str):
        return experts
    _, y_masked = _unmask(y, ids_g, experts)
    if not (is_call(act, ACT_AND_MUL) and act.args[1] in ("silu", "gelu", "gelu_tanh")):
        return "the down projection's input is not a gated activation of silu, gelu or gelu_tanh"
    up = act.args[0]
    if _biased(up):
        return BIAS
    if not (is_call(up, aten._grouped_mm.default) and len(up.args) == 3 and not up.kwargs and up.args[2] is offs):
        return "the activation's input is not a grouped GEMM over the same groups"
    rows_m, w13t, _ = up.args
    rows, _ = _unmask(rows_m, ids_g, experts)
    x = _gathered_tokens(rows, perm, top_k)
    if x is None:
        return f"the grouped rows are not hidden[perm // {top_k}]"
    if val(x).dim() != 2:
        return "the hidden states are not 2-D"
    if _filter_drops_live(act, ids_g, experts):
        return "the activation's expert filter drops ids in [0, E)"
    bounds = _key_bounds(flat)
    if not isinstance(bounds, tuple) or bounds[0] < 0:
        return "the ids may be negative: histc drops them, the sort puts them first among expert 0's rows"
    zero_dead_rows = bounds[1] >= experts
    if zero_dead_rows and not y_masked:
        return "ids of E or more are possible and their rows are not zeroed before weighting"
    weights = ((w13t, True), (w2t, True))
    return _checked(total, val(rows3).shape, x, weights, experts, w, ids, act.args[1], zero_dead_rows)


def _checked(total, rows_shape, x, weights, experts, w, ids, act, zero_dead_rows):
    """The shapes and dtypes every spelling must have, and the node the op replaces: the sum, or its cast to
    the hidden states' dtype. ``weights``: (w13, w2) each as (node, whether the op takes it transposed)."""
    (w13, t13), (w2, t2) = weights
    w13v = val(w13).transpose(1, 2) if t13 else val(w13)
    w2v = val(w2).transpose(1, 2) if t2 else val(w2)
    xv = val(x)
    tokens, top_k = val(ids).shape
    hidden = xv.shape[1]
    if not (
        w13v.dim() == 3
        and w2v.dim() == 3
        and w13v.shape[0] == experts
        and w2v.shape[0] == experts
        and known(w13v.shape[2] == hidden)
        and known(w2v.shape[1] == hidden)
        and known(w13v.shape[1] == 2 * w2v.shape[2])
        and known(xv.shape[0] == tokens)
        and list(val(w).shape) == list(val(ids).shape)
        and len(rows_shape) == 3
        and known(rows_shape[0] == tokens)
        and rows_shape[1] == top_k
        and known(rows_shape[2] == hidden)
    ):
        return "the weights' shapes are not [E, 2I, H] and [E, H, I] of the hidden size"
    if not (xv.dtype == w13v.dtype == w2v.dtype and xv.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return "the hidden states and the weights differ in dtype"
    out = total
    if val(total).dtype != xv.dtype:
        users = list(total.users)
        cast = users[0] if len(users) == 1 else None
        if not (is_call(cast, torch.ops.prims.convert_element_type.default) and cast.args[1] == xv.dtype):
            return f"the sum stays {val(total).dtype}; the op returns {xv.dtype}"
        out = cast
    args = dict(x=x, w13=(w13, t13), w2=(w2, t2), w=w, ids=ids, act=act, zero_dead_rows=zero_dead_rows)
    return out, args


def _match_batched(total: torch.fx.Node) -> tuple[torch.fx.Node, dict] | str:
    """transformers' ``batched_mm_experts_forward``: every pair's expert weights gathered (``w13[ids]``), the rows
    repeated k times, ``bmm`` up and down, weighted, ``view(T, K, H).sum(1)``. The ids are clamped into [0, E)
    first, so an id outside it is computed by expert 0 or E - 1: rewritten only when the ids provably lie in
    [0, E), where the clamp changes nothing and every pair is live."""
    rows3, dims = total.args[0], total.args[1]
    if list(dims) != [1] or (len(total.args) > 2 and total.args[2]) or not is_call(rows3, *_VIEWS):
        return ""
    weighted = rows3.args[0]
    if not is_call(weighted, aten.mul.Tensor):
        return ""
    y, w = _rows_and_weights(weighted, None)
    if y is None:
        if any(_batched_linear(_without_noop_views(a)) is not None for a in weighted.args):
            return MASKED_WEIGHTS
        return ""
    y = _without_noop_views(y)
    down = _batched_linear(y)
    if down is None:
        return BIAS if y is not None and _biased(y) else ""
    a, w2, w2_ids, t2 = down
    # from here on the computation is this spelling's
    if not (is_call(a, ACT_AND_MUL) and a.args[1] in ("silu", "gelu", "gelu_tanh") and len(a.args) == 2):
        return "the down projection's input is not an unfiltered gated activation of silu, gelu or gelu_tanh"
    up = _batched_linear(a.args[0])
    if up is None:
        return BIAS if _biased(a.args[0]) else "the activation's input is not a batched GEMM of the pairs' weights"
    rows, w13, w13_ids, t13 = up
    if w13_ids is not w2_ids:
        return "the two projections gather their weights by different ids"
    experts = val(w13).shape[0]
    flat = _unclamped(w13_ids, experts)
    if flat is None or not is_call(flat, *_VIEWS) or val(flat.args[0]).dim() != 2:
        return "the weights are not gathered by the flattened [tokens, k] ids (clamped into [0, E))"
    ids = flat.args[0]
    top_k = val(ids).shape[1]
    if w is None:
        return "the rows' weights are not the flattened routing weights"
    x = _repeated_tokens(rows, top_k)
    if x is None:
        return f"the pairs' rows are not the hidden states repeated {top_k} times"
    bounds = _key_bounds(flat)
    if not isinstance(bounds, tuple) or bounds[0] < 0 or bounds[1] >= experts:
        return "ids outside [0, E) are possible: the clamp computes them with expert 0 or E - 1"
    weights = ((w13, t13), (w2, t2))
    return _checked(total, val(rows3).shape, x, weights, experts, w, ids, a.args[1], False)


def _batched_linear(node):
    """(input, weight, ids, transposed) for transformers' ``_batched_linear`` without bias:
    ``bmm(weight[ids], input[..., None]).squeeze(-1)`` (weight [E, out, in]) or
    ``bmm(input[:, None], weight[ids]).squeeze(1)`` (weight [E, in, out], transposed)."""
    if not (is_call(node, aten.squeeze.dim) and is_call(node.args[0], aten.bmm.default)):
        return None
    left, right = node.args[0].args
    if node.args[1] in (-1, 2) and is_call(right, aten.unsqueeze.default) and right.args[1] in (-1, 2):
        gathered, inp, transposed = left, right.args[0], False
    elif node.args[1] == 1 and is_call(left, aten.unsqueeze.default) and left.args[1] == 1:
        gathered, inp, transposed = right, left.args[0], True
    else:
        return None
    if not (is_call(gathered, aten.index.Tensor) and len(gathered.args[1]) == 1 and val(gathered.args[0]).dim() == 3):
        return None
    return inp, gathered.args[0], gathered.args[1][0], transposed


def _unclamped(ids, experts):
    """x for ``clamp(x, 0, E - 1)`` as decomposed (``clamp_max(clamp_min(x, 0), E - 1)``, either order), or ids
    itself if no clamp."""
    seen = {}
    while is_call(ids, aten.clamp_min.default, aten.clamp_max.default) and ids.target not in seen:
        seen[ids.target] = ids.args[1]
        ids = ids.args[0]
    if seen and seen != {aten.clamp_min.default: 0, aten.clamp_max.default: experts - 1}:
        return None
    return ids


def _repeated_tokens(rows, top_k):
    """x if ``rows`` is ``x.repeat_interleave(top_k, dim=0)`` as decomposed: the [T, H] rows unsqueezed to
    [T, 1, H], expanded to [T, top_k, H] (maybe copied) and viewed as [T * top_k, H]."""
    if not is_call(rows, *_VIEWS):
        return None
    node = rows.args[0]
    if is_call(node, aten.clone.default):
        node = node.args[0]
    unsqueezed = node.args[0] if is_call(node, aten.expand.default) else None
    if not (is_call(unsqueezed, aten.unsqueeze.default) and unsqueezed.args[1] == 1):
        return None
    x = node.args[0].args[0]
    expanded = val(node)
    if val(x).dim() != 2 or expanded.dim() != 3 or expanded.shape[1] != top_k:
        return None
    return x


def _match_combined(combine: torch.fx.Node) -> tuple[torch.fx.Node, dict] | str:
    """Grouped-GEMM experts whose sum over k the combine family already made a ``moe_combine``
    (inductor_moe/testing.py's grouped_experts, torchtitan's grouping): ``key`` each pair's group (its local
    expert, or E for a pair of no local expert), ``perm`` a stable sort's indices of the flattened keys::

        offs = cumsum(counts of key over [0, E] [:E], dtype=int32)      # scatter_add of ones, or histc
        h = _grouped_mm(x[perm // K], w13.transpose(1, 2), offs)
        a = act_and_mul(h, act, key through perm [, any filter keeping [0, E) live])
        y = _grouped_mm(a, w2.transpose(1, 2), offs)
        out = moe_combine(y, w, key.view(T, K), lo, hi, src_rows=inv.view(T, K), zero_dead_rows, renormalize)

    with ``inv`` perm's inverse and the combine's filter live exactly on [0, E) of the keys' values [0, E]:
    ``fused_experts(x, w13, w2, w, key.view(T, K), act, 0, renormalize, zero_dead_rows=zero_dead_rows)``."""
    y, w = combine.args[:2]
    keys, lo, hi = (
        _arg(combine, 2, "topk_ids", None),
        _arg(combine, 3, "expert_lo", 0),
        _arg(combine, 4, "expert_hi", 2**31 - 1),
    )
    src_rows, zero_dead_rows = _arg(combine, 5, "src_rows", None), _arg(combine, 6, "zero_dead_rows", False)
    renormalize = _arg(combine, 7, "renormalize", False)
    if not is_call(y, aten._grouped_mm.default) or src_rows is None:
        return ""
    act, w2t, offs = y.args if len(y.args) == 3 and not y.kwargs else (None, None, None)
    if not (is_call(act, ACT_AND_MUL) and act.args[1] in ("silu", "gelu", "gelu_tanh")):
        return ""
    # from here on the computation is this spelling's
    up = act.args[0]
    if not (is_call(up, aten._grouped_mm.default) and len(up.args) == 3 and not up.kwargs and up.args[2] is offs):
        return "the activation's input is not a grouped GEMM over the same groups"
    inv = src_rows.args[0] if is_call(src_rows, *_VIEWS) else None
    perm = _inverse_of(inv)
    sort = matching.sort_indices(perm) if perm is not None else None
    if sort is None or sort[1]:
        return "the combine's rows are not the rows of an ascending sort put back in pair order"
    flat = sort[0]
    while is_call(flat, torch.ops.prims.convert_element_type.default):
        flat = flat.args[0]
    if keys is None:  # no filter: the sort's keys are the routed ids themselves
        keys = flat.args[0] if is_call(flat, *_VIEWS) and val(flat.args[0]).dim() == 2 else None
    if keys is None or not _same(keys, flat):
        return "the rows are not grouped by a sort of the combine's ids"
    experts = val(w2t).shape[0]
    counted = _counts_of(offs, flat)
    if not isinstance(experts, int) or counted is None or counted[0] != experts:
        return "the groups' ends are not the cumulative counts of the keys' first E values"
    x = _gathered_tokens(up.args[0], perm, val(keys).shape[1])
    if x is None or val(x).dim() != 2:
        return f"the grouped rows are not hidden[perm // {val(keys).shape[1]}]"
    bounds = _key_bounds(flat)
    if not isinstance(bounds, tuple) or bounds[0] < 0 or bounds[1] > experts - counted[1]:
        return "the keys are not provably in [0, E]"
    values = range(bounds[0], bounds[1] + 1)
    if any(_live(v, lo, hi) != (v < experts) for v in values):
        return "the combine's filter is not live exactly on the keys below E"
    act_lo, act_hi = _arg(act, 4, "expert_lo", 0), _arg(act, 5, "expert_hi", 2**31 - 1)
    filtered = _arg(act, 2, "expert_ids", None) is not None
    if filtered and not (
        _same(_arg(act, 2, "expert_ids", None), flat)
        and _arg(act, 3, "expert_step", 1) == 1
        and _arg(act, 6, "expert_ids_index", None) is perm
        and all(_live(v, act_lo, act_hi) for v in values if v < experts)
    ):
        return "the activation's expert filter drops keys below E"
    weights = ((up.args[1], True), (w2t, True))
    rows_shape = (*val(keys).shape, val(y).shape[1])
    found = _checked(combine, rows_shape, x, weights, experts, w, keys, act.args[1], zero_dead_rows)
    if isinstance(found, str):
        return found
    out, args = found
    return out, args | {"renormalize": renormalize}


def _live(v: int, lo: int, hi: int) -> bool:
    """The ops' expert filter on one value: lo <= v < hi, wrapping around when lo > hi."""
    return lo <= v < hi if lo <= hi else (v >= lo or v < hi)


def _counts_of(offs, flat) -> tuple[int, bool] | None:
    """(E, whether every value of ``flat`` must be below E) if ``offs`` is the cumulative int32 counts of
    ``flat``'s values 0..E-1: ``cumsum(scatter_add(zeros(n), 0, flat, ones)[:E])`` with n > E, the same over
    zeros(E) without the slice (a value of E or more would be out of its bounds), or
    ``cumsum(histc(flat, E, 0, E - 1))``."""
    if not (is_call(offs, aten.cumsum.default) and offs.args[1] == 0 and offs.kwargs.get("dtype") == torch.int32):
        return None
    counts = offs.args[0]
    if is_call(counts, aten.histc.default):
        found = _histc_experts(offs, flat)
        return (found, False) if isinstance(found, int) else None
    end = None
    if is_call(counts, aten.slice.Tensor):
        if counts.args[1] != 0 or _arg(counts, 2, "start", 0) not in (0, None):
            return None
        end, counts = _arg(counts, 3, "end", None), counts.args[0]
    if not (is_call(counts, aten.scatter_add.default) and counts.args[1] == 0 and _same(counts.args[2], flat)):
        return None
    base, ones = counts.args[0], counts.args[3]
    if not (is_call(base, aten.full.default) and base.args[1] == 0 and val(base).dim() == 1):
        return None
    if not (is_call(ones, aten.full.default) and ones.args[1] == 1 and list(val(ones).shape) == list(val(flat).shape)):
        return None
    size = val(base).shape[0]
    if not isinstance(size, int):
        return None
    if end is None:  # every key counted into its own bin: the keys must lie in [0, size), as the caller checks
        return size, True
    return (end, False) if isinstance(end, int) and end < size else None


def _same(a, b) -> bool:
    """Whether ``a`` and ``b`` hold the same values in the same row-major order: one node, or reshapes of one
    node (to any shapes of its size)."""

    def root(node):
        while is_call(node, *_VIEWS):
            node = node.args[0]
        return node

    if a is b:
        return True
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
        return False
    return root(a) is root(b) and known(val(a).numel() == val(b).numel())


COMBINE = torch.ops.inductor_moe.moe_combine.default
# spelling -> (the node it is anchored at, its matcher)
SPELLINGS = {
    "grouped_mm experts (transformers)": (aten.sum.dim_IntList, _match_grouped),
    "batched_mm experts (transformers)": (aten.sum.dim_IntList, _match_batched),
    "grouped GEMMs into moe_combine": (COMBINE, _match_combined),
}


BIAS = "the expert projections add biases, which fused_experts has not"
# transformers >= 5.2x under expert parallelism: sentinel pairs run through a clamped expert and are weighted by 0,
# so a non-finite row of that expert reaches the sum as NaN, where fused_experts computes nothing
MASKED_WEIGHTS = "the rows' weights are masked before they weigh the rows (a masked pair still adds its row * 0)"


def _without_noop_views(node):
    """``x`` for ``squeeze(unsqueeze(x, d), d')`` of x's own shape (what functionalising ``out.add_(bias)`` on a
    squeezed bmm output leaves)."""
    while (
        is_call(node, aten.squeeze.dim)
        and is_call(node.args[0], aten.unsqueeze.default)
        and list(val(node).shape) == list(val(node.args[0].args[0]).shape)
    ):
        node = node.args[0].args[0]
    return node


def _biased(node) -> bool:
    """Whether ``node`` is a grouped or batched GEMM's output plus something (transformers' ``out.add_(bias)``)."""
    if not is_call(node, aten.add.Tensor):
        return False
    return any(is_call(a, aten._grouped_mm.default) or _batched_linear(a) is not None for a in node.args)


def _descending(sort) -> bool:
    if sort.target is aten.sort.default:
        return bool(sort.args[2] if len(sort.args) > 2 else sort.kwargs.get("descending", False))
    return bool(sort.kwargs.get("descending", False))


def _inverse_of(inv) -> torch.fx.Node | None:
    """perm if ``inv`` is ``empty(n).index_put_([perm], arange(n))``: perm's inverse when perm is a permutation
    of range(n) (a sort's indices, checked by the caller)."""
    if not (is_call(inv, aten.index_put.default, aten.index_put_.default) and len(inv.args[1]) == 1):
        return None
    base, (perm,), values = inv.args[:3]
    if len(inv.args) > 3 and inv.args[3]:  # accumulate
        return None
    if not (is_call(values, torch.ops.prims.iota.default) and is_call(base, aten.empty.memory_format)):
        return None
    start = values.kwargs.get("start", 0)
    step = values.kwargs.get("step", 1)
    n = val(perm).shape[0] if isinstance(val(perm), torch.Tensor) else None
    if start != 0 or step != 1 or n is None:
        return None
    if not (known(val(values.args[0]) == n) and known(val(base).shape[0] == n)):
        return None
    return perm


def _rows_and_weights(weighted, perm):
    """(rows, w) if ``weighted`` is ``rows * w.view(-1)[perm][:, None]`` (either order) with w [T, K], or
    without perm ``rows * w.view(-1)[:, None]``."""
    for rows, scale in (weighted.args, weighted.args[::-1]):
        if not is_call(scale, aten.unsqueeze.default) or scale.args[1] not in (-1, 1):
            continue
        flat = scale.args[0]
        if perm is not None:
            gathered = flat
            by_perm = is_call(gathered, aten.index.Tensor) and len(gathered.args[1]) == 1
            if not (by_perm and gathered.args[1][0] is perm):
                continue
            flat = gathered.args[0]
        if is_call(flat, *_VIEWS) and val(flat).dim() == 1 and val(flat.args[0]).dim() == 2:
            return rows, flat.args[0]
    return None, None


def _unmask(node, ids_g, experts):
    """(inner, True) for ``where(ids_g[:, None] >= E, 0, inner)`` (rows of ids of E or more zeroed), else
    (node, False): any other where stays part of what the rows are, and fails the checks that follow."""
    if not is_call(node, aten.where.self):
        return node, False
    cond, zero, inner = node.args
    if is_call(cond, aten.unsqueeze.default) and cond.args[1] in (-1, 1):
        cond = cond.args[0]
    dead = is_call(cond, aten.ge.Scalar) and cond.args[0] is ids_g and cond.args[1] == experts
    if not (dead and matching.is_plus_zero(matching.fill_value(zero, val(node)))):
        return node, False
    return inner, True


def _arg(node, i: int, name: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _histc_experts(offs, ids_g) -> int | str:
    """E if ``offs`` is ``cumsum(histc(ids_g, E, 0, E - 1), 0, dtype=int32)``, else why not."""
    if not (is_call(offs, aten.cumsum.default) and offs.args[1] == 0 and offs.kwargs.get("dtype") == torch.int32):
        return "the groups' ends are not a cumsum of per-expert counts"
    hist = offs.args[0]
    if not is_call(hist, aten.histc.default):
        return "the per-expert counts are not a histc of the sorted ids"
    source = hist.args[0]
    if is_call(source, torch.ops.prims.convert_element_type.default):
        source = source.args[0]
    bins, lo, hi = _arg(hist, 1, "bins", 100), _arg(hist, 2, "min", 0), _arg(hist, 3, "max", 0)
    if source is not ids_g or not isinstance(bins, int) or lo != 0 or hi != bins - 1:
        return "the per-expert counts are not histc(sorted ids, bins=E, min=0, max=E - 1)"
    return bins


def _gathered_tokens(rows, perm, top_k) -> torch.fx.Node | None:
    """x if ``rows`` is ``x[perm // top_k]`` with x 2-D."""
    if not (is_call(rows, aten.index.Tensor) and len(rows.args[1]) == 1):
        return None
    x, (index,) = rows.args
    if not (is_call(index, aten.div.Tensor_mode) and index.kwargs.get("rounding_mode") == "floor"):
        return None
    if index.args[0] is not perm or index.args[1] != top_k or val(x).dim() != 2:
        return None
    return x


def _filter_drops_live(act, ids_g, experts) -> bool:
    """Whether the activation's expert filter (if any) marks some id in [0, E) dead."""
    filter_ids, step = _arg(act, 2, "expert_ids", None), _arg(act, 3, "expert_step", 1)
    lo, hi, index = (
        _arg(act, 4, "expert_lo", 0),
        _arg(act, 5, "expert_hi", 2**31 - 1),
        _arg(act, 6, "expert_ids_index", None),
    )
    if filter_ids is None:
        return False
    return not (filter_ids is ids_g and step == 1 and index is None and lo <= 0 and hi >= experts)
