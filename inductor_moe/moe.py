"""The MoE experts runner: one kernel sequence from router logits to the combined output.

:func:`moe` = :func:`route` (the ``route`` op: softmax, top-k, optional renormalisation) + :func:`experts` (the
``fused_experts`` op: rows grouped by expert, the two grouped GEMMs with the filtered gated activation in the
first's epilogue, the weighted combine). It is the only copy of that sequence: the eager entry point is it,
and a compiled model that calls it gets the same op (a custom op with a fake function; nothing here syncs with
the host, so it traces whole). Nothing inside the package imports this module: it sits on top of the ops.

Expert weights use nn.Linear's layout, as model libraries store them: ``w13`` [E, 2I, H] (gate rows, then up
rows) and ``w2`` [E, H, I]. With ``expert_range=(lo, hi)`` this rank holds experts lo..hi-1 (expert
parallelism): w13/w2 have hi - lo experts and every other routed pair is dead — never computed, never read.
"""

from __future__ import annotations

import torch

from . import ops


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts (fp32), the top ``top_k``: (weights fp32 [T, K], expert ids int64 [T, K]). The
    ``route`` op: one kernel."""
    return ops.route(router_logits, top_k, "softmax", renormalize)


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
    With ``renormalize`` the weights are divided by their sum over k first (inside the combine). The
    ``fused_experts`` op: the pairs grouped by expert, two grouped GEMMs reading only the routed experts'
    weights with the filtered gated activation in the first's epilogue, the weighted sum over k."""
    lo = 0 if expert_range is None else expert_range[0]
    local = (lo, lo + w13.shape[0])  # this rank's ids; every other id is a dead pair
    return ops.fused_experts(hidden, w13, w2, topk_weights, topk_ids, activation, local, renormalize)


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
