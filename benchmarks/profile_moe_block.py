"""One point of the MoE block benchmark, kernel by kernel: where two compiled variants differ.

    python benchmarks/profile_moe_block.py --shape mixtral --local all --tokens 16 [--variants A,B] [--swap]

Compiles inductor_moe/testing.py's grouped block with two of bench_moe_block.py's variants (default: stock
inductor and inductor_moe −PDL, the rewrites alone), times them with that benchmark's timer (T=1 first, as
there: Inductor tunes each kernel at its first call), then profiles a CUDA graph of 32 calls of each
(``--swap``: the second first) and prints, position by position in the call, each kernel's name and median
duration and the median gap before it, with the span of a call. The timings come before the profiles: a profile
slows the graphs a process replays after it, which the last line shows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_moe_block import SHAPES, VARIANTS, inputs, us, weights  # noqa: E402

from inductor_moe.testing import GroupedMoE  # noqa: E402

import timing  # noqa: E402


def profile(fn, calls: int = 32, replays: int = 5) -> tuple[list[tuple[str, float, float]], float]:
    """([(kernel name, median µs, median µs of the gap before it)] in call order, µs per call from the first
    kernel's start to the last one's end), over ``replays`` replays of a graph of ``calls`` calls of ``fn``."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    del graph
    return per_position(events, calls, replays)


def per_position(events, calls: int, replays: int) -> tuple[list[tuple[str, float, float]], float]:
    """profile's result from the device events of ``replays`` replays of ``calls`` calls (``name``,
    ``time_range.start``/``.end`` in µs)."""
    events = sorted(events, key=lambda e: e.time_range.start)
    per_call = len(events) // (calls * replays)
    if per_call * calls * replays != len(events):
        raise RuntimeError(f"{len(events)} kernels in {replays} replays of {calls} calls: not the same kernels a call")
    rows = []
    for i in range(per_call):
        same = events[i::per_call]  # this position in every call
        duration = statistics.median(e.time_range.end - e.time_range.start for e in same)
        gaps = [same[c].time_range.start - events[c * per_call + i - 1].time_range.end for c in range(1, len(same))]
        rows.append((same[0].name, duration, statistics.median(gaps)))
    first = [events[r * calls * per_call] for r in range(replays)]
    last = [events[(r + 1) * calls * per_call - 1] for r in range(replays)]
    span = statistics.median(b.time_range.end - a.time_range.start for a, b in zip(first, last))
    return rows, span / calls


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    parser.add_argument("--local", default="1/8", choices=["all", "1/8"])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--variants", default="inductor,inductor_moe −PDL")
    parser.add_argument("--swap", action="store_true", help="profile the second variant first")
    parser.add_argument("--width", type=int, default=60, help="characters of each kernel name")
    args = timing.cli(parser)
    timing.header()
    names = args.variants.split(",")
    settings = {v[0]: v[1:] for v in VARIANTS}
    _, _, experts, top_k = SHAPES[args.shape]
    w13, w2 = weights(args.shape)  # the benchmark's weights and inputs
    lo, hi = (0, experts) if args.local == "all" else (0, experts // 8)
    block = GroupedMoE(w13[lo:hi], w2[lo:hi], top_k, (lo, hi))
    compiled = {
        name: torch.compile(
            block, backend=settings[name][0], dynamic=True, options={"triton.enable_pdl": settings[name][1]}
        )
        for name in names
    }
    with torch.no_grad():
        for tokens in dict.fromkeys((1, args.tokens)):
            x, logits, _ = inputs(args.shape, tokens)
            calls = {name: (lambda fn=fn, x=x, logits=logits: fn(x, logits)) for name, fn in compiled.items()}
            t = timing.interleaved_us(calls, us)
            print(f"T={tokens}: " + ", ".join(f"{name} {t[name]:.2f} µs" for name in names))
        order = names[::-1] if args.swap else names
        profiles = {name: profile(calls[name]) for name in order}
    (rows_a, span_a), (rows_b, span_b) = profiles[names[0]], profiles[names[1]]
    print(f"\nspan a call: {names[0]} {span_a:.2f} µs, {names[1]} {span_b:.2f} µs")
    for label, rows in ((names[0], rows_a), (names[1], rows_b)):
        print(f"{label}: kernels {sum(r[1] for r in rows):.2f} µs, gaps {sum(r[2] for r in rows):.2f} µs")
    w = args.width
    print(f"\n{'':>3} {names[0]:<{w}} {'µs':>8} {'gap':>6} | {names[1]:<{w}} {'µs':>8} {'gap':>6}")
    for i in range(max(len(rows_a), len(rows_b))):
        cells = []
        for rows in (rows_a, rows_b):
            cells.append(f"{rows[i][0][:w]:<{w}} {rows[i][1]:8.2f} {rows[i][2]:6.2f}" if i < len(rows) else "")
        print(f"{i:3d} {cells[0] or ' ' * (w + 16)} | {cells[1]}")
    with torch.no_grad():
        t = timing.interleaved_us({name: calls[name] for name in names}, us)
    print("\ntimed again, after the profiles: " + ", ".join(f"{name} {t[name]:.2f} µs" for name in names))


if __name__ == "__main__":
    main()
