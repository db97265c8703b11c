"""``fused_experts``: a MoE layer's routed experts as one op, from hidden states, routed ids and weights and the
experts' weights to the combined output. Schema, checks, fake, CPU (the reference), CUDA (the routed pairs
grouped by ``expert_sort``, the two grouped GEMMs of kernels/triton/fused_experts.py with the filtered gated
activation in the first's epilogue, the weighted sum over k by ``moe_combine``) and the public function."""

from __future__ import annotations

import torch

from .. import reference
from ..indexing import MAX_INDEX, row_strides
from .library import DTYPE_NAMES, DTYPES, INDEX_DTYPES, check, check_activation, define, lib, with_defaults

define(
    "fused_experts(Tensor hidden, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
    "str activation='silu', int expert_lo=0, bool renormalize=False, Tensor? w3=None, bool zero_dead_rows=False) "
    "-> Tensor"
)

MAX_EXPERTS = 512
MAX_TOP_K = 16


def check_args(hidden, w13, w2, topk_weights, topk_ids, activation, expert_lo, w3):
    def _check(cond, msg):
        check(cond, msg, "fused_experts")

    check_activation(activation, "fused_experts")
    _check(hidden.dim() == 2, f"hidden must be 2-D [tokens, hidden_size], got shape {list(hidden.shape)}")
    _check(hidden.dtype in DTYPES, f"hidden dtype must be {DTYPE_NAMES}, got {hidden.dtype}")
    tokens, hidden_size = hidden.shape
    _check(w13.dim() == 3, f"w13 must be 3-D [experts, 2 * inter (or inter with w3), hidden], got {list(w13.shape)}")
    _check(w2.dim() == 3, f"w2 must be 3-D [experts, hidden, inter], got shape {list(w2.shape)}")
    experts = w13.shape[0]
    _check(1 <= experts <= MAX_EXPERTS, f"w13 must hold 1 to {MAX_EXPERTS} experts, got {experts}")
    _check(w2.shape[0] == experts, f"w13 has {experts} experts but w2 has {w2.shape[0]}")
    if w3 is None:
        _check(w13.shape[1] % 2 == 0, f"w13's dim 1 must be even (gate rows, then up rows), got {w13.shape[1]}")
        inter = w13.shape[1] // 2
    else:
        inter = w13.shape[1]
        _check(
            w3.dim() == 3 and w3.shape == w13.shape, f"w3 must have w13's shape {list(w13.shape)}, got {list(w3.shape)}"
        )
    for name, t in (("w13", w13), ("w2", w2), ("w3", w3)):
        if t is None:
            continue
        _check(t.dtype == hidden.dtype, f"{name} dtype {t.dtype} must match hidden's {hidden.dtype}")
        _check(t.device == hidden.device, f"{name} must be on {hidden.device}, got {t.device}")
    _check(
        w13.shape[2] == hidden_size,
        f"w13's hidden size {w13.shape[2]} does not match hidden's {hidden_size}",
    )
    _check(
        w2.shape[1] == hidden_size and w2.shape[2] == inter,
        f"w2 must have shape [{experts}, {hidden_size}, {inter}] (experts, hidden, inter), got {list(w2.shape)}",
    )
    _check(topk_ids.dim() == 2, f"topk_ids must be 2-D [tokens, k], got shape {list(topk_ids.shape)}")
    _check(topk_ids.dtype in INDEX_DTYPES, f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    _check(topk_weights.dtype in DTYPES, f"topk_weights dtype must be {DTYPE_NAMES}, got {topk_weights.dtype}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        _check(t.device == hidden.device, f"{name} must be on {hidden.device}, got {t.device}")
    _check(
        topk_weights.shape == topk_ids.shape,
        f"topk_weights {list(topk_weights.shape)} and topk_ids {list(topk_ids.shape)} differ in shape",
    )
    _check(topk_ids.shape[0] == tokens, f"topk_ids has {topk_ids.shape[0]} tokens but hidden has {tokens}")
    _check(topk_ids.shape[1] <= MAX_TOP_K, f"at most {MAX_TOP_K} experts a token (k), got {topk_ids.shape[1]}")
    _check(
        0 <= expert_lo <= MAX_INDEX - experts,
        f"expert_lo must be in [0, 2**31 - 1 - experts], got {expert_lo}",
    )
    pairs = tokens * topk_ids.shape[1]
    _check(pairs <= MAX_INDEX, f"at most 2**31-1 routed pairs are supported, got {pairs}")


def _bound(args):
    """The call's arguments with the schema's defaults, checked."""
    args = with_defaults("fused_experts", args)
    hidden, w13, w2, topk_weights, topk_ids, activation, expert_lo, _, w3, _ = args
    check_args(hidden, w13, w2, topk_weights, topk_ids, activation, expert_lo, w3)
    return args


@torch.library.register_fake("inductor_moe::fused_experts")
def _fake(*args):
    hidden = _bound(args)[0]
    return hidden.new_empty(hidden.shape)


@torch.library.impl(lib, "fused_experts", "CPU")
def _cpu(*args):
    return reference.fused_experts_ref(*_bound(args)).contiguous()


@torch.library.impl(lib, "fused_experts", "CUDA")
def _cuda(*args):
    return run_kernels(*_bound(args))


def run_kernels(
    hidden, w13, w2, topk_weights, topk_ids, activation, expert_lo, renormalize, w3, zero_dead_rows=False, tiles=None
):
    """The CUDA sequence (also the interpreter's, on CPU tensors under TRITON_INTERPRET=1): group, up, down,
    combine (the "pairs" path: up, down, combine; "pairs_combine": up, down with the combine; "decode": both
    GEMMs in one kernel, the down one split over the intermediate dimension, then the combine). ``tiles``
    overrides the config table (the benchmark's tuning)."""
    from ..kernels.triton import fused_experts as kernel

    tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    experts = w13.shape[0]
    gate, up = (w13.chunk(2, dim=1)) if w3 is None else (w13, w3)
    inter = gate.shape[1]
    if tokens * top_k == 0:
        return hidden.new_zeros(hidden.shape)
    local = (expert_lo, expert_lo + experts)
    tiles = tiles or kernel.config_for(tokens, experts, inter, hidden_size, top_k, hidden.dtype, hidden.device)
    if tiles.path == "decode" and not kernel.decode_fits(tokens * top_k, inter, hidden_size, tiles):
        tiles = kernel.heuristic_config(tokens, experts, top_k, hidden.dtype)
    combine = None
    if tiles.by_pair:  # rows in pair order, no grouping; the combine reads them token-major
        order = offs = src_rows = None
        pairs = (topk_ids.reshape(-1).contiguous(), expert_lo)  # a view may keep a stride (ids[:, ::2])
        if tiles.path == "decode":
            out = hidden.new_empty(hidden.shape)
            kernel.decode(
                hidden, gate, up, w2, pairs[0], expert_lo, topk_weights, out, activation, tiles, renormalize,
                zero_dead_rows,
            )  # fmt: skip
            return out
        if tiles.path == "pairs_combine":
            counts = kernel.combine_counts(tokens, hidden_size, tiles.down, hidden.device)
            out = hidden.new_empty(hidden.shape)
            combine = kernel.Combine(topk_weights, counts, out, renormalize, zero_dead_rows)
    else:
        order, offs, src_rows = group(topk_ids, expert_lo, experts)
        src_rows, pairs = src_rows.view(tokens, top_k), None
    if tiles.path == "grouped_mm" and grouped_mm_fits(hidden, w13, w2, w3):
        y = _grouped_mm_experts(hidden, w13, w2, topk_ids, order, offs, activation, local)
    else:
        a = hidden.new_empty(tokens * top_k, inter)  # dead pairs' rows are never written (nor read)
        kernel.up(hidden, gate, up, order, offs, a, activation, top_k, tiles.up, pairs, combine and combine.counts)
        y = hidden.new_empty(tokens * top_k, hidden_size)
        kernel.down(a, w2, offs, y, tiles.down, pairs, combine)
    if combine is not None:
        return combine.out
    return torch.ops.inductor_moe.moe_combine.default(
        y, topk_weights, topk_ids, *local, src_rows, zero_dead_rows, renormalize
    )


def group(topk_ids, expert_lo: int, experts: int):
    """(order, offs, src_rows) of the routed pairs grouped by local expert: ``expert_sort`` (stable) for a few
    pairs and for more than the counting kernels hold, the counting kernels between (an expert's order within a
    block of pairs is their atomics'; nothing this op computes depends on it)."""
    from ..kernels.triton import fused_experts as kernel

    pairs = topk_ids.numel()
    if pairs <= kernel.STABLE_SORT_MAX_PAIRS or not kernel.group_fits(pairs, experts):
        return torch.ops.inductor_moe.expert_sort.default(topk_ids, expert_lo, expert_lo + experts)
    order = torch.empty(pairs, dtype=torch.int32, device=topk_ids.device)
    src_rows = torch.empty_like(order)
    offs = torch.empty(experts, dtype=torch.int32, device=topk_ids.device)
    kernel.group(topk_ids, row_strides(topk_ids), expert_lo, experts, order, offs, src_rows)
    return order, offs, src_rows


def grouped_mm_fits(hidden, w13, w2, w3) -> bool:
    """Whether torch's grouped GEMM takes these operands as they are: bf16 (CUTLASS on sm90), gate and up in one
    tensor, both weights with a contiguous last dim (as stored by nn.Linear-layout model code)."""
    return hidden.dtype == torch.bfloat16 and w3 is None and w13.stride(2) == 1 and w2.stride(2) == 1


def _grouped_mm_experts(hidden, w13, w2, topk_ids, order, offs, activation, local):
    """The routed pairs' rows [T*K, H], sorted by expert, through torch's grouped GEMMs: the up projection (gate
    and up rounded to the input dtype, as the GEMM returns them), our filtered activation reading the rows' ids
    through the sort, the down projection. Dead rows (after offs[-1]) are neither computed nor read."""
    top_k = topk_ids.shape[1]
    h = torch._grouped_mm(hidden[order // top_k], w13.transpose(1, 2), offs=offs)
    a = h.new_empty(h.shape[0], h.shape[1] // 2)
    lo, hi = local
    torch.ops.inductor_moe.act_and_mul_out.default(h, a, activation, topk_ids.reshape(-1), 1, lo, hi, order)
    return torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)


def _autograd(keyset, hidden, w13, w2, topk_weights, topk_ids, *args):
    check(
        not (torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, w13, w2, topk_weights))),
        "it has no gradient; call it under torch.no_grad() (inference), or compose the differentiable ops",
        "fused_experts",
    )
    return torch.ops.inductor_moe.fused_experts.default.redispatch(
        keyset & torch._C._after_autograd_keyset, hidden, w13, w2, topk_weights, topk_ids, *args
    )


lib.impl("fused_experts", _autograd, "Autograd", with_keyset=True)

_fused_experts_op = torch.ops.inductor_moe.fused_experts.default


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    expert_range: tuple[int, int] | None = None,
    renormalize: bool = False,
    w3: torch.Tensor | None = None,
    zero_dead_rows: bool = False,
) -> torch.Tensor:
    """A MoE layer's routed experts: ``out[t] = sum_k live(t, k) * w[t, k] * expert_{id - lo}(hidden[t])``,
    ``expert_e(x) = (act(x @ gate_e.T) * (x @ up_e.T)) @ w2[e].T``; [T, H] in hidden's dtype.

    Weights as model code stores them: ``w13`` [E, 2I, H] holds gate rows then up rows (HF transformers'
    ``gate_up_proj``), or, with ``w3``, ``w13`` the gate projections [E, I, H] and ``w3`` the up projections; a
    tensor stored [E, H, 2I] is passed transposed (``.transpose(1, 2)``, no copy: any strides are read);
    ``w2`` [E, H, I] likewise. ``expert_range=(lo, hi)`` with ``hi - lo = E`` says which experts this rank
    holds (default ``(0, E)``): pairs whose id lies outside it (``-1``, the ``id >= E`` sentinel, other ranks'
    experts) are dead, never computed or read; with ``zero_dead_rows`` a dead pair adds ``w * 0`` (NaN for a
    non-finite weight), as code that zeroes dead rows and then weights them computes. ``renormalize`` divides
    the weights by their sum over k first.
    Rounding: :func:`inductor_moe.reference.fused_experts_ref`. No gradient (inference).
    """
    experts = w13.shape[0]
    lo, hi = (0, experts) if expert_range is None else expert_range
    if hi - lo != experts:
        raise ValueError(f"inductor_moe.fused_experts: expert_range {expert_range} must span w13's {experts} experts")
    return _fused_experts_op(hidden, w13, w2, topk_weights, topk_ids, activation, lo, renormalize, w3, zero_dead_rows)
