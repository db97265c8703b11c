"""Lowering of a router's top-k choice into ``inductor_moe::route``: everything after the router's GEMM.

A graph walk anchored at the ``topk`` that picks the experts, run after every other family (the experts family
proves its ids non-negative from that very ``topk``). Spellings (:data:`SPELLINGS`), in post-grad form:

- softmax (transformers' Qwen3-MoE and Mixtral routers, the runner's ``moe.route``)::

      probs = div(exp(z - amax(z)), sum(exp(z - amax(z))))   # z = logits.float(), or fp32 logits; on CUDA
                                                              # amax and sum are one prepare_softmax_online
      w, ids = topk(probs, K)                                 # over the experts, largest first
      w = w / w.sum(-1, keepdim=True)                         # optional (also ``/=``), then the tail

- top-k, then the softmax of the chosen (transformers' GPT-OSS, Cohere2-MoE, GraniteMoE routers)::

      w, ids = topk(logits, K); w = softmax(w.float())        # = the softmax over every expert renormalised
                                                              # over the chosen: route(softmax, renormalize)

- grouped sigmoid (transformers' DeepSeek-V3 router and the models built like it)::

      s = sigmoid(z); c = s + bias                            # the bias optional
      g = topk(c.view(-1, G, E // G), 2)[0].sum(-1)           # groups scored by their two best
      mask = zeros(T, G).scatter(1, topk(g, TG)[1], 1)        # the TG best groups
      c = where(~mask[..., None].expand(..).reshape(T, E).bool(), -inf, c)   # no groups: c itself
      ids = topk(c, K)[1]; w = gather(s, 1, ids)              # or, with neither bias nor groups, topk's values
      w = w / (w.sum(-1, keepdim=True) + eps)                 # optional, then the tail

  The tail, each step optional and in this order: ``* scale`` (a constant), ``.to(dtype)``.

What it computes: the op's choice is the same experts wherever the ranked values differ (softmax ranks by the
logit, which orders the probabilities the same way); on ties the spelling's ``topk`` picks in no documented
order and the op picks the lower index. Rounding: the op's softmax, sigmoid and sums over k differ from the
spelling's by a few fp32 ulps (another exp, another summation order; a weight below fp32's normal range may
flush to zero); everything else is exact. Not rewritten, with the reason: a softmax in 16 bits (its rounded
probabilities tie where the logits do not), intermediates something else reads (the probabilities for a
load-balancing loss, what the backward saves), logits not 2-D, more than 512 experts or k above 16.
"""

from __future__ import annotations

import operator

import torch

from ..ops.route import MAX_EXPERTS, MAX_TOP_K
from . import matching, report
from .matching import is_call, val

aten = torch.ops.aten
prims = torch.ops.prims
FAMILY = "route"
OP = torch.ops.inductor_moe.route.default
_VIEWS = (aten.reshape.default, aten.view.default)


def rewrite(graph: torch.fx.Graph) -> int:
    """Replace every proven router tail in ``graph`` by one ``route``; returns how many."""
    return matching.walk(graph, FAMILY, SPELLINGS, _replace)


def _getitem(node, index):
    return next((u for u in node.users if is_call(u, operator.getitem) and u.args[1] == index), None)


def _last_dim(node, dim) -> bool:
    return matching.is_last_dim(dim, val(node).dim())


def _dims(dims) -> list:
    return list(dims) if isinstance(dims, (list, tuple)) else [dims]


def _topk_args(topk):
    """(k, dim, largest) of a ``topk`` node."""
    args = list(topk.args) + [None] * 4
    k = args[1]
    dim = args[2] if args[2] is not None else topk.kwargs.get("dim", -1)
    largest = args[3] if args[3] is not None else topk.kwargs.get("largest", True)
    return k, dim, largest


def _fp32_input(z):
    """The tensor ``z`` (fp32) is an exact upcast of (or is itself), or None."""
    if is_call(z, prims.convert_element_type.default) and z.args[1] == torch.float32:
        inner = z.args[0]
        if isinstance(val(inner), torch.Tensor) and val(inner).dtype in (torch.float16, torch.bfloat16):
            return inner
    return z if val(z).dtype == torch.float32 else None


def _check_choice(topk, logits) -> str:
    """Why the op cannot take this choice ("" if it can)."""
    k, dim, largest = _topk_args(topk)
    if not (isinstance(k, int) and _last_dim(topk.args[0], dim) and largest):
        return "not the k largest over the experts' dim"
    shape = val(logits).shape
    if len(shape) != 2:
        return f"the logits are {len(shape)}-D, not [tokens, experts]"
    if not isinstance(shape[1], int) or shape[1] > MAX_EXPERTS:
        return f"{shape[1]} experts (the op takes a static count up to {MAX_EXPERTS})"
    if k > MAX_TOP_K:
        return f"k = {k} (the op takes up to {MAX_TOP_K})"
    return ""


def _renormalized(w):
    """(the node ending ``w / (w.sum(-1, keepdim=True) [+ eps])``, eps) when ``w``'s one reader begins it."""
    users = list(w.users)
    div = next((u for u in users if is_call(u, aten.div.Tensor) and u.args[0] is w), None)
    total = next((u for u in users if is_call(u, aten.sum.dim_IntList)), None)
    if div is None or total is None or len(users) != 2 or total.args[0] is not w:
        return None
    if not (_dims(total.args[1]) and all(_last_dim(w, d) for d in _dims(total.args[1]))):
        return None
    if not (len(total.args) > 2 and total.args[2]):
        return None
    denominator, eps = div.args[1], 0.0
    if is_call(denominator, aten.add.Tensor) and denominator.args[0] is total:
        eps = matching.scalar_constant(denominator.args[1])
        if not isinstance(eps, (int, float)) or len(denominator.users) != 1:
            return None
    elif denominator is not total:
        return None
    return (div, float(eps)) if len(total.users) == 1 else None


def _tail(w, renormalized=False):
    """Follow ``w``'s optional renormalisation (none after a softmax of the chosen, which is one), scaling and
    cast: (the last node, renormalize, eps, scale, dtype)."""
    renormalize, eps, scale, dtype = renormalized, 0.0, 1.0, None
    found = None if renormalized else _renormalized(w)
    if found is not None:
        w, eps = found
        renormalize = True
    if len(w.users) == 1:
        (user,) = w.users
        if is_call(user, aten.mul.Tensor):
            other = user.args[1] if user.args[0] is w else user.args[0]
            factor = matching.scalar_constant(other)
            if isinstance(factor, (int, float)) and not isinstance(factor, bool):
                w, scale = user, float(factor)
    if len(w.users) == 1:
        (user,) = w.users
        if is_call(user, prims.convert_element_type.default) and user.args[1] in (torch.float16, torch.bfloat16):
            w, dtype = user, user.args[1]
    return w, renormalize, eps, scale, dtype


def _softmax_of(probs):
    """z if ``probs`` (fp32) is the softmax of ``z`` over its last dim (``_softmax`` or its decomposition),
    else None."""
    if not (isinstance(val(probs), torch.Tensor) and val(probs).dtype == torch.float32):
        return None
    if is_call(probs, aten._softmax.default):
        return probs.args[0] if _last_dim(probs.args[0], probs.args[1]) else None
    if not is_call(probs, aten.div.Tensor):
        return None
    exp, total = probs.args
    if not (is_call(exp, aten.exp.default) and is_call(exp.args[0], aten.sub.Tensor)):
        return None
    z, top = exp.args[0].args
    if is_call(top, aten.amax.default) and is_call(total, aten.sum.dim_IntList) and total.args[0] is exp:
        inputs, dims = (top.args[0],), (*_dims(top.args[1]), *_dims(total.args[1]))
    else:  # Inductor's online form (on CUDA): the max and the sum of exp(z - max) from one prepare_softmax_online
        stats = _online_stats(top, 0)
        if stats is None or _online_stats(total, 1) is not stats:
            return None
        inputs, dims = (stats.args[0],), _dims(stats.args[1])
    if inputs != (z,) or not all(_last_dim(z, d) for d in dims):
        return None
    return z


def _online_stats(node, index):
    """The ``prepare_softmax_online(z, dim)`` whose output ``index`` (0: the max over dim, 1: the sum of
    exp(z - max)) ``node`` is, or None. Inductor's post-grad patterns put it in place of a softmax's amax and
    sum where its Triton backend runs (CUDA): what this pass sees there."""
    if not (is_call(node, operator.getitem) and node.args[1] == index):
        return None
    stats = node.args[0]
    online = getattr(prims, "prepare_softmax_online", None)  # registered by torch._inductor.inductor_prims
    return stats if online is not None and is_call(stats, online.default) else None


def _match_softmax(topk):
    probs = topk.args[0]
    if is_call(probs, prims.convert_element_type.default) and _softmax_of(probs.args[0]) is not None:
        return "the softmax is rounded to 16 bits before the top-k (its probabilities tie where the logits do not)"
    z = _softmax_of(probs)
    if z is None:
        return ""
    logits = _fp32_input(z)
    if logits is None:
        return "the softmax's input is not the logits or their exact fp32 upcast"
    reason = _check_choice(topk, logits)
    if reason:
        return reason
    values, ids = _getitem(topk, 0), _getitem(topk, 1)
    args = dict(logits=logits, k=_topk_args(topk)[0], scoring="softmax", bias=None, n_group=1, topk_group=1)
    return _with_tail(values, ids, args)


def _match_topk_softmax(topk):
    """The k largest logits, then the softmax of those k (GPT-OSS, Cohere2-MoE, GraniteMoE, JetMoE): the same
    weights as the softmax over every expert renormalised over the chosen ones, the same choice."""
    logits, values, ids = topk.args[0], _getitem(topk, 0), _getitem(topk, 1)
    if values is None or not isinstance(val(logits), torch.Tensor):
        return ""
    z = values  # the softmax's input: the values, or their fp32 upcast
    if len(values.users) == 1:
        (user,) = values.users
        if is_call(user, prims.convert_element_type.default) and user.args[1] == torch.float32:
            z = user
    near = {u for u in z.users} | {v for u in z.users for v in u.users}  # _softmax, or sub -> exp -> div
    near |= {w for v in near for w in v.users}
    probs = next((n for n in near if _softmax_of(n) is z), None)
    if probs is None:
        return ""
    if val(logits).dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return ""
    if len(logits.users) == 1 and _fp32_input(logits) is not None:
        logits = _fp32_input(logits)  # read as stored, before an upcast nothing else reads
    reason = _check_choice(topk, logits)
    if reason:
        return reason
    args = dict(logits=logits, k=_topk_args(topk)[0], scoring="softmax", bias=None, n_group=1, topk_group=1)
    return _with_tail(probs, ids, args, renormalized=True)


def _with_tail(w, ids, args, renormalized=False):
    """The match's outputs and the op's arguments, once nothing outside reads what the op replaces."""
    end, tail = None, {"renormalize": False, "eps": 0.0, "scale": 1.0, "dtype": None}
    if w is not None:
        end, *values = _tail(w, renormalized)
        tail = dict(zip(tail, values))
    leak = _region(args["logits"], (end, ids))
    if isinstance(leak, torch.fx.Node):
        return f"{leak.name} is also read outside the router (a load-balancing loss, the backward)"
    return end, ids, {**args, **tail}


def _match_sigmoid(topk):
    choice = topk.args[0]
    masked = None
    if is_call(choice, aten.where.self) and matching.scalar_constant(choice.args[1]) == float("-inf"):
        masked, choice = choice, choice.args[2]
    bias = None
    if is_call(choice, aten.add.Tensor) and is_call(choice.args[0], aten.sigmoid.default):
        scores, bias = choice.args
    elif is_call(choice, aten.sigmoid.default):
        scores = choice
    else:
        return ""
    logits = _fp32_input(scores.args[0])
    if logits is None:
        return "the sigmoid's input is not the logits or their exact fp32 upcast"
    reason = _check_choice(topk, logits)
    if reason:
        return reason
    experts, k = val(logits).shape[1], _topk_args(topk)[0]
    if bias is not None:
        if _fp32_input(bias) is not None:
            bias = _fp32_input(bias)  # as stored, before an exact upcast
        b = val(bias)
        if not (isinstance(b, torch.Tensor) and list(b.shape) == [experts]):
            return "the correction bias is not one value an expert"
        if b.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the correction bias is {b.dtype}"
    n_group, topk_group = 1, 1
    if masked is not None:
        found = _groups(masked, choice, experts, k)
        if isinstance(found, str):
            return found
        n_group, topk_group = found
    ids, values = _getitem(topk, 1), _getitem(topk, 0)
    if ids is None:
        return ""
    # the weights: the unbiased scores of the chosen experts
    gathers = [u for u in ids.users if is_call(u, aten.gather.default) and u.args[0] is scores and u.args[2] is ids]
    if values is not None:
        if choice is not scores or masked is not None:
            return "the weights are the biased or masked top-k values, not the scores"
        weights = values
    elif len(gathers) == 1 and _last_dim(scores, gathers[0].args[1]):
        weights = gathers[0]
    else:
        return "the weights are not the chosen experts' sigmoid scores"
    args = dict(logits=logits, k=k, scoring="sigmoid", bias=bias, n_group=n_group, topk_group=topk_group)
    return _with_tail(weights, ids, args)


def _ones_at(mask):
    """The [T, n] index whose entries ``mask`` [T, G] holds ones at and zeros elsewhere, or why not: ones
    scattered into zeros along the last dim, or, for an index of one column, the one-hot Inductor makes of that
    scatter (``where(index.expand(T, G) == iota(G).view(1, G), 1, 0)``, cast)."""
    if is_call(mask, aten.scatter.value):
        zeros, dim, index, one = mask.args
        if not (matching.fill_value(zeros, val(mask)) == 0 and one == 1 and dim in (1, -1)):
            return "the group mask is not ones scattered into zeros"
        return index
    one_hot = mask.args[0] if is_call(mask, prims.convert_element_type.default) else mask
    if not (is_call(one_hot, aten.where.self) and is_call(one_hot.args[0], aten.eq.Tensor)):
        return "the choice is masked by something other than a mask of groups"
    if not (matching.scalar_constant(one_hot.args[1]) == 1 and matching.scalar_constant(one_hot.args[2]) == 0):
        return "the group mask is not ones scattered into zeros"
    index, groups = one_hot.args[0].args
    if is_call(index, aten.expand.default):
        index = index.args[0]
    width = list(val(mask).shape)[1:]
    row = list(val(groups).shape) in ([1, *width], width)  # views of a 1-D iota keep its order along the last dim
    while is_call(groups, *_VIEWS, aten.unsqueeze.default):
        groups = groups.args[0]
    iota = is_call(groups, prims.iota.default) and groups.kwargs.get("start") == 0 and groups.kwargs.get("step") == 1
    if not (row and iota and [groups.args[0]] == width and val(index).dim() == 2 and val(index).shape[1] == 1):
        return "the group mask is not ones scattered into zeros"
    return index


def _groups(masked, choice, experts, k):
    """(n_group, topk_group) of the group mask, or why not."""
    not_mask = masked.args[0]
    as_bool = not_mask.args[0] if is_call(not_mask, aten.bitwise_not.default) else None
    if not is_call(as_bool, prims.convert_element_type.default):
        return "the choice is masked by something other than a mask of groups"
    mask = spread = as_bool.args[0]  # [T, E] in the group mask's dtype
    if val(as_bool).dtype != torch.bool or list(val(not_mask).shape)[1:] != [experts]:
        return "the choice is masked by something other than a mask of groups"
    while is_call(spread, *_VIEWS, aten.clone.default, aten.expand.default):
        spread = spread.args[0]
    if not is_call(spread, aten.unsqueeze.default):
        return "the choice is masked by something other than a mask of groups"
    if not matching.is_last_dim(spread.args[1], val(spread).dim()):
        return "the group mask is not spread over each group's experts"
    scatter = spread.args[0]
    index = _ones_at(scatter)
    if isinstance(index, str):
        return index
    if not (is_call(index, operator.getitem) and index.args[1] == 1 and is_call(index.args[0], aten.topk.default)):
        return "the groups are not picked by a top-k"
    group_topk = index.args[0]
    topk_group, gdim, glargest = _topk_args(group_topk)
    group_scores = group_topk.args[0]
    if not (isinstance(topk_group, int) and _last_dim(group_scores, gdim) and glargest):
        return "the groups are not the best by their scores"
    best = group_scores.args[0] if is_call(group_scores, aten.sum.dim_IntList) else None
    pair_topk = best.args[0] if is_call(best, operator.getitem) and best.args[1] == 0 else None
    if not (is_call(pair_topk, aten.topk.default) and all(_last_dim(best, d) for d in _dims(group_scores.args[1]))):
        return "the groups are not scored by the sum of their best two"
    two, pdim, plargest = _topk_args(pair_topk)
    view = pair_topk.args[0]
    if not (two == 2 and plargest and _last_dim(view, pdim)):
        return "the groups are not scored by the sum of their best two"
    if not (is_call(view, *_VIEWS) and view.args[0] is choice and val(view).dim() == 3):
        return "the groups are not scored from the choice"
    n_group, size = val(view).shape[1:]
    if not (isinstance(n_group, int) and isinstance(size, int) and n_group * size == experts):
        return "the group view does not split the experts"
    if list(val(scatter).shape)[1:] != [n_group]:
        return "the group mask does not cover the groups"
    # the mask spreads group g over experts g*size .. (g+1)*size - 1: [T, G] -> [T, G, 1] -> [T, G, size] -> [T, E]
    if list(val(mask).shape)[1:] != [experts] or val(spread).shape[1:] != (n_group, 1):
        return "the group mask is not spread over each group's experts"
    if size < 2 or topk_group * size < k:
        return f"{topk_group} groups of {size} experts cannot hold k = {k} (or score their best two)"
    return n_group, topk_group


def _region(logits, outputs):
    """The nodes the op replaces: those between ``logits`` and ``outputs`` (ancestors of the outputs that
    descend from the logits), or the first one something outside reads."""
    below, todo = set(), [logits]
    while todo:
        for user in todo.pop().users:
            if user not in below:
                below.add(user)
                todo.append(user)
    region, todo = set(), [o for o in outputs if o is not None]
    while todo:
        node = todo.pop()
        if node in region or node not in below:
            continue
        region.add(node)
        todo += [a for a in node.all_input_nodes]
    for node in region:
        if node not in outputs and not set(node.users) <= region:
            return node
    return region


SPELLINGS = {
    "softmax top-k (transformers Qwen3-MoE / Mixtral)": (aten.topk.default, _match_softmax),
    "top-k, then softmax of the chosen (transformers GPT-OSS / Cohere2-MoE)": (aten.topk.default, _match_topk_softmax),
    "grouped sigmoid top-k (transformers DeepSeek-V3)": (aten.topk.default, _match_sigmoid),
}


def _replace(graph, spelling, weights, ids, args) -> None:
    anchor = weights if weights is not None else ids
    logits = args["logits"]
    call = (
        logits,
        args["k"],
        args["scoring"],
        args["renormalize"],
        args["bias"],
        args["n_group"],
        args["topk_group"],
        args["eps"],
        args["scale"],
        args["dtype"],
    )
    first = min((n for n in (weights, ids) if n is not None), key=_position(graph))
    with graph.inserting_before(first):
        routed = graph.call_function(OP, call)
        new_w = graph.call_function(operator.getitem, (routed, 0))
        new_ids = graph.call_function(operator.getitem, (routed, 1))
    routed.meta["val"] = OP(*[val(a) if isinstance(a, torch.fx.Node) else a for a in call])
    new_w.meta["val"], new_ids.meta["val"] = routed.meta["val"]
    if weights is not None:
        weights.replace_all_uses_with(new_w)
    if ids is not None:
        ids.replace_all_uses_with(new_ids)
    report.rewritten(FAMILY, spelling, routed.name, matching._shape_str(anchor))


def _position(graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__
