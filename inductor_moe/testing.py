"""MoE blocks written the way model libraries write them in plain PyTorch, without our ops: what the demo,
the tests and the benchmarks compile to see the rewrites at work.

- :class:`LoopMoE` (Mixtral/Qwen-MoE style in HF transformers): route, then a Python loop over the experts, each
  with a fused gate/up projection split by ``chunk``, and an ``index_add_`` combine.
- :class:`GroupedMoE` (vLLM/torchtitan style): rows sorted by expert, two grouped GEMMs, expert parallelism
  (this rank owns experts [lo, hi); other experts' rows carry a sentinel and are masked before the
  activation), and a view * weights, sum over k combine.
- :func:`grouped_experts`: GroupedMoE's experts alone, from the routed ids and weights.
- :class:`TorchtitanMoE`: the grouping torchtitan writes: a stable argsort of the routed ids themselves, their
  counts by ``scatter_add_``, the rows scattered back (``out[order] = y``).
- :func:`moe_tail`: the pointwise tail of such a block alone.
- :func:`softmax_router` and :func:`grouped_sigmoid_router`: transformers' Qwen3-MoE / Mixtral and
  DeepSeek-V3 routers after their GEMM, as those models spell them.

Both blocks take nn.Linear-layout expert weights w13 [E, 2I, H] and w2 [E, H, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _route(logits: torch.Tensor, top_k: int):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


class LoopMoE(nn.Module):
    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, top_k: int):
        super().__init__()
        self.w13, self.w2, self.top_k = nn.Parameter(w13), nn.Parameter(w2), top_k

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        weights, ids = _route(logits, self.top_k)
        out = torch.zeros_like(x)
        for e in range(self.w13.shape[0]):
            tokens, slots = torch.where(ids == e)
            gate, up = (x[tokens] @ self.w13[e].T).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.w2[e].T
            out.index_add_(0, tokens, y * weights[tokens, slots, None].to(x.dtype))
        return out


class GroupedMoE(nn.Module):
    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, top_k: int, expert_range: tuple[int, int]):
        super().__init__()
        self.w13, self.w2, self.top_k = nn.Parameter(w13), nn.Parameter(w2), top_k
        self.lo = expert_range[0]

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        weights, ids = _route(logits, self.top_k)
        return grouped_experts(x, weights, ids, self.w13, self.w2, self.lo)


def grouped_experts(x, weights, ids, w13, w2, lo: int = 0):
    """GroupedMoE's experts alone, from routed (weights, ids) [T, K] to [T, H]: the local experts are
    lo..lo + E - 1 of w13 [E, 2I, H] and w2 [E, H, I]."""
    tokens, k = ids.shape
    num_local = w13.shape[0]
    local = ids - lo
    sentinel = torch.where((local >= 0) & (local < num_local), local, num_local).view(-1)
    order = torch.argsort(sentinel, stable=True)
    counts = torch.zeros(num_local + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, sentinel, torch.ones_like(sentinel, dtype=torch.int32))
    offs = counts[:num_local].cumsum(0, dtype=torch.int32)
    h = F.grouped_mm(x[order // k], w13.transpose(1, 2), offs=offs)
    remote = sentinel[order] == num_local  # rows past offs[-1]: not computed by the grouped GEMM
    h = h.masked_fill(remote[:, None], 0)
    gate, up = h.chunk(2, dim=-1)
    y = F.grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    y = torch.where(remote[:, None], 0, y)[torch.argsort(order)]  # back to token-major pairs
    return (y.view(tokens, k, -1) * weights[..., None]).sum(dim=1).to(x.dtype)


class TorchtitanMoE(nn.Module):
    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, top_k: int):
        super().__init__()
        self.w13, self.w2, self.top_k = nn.Parameter(w13), nn.Parameter(w2), top_k

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        k = self.top_k
        weights, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k, dim=-1)
        order = torch.argsort(ids.view(-1), stable=True)
        counts = torch.zeros(self.w13.shape[0], dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, ids.view(-1), torch.ones_like(ids.view(-1), dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)
        h = F.grouped_mm(x[order // k], self.w13.transpose(1, 2), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = F.grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offs)
        back = torch.empty_like(y)
        back[order] = y
        return (back.view(x.shape[0], k, -1) * weights[..., None]).sum(1).to(x.dtype)


def moe_tail(h, row_ids, topk_ids, w, expert_out):
    """The pointwise tail of a MoE block as models write it: the gated activation of the up projection's
    output h [T*K, 2I] with an expert-parallel mask (row id -1), the packing of top-k ids and weights [T, K],
    and the weighted combine of expert_out [T*K, H]."""
    gate, up = h.chunk(2, dim=-1)
    act = torch.where((row_ids == -1)[:, None], 0, F.silu(gate) * up)
    packed = (topk_ids.to(torch.int32) << 16) | (w.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF)
    out = (expert_out.view(w.shape[0], w.shape[1], -1) * w[..., None]).sum(1).to(expert_out.dtype)
    return act, packed, out


def softmax_router(logits: torch.Tensor, top_k: int, renormalize: bool = True, cast: bool = True):
    """Qwen3-MoE's router after its GEMM (Mixtral's: renormalised, no cast): fp32 softmax, top-k, the in-place
    renormalisation, the weights cast back to the logits' dtype."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    return (weights.to(logits.dtype) if cast else weights), ids


def grouped_sigmoid_router(
    logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int, scaling: float
):
    """DeepSeek-V3's router after its GEMM: sigmoid scores, the correction bias for the choice, the best
    ``topk_group`` of ``n_group`` groups by the sum of their two best, top-k among those, weights gathered from
    the unbiased scores, renormalised (+1e-20) and scaled."""
    experts = logits.shape[-1]
    scores = logits.float().sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, n_group, experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, experts // n_group).reshape(-1, experts)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * scaling, ids
