"""The op contracts, one table (as PyTorch's OpInfo): for every custom op, the samples and cases that
tests/test_contracts.py turns into one parametrised test each:

- ``samples``: valid calls of the op; each passes ``torch.library.opcheck`` and, on the GPU, replays in a CUDA
  graph (with PDL on and off) to the values of an eager call on the same inputs;
- ``bad_inputs``: calls that must fail with a ``RuntimeError`` whose message names the op's argument;
- ``limits``: meta-tensor calls past (must fail, with the message) or at (must succeed) the ops' 32-bit limits;
- ``compiles``: a function around the op compiled with one graph across batch sizes from 1 up;
- ``traps``: device-side argument errors the kernel reports and traps on (a child process: a trap poisons its
  CUDA context).

Every builder takes the device and makes its tensors when called; the test collection calls them on the CPU
only for the case names. Adding an op: one ``OpContract`` in ``CONTRACTS``.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Callable

import torch

import inductor_moe as im

from helpers import TOL, assert_bit_exact, combine_case, randn, routed_ids


@dataclasses.dataclass(frozen=True)
class Case:
    """A call and what it must raise (``match``, a regex of the RuntimeError's message) or, with None, return
    (``expect(result)`` must hold)."""

    call: Callable[[], object]
    match: str | None = None
    expect: Callable[[object], bool] | None = None
    error: type = RuntimeError


@dataclasses.dataclass(frozen=True)
class Compile:
    """``fn`` compiled once (fullgraph) across ``batches``, the inputs' dim 0 dynamic; ``check(out, eager)``."""

    fn: Callable
    make_args: Callable[[int], tuple]
    batches: tuple[int, ...]
    check: Callable
    unbacked: bool = False


@dataclasses.dataclass(frozen=True)
class Trap:
    """A child process's script that must fail with ``message`` in its output (and never print ``absent``)."""

    script: str
    message: str
    absent: str | None = None


@dataclasses.dataclass(frozen=True)
class OpContract:
    name: str
    samples: Callable[[str], dict[str, tuple[torch._ops.OpOverload, tuple]]]
    bad_inputs: Callable[[str], dict[str, Case]]
    limits: Callable[[], dict[str, Case]]
    compiles: Callable[[str], dict[str, Compile]]
    traps: dict[str, Trap] = dataclasses.field(default_factory=dict)


def _other(device: str) -> str:
    """A device the op's inputs are not on."""
    return "cpu" if device == "cuda" else "meta"


def _exact(out, ref):
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _all_equal(got, want):
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ------------------------------------------------------------------------------------------------------------
# act_and_mul, act_and_mul_out


def _act_samples(device):
    x = randn(3, 5, 2 * 24, dtype=torch.bfloat16, device=device)
    ids = torch.randint(-1, 8, (3, 5), device=device)
    out = torch.zeros(3, 5, 24, dtype=torch.bfloat16, device=device)
    blocks = torch.tensor([1, -1], device=device)
    x2 = randn(100, 2 * 8, device=device)
    index = torch.randint(0, 15, (3, 5), device=device)
    flat = ids.view(-1)
    fn, fn_out = torch.ops.inductor_moe.act_and_mul.default, torch.ops.inductor_moe.act_and_mul_out.default
    return {
        "plain": (fn, (x, "silu", None, 1, 0, 8)),
        "out plain": (fn_out, (x, out, "gelu", None, 1, 0, 8)),
        "filtered": (fn, (x, "silu", ids, 1, 0, 8)),
        "out filtered": (fn_out, (x, out, "gelu", ids, 1, 0, 8)),
        "per block": (fn, (x2, "gelu_tanh", blocks, 64, 0, 8)),
        "through an index": (fn, (x, "silu", flat, 1, 0, 8, index)),
        "out through an int32 index": (fn_out, (x, out, "gelu", flat, 1, 0, 8, index.int())),
    }


def _act_bad_inputs(device):
    other = _other(device)
    x = randn(4, 16, dtype=torch.bfloat16, device=device)
    ids = torch.zeros(4, dtype=torch.int32, device=device)
    silu = im.silu_and_mul
    return {
        "dtype": Case(lambda: silu(x.to(torch.float64)), "input dtype must be float16, bfloat16 or float32"),
        "int dtype": Case(lambda: silu(x.to(torch.int32)), "input dtype must be float16, bfloat16 or float32"),
        "odd last dim": Case(lambda: silu(x[:, :15]), "the last dim of input must be even"),
        "activation": Case(lambda: im.act_and_mul("relu", x), "activation must be one of"),
        "0-dim": Case(lambda: silu(x[0, 0]), "input must have at least one dim"),
        "last dim stride": Case(lambda: silu(randn(16, 4, device=device).t()), "input must have a contiguous last dim"),
        "leading dims": Case(
            lambda: silu(randn(5, 3, 16, device=device).transpose(0, 1)), "input .* flatten to one row stride"
        ),
        "out dtype": Case(lambda: silu(x, out=torch.empty(4, 8, device=device)), "out dtype"),
        "out shape": Case(lambda: silu(x, out=x.new_empty(4, 9)), r"out must have shape \[4, 8\]"),
        "out device": Case(lambda: silu(x, out=x.new_empty(4, 8, device=other)), "out must be on"),
        "out layout": Case(lambda: silu(x, out=x.new_empty(8, 4).t()), "out must have a contiguous last dim"),
        "ids dtype": Case(lambda: silu(x, expert_ids=ids.float()), "expert_ids must be int32 or int64"),
        "ids device": Case(lambda: silu(x, expert_ids=ids.to(other)), "expert_ids must be on"),
        "ids shape": Case(lambda: silu(x, expert_ids=ids[:3]), r"expert_ids must have shape"),
        "ids 2d": Case(lambda: silu(x, expert_ids=ids.view(2, 2)), r"expert_ids must have shape"),
        "ids blocks": Case(lambda: silu(x, expert_ids=ids, expert_step=2), r"expert_ids must have shape .*\[2\]"),
        "ids non-contiguous": Case(
            lambda: silu(x, expert_ids=torch.zeros(4, 2, dtype=torch.int32, device=device)[:, 0]),
            "expert_ids must be contiguous",
        ),
        "expert_step": Case(lambda: silu(x, expert_ids=ids, expert_step=0), "expert_step must be >= 1"),
        "index alone": Case(lambda: silu(x, expert_ids_index=ids), "expert_ids_index needs expert_ids"),
        "index dtype": Case(
            lambda: silu(x, expert_ids=ids, expert_ids_index=ids.float()), "expert_ids_index must be int32 or int64"
        ),
        "index device": Case(
            lambda: silu(x, expert_ids=ids, expert_ids_index=ids.to(other)), "expert_ids_index must be on"
        ),
        "index shape": Case(
            lambda: silu(x, expert_ids=ids, expert_ids_index=ids[:3]),
            r"expert_ids_index must have shape input.shape\[:-1\]",
        ),
        "ids 2d with index": Case(
            lambda: silu(x, expert_ids=ids.view(2, 2), expert_ids_index=ids),
            "with expert_ids_index, expert_ids must be 1-D",
        ),
        "out= with a gradient": Case(
            lambda: silu(x.float().requires_grad_(), out=torch.empty(4, 8, device=device)),
            "the out= form has no gradient",
        ),
    }


def _act_limits():
    meta = dict(dtype=torch.bfloat16, device="meta")
    return {
        "last dim past 2**31": Case(lambda: im.silu_and_mul(torch.empty(1, 2**32, **meta)), r"must be below 2\*\*31"),
        "rows past 2**31-1": Case(lambda: im.silu_and_mul(torch.empty(2**31, 2, **meta)), r"at most 2\*\*31-1 rows"),
        # 2**31 elements in total need 64-bit offsets, not an error
        "2**31 elements": Case(
            lambda: im.silu_and_mul(torch.empty(2**17, 2**14, **meta)), expect=lambda y: y.shape == (2**17, 2**13)
        ),
    }


def _act_compiles(device):
    def filtered(x, ids):
        return im.silu_and_mul(x, expert_ids=ids) * 2

    def through_index(x, ids):
        order = torch.argsort(ids, stable=True)
        return im.silu_and_mul(x, expert_ids=ids, expert_ids_index=order)

    def make(t):
        return randn(t, 2 * 32, device=device), torch.randint(-1, 8, (t,), device=device)

    return {
        "filtered": Compile(filtered, make, (1, 2, 3, 64, 1000, 4096), _exact),
        "filtered, unbacked batch": Compile(filtered, make, (1, 2, 3, 64, 1000, 4096), _exact, unbacked=True),
        "through an index": Compile(through_index, make, (1, 2, 3, 64, 1000), _exact),
    }


_ACT_TRAPS = {
    # the host cannot check an index without a sync: the kernel reports it and traps
    "ids index out of range": Trap(
        """
        import torch, inductor_moe as im
        x = torch.randn(8, 64, device="cuda")
        index = torch.arange(8, device="cuda")
        index[5] = -3
        im.silu_and_mul(x, expert_ids=torch.zeros(8, dtype=torch.int32, device="cuda"), expert_ids_index=index)
        torch.cuda.synchronize()
        """,
        "expert_ids_index[5] = -3 is outside expert_ids' 8 entries",
    ),
}


# ------------------------------------------------------------------------------------------------------------
# pack_topk_ids_weights


def _pack_samples(device):
    ids = torch.randint(-1, 64, (6, 8), device=device, dtype=torch.int32)
    op = torch.ops.inductor_moe.pack_topk_ids_weights.default
    return {
        f"{dtype}".removeprefix("torch."): (op, (ids, torch.randn(6, 8, device=device).to(dtype)))
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    }


def _pack_bad_inputs(device):
    other = _other(device)
    ids = torch.zeros(4, 8, dtype=torch.int32, device=device)
    w = torch.zeros(4, 8, device=device)
    pack = im.pack_topk_ids_weights
    return {
        "shapes differ": Case(lambda: pack(ids, w[:, :7]), r"topk_ids \[4, 8\] and topk_weights \[4, 7\] differ"),
        "ids dtype": Case(lambda: pack(ids.float(), w), "topk_ids must be int32 or int64"),
        "weights dtype": Case(lambda: pack(ids, w.double()), "topk_weights dtype must be"),
        "weights device": Case(lambda: pack(ids, w.to(other)), "topk_weights must be on"),
        "0-dim": Case(lambda: pack(ids[0, 0], w[0, 0]), "topk_ids must have at least one dim"),
        "leading dims": Case(
            lambda: pack(ids.view(2, 2, 8).transpose(0, 1), w.view(2, 2, 8).transpose(0, 1)),
            "topk_ids's leading dims must flatten to one row stride",
        ),
    }


def _pack_limits():
    ids = torch.empty(2**28, 8, dtype=torch.int32, device="meta")
    w = torch.empty(2**28, 8, device="meta")
    return {
        "pairs past 2**31-1": Case(lambda: im.pack_topk_ids_weights(ids, w), r"at most 2\*\*31-1 \(id, weight\) pairs"),
        "1000 x 8": Case(lambda: im.pack_topk_ids_weights(ids[:1000], w[:1000]), expect=lambda y: y.shape == (1000, 8)),
    }


def _pack_compiles(device):
    # only exact arithmetic around the op (a compiled softmax may differ from eager by an ulp, which can swap
    # near-tied top-k picks and make the two sides disagree for reasons that are not the op's)
    def f(ids, w):
        return im.pack_topk_ids_weights(ids + 1, w * 2)

    return {
        "ids + 1, w * 2": Compile(
            f,
            lambda t: (torch.randint(-1, 255, (t, 8), device=device), torch.randn(t, 8, device=device)),
            (1, 2, 37, 1000, 4096),
            assert_bit_exact,
        )
    }


# ------------------------------------------------------------------------------------------------------------
# moe_combine


def _combine_samples(device):
    op = torch.ops.inductor_moe.moe_combine.default
    samples = {}
    for ids_dtype, rows_dtype in [(None, None), (torch.int32, None), (torch.int64, torch.int32)]:
        eo, w, ids, rows = combine_case(6, 4, 24, torch.bfloat16, torch.float32, ids_dtype, rows_dtype, device)
        eo = eo.nan_to_num()  # opcheck compares eager runs with each other; NaN != NaN
        name = f"ids {ids_dtype}, src_rows {rows_dtype}".replace("torch.", "")
        samples[name] = (op, (eo, w, ids, 0, 8, rows))
        samples[f"{name}, zero_dead_rows"] = (op, (eo, w, ids, 0, 8, rows, True))
        samples[f"{name}, renormalize"] = (op, (eo, w, ids, 0, 8, rows, False, True))
    return samples


def _combine_bad_inputs(device):
    other = _other(device)
    eo = randn(32, 16, device=device)
    w = torch.rand(4, 8, device=device)
    ids = torch.zeros(4, 8, dtype=torch.int32, device=device)
    combine = im.moe_combine
    return {
        "k mismatch (rows)": Case(lambda: combine(eo[:31], w), r"tokens \* k = 32 rows"),
        "k mismatch (weights)": Case(lambda: combine(eo, w[:, :7]), r"tokens \* k = 28 rows"),
        "expert_out 3-D": Case(lambda: combine(eo.view(4, 8, 16), w), "expert_out must be 2-D"),
        "expert_out dtype": Case(lambda: combine(eo.double(), w), "expert_out dtype must be"),
        "expert_out layout": Case(
            lambda: combine(randn(16, 32, device=device).t(), w), "expert_out must have a contiguous last dim"
        ),
        "weights 1-D": Case(lambda: combine(eo, w.view(-1)), "topk_weights must be 2-D"),
        "weights dtype": Case(lambda: combine(eo, w.to(torch.int32)), "topk_weights dtype must be"),
        "weights device": Case(lambda: combine(eo, w.to(other)), "topk_weights must be on"),
        "ids shape": Case(lambda: combine(eo, w, ids[:, :7]), r"topk_ids must have topk_weights' shape \[4, 8\]"),
        "ids dtype": Case(lambda: combine(eo, w, ids.float()), "topk_ids must be int32 or int64"),
        "ids device": Case(lambda: combine(eo, w, ids.to(other)), "topk_ids must be on"),
        "src_rows shape": Case(lambda: combine(eo, w, src_rows=ids[:3]), r"src_rows must have topk_weights' shape"),
        "src_rows 1-D": Case(lambda: combine(eo, w, src_rows=ids.view(-1)), r"src_rows must have topk_weights' shape"),
        "src_rows dtype": Case(lambda: combine(eo, w, src_rows=ids.half()), "src_rows must be int32 or int64"),
    }


def _combine_limits():
    return {
        "hidden past 2**31": Case(
            lambda: im.moe_combine(
                torch.empty(8, 2**31, dtype=torch.bfloat16, device="meta"), torch.rand(4, 2, device="meta")
            ),
            r"must be below 2\*\*31, got 2147483648",
        ),
        # more than 2**31 elements in expert_out needs 64-bit row offsets, not an error
        "2**32 elements": Case(
            lambda: im.moe_combine(
                torch.empty(2**20, 2**12, dtype=torch.bfloat16, device="meta"), torch.rand(2**17, 8, device="meta")
            ),
            expect=lambda y: y.shape == (2**17, 2**12),
        ),
    }


def _combine_compiles(device):
    def gathered_renormalized(expert_out, w, ids):
        src_rows = torch.argsort(ids.view(-1), stable=True).view(ids.shape)
        return im.moe_combine(expert_out, w, ids, (0, 8), src_rows, zero_dead_rows=True, renormalize=True)

    def token_major(expert_out, w, ids):
        return im.moe_combine(expert_out * 2, w.softmax(-1), ids, (0, 8))

    def make(weights):
        return lambda t: (
            randn(t * 4, 32, device=device),
            weights(t),
            torch.randint(-1, 8, (t, 4), device=device),
        )

    return {
        "gathered, renormalized": Compile(
            gathered_renormalized, make(lambda t: torch.rand(t, 4, device=device)), (1, 2, 37, 1000), _exact
        ),
        "token-major": Compile(
            token_major,
            make(lambda t: randn(t, 4, device=device)),
            (1, 2, 37, 1000),
            lambda out, ref: torch.testing.assert_close(out, ref, **TOL[torch.float32]),
        ),
    }


def _combine_filtered_trap(k):
    # the kernel reads a bad live pair as dead and reports it after its writes, finding it again among the pairs
    # its thread staged (k=70: the second round of 64); a dead pair's bad row is never read, nor reported
    return Trap(
        f"""
        import torch, inductor_moe as im
        k = {k}
        eo = torch.randn(8 * k, 64, device="cuda")
        rows = torch.arange(8 * k, device="cuda").view(8, k)
        ids = torch.zeros(8, k, dtype=torch.int32, device="cuda")
        ids[5, 0] = -1
        rows[5, 0] = -4  # dead
        rows[5, k - 1] = 8 * k + 3  # live
        im.moe_combine(eo, torch.ones(8, k, device="cuda"), topk_ids=ids, expert_range=(0, 8), src_rows=rows)
        torch.cuda.synchronize()
        """,
        f"inductor_moe.moe_combine: src_rows[5, {k - 1}] = {8 * k + 3} is outside expert_out's {8 * k} rows",
        absent="= -4",
    )


_COMBINE_TRAPS = {
    "src_rows out of range": Trap(
        """
        import torch, inductor_moe as im
        eo = torch.randn(16, 64, device="cuda")
        rows = torch.arange(16, device="cuda").view(8, 2)
        rows[3, 1] = 99
        im.moe_combine(eo, torch.ones(8, 2, device="cuda"), src_rows=rows)
        torch.cuda.synchronize()
        """,
        "src_rows[3, 1] = 99 is outside expert_out's 16 rows",
    ),
    "filtered src_rows out of range, k=2": _combine_filtered_trap(2),
    "filtered src_rows out of range, k=70": _combine_filtered_trap(70),
}


# ------------------------------------------------------------------------------------------------------------
# expert_sort


def _sort_samples(device):
    op = torch.ops.inductor_moe.expert_sort.default
    return {
        # on the GPU: the kernel, then the ATen chain
        f"{shape}, {dtype}".replace("torch.", ""): (op, (routed_ids(shape, 2, 10, dtype, device), 2, 10))
        for shape in ((6, 8), (200, 8))
        for dtype in (torch.int32, torch.int64)
    }


def _sort_bad_inputs(device):
    ids = torch.zeros(4, 8, dtype=torch.int64, device=device)
    sort = im.expert_sort
    bad_range = r"expert_range must satisfy 0 <= lo <= hi < 2\*\*31"
    return {
        "ids dtype": Case(lambda: sort(ids.float(), (0, 8)), "topk_ids must be int32 or int64"),
        "0-dim": Case(lambda: sort(ids[0, 0], (0, 8)), "topk_ids must have at least one dim"),
        "leading dims": Case(
            lambda: sort(ids.view(2, 2, 8).transpose(0, 1), (0, 8)), "topk_ids' leading dims must flatten"
        ),
        "wrapped range": Case(lambda: sort(ids, (5, 3)), bad_range),
        "negative lo": Case(lambda: sort(ids, (-1, 3)), bad_range),
        "hi past 2**31-1": Case(lambda: sort(ids, (0, 2**31)), bad_range),
    }


def _sort_limits():
    ids = torch.empty(2**28, 8, dtype=torch.int32, device="meta")
    return {
        "pairs past 2**31-1": Case(lambda: im.expert_sort(ids, (0, 8)), r"at most 2\*\*31-1 routed pairs"),
        "2**31-1 groups": Case(
            lambda: im.expert_sort(ids[:4], (0, 2**31 - 1)), expect=lambda out: out[1].shape == (2**31 - 1,)
        ),
    }


def _sort_compiles(device):
    def f(ids):
        order, offs, src_rows = im.expert_sort(ids + 0, (16, 32))
        return order, offs, src_rows

    return {
        # 8 to 32768 pairs: one program, then (on the GPU) the ATen chain
        "(16, 32)": Compile(
            f, lambda t: (routed_ids((t, 8), 16, 32, torch.int64, device, seed=t),), (1, 2, 37, 1000, 4096), _all_equal
        )
    }


# ------------------------------------------------------------------------------------------------------------
# fused_experts


def _experts_layer(tokens, device, dtype=torch.bfloat16, experts=6, hidden=40, inter=24, top_k=3):
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / 6).to(dtype).to(device)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / 5).to(dtype).to(device)
    w, ids = torch.topk(torch.randn(tokens, experts + 2, generator=gen).softmax(-1), top_k)
    return x, w13, w2, w.to(device), ids.to(device)


def _experts_samples(device):
    op = torch.ops.inductor_moe.fused_experts.default
    x, w13, w2, w, ids = _experts_layer(7, device)
    x32, w13_32, w2_32, w32, ids32 = _experts_layer(5, device, torch.float32)
    inter = w13.shape[1] // 2
    return {
        "bf16, -1 and sentinel ids": (op, (x, w13, w2, w, ids.masked_fill(ids == 2, -1), "silu", 0, False)),
        "fp32, local range, renormalize": (op, (x32, w13_32, w2_32, w32, ids32.int(), "gelu", 1, True)),
        "sentinel ids adding w * 0": (op, (x, w13, w2, w, ids, "silu", 0, False, None, True)),
        "w3, transposed w2": (
            op,
            (
                x,
                w13[:, :inter].contiguous(),
                w2.transpose(1, 2).contiguous().transpose(1, 2),
                w,
                ids,
                "gelu_tanh",
                0,
                False,
                w13[:, inter:].contiguous(),
            ),
        ),
    }


def _experts_bad_inputs(device):
    other = _other(device)
    x, w13, w2, w, ids = _experts_layer(4, device)
    fe = im.fused_experts
    return {
        "experts differ": Case(lambda: fe(x, w13, w2[:5], w, ids), "w13 has 6 experts but w2 has 5"),
        "hidden size": Case(lambda: fe(x[:, :39], w13, w2, w, ids), "w13's hidden size 40 does not match hidden's 39"),
        "w2 shape": Case(lambda: fe(x, w13, w2[:, :, :23], w, ids), r"w2 must have shape \[6, 40, 24\]"),
        "k differs": Case(lambda: fe(x, w13, w2, w[:, :2], ids), r"topk_weights \[4, 2\] and topk_ids \[4, 3\] differ"),
        "tokens differ": Case(lambda: fe(x[:3], w13, w2, w, ids), "topk_ids has 4 tokens but hidden has 3"),
        "float ids": Case(lambda: fe(x, w13, w2, w, ids.float()), "topk_ids must be int32 or int64"),
        "weights device": Case(lambda: fe(x, w13.to(other), w2, w, ids), "w13 must be on"),
        "routing weights device": Case(lambda: fe(x, w13, w2, w.to(other), ids), "topk_weights must be on"),
        "2I odd": Case(lambda: fe(x, w13[:, :47], w2, w, ids), "w13's dim 1 must be even"),
        "w3 shape": Case(lambda: fe(x, w13[:, :24], w2, w, ids, w3=w13[:, :23]), "w3 must have w13's shape"),
        "weights dtype": Case(lambda: fe(x, w13.float(), w2, w, ids), "w13 dtype torch.float32 must match"),
        "hidden dtype": Case(lambda: fe(x.double(), w13, w2, w, ids), "hidden dtype must be"),
        "hidden 3-D": Case(lambda: fe(x[None], w13, w2, w, ids), "hidden must be 2-D"),
        "activation": Case(lambda: fe(x, w13, w2, w, ids, "relu"), "activation must be one of"),
        "k past 16": Case(lambda: fe(x, w13, w2, w.repeat(1, 6), ids.repeat(1, 6)), "at most 16 experts a token"),
        "negative expert_lo": Case(
            lambda: torch.ops.inductor_moe.fused_experts(x, w13, w2, w, ids, "silu", -1), "expert_lo must be in"
        ),
        "a gradient": Case(lambda: fe(x.float().requires_grad_(), w13.float(), w2.float(), w, ids), "has no gradient"),
    }


def _experts_limits():
    meta = dict(device="meta", dtype=torch.bfloat16)
    ids = torch.empty(2**28, 8, dtype=torch.int32, device="meta")
    w = torch.empty(2**28, 8, device="meta")
    x = torch.empty(2**28, 64, **meta)
    w13, w2 = torch.empty(8, 64, 64, **meta), torch.empty(8, 64, 32, **meta)
    return {
        "pairs past 2**31-1": Case(lambda: im.fused_experts(x, w13, w2, w, ids), r"at most 2\*\*31-1 routed pairs"),
        "513 experts": Case(
            lambda: im.fused_experts(
                x[:4], torch.empty(513, 64, 64, **meta), torch.empty(513, 64, 32, **meta), w[:4], ids[:4]
            ),
            "w13 must hold 1 to 512 experts",
        ),
        "2**28 x 4 pairs": Case(
            lambda: im.fused_experts(x, w13, w2, w[:, :4], ids[:, :4]), expect=lambda y: y.shape == (2**28, 64)
        ),
    }


def _experts_compiles(device):
    _, w13, w2, _, _ = _experts_layer(1, device)

    def f(x, w, ids):
        return im.fused_experts(x * 2, w13, w2, w, ids, "silu", None, True)

    def make(t):
        x, _, _, w, ids = _experts_layer(t, device)
        return x, w, ids

    return {"T 1..4096": Compile(f, make, (1, 2, 7, 37, 1000, 4096), _exact)}


# ------------------------------------------------------------------------------------------------------------
# route


def _route_samples(device):
    op = torch.ops.inductor_moe.route.default
    logits = randn(37, 160, device=device)
    bias = randn(160, device=device) / 10
    return {
        "softmax, renormalised, bf16 weights": (
            op,
            (logits.bfloat16(), 8, "softmax", True, None, 1, 1, 0.0, 1.0, torch.bfloat16),
        ),
        "softmax, fp16 logits, k=1": (op, (logits[:, :60].half(), 1)),
        "sigmoid, 8 groups, top-3 groups": (op, (logits, 7, "sigmoid", True, bias, 8, 3, 1e-20, 2.5)),
        "sigmoid, no bias, no groups": (op, (logits[:5].t().contiguous().t(), 16, "sigmoid")),
    }


def _route_bad_inputs(device):
    logits = torch.zeros(4, 16, device=device)
    route = im.route
    return {
        "1-D logits": Case(lambda: route(logits[0], 2), "router_logits must be 2-D"),
        "int logits": Case(lambda: route(logits.long(), 2), "router_logits dtype must be"),
        "too many experts": Case(lambda: route(torch.zeros(2, 513, device=device), 2), "1 to 512 experts"),
        "k above E": Case(lambda: route(logits[:, :4], 5), r"top_k must be in \[1, min\(16, experts=4\)\]"),
        "k above 16": Case(lambda: route(torch.zeros(2, 64, device=device), 17), "top_k must be in"),
        "scoring": Case(lambda: route(logits, 2, "relu"), "scoring must be 'softmax' or 'sigmoid'"),
        "softmax with bias": Case(
            lambda: route(logits, 2, "softmax", correction_bias=logits[0]), "correction_bias is for sigmoid"
        ),
        "softmax with groups": Case(lambda: route(logits, 2, "softmax", n_group=4), "n_group"),
        "bias shape": Case(
            lambda: route(logits, 2, "sigmoid", correction_bias=logits[0, :8]), "correction_bias must be 1-D"
        ),
        "bias device": Case(
            lambda: route(logits, 2, "sigmoid", correction_bias=torch.zeros(16, device=_other(device))),
            "correction_bias must be on",
        ),
        "n_group not dividing": Case(lambda: route(logits, 2, "sigmoid", n_group=3), "n_group must divide experts=16"),
        "topk_group past n_group": Case(
            lambda: route(logits, 2, "sigmoid", n_group=4, topk_group=5), r"topk_group must be in \[1, n_group=4\]"
        ),
        "groups of one": Case(lambda: route(logits, 2, "sigmoid", n_group=16), "two best experts"),
        "groups too few": Case(lambda: route(logits, 8, "sigmoid", n_group=4, topk_group=1), "hold fewer than top_k=8"),
        "weights dtype": Case(lambda: route(logits, 2, weights_dtype=torch.int32), "weights_dtype must be"),
        "a gradient": Case(lambda: route(logits.clone().requires_grad_(), 2), "it has no gradient"),
    }


def _route_limits():
    logits = torch.empty(2**31, 512, dtype=torch.bfloat16, device="meta")
    return {
        "2**31 tokens, 512 experts": Case(
            lambda: im.route(logits, 16),
            expect=lambda out: out[1].shape == (2**31, 16) and out[0].dtype == torch.float32,
        ),
    }


def _route_compiles(device):
    bias = randn(64, device=device) / 10

    def f(logits):
        return im.route(logits * 2, 6, "sigmoid", True, bias, 4, 2, 1e-20, 2.5)

    return {"T 1..4096": Compile(f, lambda t: (randn(t, 64, device=device),), (1, 2, 7, 37, 1000, 4096), _all_equal)}


CONTRACTS = [
    OpContract(
        "act_and_mul",
        _act_samples,
        _act_bad_inputs,
        _act_limits,
        _act_compiles,
        _ACT_TRAPS,
    ),
    OpContract(
        "pack_topk_ids_weights",
        _pack_samples,
        _pack_bad_inputs,
        _pack_limits,
        _pack_compiles,
    ),
    OpContract(
        "moe_combine",
        _combine_samples,
        _combine_bad_inputs,
        _combine_limits,
        _combine_compiles,
        _COMBINE_TRAPS,
    ),
    OpContract(
        "fused_experts",
        _experts_samples,
        _experts_bad_inputs,
        _experts_limits,
        _experts_compiles,
    ),
    OpContract(
        "expert_sort",
        _sort_samples,
        _sort_bad_inputs,
        _sort_limits,
        _sort_compiles,
    ),
    OpContract(
        "route",
        _route_samples,
        _route_bad_inputs,
        _route_limits,
        _route_compiles,
    ),
]

BY_NAME = {c.name: c for c in CONTRACTS}


def trap_script(trap: Trap) -> str:
    return textwrap.dedent(trap.script)
