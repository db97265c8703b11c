"""Triton kernel of ``inductor_moe::route``: a router's scores, its top-k choice and the chosen weights, in one
launch (what stock Inductor runs as a softmax or sigmoid kernel, one or three ``topk`` launches, a mask, a
gather and the renormalisation).

A program takes ``BLOCK_T`` tokens; each token's experts sit in a ``[GROUPS, GROUP_SIZE]`` tile (padded to
powers of two; one group without grouped selection). Ranking uses integer keys: the fp32 bits mapped so that
integer order is float order, -0 made +0, every NaN the largest key; the K choices are K rounds of "largest
key, lowest index on ties", which is the reference's stable descending sort, bit for bit. Padding, chosen and
ineligible experts take the smallest key, which no float maps to.

PDL on sm90+: ``gdc_wait`` before the first load, then at once ``gdc_launch_dependents`` (the grid is small; the
next kernel's own wait still orders its reads after this grid). The same kernel runs under
``TRITON_INTERPRET=1`` on the CPU with PDL off, which is how CI tests it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch

SCORING_CODES = {"softmax": 0, "sigmoid": 1}
_NO_KEY = tl.constexpr(-(2**31))  # below every float's key: -inf maps to -2**31 + 2**23 - 1


@triton.jit
def _key(x):
    """int32 keys whose order is x's (fp32): -0 as +0, every NaN above +inf."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(x == 0, 0, key)
    return tl.where(x != x, 0x7FFFFFFF, key)


@triton.jit
def _take(key, index, OVER_GROUPS: tl.constexpr):
    """(the largest key of each token's tile, the lowest index holding it): [BLOCK_T] each."""
    if OVER_GROUPS:  # [BLOCK_T, GROUPS]
        best = tl.max(key, axis=1)
        first = tl.min(tl.where(key == best[:, None], index, 2**30), axis=1)
    else:  # [BLOCK_T, GROUPS, GROUP_SIZE]
        best = tl.max(tl.max(key, axis=2), axis=1)
        first = tl.min(tl.min(tl.where(key == best[:, None, None], index, 2**30), axis=2), axis=1)
    return best, first


@triton.jit
def route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    tokens,
    logits_row_stride,
    logits_col_stride,
    renorm_eps,
    scaling_factor,
    EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_K_POW2: tl.constexpr,
    SCORING: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    GROUPS: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUPS_POW2: tl.constexpr,
    GROUP_SIZE_POW2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    GROUP_SIZE: tl.constexpr = EXPERTS // GROUPS
    row = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    group = tl.arange(0, GROUPS_POW2)
    member = tl.arange(0, GROUP_SIZE_POW2)
    expert = group[None, :, None] * GROUP_SIZE + member[None, None, :]  # [1, G, S]
    valid_expert = (group[None, :, None] < GROUPS) & (member[None, None, :] < GROUP_SIZE)
    valid = (row[:, None, None] < tokens) & valid_expert  # [BLOCK_T, G, S]
    x = tl.load(
        logits_ptr + row[:, None, None].to(tl.int64) * logits_row_stride + expert * logits_col_stride,
        mask=valid,
        other=-float("inf"),
    ).to(tl.float32)

    if SCORING == 0:  # softmax over the experts; the choice by the logit (the same order)
        top = tl.max(tl.max(x, axis=2), axis=1)
        e = tl.exp(x - top[:, None, None])
        e = tl.where(valid, e, 0.0)
        scores = e / tl.sum(tl.sum(e, axis=2), axis=1)[:, None, None]
        choice = x
    else:  # sigmoid; the correction bias takes part in the choice only
        scores = 1.0 / (1.0 + tl.exp(-x))
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(bias_ptr + expert, mask=valid_expert, other=0.0).to(tl.float32)
    key = tl.where(valid_expert, _key(choice), _NO_KEY)

    if GROUPS > 1:  # the topk_group groups whose two best choice values sum highest
        m_index = member[None, None, :] + 0 * group[None, :, None]
        k1 = tl.max(key, axis=2)  # [BLOCK_T, G]
        i1 = tl.min(tl.where(key == k1[:, :, None], m_index, 2**30), axis=2)
        v1 = tl.sum(tl.where(m_index == i1[:, :, None], choice, 0.0), axis=2)
        rest = tl.where(m_index == i1[:, :, None], _NO_KEY, key)
        k2 = tl.max(rest, axis=2)
        i2 = tl.min(tl.where(rest == k2[:, :, None], m_index, 2**30), axis=2)
        v2 = tl.sum(tl.where(m_index == i2[:, :, None], choice, 0.0), axis=2)
        g_key = tl.where(group[None, :] < GROUPS, _key(v1 + v2), _NO_KEY)
        g_ids = group[None, :] + 0 * row[:, None]
        eligible = tl.zeros((BLOCK_T, GROUPS_POW2), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            _, g = _take(g_key, g_ids, OVER_GROUPS=True)
            eligible = eligible | (g_ids == g[:, None])
            g_key = tl.where(g_ids == g[:, None], _NO_KEY, g_key)
        key = tl.where(eligible[:, :, None], key, _NO_KEY)

    index = expert + 0 * row[:, None, None]
    out_k = tl.arange(0, TOP_K_POW2)
    chosen_ids = tl.zeros((BLOCK_T, TOP_K_POW2), dtype=tl.int32)
    chosen = tl.zeros((BLOCK_T, TOP_K_POW2), dtype=tl.float32)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        _, first = _take(key, index, OVER_GROUPS=False)
        hit = index == first[:, None, None]
        w = tl.sum(tl.sum(tl.where(hit, scores, 0.0), axis=2), axis=1)
        key = tl.where(hit, _NO_KEY, key)
        chosen_ids = tl.where(out_k[None, :] == k, first[:, None], chosen_ids)
        chosen = tl.where(out_k[None, :] == k, w[:, None], chosen)
        total += w  # in choice order, as the reference's sum
    if RENORMALIZE:
        chosen = chosen / (total + renorm_eps)[:, None]
    chosen = chosen * scaling_factor
    out = row[:, None].to(tl.int64) * TOP_K + out_k[None, :]
    live = (row[:, None] < tokens) & (out_k[None, :] < TOP_K)
    tl.store(weights_ptr + out, chosen.to(weights_ptr.dtype.element_ty), mask=live)
    tl.store(ids_ptr + out, chosen_ids.to(tl.int64), mask=live)


def launch_config(tokens: int, experts: int) -> tuple[int, int]:
    """(tokens a program, warps): a few tokens a program keeps every lane busy at small E (not yet tuned on the
    device: ``benchmarks/bench_route.py --sweep`` times the alternatives)."""
    lanes = triton.next_power_of_2(experts)
    block_t = max(1, min(triton.next_power_of_2(max(tokens, 1)), 1024 // lanes, 16))
    return block_t, max(1, min(4, block_t * lanes // 128))


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    weights: torch.Tensor,
    ids: torch.Tensor,
    scoring: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    renorm_eps: float,
    scaling_factor: float,
    block: tuple[int, int] | None = None,
) -> None:
    """Launch over ``logits`` [T, E] (any strides) into ``weights`` / ``ids`` (contiguous [T, K]); the op checks
    the arguments. ``block`` (tokens a program, warps) overrides :func:`launch_config` (the benchmark's sweep)."""
    tokens, experts = logits.shape
    if tokens == 0:
        return
    top_k = ids.shape[1]
    block_t, warps = block or launch_config(tokens, experts)
    pdl = launch.pdl(logits.device)
    with launch.on(logits.device):
        route_kernel[(triton.cdiv(tokens, block_t),)](
            logits,
            logits if bias is None else bias,
            weights,
            ids,
            tokens,
            *logits.stride(),
            renorm_eps,
            scaling_factor,
            EXPERTS=experts,
            TOP_K=top_k,
            TOP_K_POW2=triton.next_power_of_2(top_k),
            SCORING=SCORING_CODES[scoring],
            HAS_BIAS=bias is not None,
            RENORMALIZE=renormalize,
            GROUPS=n_group,
            TOPK_GROUP=topk_group,
            GROUPS_POW2=triton.next_power_of_2(n_group),
            GROUP_SIZE_POW2=triton.next_power_of_2(experts // n_group),
            BLOCK_T=block_t,
            USE_PDL=pdl,
            num_warps=warps,
            **launch.pdl_options(pdl),
        )
