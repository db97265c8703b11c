"""How much a MoE block's time depends on where the allocator puts the grouped GEMM's input: the noise floor of
bench_moe_block's ratios at the points the expert GEMMs dominate.

    python benchmarks/bench_gemm_placement.py [--shape mixtral] [--local all] [--tokens 16] [--pads 8]

1. The up projection alone (torch's grouped GEMM over the block's weights and routing), its A operand (the
   rows grouped by expert) moved through 16 KB of addresses in 128 B steps; a table of the time at five offsets
   in each 4 KB page of A's start.
2. The block compiled with stock inductor and with inductor_moe, each call holding a pad of a different size
   while it runs (one in the allocator's small pool, one in its large pool), so that every buffer the compiled
   code allocates, the GEMM's A among them, lands elsewhere; a table of both times and their ratio by pad.

Nothing of ours runs in part 1, and in part 2 the pad is the only difference between rows. On an H200 with this
script's defaults the Mixtral-like up projection at T=16 took 647-779 µs as A moved, jumping where A's start
crosses a 4 KB boundary, and the block's ratio moved between 0.90 and 1.01 with the pad.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_moe_block import SHAPES, inputs, us, weights  # noqa: E402

from inductor_moe.testing import GroupedMoE  # noqa: E402

import timing  # noqa: E402

_PAGE = 4096  # where the GEMM's time jumps (part 1's table)
_STEP = 128
_PAGES = 4
_IN_PAGE = (0, 1024, 2048, 3072, _PAGE - _STEP)  # the offsets within a page that the table shows


def up_projection_by_address(shape: str, tokens: int, lo: int, hi: int) -> None:
    """Part 1: µs of the up projection's grouped GEMM at each of _PAGES * _PAGE / _STEP addresses of its A."""
    hidden, _, _, top_k = SHAPES[shape]
    w13, _ = weights(shape)
    w13 = w13[lo:hi]
    _, logits, _ = inputs(shape, tokens)
    ids = logits.topk(top_k, dim=-1).indices.view(-1) - lo  # the block's routing (softmax keeps the order)
    live = ids[(ids >= 0) & (ids < hi - lo)]
    offs = torch.bincount(live, minlength=hi - lo).cumsum(0).to(torch.int32)
    rows = ids.numel()  # the block's A has a row per pair; the dead ones (past offs[-1]) are not computed
    elems = rows * hidden
    # one allocation from which every A is a view; its start rounded up to a page, so that offset o is the
    # address's o mod _PAGE
    base = torch.randn(elems + (_PAGES + 1) * _PAGE // 2, device="cuda").to(torch.bfloat16)
    start = (-base.data_ptr() % _PAGE) // 2
    times = {}
    for offset in range(0, _PAGES * _PAGE, _STEP):
        a = base[start + offset // 2 : start + offset // 2 + elems].view(rows, hidden)
        times[offset] = timing.graph_us([lambda a=a: F.grouped_mm(a, w13.transpose(1, 2), offs=offs)], calls=4)
    timing.table(
        f"{shape}-like up projection, T={tokens} ({rows} rows, {hi - lo} groups, {offs[-1].item()} live): µs by "
        f"where A starts (range {min(times.values()):.1f}-{max(times.values()):.1f})",
        ["A's 4 KB page", *(f"+{o} B" for o in _IN_PAGE)],
        [[p, *(f"{times[p * _PAGE + o]:.1f}" for o in _IN_PAGE)] for p in range(_PAGES)],
    )


def block_by_pad(shape: str, tokens: int, lo: int, hi: int, pads: int) -> None:
    """Part 2: the compiled block's µs under inductor and inductor_moe, each call holding one of ``pads`` pads."""
    _, _, _, top_k = SHAPES[shape]
    w13, w2 = weights(shape)
    block = GroupedMoE(w13[lo:hi], w2[lo:hi], top_k, (lo, hi))
    compiled = {name: torch.compile(block, backend=name, dynamic=True) for name in ("inductor", "inductor_moe")}
    # T=1 first, as in bench_moe_block: Inductor tunes each kernel at its first call
    for t in dict.fromkeys((1, tokens)):
        x, logits, _ = inputs(shape, t)
        for fn in compiled.values():
            fn(x, logits)
    x, logits, _ = inputs(shape, tokens)
    rows, ratios, mean = [], [], {name: [] for name in compiled}
    for i in range(pads):
        # 4.5 KB steps move a buffer across the 4 KB pages of part 1; one pad per pool (under and over 1 MiB)
        small, large = i * 4608, (1 << 20) + i * 4608

        def padded(fn, small=small, large=large):
            held = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in (small, large) if n]
            out = fn(x, logits)
            del held
            return out

        t = timing.interleaved_us({name: (lambda fn=fn: padded(fn)) for name, fn in compiled.items()}, us)
        ratios.append(t["inductor_moe"] / t["inductor"])
        for name in compiled:
            mean[name].append(t[name])
        rows.append([f"{small} + {large}", f"{t['inductor']:.1f}", f"{t['inductor_moe']:.1f}", f"{ratios[-1]:.4f}"])
    means = {name: statistics.mean(v) for name, v in mean.items()}
    rows.append(
        [
            "mean",
            f"{means['inductor']:.1f}",
            f"{means['inductor_moe']:.1f}",
            f"{means['inductor_moe'] / means['inductor']:.4f}",
        ]
    )
    timing.table(
        f"{shape}-like block, local {lo}-{hi}, T={tokens}, by the pads each call holds "
        f"(ratio range {min(ratios):.4f}-{max(ratios):.4f})",
        ["pad bytes (small + large pool)", "inductor µs", "inductor_moe µs", "inductor_moe / inductor"],
        rows,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    parser.add_argument("--local", default="all", choices=["all", "1/8"])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--pads", type=int, default=8)
    args = timing.cli(parser)
    timing.header()
    experts = SHAPES[args.shape][2]
    lo, hi = (0, experts) if args.local == "all" else (0, experts // 8)
    torch._dynamo.config.recompile_limit = 64
    with torch.no_grad():
        up_projection_by_address(args.shape, args.tokens, lo, hi)
        block_by_pad(args.shape, args.tokens, lo, hi, args.pads)


if __name__ == "__main__":
    main()
