"""The MoE experts runner: one kernel sequence from router logits to the combined output.

:func:`moe` = :func:`route` (softmax, top-k, optional renormalisation) + :func:`experts` (grouping rows by
expert with the ``expert_sort`` op, the two grouped GEMMs, the filtered gated activation, the weighted
combine). It is the only copy of that sequence: the eager entry point is it, and a compiled model that calls
it gets the same ops (they are custom ops with fake functions, and nothing here syncs with the host, so it
traces whole). Nothing inside the package imports this module: it sits on top of the ops.

Expert weights use nn.Linear's layout, as model libraries store them: ``w13`` [E, 2I, H] (gate rows, then up
rows) and ``w2`` [E, H, I]. With ``expert_range=(lo, hi)`` this rank holds experts lo..hi-1 (expert
parallelism): w13/w2 have hi - lo experts and every other routed pair is dead — never computed, never read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts (fp32), the top ``top_k``: (weights fp32 [T, K], expert ids int64 [T, K])."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K] each
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """rows offs[e-1]..offs[e]-1 of ``a`` [M, K] times ``b[e]`` [K, N], for every expert e: [M, N]. Rows past
    offs[-1] (the dead ones) are not computed. torch's grouped GEMM (CUTLASS on sm90+ bf16, its own fallback
    elsewhere)."""
    return F.grouped_mm(a, b, offs=offs) if hasattr(F, "grouped_mm") else torch._grouped_mm(a, b, offs=offs)


def experts(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
    expert_range: tuple[int, int] | None = None,
    renormalize: bool = False,
) -> torch.Tensor:
    """``sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t])`` over this rank's experts, where
    ``expert_e(x) = (act(x @ w13[e, :I].T) * (x @ w13[e, I:].T)) @ w2[e].T``. [T, H] in hidden's dtype.
    With ``renormalize`` the weights are divided by their sum over k first (inside the combine)."""
    tokens, k = topk_ids.shape
    num_local = w13.shape[0]
    lo = 0 if expert_range is None else expert_range[0]
    local = (lo, lo + num_local)  # this rank's ids; every other id is a dead pair
    # order [T*K]: sorted row -> pair (t * K + k), live pairs grouped by expert, dead ones last; offs [E]: end
    # row of each local expert's group; src_rows [T*K]: pair -> sorted row. One launch at decode sizes.
    order, offs, src_rows = ops.expert_sort(topk_ids, local)
    x = hidden[order // k]  # [T*K, H] rows grouped by expert
    h = _grouped_mm(x, w13.transpose(1, 2), offs)  # [T*K, 2I]
    # untouched mode: the dead rows (after offs[-1]) are neither read nor written; the second GEMM skips them
    # too (writing their zeros cost 20 of 26 us at T=4096, 7/8 dead, Qwen3 sizes on H100)
    a = h.new_empty(h.shape[0], h.shape[1] // 2)  # [T*K, I]
    # sorted row r's expert is topk_ids' entry order[r], read through the index
    ops.act_and_mul(activation, h, out=a, expert_ids=topk_ids.reshape(-1), expert_range=local, expert_ids_index=order)
    y = _grouped_mm(a, w2.transpose(1, 2), offs)  # [T*K, H]
    return ops.moe_combine(  # [T, H]: dead pairs (and their unwritten rows) are never read
        y,
        topk_weights,
        topk_ids=topk_ids,
        expert_range=local,
        src_rows=src_rows.view(tokens, k),
        renormalize=renormalize,
    )


def moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
    activation: str = "silu",
    expert_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A MoE layer's experts from router logits [T, E] and hidden states [T, H]: [T, H]."""
    weights, ids = route(router_logits, top_k, renormalize=False)  # renormalised by the combine: no kernel
    return experts(hidden, weights, ids, w13, w2, activation, expert_range, renormalize)
