"""The ``inductor_moe`` custom ops: schemas, fake functions, CPU implementations (the reference) and the
wiring of the CUDA implementations (C++, kernels/csrc/*.cpp), plus the public eager functions.

Layering, per family: kernel (kernels/) -> custom op with fake (here) -> public function (here, re-exported
by the package). See DESIGN.md for the contract of each op.
"""

from __future__ import annotations

import math
import threading

import torch

from . import reference
from .kernels import jit

_lib = torch.library.Library("inductor_moe", "DEF")

_FILTER_ARGS = (
    "Tensor? expert_ids=None, int expert_step=1, int expert_lo=0, int expert_hi=2147483647, "
    "Tensor? expert_ids_index=None"
)
_lib.define(f"act_and_mul(Tensor input, str activation, {_FILTER_ARGS}) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,))
_lib.define(
    f"act_and_mul_out(Tensor input, Tensor(a!) out, str activation, {_FILTER_ARGS}) -> ()",
    tags=(torch.Tag.pt2_compliant_tag,),
)

_lib.define(
    "pack_topk_ids_weights(Tensor topk_ids, Tensor topk_weights) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,)
)
_lib.define(
    "moe_combine(Tensor expert_out, Tensor topk_weights, Tensor? topk_ids=None, int expert_lo=0, "
    "int expert_hi=2147483647, Tensor? src_rows=None, bool zero_dead_rows=False, bool renormalize=False) -> Tensor",
    tags=(torch.Tag.pt2_compliant_tag,),
)

_lib.define(
    "expert_sort(Tensor topk_ids, int expert_lo, int expert_hi) -> (Tensor order, Tensor offs, Tensor src_rows)",
    tags=(torch.Tag.pt2_compliant_tag,),
)

_MAX_INDEX = 2**31 - 1
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------------------
# Argument checks, shared by the fake and CPU implementations. csrc/<family>.cpp makes the same checks with the
# same messages for CUDA (it cannot call back into Python without costing the ~45 us a C++ op saves).
# Comparisons that involve sizes use guard_or_false, so a symbolic batch is never specialised by a check.


def guard_or_false(cond) -> bool:
    # imported here: symbolic_shapes costs ~0.45 s at import, and only fake/CPU calls get here
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    return guard_or_false(cond)


def _check(cond, msg: str, op: str = "act_and_mul") -> None:
    torch._check(cond, lambda: f"inductor_moe.{op}: {msg}")


def _flat_row_stride(t: torch.Tensor, holds=guard_or_false):
    """Row stride of ``t`` viewed as [rows, t.shape[-1]], or None if its leading dims do not flatten.
    ``holds`` decides size conditions (the lowerings pass one that never guards)."""
    if t.dim() <= 1:
        return t.shape[-1]
    stride = expected = None
    for i in range(t.dim() - 2, -1, -1):
        if holds(t.shape[i] == 1):
            continue
        if stride is None:
            stride = t.stride(i)
        elif not holds(t.stride(i) == expected):
            return None
        expected = t.stride(i) * t.shape[i]
    return t.shape[-1] if stride is None else stride


def rows_layout_ok(t: torch.Tensor, holds=guard_or_false) -> bool:
    """Whether the kernels can read ``t`` as [rows, last dim]: a contiguous last dim, leading dims that flatten."""
    contiguous_last = holds(t.shape[-1] <= 1) or holds(t.stride(-1) == 1)
    return t.dim() >= 1 and contiguous_last and _flat_row_stride(t, holds) is not None


def _check_layout(name: str, t: torch.Tensor) -> None:
    _check(
        rows_layout_ok(t),
        f"{name} must have a contiguous last dim and leading dims that flatten to one row stride; "
        f"got strides {list(t.stride())}",
    )


def _check_act_and_mul(input, out, activation, expert_ids, expert_step, index=None) -> None:
    _check(
        activation in reference.ACTIVATIONS,
        f"activation must be one of 'silu', 'gelu', 'gelu_tanh', got '{activation}'",
    )
    _check(input.dim() >= 1, "input must have at least one dim")
    _check(input.dtype in _DTYPES, f"input dtype must be float16, bfloat16 or float32, got {input.dtype}")
    two_d = input.shape[-1]
    _check(two_d % 2 == 0, f"the last dim of input must be even (gate and up halves), got {two_d}")
    _check(two_d <= _MAX_INDEX, f"the last dim of input ({two_d}) must be below 2**31")
    _check_layout("input", input)
    rows = math.prod(input.shape[:-1])
    _check(rows <= _MAX_INDEX, f"at most 2**31-1 rows are supported, got {rows}")
    if out is not None:
        _check(out.dtype == input.dtype, f"out dtype {out.dtype} must match input dtype {input.dtype}")
        _check(out.device == input.device, f"out must be on {input.device}, got {out.device}")
        expected = (*input.shape[:-1], two_d // 2)
        _check(tuple(out.shape) == expected, f"out must have shape {list(expected)}, got {list(out.shape)}")
        _check_layout("out", out)
    _check(expert_step >= 1, f"expert_step must be >= 1, got {expert_step}")
    if expert_ids is None:
        _check(index is None, "expert_ids_index needs expert_ids")
        return
    for name, t in (("expert_ids", expert_ids), ("expert_ids_index", index)):
        if t is None:
            continue
        _check(t.dtype in (torch.int32, torch.int64), f"{name} must be int32 or int64, got {t.dtype}")
        _check(t.device == input.device, f"{name} must be on {input.device}, got {t.device}")
        _check(t.is_contiguous(), f"{name} must be contiguous")
    if index is not None:
        _check(expert_ids.dim() == 1, f"with expert_ids_index, expert_ids must be 1-D, got {list(expert_ids.shape)}")
        _check(expert_ids.numel() <= _MAX_INDEX, f"at most 2**31-1 expert_ids, got {expert_ids.numel()}")
    # the ids of the rows, one per row or per block: expert_ids, or the index that reaches them
    ids, name = (expert_ids, "expert_ids") if index is None else (index, "expert_ids_index")
    blocks = (rows + expert_step - 1) // expert_step
    msg = (
        f"{name} must have shape input.shape[:-1] (expert_step=1) or [{blocks}] "
        f"(= ceil(rows / expert_step)), got {list(ids.shape)}"
    )
    # One torch._check per size: on an unbacked batch each becomes a runtime assert instead of a guard.
    if expert_step == 1 and ids.dim() == input.dim() - 1:
        for have, want in zip(ids.shape, input.shape[:-1]):
            _check(have == want, msg)
    else:
        _check(ids.dim() == 1, msg)
        _check(ids.shape[0] == blocks, msg)


# ------------------------------------------------------------------------------------------------------------
# act_and_mul / act_and_mul_out: fake and CPU (reference) implementations


@torch.library.register_fake("inductor_moe::act_and_mul")
def _act_and_mul_fake(
    input, activation, expert_ids=None, expert_step=1, expert_lo=0, expert_hi=_MAX_INDEX, expert_ids_index=None
):
    _check_act_and_mul(input, None, activation, expert_ids, expert_step, expert_ids_index)
    return input.new_empty((*input.shape[:-1], input.shape[-1] // 2))  # contiguous, as the kernel allocates


@torch.library.register_fake("inductor_moe::act_and_mul_out")
def _act_and_mul_out_fake(
    input, out, activation, expert_ids=None, expert_step=1, expert_lo=0, expert_hi=_MAX_INDEX, expert_ids_index=None
):
    _check_act_and_mul(input, out, activation, expert_ids, expert_step, expert_ids_index)


@torch.library.impl(_lib, "act_and_mul", "CPU")
def _act_and_mul_cpu(
    input, activation, expert_ids=None, expert_step=1, expert_lo=0, expert_hi=_MAX_INDEX, expert_ids_index=None
):
    _check_act_and_mul(input, None, activation, expert_ids, expert_step, expert_ids_index)
    return reference.act_and_mul_ref(
        input, activation, expert_ids, expert_step, expert_lo, expert_hi, expert_ids_index=expert_ids_index
    )


@torch.library.impl(_lib, "act_and_mul_out", "CPU")
def _act_and_mul_out_cpu(
    input, out, activation, expert_ids=None, expert_step=1, expert_lo=0, expert_hi=_MAX_INDEX, expert_ids_index=None
):
    _check_act_and_mul(input, out, activation, expert_ids, expert_step, expert_ids_index)
    reference.act_and_mul_ref(
        input, activation, expert_ids, expert_step, expert_lo, expert_hi, out=out, expert_ids_index=expert_ids_index
    )


# ------------------------------------------------------------------------------------------------------------
# pack_topk_ids_weights: checks, fake, CPU (reference) and CUDA (Triton, launched here to keep PDL)

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_topk_pack(ids, weights):
    def check(cond, msg):
        _check(cond, msg, "pack_topk_ids_weights")

    check(ids.dtype in _INDEX_DTYPES, f"topk_ids must be int32 or int64, got {ids.dtype}")
    check(weights.dtype in _DTYPES, f"topk_weights dtype must be float16, bfloat16 or float32, got {weights.dtype}")
    check(ids.device == weights.device, f"topk_weights must be on {ids.device}, got {weights.device}")
    check(ids.dim() >= 1, "topk_ids must have at least one dim")
    check(
        ids.shape == weights.shape, f"topk_ids {list(ids.shape)} and topk_weights {list(weights.shape)} differ in shape"
    )
    for name, t in (("topk_ids", ids), ("topk_weights", weights)):
        check(
            _flat_row_stride(t) is not None,
            f"{name}'s leading dims must flatten to one row stride; got strides {list(t.stride())}",
        )
    check(ids.numel() <= _MAX_INDEX, f"at most 2**31-1 (id, weight) pairs are supported, got {ids.numel()}")


@torch.library.register_fake("inductor_moe::pack_topk_ids_weights")
def _pack_topk_ids_weights_fake(topk_ids, topk_weights):
    _check_topk_pack(topk_ids, topk_weights)
    return topk_ids.new_empty(topk_ids.shape, dtype=torch.int32)


@torch.library.impl(_lib, "pack_topk_ids_weights", "CPU")
def _pack_topk_ids_weights_cpu(topk_ids, topk_weights):
    _check_topk_pack(topk_ids, topk_weights)
    return reference.pack_topk_ids_weights_ref(topk_ids, topk_weights).contiguous()


def pack_strides(t: torch.Tensor) -> tuple[int, int]:
    """(row stride, column stride) of ``t`` viewed as [rows, t.shape[-1]]."""
    return _flat_row_stride(t), (t.stride(-1) if t.dim() else 1)


@torch.library.impl(_lib, "pack_topk_ids_weights", "CUDA")
def _pack_topk_ids_weights_cuda(topk_ids, topk_weights):
    from .kernels.triton.topk_pack import topk_pack

    _check_topk_pack(topk_ids, topk_weights)
    out = torch.empty(topk_ids.shape, dtype=torch.int32, device=topk_ids.device)
    topk_pack(topk_ids, topk_weights, pack_strides(topk_ids), pack_strides(topk_weights), out)
    return out


# ------------------------------------------------------------------------------------------------------------
# moe_combine: checks, fake and CPU (reference); CUDA in csrc/combine.cpp


def _check_combine(expert_out, topk_weights, topk_ids, src_rows):
    def check(cond, msg):
        _check(cond, msg, "moe_combine")

    check(expert_out.dim() == 2, f"expert_out must be 2-D [rows, hidden], got shape {list(expert_out.shape)}")
    check(
        expert_out.dtype in _DTYPES,
        f"expert_out dtype must be float16, bfloat16 or float32, got {expert_out.dtype}",
    )
    check(
        guard_or_false(expert_out.shape[1] <= 1) or guard_or_false(expert_out.stride(1) == 1),
        f"expert_out must have a contiguous last dim; got strides {list(expert_out.stride())}",
    )
    check(topk_weights.dim() == 2, f"topk_weights must be 2-D [tokens, k], got shape {list(topk_weights.shape)}")
    check(
        topk_weights.dtype in _DTYPES,
        f"topk_weights dtype must be float16, bfloat16 or float32, got {topk_weights.dtype}",
    )
    check(
        topk_weights.device == expert_out.device,
        f"topk_weights must be on {expert_out.device}, got {topk_weights.device}",
    )
    for name, t in (("topk_ids", topk_ids), ("src_rows", src_rows)):
        if t is None:
            continue
        check(t.dtype in _INDEX_DTYPES, f"{name} must be int32 or int64, got {t.dtype}")
        check(t.device == topk_weights.device, f"{name} must be on {topk_weights.device}, got {t.device}")
        msg = f"{name} must have topk_weights' shape {list(topk_weights.shape)}, got {list(t.shape)}"
        check(t.dim() == 2, msg)
        check(t.shape[0] == topk_weights.shape[0], msg)
        check(t.shape[1] == topk_weights.shape[1], msg)
    tokens, k = topk_weights.shape
    if src_rows is None:
        check(
            expert_out.shape[0] == tokens * k,
            f"without src_rows, expert_out must have tokens * k = {tokens * k} rows (token-major), "
            f"got {expert_out.shape[0]}",
        )
    check(
        expert_out.shape[1] <= _MAX_INDEX and tokens <= _MAX_INDEX and k <= _MAX_INDEX,
        f"hidden size, tokens and k must be below 2**31, got {expert_out.shape[1]}, {tokens}, {k}",
    )


@torch.library.register_fake("inductor_moe::moe_combine")
def _moe_combine_fake(
    expert_out,
    topk_weights,
    topk_ids=None,
    expert_lo=0,
    expert_hi=_MAX_INDEX,
    src_rows=None,
    zero_dead_rows=False,
    renormalize=False,
):
    _check_combine(expert_out, topk_weights, topk_ids, src_rows)
    return expert_out.new_empty((topk_weights.shape[0], expert_out.shape[1]))


@torch.library.impl(_lib, "moe_combine", "CPU")
def _moe_combine_cpu(
    expert_out,
    topk_weights,
    topk_ids=None,
    expert_lo=0,
    expert_hi=_MAX_INDEX,
    src_rows=None,
    zero_dead_rows=False,
    renormalize=False,
):
    _check_combine(expert_out, topk_weights, topk_ids, src_rows)
    return reference.moe_combine_ref(
        expert_out, topk_weights, topk_ids, expert_lo, expert_hi, src_rows, zero_dead_rows, renormalize
    )


# ------------------------------------------------------------------------------------------------------------
# expert_sort: checks, fake, CPU (reference) and CUDA (kernels/triton/expert_sort.py, or the ATen chain)


def _check_expert_sort(topk_ids, expert_lo, expert_hi):
    def check(cond, msg):
        _check(cond, msg, "expert_sort")

    check(topk_ids.dtype in _INDEX_DTYPES, f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    check(topk_ids.dim() >= 1, "topk_ids must have at least one dim")
    check(
        _flat_row_stride(topk_ids) is not None,
        f"topk_ids' leading dims must flatten to one row stride; got strides {list(topk_ids.stride())}",
    )
    check(
        0 <= expert_lo <= expert_hi <= _MAX_INDEX,
        f"expert_range must satisfy 0 <= lo <= hi < 2**31 (a range that wraps around has no group order), "
        f"got ({expert_lo}, {expert_hi})",
    )
    check(topk_ids.numel() <= _MAX_INDEX, f"at most 2**31-1 routed pairs are supported, got {topk_ids.numel()}")


@torch.library.register_fake("inductor_moe::expert_sort")
def _expert_sort_fake(topk_ids, expert_lo, expert_hi):
    _check_expert_sort(topk_ids, expert_lo, expert_hi)
    pairs = topk_ids.numel()
    return (
        topk_ids.new_empty(pairs, dtype=torch.int64),
        topk_ids.new_empty(expert_hi - expert_lo, dtype=torch.int32),
        topk_ids.new_empty(pairs, dtype=torch.int64),
    )


@torch.library.impl(_lib, "expert_sort", "CPU")
def _expert_sort_cpu(topk_ids, expert_lo, expert_hi):
    _check_expert_sort(topk_ids, expert_lo, expert_hi)
    return reference.expert_sort_ref(topk_ids, expert_lo, expert_hi)


def expert_sort_aten(topk_ids: torch.Tensor, expert_lo: int, expert_hi: int):
    """expert_sort as a chain of ATen ops, for inputs larger than one program of the kernel holds: the key
    sorted in the narrowest integer dtype that holds it, the inverse scattered instead of sorted (moe.py says
    what each saves). The same values as the reference."""
    from . import moe  # moe imports this module

    groups = expert_hi - expert_lo
    ids = topk_ids.reshape(-1)
    local = ids - expert_lo
    key = torch.where((local >= 0) & (local < groups), local, groups)  # [n], the dead group last
    order = torch.argsort(moe.narrow_keys(key, groups), stable=True)
    counts = torch.zeros(groups + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, key.long(), torch.ones_like(key, dtype=torch.int32))
    return order, counts[:groups].cumsum(0, dtype=torch.int32), moe.inverse_permutation(order)


@torch.library.impl(_lib, "expert_sort", "CUDA")
def _expert_sort_cuda(topk_ids, expert_lo, expert_hi):
    from .kernels.triton import expert_sort as kernel

    _check_expert_sort(topk_ids, expert_lo, expert_hi)
    pairs, groups = topk_ids.numel(), expert_hi - expert_lo
    if not kernel.fits(pairs, groups):
        return expert_sort_aten(topk_ids, expert_lo, expert_hi)
    order = torch.empty(pairs, dtype=torch.int64, device=topk_ids.device)
    src_rows = torch.empty_like(order)
    offs = torch.empty(groups, dtype=torch.int32, device=topk_ids.device)
    kernel.expert_sort(topk_ids, pack_strides(topk_ids), expert_lo, groups, order, offs, src_rows)
    return order, offs, src_rows


# ------------------------------------------------------------------------------------------------------------
# CUDA: the kernels are registered from C++ when the host glue loads. Until then a trampoline holds each CUDA
# slot; the first CUDA call builds (or loads from the disk cache) the glue, removes the trampolines and
# re-dispatches, so every later call goes straight to C++. Importing the package therefore never compiles.

_CUDA_OPS = ("act_and_mul", "act_and_mul_out", "moe_combine")
_trampolines = torch.library.Library("inductor_moe", "IMPL")
_trampoline_lock = threading.Lock()


def load_cuda_kernels() -> None:
    """Build/load the CUDA host glue now instead of at the first CUDA call (e.g. before CUDA-graph capture)."""
    with _trampoline_lock:
        jit.load_host_library(before_register=_trampolines._destroy)


def _make_trampoline(name: str):
    def trampoline(*args):
        load_cuda_kernels()
        return getattr(torch.ops.inductor_moe, name).default(*args)

    return trampoline


for _name in _CUDA_OPS:
    _trampolines.impl(_name, _make_trampoline(_name), "CUDA")


# ------------------------------------------------------------------------------------------------------------
# Public eager API (drop-in for SGLang-style call sites)

_act_and_mul_op = torch.ops.inductor_moe.act_and_mul.default


def _expert_bounds(expert_range: tuple[int, int] | None) -> tuple[int, int]:
    """The public ``expert_range`` as the ops' (expert_lo, expert_hi); the default makes -1 the dead marker."""
    return (reference.EXPERT_LO, reference.EXPERT_HI) if expert_range is None else expert_range


_act_and_mul_out_op = torch.ops.inductor_moe.act_and_mul_out.default


def act_and_mul(
    activation: str,
    input: torch.Tensor,
    out: torch.Tensor | None = None,
    expert_ids: torch.Tensor | None = None,
    expert_step: int = 1,
    expert_range: tuple[int, int] | None = None,
    expert_ids_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(input[..., :d]) * input[..., d:]`` for activation ``silu``, ``gelu`` (erf) or ``gelu_tanh``.

    With ``expert_ids``, row ``r`` is computed only if ``lo <= expert_ids[r // expert_step] < hi`` where
    ``(lo, hi) = expert_range`` (default ``(0, 2**31 - 1)``: the id ``-1`` marks a dead row; pass
    ``(0, num_experts)`` to also treat ``id >= num_experts`` as dead, or a local expert range for expert
    parallelism; with ``lo > hi`` the range wraps around: live iff ``id >= lo or id < hi``). Without ``out``
    a new tensor is returned and dead rows are zero; with ``out`` the result is written there, dead rows are
    left untouched, and ``out`` is returned.

    With ``expert_ids_index`` (shaped as ``expert_ids`` would be), the ids are reached through it: row ``r``'s id
    is ``expert_ids[expert_ids_index[r // expert_step]]`` (1-D ``expert_ids``; an index outside
    ``[0, len(expert_ids))`` is an error). E.g. rows sorted by expert with ids kept in token order, without a
    gathered copy of the ids.
    """
    lo, hi = _expert_bounds(expert_range)
    if out is None:
        return _act_and_mul_op(input, activation, expert_ids, expert_step, lo, hi, expert_ids_index)
    _act_and_mul_out_op(input, out, activation, expert_ids, expert_step, lo, hi, expert_ids_index)
    return out


_pack_op = torch.ops.inductor_moe.pack_topk_ids_weights.default
_combine_op = torch.ops.inductor_moe.moe_combine.default


def pack_topk_ids_weights(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """int32 ``(id << 16) | bf16_bits(weight)`` per (token, k) pair; see reference.pack_topk_ids_weights_ref for
    the id range the format holds. Any shape (ids and weights alike); int32/int64 ids, fp32/bf16/fp16 weights."""
    return _pack_op(topk_ids, topk_weights)


def moe_combine(
    expert_out: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor | None = None,
    expert_range: tuple[int, int] | None = None,
    src_rows: torch.Tensor | None = None,
    zero_dead_rows: bool = False,
    renormalize: bool = False,
) -> torch.Tensor:
    """``out[t] = sum_k live(t, k) * topk_weights[t, k] * expert_out[row(t, k)]`` accumulated in fp32, in
    expert_out's dtype: [tokens, hidden].

    ``row(t, k)`` is ``src_rows[t, k]`` when given (rows gathered from anywhere in ``expert_out``), else
    ``t * K + k`` (token-major). With ``topk_ids``, pair ``(t, k)`` is live only if
    ``lo <= topk_ids[t, k] < hi`` for ``(lo, hi) = expert_range`` (default ``(0, 2**31 - 1)``; wrapping around
    when ``lo > hi``, as in :func:`act_and_mul`); dead pairs' rows are not read, and a token with no live pair
    is zero. With ``zero_dead_rows`` a dead pair adds ``topk_weights[t, k] * 0``, as if its row were zeros: the
    same sum for finite weights, NaN for a NaN or infinite one (what zeroing rows, then weighting them computes).
    With ``renormalize`` the weights are first divided by their sum over k (dead pairs included), in their dtype:
    ``topk_weights / topk_weights.sum(-1, keepdim=True)``, the top-k renormalisation, without a kernel of its own.
    """
    lo, hi = _expert_bounds(expert_range)
    return _combine_op(expert_out, topk_weights, topk_ids, lo, hi, src_rows, zero_dead_rows, renormalize)


_expert_sort_op = torch.ops.inductor_moe.expert_sort.default


def expert_sort(
    topk_ids: torch.Tensor, expert_range: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed pairs grouped by local expert, for grouped GEMMs: ``(order, offs, src_rows)``.

    Pair ``p`` is ``topk_ids.reshape(-1)[p]``; with ``(lo, hi) = expert_range`` its group is ``id - lo`` when
    ``lo <= id < hi`` (this rank's experts) and ``hi - lo`` otherwise (dead: sorted after every live pair).
    ``order`` (int64 [n]) is the stable sort of the pairs by group (sorted row -> pair), ``offs`` (int32
    [hi - lo]) each group's end row (its cumulative count, as ``torch._grouped_mm`` takes it; dead rows start
    at ``offs[-1]``), and ``src_rows`` (int64 [n]) the inverse of ``order`` (pair -> sorted row). Exactly
    :func:`inductor_moe.reference.expert_sort_ref`: integers only, nothing rounded.
    """
    return _expert_sort_op(topk_ids, *expert_range)


def silu_and_mul(
    input, out=None, expert_ids=None, expert_step=1, expert_range=None, expert_ids_index=None
) -> torch.Tensor:
    """``silu(input[..., :d]) * input[..., d:]``; see :func:`act_and_mul`."""
    return act_and_mul("silu", input, out, expert_ids, expert_step, expert_range, expert_ids_index)


def gelu_and_mul(
    input, out=None, expert_ids=None, expert_step=1, expert_range=None, expert_ids_index=None
) -> torch.Tensor:
    """``gelu(input[..., :d]) * input[..., d:]`` with the erf GELU; see :func:`act_and_mul`."""
    return act_and_mul("gelu", input, out, expert_ids, expert_step, expert_range, expert_ids_index)


def gelu_tanh_and_mul(
    input, out=None, expert_ids=None, expert_step=1, expert_range=None, expert_ids_index=None
) -> torch.Tensor:
    """``gelu(input[..., :d], approximate="tanh") * input[..., d:]``; see :func:`act_and_mul`."""
    return act_and_mul("gelu_tanh", input, out, expert_ids, expert_step, expert_range, expert_ids_index)
