"""Triton kernel of ``inductor_moe::route``: a router's scores, its top-k choice and the chosen weights, in one
launch (what stock Inductor runs as a softmax or sigmoid kernel, one or three ``topk`` launches, a mask, a
gather and the renormalisation).

A program takes ``BLOCK_T`` tokens; each token's experts sit in a ``[GROUPS, GROUP_SIZE]`` tile (padded to
powers of two; one group without grouped selection). Ranking uses integer keys: the fp32 bits mapped so that
integer order is float order, -0 made +0, every NaN the largest key, packed with the expert's index into one
int64 whose maximum is "the largest key, the lowest index on ties"; the K choices are K rounds of one max
reduction each, which is the reference's stable descending sort, bit for bit (the groups' choice likewise).
Padding takes the smallest key, which no float maps to; chosen and ineligible experts a packed key below every
other. A chosen expert's weight is recomputed from its logit with the tile's arithmetic.

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
_TAKEN = tl.constexpr(-(2**63))  # below every packed key: a chosen expert or group


@triton.jit
def _key(x):
    """int32 keys whose order is x's (fp32): -0 as +0, every NaN above +inf."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(x == 0, 0, key)
    return tl.where(x != x, 0x7FFFFFFF, key)


@triton.jit
def _pack(key, index):
    """int64 keys ordered by ``key``, then by the lower ``index`` (< 1024, in the low bits as 1023 - index): one
    max reduction takes the largest key and, among equal keys, the lowest index (the reference's stable
    descending order)."""
    return (key.to(tl.int64) << 32) | (1023 - index).to(tl.int64)


@triton.jit
def _index(packed):
    return 1023 - (packed & 1023).to(tl.int32)


@triton.jit
def _value(packed):
    """The fp32 value of a packed key (-0 as +0, NaN as a NaN): what the key ranks."""
    key = (packed >> 32).to(tl.int32)
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


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
        e = tl.where(valid, tl.exp(x - top[:, None, None]), 0.0)
        denom = tl.sum(tl.sum(e, axis=2), axis=1)
        choice = x
    else:  # sigmoid; the correction bias takes part in the choice only
        choice = 1.0 / (1.0 + tl.exp(-x))
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + expert, mask=valid_expert, other=0.0).to(tl.float32)
    key = tl.where(valid_expert, _key(choice), _NO_KEY)

    index = expert + 0 * row[:, None, None]
    packed = _pack(key, index)
    if GROUPS > 1:  # the topk_group groups whose two best choice values sum highest
        best = tl.max(packed, axis=2)  # [BLOCK_T, G]
        second = tl.max(tl.where(packed == best[:, :, None], _TAKEN, packed), axis=2)
        g_ids = group[None, :] + 0 * row[:, None]
        g_packed = _pack(tl.where(group[None, :] < GROUPS, _key(_value(best) + _value(second)), _NO_KEY), g_ids)
        eligible = tl.zeros((BLOCK_T, GROUPS_POW2), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            g_best = tl.max(g_packed, axis=1)
            eligible = eligible | (g_packed == g_best[:, None])
            g_packed = tl.where(g_packed == g_best[:, None], _TAKEN, g_packed)
        packed = tl.where(eligible[:, :, None], packed, _TAKEN)  # never among the K (checked by the op)

    # K rounds, each one max reduction; a chosen expert's weight is recomputed from its logit (the same
    # arithmetic as the tile's, off the reductions' critical path)
    out_k = tl.arange(0, TOP_K_POW2)
    chosen_ids = tl.zeros((BLOCK_T, TOP_K_POW2), dtype=tl.int32)
    chosen = tl.zeros((BLOCK_T, TOP_K_POW2), dtype=tl.float32)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    live_row = row < tokens
    for k in tl.static_range(TOP_K):
        best = tl.max(tl.max(packed, axis=2), axis=1)
        packed = tl.where(packed == best[:, None, None], _TAKEN, packed)
        first = _index(best)
        x_first = tl.load(
            logits_ptr + row.to(tl.int64) * logits_row_stride + first * logits_col_stride, mask=live_row, other=0.0
        ).to(tl.float32)
        if SCORING == 0:
            w = tl.exp(x_first - top) / denom
        else:
            w = 1.0 / (1.0 + tl.exp(-x_first))
        chosen_ids = tl.where(out_k[None, :] == k, first[:, None], chosen_ids)
        chosen = tl.where(out_k[None, :] == k, w[:, None], chosen)
        total += w  # in choice order, as the reference's sum
    if RENORMALIZE:
        chosen = chosen / (total + renorm_eps)[:, None]
    chosen = chosen * scaling_factor
    out = row[:, None].to(tl.int64) * TOP_K + out_k[None, :]
    live = live_row[:, None] & (out_k[None, :] < TOP_K)
    tl.store(weights_ptr + out, chosen.to(weights_ptr.dtype.element_ty), mask=live)
    tl.store(ids_ptr + out, chosen_ids.to(tl.int64), mask=live)


def launch_config(tokens: int, experts: int) -> tuple[int, int]:
    """(tokens a program, warps): one warp a program, so that every reduction stays in the warp (``redux.sync``
    and shuffles, no barrier: with 8 tokens on 4 warps the Qwen3 router's kernel has 39 ``bar.sync``), and at
    small E as many tokens as fill a lane with 8 values. ``benchmarks/bench_route.py --sweep`` times the
    alternatives: on the H100 this choice is within 0.16 us of the fastest at every point it times."""
    block_t = max(1, min(triton.next_power_of_2(max(tokens, 1)), 256 // triton.next_power_of_2(experts), 16))
    return block_t, 1


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
