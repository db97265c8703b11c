"""Lowering of the weighted top-k combine ``out[t] = sum_k w[t, k] * expert_out[t * K + k]`` into
``inductor_moe::moe_combine``.

Spellings, traced per dtype: ``(expert_out.view(T, K, H) * w[..., None]).sum(1)`` (either order, with or
without a final ``.to(expert_out.dtype)``, or in fp32 as the reference computes it), ``torch.bmm(w[:, None],
expert_out.view(T, K, H)).squeeze(1)`` and ``torch.einsum`` of ``"tkh,tk->th"`` or ``"tk,tkh->th"``
(canonicalize.py brings ``w.view(T, K, 1)`` and ``w[:, None] @ view`` to these forms). The check proves from
the shapes that the view is [tokens, k, hidden] of token-major rows, that the weights broadcast over hidden,
and that the sum runs over k. With the products of dead pairs replaced by 0 (or a ``zeros_like``) before the
sum (``where(dead[..., None], 0, view * w[..., None]).sum(1)``, or the live mask the other way round), the mask
becomes the op's expert filter (expert_mask.py).

Rounding: the op multiplies and accumulates in fp32 and rounds once to expert_out's dtype; eager bf16/fp16
rounds every product first, and bmm accumulates in its own order. A result that stays fp32 (fp32 weights,
half-precision expert_out, no cast back) is not rewritten: the op returns expert_out's dtype.
A mask on the weights (``w * live`` or ``where(dead, 0, w)``) stays what it is, the op's weights: the masked
pairs are still read, as the spelling reads them (0 * NaN is NaN).

Gathered rows: when expert_out is ``y[inv]`` with ``inv`` the indices of a sort (so a permutation of its rows,
never negative: an arbitrary index could wrap around, which src_rows does not), the op reads ``y`` through
``src_rows = inv`` instead of a materialised copy. If ``y`` is itself ``where(remote[:, None], 0, y0)`` with
``remote`` a mask of ids ``s[perm]`` and ``inv = argsort(perm)`` for a permutation ``perm`` (rows sorted by
expert, then put back in token order, as grouped-GEMM MoE blocks do), pair j's row is masked exactly when
``s[perm[inv[j]]] = s[j]`` is, so ``s`` becomes the op's per-pair filter with ``zero_dead_rows``: a masked
pair then adds ``w * 0`` as the spelling does (NaN for a non-finite weight), without reading its row. And when
``perm`` is itself a sort's indices, ``inv = argsort(perm)`` is its inverse: src_rows are then scattered
(``indexing.inverse_permutation``, the same values, as the expert_sort op's ATen chain computes them) instead of
sorted, unless the program uses that sort for something else. Rows scattered back instead, ``out[perm] = y``
or ``base.index_copy(0, perm, y)`` (``index_put``, not accumulated, of y into a base of y's shape and dtype,
perm a sort's indices of y's length, so every row of base is overwritten), are ``y[inv]`` with inv perm's
inverse: read the same way, the copy is never made.

Renormalised weights: ``w / w.sum(-1, keepdim=True)`` computed only for the combine (in one dtype) becomes the
op's ``renormalize``, which saves the launch that materialised them. The op sums the k weights in pair order,
where Inductor's reduction may add them in another order: the weights can differ in their last bit.
"""

from __future__ import annotations

import dataclasses

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass

from .. import reference
from ..indexing import inverse_permutation
from . import expert_mask, matching

aten = torch.ops.aten
OP = torch.ops.inductor_moe.moe_combine.default
FAMILY = "combine"


def _rows(expert_out, topk_weights):
    return expert_out.view(topk_weights.shape[0], topk_weights.shape[1], -1)


SPELLINGS = {
    "(view * w[..., None]).sum(1)": lambda expert_out, topk_weights: (
        _rows(expert_out, topk_weights) * topk_weights.unsqueeze(-1)
    ).sum(1),
    "(w[..., None] * view).sum(1)": lambda expert_out, topk_weights: (
        topk_weights.unsqueeze(-1) * _rows(expert_out, topk_weights)
    ).sum(1),
    "(view * w[..., None]).sum(1).to(dtype)": lambda expert_out, topk_weights: (
        (_rows(expert_out, topk_weights) * topk_weights.unsqueeze(-1)).sum(1).to(expert_out.dtype)
    ),
    "(w[..., None] * view).sum(1).to(dtype)": lambda expert_out, topk_weights: (
        (topk_weights.unsqueeze(-1) * _rows(expert_out, topk_weights)).sum(1).to(expert_out.dtype)
    ),
    "(view.float() * w.float()[..., None]).sum(1).to(dtype)": lambda expert_out, topk_weights: (
        (_rows(expert_out, topk_weights).float() * topk_weights.float().unsqueeze(-1)).sum(1).to(expert_out.dtype)
    ),
    "bmm(w[:, None], view).squeeze(1)": lambda expert_out, topk_weights: torch.bmm(
        topk_weights.unsqueeze(1), _rows(expert_out, topk_weights)
    ).squeeze(1),
    "einsum('tkh,tk->th')": lambda expert_out, topk_weights: torch.einsum(
        "tkh,tk->th", _rows(expert_out, topk_weights), topk_weights
    ),
    "einsum('tk,tkh->th')": lambda expert_out, topk_weights: torch.einsum(
        "tk,tkh->th", topk_weights, _rows(expert_out, topk_weights)
    ),
}

# The filtered combine: the products of dead pairs replaced by 0 before the sum (cond is the mask with a
# trailing dim of 1, zero a scalar 0). Exact: a dead pair's row and weight never reach the sum, NaN or not,
# which is what the filter does by not reading them (masking the weights instead is not: 0 * NaN is NaN).
FILTERED_SPELLINGS = {
    "where(dead, 0, view * w[..., None]).sum(1)": (
        False,
        lambda expert_out, topk_weights, cond, zero: torch.where(
            cond, zero, _rows(expert_out, topk_weights) * topk_weights.unsqueeze(-1)
        ).sum(1),
    ),
    "where(live, view * w[..., None], 0).sum(1)": (
        True,
        lambda expert_out, topk_weights, cond, zero: torch.where(
            cond, _rows(expert_out, topk_weights) * topk_weights.unsqueeze(-1), zero
        ).sum(1),
    ),
}

# (expert_out, weights) dtypes the spellings are traced with; mixed pairs differ only by the casts they add
_DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32)]
_DTYPES += [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)]
_DTYPES += [(torch.float32, torch.float16)]


def register(arithmetic: PatternMatcherPass) -> None:
    seen = set()

    def add(spelling, fn, example, check, replacement):
        pattern = matching.trace(fn, example)
        if repr(pattern) not in seen:  # mixed dtypes often trace to the same pattern
            seen.add(repr(pattern))
            matching.register(arithmetic, FAMILY, spelling, pattern, check, replacement)

    for eo_dtype, w_dtype in _DTYPES:
        example = [torch.zeros(8, 4, dtype=eo_dtype), torch.zeros(2, 4, dtype=w_dtype)]
        mask = [torch.zeros(2, 4, 1, dtype=torch.bool), torch.zeros((), dtype=torch.promote_types(eo_dtype, w_dtype))]
        for spelling, fn in SPELLINGS.items():
            if not (spelling.startswith(("bmm", "einsum")) and eo_dtype != w_dtype):  # bmm needs one dtype
                add(spelling, fn, example, _check_unfiltered, _replace)
        for spelling, (live_when_true, fn) in FILTERED_SPELLINGS.items():
            add(spelling, fn, example + mask, _check_filtered(live_when_true), _replace)
            add(
                f"{spelling}.to(dtype)",
                _cast_back(fn),
                example + mask,
                _check_filtered(live_when_true),
                _replace,
            )


def _cast_back(fn):
    def spelling(expert_out, topk_weights, cond, zero):
        return fn(expert_out, topk_weights, cond, zero).to(expert_out.dtype)

    return spelling


def _check(match: Match) -> bool | str:
    eo_node, w_node = match.kwargs["expert_out"], match.kwargs["topk_weights"]
    eo, w, out = matching.val(eo_node), matching.val(w_node), matching.val(match.output_node())
    known = matching.known
    if eo.dim() != 2 or w.dim() != 2:
        return f"expert_out {list(eo.shape)} and weights {list(w.shape)} are not 2-D [rows, hidden] and [tokens, k]"
    tokens, k, hidden = w.shape[0], w.shape[1], eo.shape[1]

    def has_shape(v, want) -> bool:
        return v.dim() == len(want) and all(known(a == b) for a, b in zip(v.shape, want))

    for node in match.nodes:
        v = matching.val(node)
        if node.target is aten.reshape.default and node.args[0] is eo_node:
            if not (v.dim() == 3 and known(v.shape[0] == tokens) and known(v.shape[1] == k)):
                return f"expert_out is viewed as {list(v.shape)}, not [tokens, k, hidden] = [{tokens}, {k}, {hidden}]"
        elif node.target is aten.unsqueeze.default and node.args[0] is w_node:
            bmm = any(u.target is aten.bmm.default and u.args[0] is node for u in node.users)
            want = [tokens, 1, k] if bmm else [tokens, k, 1]
            if not has_shape(v, want):
                return f"the weights are broadcast as {list(v.shape)}, not {want}"
        elif (
            node.target is aten.reshape.default
            and getattr(node.args[0], "target", None) is aten.unsqueeze.default
            and node.args[0].args[0] is w_node
        ):
            # einsum("tk,tkh->th") moves the weights' 1 to the middle for its bmm: [tokens, k, 1] -> [tokens, 1, k]
            if not has_shape(v, [tokens, 1, k]):
                return f"the weights are reshaped to {list(v.shape)}, not {[tokens, 1, k]}"
        elif node.target is aten.sum.dim_IntList:
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            if list(node.args[1]) not in ([1], [-2]) or keepdim:
                return f"the sum runs over dims {node.args[1]} (keepdim={keepdim}), not over k"
        elif node.target is aten.squeeze.dim and node.args[1] not in (1, -2):
            return f"squeezes dim {node.args[1]}, not the bmm's dim 1"
    if not (out.dim() == 2 and known(out.shape[0] == tokens) and known(out.shape[1] == hidden)):
        return f"the result has shape {list(out.shape)}, not [tokens, hidden]"
    if out.dtype != eo.dtype:
        return f"the result stays {out.dtype}; moe_combine returns expert_out's dtype {eo.dtype}"
    if eo.device != w.device:
        return f"expert_out on {eo.device}, weights on {w.device}"
    if not (known(hidden <= 1) or known(eo.stride(1) == 1)):
        return f"expert_out's last dim is not contiguous (strides {list(eo.stride())})"
    return True


@dataclasses.dataclass(frozen=True)
class _Combine:
    """What the op is called with: rows (expert_out, or what it was gathered from), src_rows, the filter
    (ids over pairs), whether dead pairs add w * 0, and the weights (before renormalisation when folded)."""

    rows: torch.fx.Node
    weights: torch.fx.Node
    src_rows: torch.fx.Node | None = None
    # the permutation whose inverse src_rows are, scattered by the replacement (src_rows itself unused or None)
    inverse_of: torch.fx.Node | None = None
    filter: expert_mask.ExpertFilter | None = None
    zero_dead_rows: bool = False
    renormalize: bool = False


def _check_unfiltered(match: Match) -> _Combine | str:
    proof = _check(match)
    if proof is not True:
        return proof
    weights, renormalize = _weights(match.kwargs["topk_weights"])
    plain = _Combine(match.kwargs["expert_out"], weights, renormalize=renormalize)
    return _gathered(plain) or plain


def _weights(w_node: torch.fx.Node) -> tuple[torch.fx.Node, bool]:
    """(w0, True) if the weights are ``w0 / w0.sum(-1, keepdim=True)`` computed only for this combine (the top-k
    renormalisation, which the op then does without a kernel of its own), else (the weights, False)."""
    if w_node.target is not aten.div.Tensor or len(w_node.users) != 1:
        return w_node, False
    num, den = w_node.args
    if not (isinstance(den, torch.fx.Node) and den.target is aten.sum.dim_IntList and den.args[0] is num):
        return w_node, False
    keepdim = den.args[2] if len(den.args) > 2 else den.kwargs.get("keepdim", False)
    nv = matching.val(num)
    if list(den.args[1]) not in ([-1], [1]) or not keepdim or nv.dim() != 2:
        return w_node, False
    if not (matching.val(den).dtype == nv.dtype == matching.val(w_node).dtype):
        return w_node, False  # a sum or quotient in another dtype rounds differently
    return num, True


def _gathered(c: _Combine) -> _Combine | None:
    """The combine reading expert_out's source rows through src_rows, when expert_out is those rows put back in
    token order by a permutation (see the module docstring), else None."""
    eo_node = c.rows
    if len(eo_node.users) != 1:
        return None
    w = matching.val(c.weights)
    pairs = w.shape[0] * w.shape[1]
    source = _token_order(eo_node, pairs)
    if source is None:
        return None
    rows, inv, perm = source
    # the inverse is scattered when it is known and no sort computes it for something else already
    inverse_of = perm if perm is not None and (inv is None or _serves_only(inv)) else None
    c = dataclasses.replace(c, src_rows=inv, inverse_of=inverse_of)
    folded = _masked_rows(rows, perm, pairs) if perm is not None else None
    if folded and _rows_layout_ok(folded[0]):
        return dataclasses.replace(c, rows=folded[0], filter=folded[1], zero_dead_rows=True)
    return dataclasses.replace(c, rows=rows) if _rows_layout_ok(rows) else None


def _token_order(
    eo_node: torch.fx.Node, pairs
) -> tuple[torch.fx.Node, torch.fx.Node | None, torch.fx.Node | None] | None:
    """(y, inv, perm) if expert_out is the rows of the 2-D ``y`` put in another order, one row per pair, with
    pair j's row ``y[inv[j]]``: gathered, ``y[inv]`` with inv a sort's indices (so a permutation, never negative),
    or scattered, ``index_put(base, [perm], y)`` (``out[perm] = y``, ``index_copy``) with perm a sort's indices of
    y's length, which overwrites every row of base, so that inv is perm's inverse. ``perm`` is the permutation
    whose inverse inv is, where that is known (``inv = argsort(perm)`` with perm a sort's indices, or the
    scatter's), else None; ``inv`` is None for the scatter (no node computes it)."""
    if eo_node.target is aten.index.Tensor:
        y, indices = eo_node.args
        found = matching.sort_indices(indices[0]) if len(indices) == 1 else None
        if found is None:
            return None
        inv, (x, descending) = indices[0], found
        perm = x if not descending and matching.sort_indices(x) is not None else None
        length = matching.val(inv).shape[0]
    elif eo_node.target is aten.index_put.default:
        base, indices, y = eo_node.args[:3]
        accumulate = eo_node.args[3] if len(eo_node.args) > 3 else eo_node.kwargs.get("accumulate", False)
        if accumulate or len(indices) != 1 or matching.sort_indices(indices[0]) is None:
            return None
        inv, perm = None, indices[0]
        bv, yv = matching.val(base), matching.val(y)
        if not (
            bv.dtype == yv.dtype
            and bv.dim() == yv.dim()
            and all(matching.known(a == b) for a, b in zip(bv.shape, yv.shape))
        ):
            return None  # a cast or a broadcast of the values into base
        length = matching.val(perm).shape[0]
        if not matching.known(length == bv.shape[0]):
            return None
    else:
        return None
    if matching.val(y).dim() != 2 or not matching.known(length == pairs):
        return None
    return y, inv, perm


def _serves_only(inv: torch.fx.Node) -> bool:
    """Whether the sort whose indices ``inv`` are serves nothing but this combine (so inverting instead of
    sorting removes the sort)."""
    return len(inv.users) == 1 and list(inv.args[0].users) == [inv]


def _rows_layout_ok(node: torch.fx.Node) -> bool:
    v = matching.val(node)
    return matching.known(v.shape[1] <= 1) or matching.known(v.stride(1) == 1)


def _masked_rows(rows: torch.fx.Node, perm: torch.fx.Node, pairs):
    """(y, filter over pairs) if rows = where(mask of s[perm] per row, 0, y), rows put in token order by perm's
    inverse, else None."""
    if rows.target is not aten.where.self or len(rows.users) != 1:
        return None
    cond, a, b = rows.args
    rv = matching.val(rows)
    if matching.is_plus_zero(matching.fill_value(a, rv)):
        y, live_when_true = b, False
    elif matching.is_plus_zero(matching.fill_value(b, rv)):
        y, live_when_true = a, True
    else:
        return None
    yv = matching.val(y)
    if not (isinstance(yv, torch.Tensor) and yv.dtype == rv.dtype and list(yv.shape) == list(rv.shape)):
        return None
    f = expert_mask.expert_filter(cond, [rv.shape[0]], live_when_true)
    if isinstance(f, str) or f.step != 1:
        return None
    # f.ids must be s[perm] with rows put in token order by perm's inverse inv: then row inv[j] is s[j]'s
    indexed = expert_mask.through_index(f.ids)
    if indexed is None or indexed[1] is not perm:
        return None
    s_node = indexed[0]
    if not (
        matching.known(matching.val(s_node).shape[0] == pairs) and matching.known(matching.val(perm).shape[0] == pairs)
    ):
        return None
    return y, expert_mask.ExpertFilter(s_node, 1, f.lo, f.hi)


def _replace(match: Match, c: _Combine):
    f = c.filter
    lo, hi = (f.lo, f.hi) if f else (reference.EXPERT_LO, reference.EXPERT_HI)

    def combine(rows, weights, ids=None, src_rows=None):
        shape = weights.shape
        ids = None if ids is None else ids.reshape(shape)
        if c.inverse_of is not None:
            src_rows = inverse_permutation(src_rows)
        src_rows = None if src_rows is None else src_rows.reshape(shape)
        return OP(rows, weights, ids, lo, hi, src_rows, c.zero_dead_rows, c.renormalize)

    args = [c.rows, c.weights, f.ids if f else None, c.inverse_of if c.inverse_of is not None else c.src_rows]
    return combine, args


def _check_filtered(live_when_true: bool):
    def check(match: Match) -> _Combine | str:
        proof = _check(match)
        if isinstance(proof, str):
            return proof
        masked = next(n for n in match.nodes if n.target is aten.where.self)
        if not matching.is_plus_zero(matching.fill_value(match.kwargs["zero"], matching.val(masked))):
            return "dead pairs get a value other than +0"
        weights, renormalize = _weights(match.kwargs["topk_weights"])
        f = expert_mask.expert_filter(match.kwargs["cond"], list(matching.val(weights).shape), live_when_true)
        if isinstance(f, str):
            return f
        return _Combine(match.kwargs["expert_out"], weights, filter=f, renormalize=renormalize)  # f.step is 1

    return check
