"""End to end: a MoE block in eager PyTorch, compiled with inductor and with inductor_moe, and our runner.

    python benchmarks/bench_moe_block.py [--shapes qwen3,mixtral] [--tokens 1,16,256,4096]

Blocks from inductor_moe/testing.py: the eager expert loop (LoopMoE, HF style) and the grouped-GEMM block
(GroupedMoE: sorted rows, two grouped GEMMs, expert-parallel sentinel mask, view * weights combine), which is
what gets compiled, with inductor and inductor_moe as they come (inductor_moe turns on Inductor's own PDL, stock
inductor does not) and each with that setting flipped, which separates the rewrites from PDL. "runner" is
inductor_moe.moe.moe called directly. Shapes: Qwen3-30B-A3B-like (hidden 2048,
128 experts, top-8, intermediate 768) and Mixtral-like (hidden 4096, 8 experts, top-2, intermediate 14336),
without and with an expert-parallel local range of 1/8 of the experts. µs per call inside a CUDA graph
(benchmarks/timing.py), median of three rounds that each time every column once in a rotated order,
except the eager loop (its torch.where syncs with the host: CUDA events over back-to-back calls; timed once).

Also: the share of the block's time under inductor spent in the kernels our rewrites replace, and our
activation as the runner calls it (untouched mode, dead rows sorted last) with 7/8 of the rows dead (the 1/8
local range) over none dead. The share comes from profiles of the compiled block itself, taken after every
timing of the run (a profile slows the graphs replayed after it in its process, see main), both backends with
PDL off (so no kernel's time includes a wait on the one before): Inductor's kernels that do not appear under
inductor_moe, less the Inductor kernels that appear only there (the same fusions renamed after the ops they
now sit next to), over the block's time. The masked activation and the combine compiled alone are no measure
of it: Inductor fuses them differently there, and alone they took from half to 13x their time inside the block
(H200, T=4096, 1/8 local, Mixtral-like: 558 + 541 us alone against 321 + 41 inside).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import zlib
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
import inductor_moe as im  # noqa: E402
from inductor_moe.testing import GroupedMoE, LoopMoE  # noqa: E402

import timing  # noqa: E402

SHAPES = {"qwen3": (2048, 768, 128, 8), "mixtral": (4096, 14336, 8, 2)}  # hidden, intermediate, experts, top-k
# (column, backend, Inductor's triton.enable_pdl): each backend as it comes, then with that setting flipped
VARIANTS = (
    ("inductor", "inductor", False),
    ("inductor +PDL", "inductor", True),
    ("inductor_moe", "inductor_moe", True),
    ("inductor_moe −PDL", "inductor_moe", False),
)


def us(fn) -> float:
    # in a graph at every T: back-to-back calls timed with events measured this VM's host at T=4096 (a block
    # is ~100 launches), which moved stock inductor's time from 783 to 975 us between runs
    try:
        return timing.graph_us([fn], repeats=10)
    except RuntimeError as e:  # not capturable (a host sync): say so, time it without a graph
        print(f"(no CUDA graph: {str(e).splitlines()[0][:100]}; timed with events)")
        return timing.events_us(fn)


# what our kernels are called in a profile: the JIT CUDA kernels' entry point and the Triton packing kernel
OUR_KERNELS = ("inductor_moe_kernel", "topk_pack_kernel")


def kernel_us(fn, calls: int = 10) -> dict[str, float]:
    """µs a call of each kernel ``fn`` launches, by name (Inductor's trailing kernel index stripped), from a
    profile of eager calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[re.sub(r"_\d+$", "", event.name)] += event.device_time / calls
    return times


def replaced_us(inductor_fn, ours_fn) -> tuple[float, float]:
    """(µs of Inductor's kernels that the rewrites take out of a call, µs of our kernels in their place).

    ``ours_fn`` should be compiled with Inductor's PDL off; our kernels' PDL is turned off here. Outside a CUDA
    graph our launcher gives every kernel PDL, and a PDL kernel may start before its predecessor ends, so its
    profiled time could include its wait (on an H200 our kernels' times came out the same either way, to 0.2 µs;
    off, the column means what it says)."""
    before = kernel_us(inductor_fn)
    with mock.patch.dict(os.environ, {"INDUCTOR_MOE_PDL": "0"}):  # the launcher reads it at every launch
        after = kernel_us(ours_fn)
    removed = sum(t for name, t in before.items() if name not in after)
    renamed = sum(t for name, t in after.items() if name not in before and name not in OUR_KERNELS)
    return removed - renamed, sum(t for name, t in after.items() if name in OUR_KERNELS)


def generator(*key) -> torch.Generator:
    """A CUDA generator seeded from ``key`` alone. Each shape's weights and each (shape, T)'s inputs get their own,
    so a row does not depend on which other rows the run covers (with one seeded stream the routing, and so the
    1/8-local Qwen3-like T=1 time, changed with the set of points run: 30 against 47 µs on an H200)."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(zlib.crc32(repr(key).encode()))
    return gen


def weights(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The shape's expert weights (w13 [E, 2I, H], w2 [E, H, I], bf16), from its own generator."""
    hidden, inter, experts, _ = SHAPES[shape]
    gen = generator(shape)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) / hidden**0.5).to(torch.bfloat16)
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=gen) / inter**0.5).to(torch.bfloat16)
    return w13, w2


def inputs(shape: str, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """(hidden states, router logits, the generator they came from) of T=tokens: the same tokens and routing
    with and without the local range."""
    hidden, _, experts, _ = SHAPES[shape]
    gen = generator(shape, tokens)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(tokens, experts, device="cuda", generator=gen)
    return x, logits, gen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="qwen3,mixtral")
    parser.add_argument("--tokens", default="1,16,256,4096")
    args = timing.cli(parser)
    timing.header()
    # Every timing first, every profile after: once torch.profiler has run in a process, graphs replay slower
    # there (H200, the Mixtral-like 1/8 block at T=1: 26.4 us before a profile, 33.2 after). Hence also no
    # torch._dynamo.reset() between blocks: the
    # profiles reuse the compiled graphs they time (kernels tuned at their first call, at T=1), and each of the
    # four blocks compiles each variant twice (T=1 is specialised), past Dynamo's default limit of 8 a function.
    torch._dynamo.config.recompile_limit = 64
    points, shares = [], []
    for shape in args.shapes.split(","):
        _, inter, experts, top_k = SHAPES[shape]
        w13, w2 = weights(shape)
        loop = LoopMoE(w13, w2, top_k)
        for ep in (False, True):
            lo, hi = (0, experts // 8) if ep else (0, experts)
            block = GroupedMoE(w13[lo:hi], w2[lo:hi], top_k, (lo, hi))
            # inductor_moe turns on Inductor's own PDL (sm90+); the two extra columns separate that from the rewrites
            compiled = {
                name: torch.compile(block, backend=backend, dynamic=True, options={"triton.enable_pdl": pdl})
                for name, backend, pdl in VARIANTS
            }
            for tokens in map(int, args.tokens.split(",")):
                x, logits, gen = inputs(shape, tokens)
                t = {}
                with torch.no_grad():
                    t["eager loop"] = timing.events_us(lambda: loop(x, logits), calls=3) if not ep else None
                    calls = {"eager": lambda block=block, x=x, logits=logits: block(x, logits)}
                    calls.update(
                        {name: lambda fn=fn, x=x, logits=logits: fn(x, logits) for name, fn in compiled.items()}
                    )
                    calls["runner"] = lambda: im.moe.moe(x, logits, w13[lo:hi], w2[lo:hi], top_k, expert_range=(lo, hi))
                    t.update(timing.interleaved_us(calls, us))
                    # our filtered activation as the runner calls it, dead rows sorted last as the runner sorts them
                    pairs = tokens * top_k
                    h = torch.randn(pairs, 2 * inter, device="cuda", dtype=torch.bfloat16, generator=gen)
                    remote = torch.arange(pairs, device="cuda") >= (pairs // 8 if ep else pairs)
                    ids = torch.where(remote, -1, 0)
                    a = torch.empty(pairs, inter, device="cuda", dtype=torch.bfloat16)
                    act_us = timing.graph_us([lambda: im.silu_and_mul(h, out=a, expert_ids=ids)])  # the runner's call
                points.append((shape, ep, tokens, t, calls["inductor"], calls["inductor_moe −PDL"]))
                shares.append((shape, ep, tokens, act_us))
    rows = []
    for shape, ep, tokens, t, inductor_call, ours_call in points:
        with torch.no_grad():
            inductor_us, ours_us = replaced_us(inductor_call, ours_call)  # PDL off
        ratio = t["inductor_moe"] / t["inductor"]
        rewrites_only = t["inductor_moe −PDL"] / t["inductor"]
        loop_x = f"{t['eager loop'] / t['runner']:.1f}×" if t["eager loop"] else "-"
        rows.append(
            [shape, "1/8" if ep else "all", tokens]
            + [f"{t[k]:.1f}" if t[k] else "-" for k in ("eager loop", "eager", *(v[0] for v in VARIANTS), "runner")]
            + [
                f"**{ratio:.2f}**",
                f"{rewrites_only:.2f}",
                loop_x,
                f"{100 * inductor_us / t['inductor']:.0f}%",
                f"{inductor_us:.1f} -> {ours_us:.1f}",
            ]
        )
    timing.table(
        "MoE block, bf16, µs per call in a CUDA graph (the eager loop: events)",
        [
            "shape",
            "local experts",
            "T",
            "eager loop",
            "eager grouped",
            *(v[0] for v in VARIANTS),
            "runner",
            "inductor_moe / inductor",
            "the rewrites alone: inductor_moe −PDL / inductor",
            "runner vs eager loop",
            "rewritten share under inductor",
            "replaced kernels: inductor -> ours µs",
        ],
        rows,
    )
    act = {(s, ep, t): a for s, ep, t, a in shares}
    timing.table(
        "Our gated activation as the runner calls it (silu, untouched mode): 7/8 of the rows dead over none dead",
        ["shape", "T", "none dead µs", "7/8 dead µs", "ratio"],
        [
            [
                s,
                t,
                f"{act[(s, False, t)]:.2f}",
                f"{act[(s, True, t)]:.2f}",
                f"**{act[(s, True, t)] / act[(s, False, t)]:.2f}**",
            ]
            for s, ep, t, _ in shares
            if not ep
        ],
    )


if __name__ == "__main__":
    main()
