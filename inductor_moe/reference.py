"""Plain-PyTorch reference of every inductor_moe op.

This module is the spec: the CPU implementations of the ops call it, the tests compare the kernels against
it, and the lowerings trace their patterns from it. Keep it plain and obviously right.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")

EXPERT_LO = 0
EXPERT_HI = 2**31 - 1  # with EXPERT_LO, makes -1 (SGLang's marker) the only dead id


def activation_ref(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}")


def live_ids_ref(ids: torch.Tensor, expert_lo: int = EXPERT_LO, expert_hi: int = EXPERT_HI) -> torch.Tensor:
    """The expert filter on ids: live iff the id lies in [expert_lo, expert_hi). When expert_lo > expert_hi the
    range wraps around: live iff id >= expert_lo or id < expert_hi, so (c + 1, c) keeps every id but c (the
    lowerings express a spelled ``id == c`` dead marker that way). Bool, ids' shape."""
    ids = ids.long()  # compare as int64: a bound outside int32 must not wrap to an int32 scalar
    if expert_lo <= expert_hi:
        return (ids >= expert_lo) & (ids < expert_hi)
    return (ids >= expert_lo) | (ids < expert_hi)


def live_rows_ref(
    expert_ids: torch.Tensor,
    rows: int,
    expert_step: int = 1,
    expert_lo: int = EXPERT_LO,
    expert_hi: int = EXPERT_HI,
    expert_ids_index: torch.Tensor | None = None,
    check_index: bool = True,
) -> torch.Tensor:
    """The expert filter on rows: row r is live iff its id is live, where its id is expert_ids[r // expert_step],
    or expert_ids[expert_ids_index[r // expert_step]] through an index (which must lie in [0, len(expert_ids)):
    a negative index is an error, not a wrap-around; ``check_index=False`` skips that check, which syncs with
    the device, for an index already checked). Bool [rows]."""
    slots = torch.arange(rows, device=expert_ids.device) // expert_step
    ids = expert_ids.reshape(-1)
    if expert_ids_index is not None:
        slots = expert_ids_index.reshape(-1)[slots].long()
        bad = (slots < 0) | (slots >= ids.numel())
        if check_index and bad.any():
            raise IndexError(
                f"inductor_moe: expert_ids_index holds {int(slots[bad][0])}, outside expert_ids' {ids.numel()} entries"
            )
    return live_ids_ref(ids[slots], expert_lo, expert_hi)


def act_and_mul_ref(
    input: torch.Tensor,
    activation: str,
    expert_ids: torch.Tensor | None = None,
    expert_step: int = 1,
    expert_lo: int = EXPERT_LO,
    expert_hi: int = EXPERT_HI,
    out: torch.Tensor | None = None,
    expert_ids_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(input[..., :d]) * input[..., d:]`` computed in fp32 and rounded once to input's dtype (what
    Inductor's fused code and the kernels compute). Without ``out``, dead rows are zero; with ``out``, live
    rows are written into it and dead rows are left as they were. Rows' ids: see :func:`live_rows_ref`."""
    d = input.shape[-1] // 2
    acc = torch.promote_types(input.dtype, torch.float32)
    y = (activation_ref(input[..., :d].to(acc), activation) * input[..., d:].to(acc)).to(input.dtype)
    if expert_ids is None:
        live = None
    else:
        rows = math.prod(y.shape[:-1])
        live = live_rows_ref(expert_ids, rows, expert_step, expert_lo, expert_hi, expert_ids_index)
        live = live.reshape(y.shape[:-1])
    if out is None:
        return y if live is None else torch.where(live.unsqueeze(-1), y, torch.zeros_like(y))
    if live is None:
        out.copy_(y)
    else:
        out[live] = y[live]
    return out


def pack_topk_ids_weights_ref(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """int32 ``(id << 16) | bf16_bits(weight)``: the id in the high half, the weight rounded to bfloat16
    (round to nearest even, torch's ``.to(bfloat16)``) in the low half.

    The high half holds ids in [-32768, 32767] (so ``-1``, the dead marker, survives: ``packed >> 16`` gives
    it back). Outside that range only the id's low 16 bits are kept (int64 ids are first truncated to int32,
    as ``.to(int32)`` does). The ``& 0xFFFF`` keeps a negative weight's sign extension out of the id bits.
    """
    return (topk_ids.to(torch.int32) << 16) | (
        topk_weights.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    )


def moe_combine_ref(
    expert_out: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor | None = None,
    expert_lo: int = EXPERT_LO,
    expert_hi: int = EXPERT_HI,
    src_rows: torch.Tensor | None = None,
    zero_dead_rows: bool = False,
    renormalize: bool = False,
) -> torch.Tensor:
    """``out[t] = sum_k live(t, k) * w[t, k] * expert_out[row(t, k)]`` in fp32 (or wider), in expert_out's dtype.

    ``row(t, k)`` is ``src_rows[t, k]`` or ``t * K + k`` (token-major). ``live(t, k)`` is the expert filter on
    ``topk_ids[t, k]`` (always true without ids). Dead pairs' rows are not read at all, so they may hold
    anything (NaN, stale data, an invalid index in ``src_rows``); a token with no live pair is zero. With
    ``zero_dead_rows`` a dead pair adds ``w[t, k] * 0`` instead of nothing: the product a zeroed row would
    give, NaN for a NaN or infinite weight (zero otherwise). With ``renormalize`` the weights are divided by
    their sum over k first, in their own dtype (the sum accumulated in fp32, pair by pair).
    """
    if renormalize:
        total = topk_weights[:, :1].float()
        for j in range(1, topk_weights.shape[1]):  # in pair order, as the kernel sums
            total = total + topk_weights[:, j : j + 1].float()
        topk_weights = topk_weights / total.to(topk_weights.dtype)
    t, k = topk_weights.shape
    rows = torch.arange(t * k, device=expert_out.device).view(t, k) if src_rows is None else src_rows.long()
    live = torch.ones(t, k, dtype=torch.bool, device=expert_out.device)
    if topk_ids is not None:
        live = live_ids_ref(topk_ids, expert_lo, expert_hi)
    acc = torch.promote_types(expert_out.dtype, torch.float32)
    gathered = expert_out[torch.where(live, rows, 0).reshape(-1)].view(t, k, expert_out.shape[1]).to(acc)
    w = topk_weights.to(acc).unsqueeze(-1)
    terms = torch.where(live.unsqueeze(-1), gathered * w, w * 0.0 if zero_dead_rows else 0.0)
    return terms.sum(dim=1).to(expert_out.dtype)


def expert_sort_ref(
    topk_ids: torch.Tensor, expert_lo: int, expert_hi: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routed pairs grouped by local expert: (order, offs, src_rows). Pair p = topk_ids.reshape(-1)[p] is in
    group id - expert_lo when expert_lo <= id < expert_hi, else in the dead group expert_hi - expert_lo.
    order: the stable argsort of the groups (int64); offs: each local group's end row, the cumulative counts
    (int32 [expert_hi - expert_lo]); src_rows: the inverse permutation of order (int64)."""
    groups = expert_hi - expert_lo
    ids = topk_ids.reshape(-1).long()
    key = torch.where((ids >= expert_lo) & (ids < expert_hi), ids - expert_lo, groups)
    order = torch.argsort(key, stable=True)
    offs = torch.bincount(key, minlength=groups + 1)[:groups].cumsum(0).to(torch.int32)
    return order, offs, torch.argsort(order)


def moe_ref(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
    activation: str = "silu",
    expert_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A MoE layer's experts, in fp32, expert by expert: softmax routing, top-k, optional renormalisation, then
    for every routed pair whose expert is one of this rank's (``expert_range``, default all of w13's experts)
    ``w * (act(x @ w13[e, :I].T) * (x @ w13[e, I:].T)) @ w2[e].T`` summed per token, in hidden's dtype."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    lo = 0 if expert_range is None else expert_range[0]
    out = torch.zeros(hidden.shape[0], w2.shape[1], dtype=torch.float32, device=hidden.device)
    inter = w13.shape[1] // 2
    for e in range(w13.shape[0]):
        tokens, slots = torch.nonzero(ids == lo + e, as_tuple=True)
        x = hidden[tokens].float()
        h = x @ w13[e].float().T
        y = (activation_ref(h[:, :inter], activation) * h[:, inter:]) @ w2[e].float().T
        out.index_add_(0, tokens, weights[tokens, slots, None] * y)
    return out.to(hidden.dtype)


def fused_experts_ref(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    expert_lo: int = 0,
    renormalize: bool = False,
    w3: torch.Tensor | None = None,
    zero_dead_rows: bool = False,
) -> torch.Tensor:
    """A MoE layer's routed experts: ``out[t] = sum_k live(t, k) * w[t, k] * expert_{id - lo}(hidden[t])``, with
    ``expert_e(x) = (act(x @ gate_e.T) * (x @ up_e.T)) @ w2[e].T``; [T, H] in hidden's dtype.

    gate_e and up_e are the halves of ``w13[e]`` ([2I, H]: gate rows, then up rows), or ``w13[e]`` and ``w3[e]``
    ([I, H] each). A pair is live iff ``lo <= id < lo + E`` (E = w13's experts): ``-1``, the ``id >= E`` sentinel
    and other ranks' experts are dead, never computed or read. Rounding, as the kernels compute: the gate and up
    projections accumulate in fp32, ``act(gate) * up`` in fp32 is rounded once to hidden's dtype (the down
    projection's input), the down projection accumulates in fp32 and is rounded to hidden's dtype (one row a
    pair), and the weighted sum over k is :func:`moe_combine_ref`'s (fp32, rounded once; with ``renormalize``
    the weights are first divided by their sum over k, dead pairs included; with ``zero_dead_rows`` a dead pair
    adds ``w * 0``)."""
    tokens, k = topk_ids.shape
    experts = w13.shape[0]
    gate_w, up_w = (w13.chunk(2, dim=1)) if w3 is None else (w13, w3)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    ids = topk_ids.reshape(-1).long() - expert_lo
    y = torch.zeros(tokens * k, w2.shape[1], dtype=hidden.dtype, device=hidden.device)
    for e in range(experts):
        (pairs,) = torch.nonzero(ids == e, as_tuple=True)
        x = hidden[pairs // k].to(acc)
        a = (activation_ref(x @ gate_w[e].to(acc).T, activation) * (x @ up_w[e].to(acc).T)).to(hidden.dtype)
        y[pairs] = (a.to(acc) @ w2[e].to(acc).T).to(hidden.dtype)
    return moe_combine_ref(y, topk_weights, topk_ids, expert_lo, expert_lo + experts, None, zero_dead_rows, renormalize)


SCORINGS = ("softmax", "sigmoid")


def route_ref(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    renorm_eps: float = 0.0,
    scaling_factor: float = 1.0,
    weights_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's top-k from its logits [T, E]: ``(topk_weights [T, K], topk_ids int64 [T, K])``.

    Scores in fp32: ``softmax`` over E, or ``sigmoid``. The choice: the experts ranked by their logit (softmax,
    which is monotone: the same order as the probabilities wherever those differ) or by ``score + bias``
    (sigmoid, the correction bias taking part in the choice only). With ``n_group`` groups of E / n_group
    consecutive experts, only the ``topk_group`` groups whose two best choice values sum highest are eligible.
    Ranking: larger first, NaN above every number, +0 and -0 equal, ties to the lower index (expert or group);
    the ids come in that order (``torch.topk``'s on values without ties). The weights are the unbiased scores of
    the chosen experts; with ``renormalize`` divided by ``their sum over k + renorm_eps`` (fp32), then multiplied
    by ``scaling_factor`` (fp32) and rounded to ``weights_dtype`` (default fp32)."""
    x = router_logits.float()
    tokens, experts = x.shape
    if scoring == "softmax":
        scores, choice = torch.softmax(x, dim=-1), x
    elif scoring == "sigmoid":
        scores = torch.sigmoid(x)
        choice = scores if correction_bias is None else scores + correction_bias.float()
    else:
        raise ValueError(f"unknown scoring {scoring!r}")
    rank = torch.where(choice == 0, 0.0, choice)  # -0 ranks as +0; a stable sort keeps ties in index order
    if n_group > 1:
        grouped = rank.view(tokens, n_group, experts // n_group)
        best_two = torch.sort(grouped, dim=-1, descending=True, stable=True).values[..., :2]
        group_scores = best_two[..., 0] + best_two[..., 1]
        group_scores = torch.where(group_scores == 0, 0.0, group_scores)
        chosen = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        eligible = torch.zeros(tokens, n_group, dtype=torch.bool, device=x.device).scatter(1, chosen, True)
        eligible = eligible.repeat_interleave(experts // n_group, dim=1)
        # ineligible experts rank below every eligible one, -inf and NaN included
        order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
        order = order.gather(1, torch.sort((~eligible).gather(1, order).byte(), dim=-1, stable=True).indices)
    else:
        order = torch.sort(rank, dim=-1, descending=True, stable=True).indices
    ids = order[:, :top_k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + renorm_eps)
    weights = weights * scaling_factor
    return weights.to(weights_dtype or torch.float32), ids
