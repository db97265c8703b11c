"""``route``: a router's top-k from its logits, ``(topk_weights, topk_ids)``: softmax, or sigmoid with a
correction bias and group-limited choice; renormalisation, scaling, the weights' cast. Schema, checks, fake,
CPU (the reference), CUDA (kernels/triton/route.py, one launch) and the public function. No gradient: the
lowering rewrites only routers whose intermediates nothing else reads, as in inference graphs."""

from __future__ import annotations

import torch

from .. import reference
from .library import DTYPE_NAMES, DTYPES, check, define, lib, with_defaults

define(
    "route(Tensor router_logits, int top_k, str scoring='softmax', bool renormalize=False, "
    "Tensor? correction_bias=None, int n_group=1, int topk_group=1, float renorm_eps=0.0, "
    "float scaling_factor=1.0, ScalarType? weights_dtype=None) -> (Tensor topk_weights, Tensor topk_ids)"
)

MAX_EXPERTS = 512
MAX_TOP_K = 16


def check_args(logits, top_k, scoring, correction_bias, n_group, topk_group, weights_dtype):
    def _check(cond, msg):
        check(cond, msg, "route")

    _check(logits.dim() == 2, f"router_logits must be 2-D [tokens, experts], got shape {list(logits.shape)}")
    _check(logits.dtype in DTYPES, f"router_logits dtype must be {DTYPE_NAMES}, got {logits.dtype}")
    experts = logits.shape[1]
    _check(1 <= experts <= MAX_EXPERTS, f"router_logits must score 1 to {MAX_EXPERTS} experts, got {experts}")
    _check(
        1 <= top_k <= min(MAX_TOP_K, experts), f"top_k must be in [1, min({MAX_TOP_K}, experts={experts})], got {top_k}"
    )
    _check(scoring in reference.SCORINGS, f"scoring must be 'softmax' or 'sigmoid', got '{scoring}'")
    _check(
        weights_dtype is None or weights_dtype in DTYPES,
        f"weights_dtype must be {DTYPE_NAMES} (or None: float32), got {weights_dtype}",
    )
    if scoring == "softmax":
        _check(correction_bias is None, "correction_bias is for sigmoid scoring; softmax takes none")
        _check(n_group == 1, f"group-limited choice (n_group) is for sigmoid scoring; softmax takes 1, got {n_group}")
    if correction_bias is not None:
        _check(
            correction_bias.dim() == 1 and correction_bias.shape[0] == experts,
            f"correction_bias must be 1-D [experts={experts}], got shape {list(correction_bias.shape)}",
        )
        _check(
            correction_bias.dtype in DTYPES, f"correction_bias dtype must be {DTYPE_NAMES}, got {correction_bias.dtype}"
        )
        _check(
            correction_bias.device == logits.device,
            f"correction_bias must be on {logits.device}, got {correction_bias.device}",
        )
    _check(n_group >= 1 and experts % n_group == 0, f"n_group must divide experts={experts}, got {n_group}")
    _check(1 <= topk_group <= n_group, f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if n_group > 1:
        size = experts // n_group
        _check(size >= 2, f"a group scores its two best experts: n_group={n_group} leaves {size} an expert group")
        _check(
            topk_group * size >= top_k,
            f"topk_group={topk_group} groups of {size} experts hold fewer than top_k={top_k} experts",
        )


def _bound(args):
    """(logits, top_k, scoring, renormalize, bias, n_group, topk_group, eps, scaling, weights_dtype), checked."""
    args = with_defaults("route", args)
    logits, top_k, scoring, _, bias, n_group, topk_group, _, _, weights_dtype = args
    check_args(logits, top_k, scoring, bias, n_group, topk_group, weights_dtype)
    return args


@torch.library.register_fake("inductor_moe::route")
def _fake(*args):
    logits, top_k, *_, weights_dtype = _bound(args)
    tokens = logits.shape[0]
    return (
        logits.new_empty(tokens, top_k, dtype=weights_dtype or torch.float32),
        logits.new_empty(tokens, top_k, dtype=torch.int64),
    )


@torch.library.impl(lib, "route", "CPU")
def _cpu(*args):
    weights, ids = reference.route_ref(*_bound(args))
    return weights.contiguous(), ids.contiguous()


@torch.library.impl(lib, "route", "CUDA")
def _cuda(*args):
    from ..kernels.triton import route as kernel

    logits, top_k, scoring, renormalize, bias, n_group, topk_group, eps, scaling, weights_dtype = _bound(args)
    tokens, device = logits.shape[0], logits.device
    weights = torch.empty(tokens, top_k, dtype=weights_dtype or torch.float32, device=device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=device)
    kernel.route(logits, bias, weights, ids, scoring, renormalize, n_group, topk_group, eps, scaling)
    return weights, ids


def _autograd(keyset, *args):
    logits, _, _, _, bias, *_ = with_defaults("route", args)
    check(
        not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (logits, bias))),
        "it has no gradient; call it under torch.no_grad() (inference), or route with the plain PyTorch ops",
        "route",
    )
    return torch.ops.inductor_moe.route.default.redispatch(keyset & torch._C._after_autograd_keyset, *args)


lib.impl("route", _autograd, "Autograd", with_keyset=True)

_route_op = torch.ops.inductor_moe.route.default


def route(
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
    """A router's top-k choice from its logits [T, E] after the router's GEMM: ``(topk_weights [T, K], topk_ids
    int64 [T, K])``; softmax (Qwen3-MoE, Mixtral) or sigmoid with a correction bias and group-limited choice
    (DeepSeek-V3), then renormalisation, scaling and the weights' dtype. One kernel on CUDA; E <= 512, K <= 16.
    :func:`inductor_moe.reference.route_ref` is the spec (ranking, ties, NaN, rounding)."""
    return _route_op(
        router_logits,
        top_k,
        scoring,
        renormalize,
        correction_bias,
        n_group,
        topk_group,
        renorm_eps,
        scaling_factor,
        weights_dtype,
    )
