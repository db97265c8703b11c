"""A MoE layer's routed experts: the floor, stock torch.compile, the grouped-GEMM runner and ``fused_experts``.

    python benchmarks/bench_fused_experts.py [--shapes qwen3,mixtral] [--tokens 1,16,256,2048] [--autotune all|16,256]
    python benchmarks/bench_fused_experts.py --tune [--shapes ...] [--tokens ...]   # writes the config table
    python benchmarks/bench_fused_experts.py --profile [--shapes ...] [--tokens ...]  # fused_experts kernel by kernel

Shapes: Qwen3-30B-A3B (hidden 2048, 128 experts, top-8, intermediate 768) and Mixtral-8x7B (hidden 4096, 8
experts, top-2, intermediate 14336), bf16, weights N(0, 0.02), with all experts local and with 1/8 of them (the
first E/8; every other pair dead). Columns, each from routed ids and weights to the combined [T, H]:

- floor: the larger of the distinct routed local experts' weight bytes over the device's copy rate and the live
  pairs' FLOPs over a bf16 GEMM's rate, both measured in this run;
- inductor: ``torch.compile`` of inductor_moe.testing.grouped_experts (stable sort, two ``F.grouped_mm``, the
  masked activation, the weighted sum), default mode; with ``--autotune`` also
  ``mode="max-autotune-no-cudagraphs"`` (Inductor's Triton grouped-GEMM template), at every T or those listed
  (its compiles take minutes a point);
- grouped runner: ``expert_sort`` + ``F.grouped_mm`` + our filtered activation + ``F.grouped_mm`` + our combine;
- fused_experts: the op (``expert_sort``, the two Triton GEMMs, the combine);
- cuBLAS bmm, even rows: what the GEMMs alone cost the GEMM library at this point, a bound (not a way to run a
  layer: :func:`even_bmm`).

Four routings per CUDA graph (the replay cycles through them), so every call streams its experts' weights from
HBM rather than L2. ``--tune`` times candidate tiles of each GEMM alone at every point, then the op end to end
with those tiles and with torch's grouped GEMMs in their place, and writes the fastest to
inductor_moe/kernels/triton/fused_experts_configs.json under this device's name.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import inductor_moe as im  # noqa: E402
from inductor_moe.kernels.triton import fused_experts as kernel  # noqa: E402
from inductor_moe.ops.fused_experts import run_kernels  # noqa: E402
from inductor_moe.testing import grouped_experts  # noqa: E402

import timing  # noqa: E402

SHAPES = {"qwen3": (2048, 128, 8, 768), "mixtral": (4096, 8, 2, 14336)}  # hidden, experts, top-k, inter
ROUTINGS = 4


def routings(tokens, experts, top_k, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(ROUTINGS):
        logits = torch.randn(tokens, experts, device="cuda", generator=gen)
        w, ids = torch.topk(logits.softmax(-1), top_k)
        out.append((w, ids))
    return out


def grouped_runner(x, w, ids, w13, w2, lo):
    """The runner before fused_experts: the grouping op, torch's grouped GEMMs, our activation and combine."""
    tokens, k = ids.shape
    local = (lo, lo + w13.shape[0])
    order, offs, src_rows = im.expert_sort(ids, local)
    h = torch._grouped_mm(x[order // k], w13.transpose(1, 2), offs=offs)
    a = h.new_empty(h.shape[0], h.shape[1] // 2)
    im.silu_and_mul(h, out=a, expert_ids=ids.reshape(-1), expert_range=local, expert_ids_index=order)
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
    return im.moe_combine(y, w, ids, local, src_rows.view(tokens, k))


def gemm_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    us = timing.graph_us([lambda: a @ b], calls=8)
    return 2 * 8192**3 / (us * 1e-6) / 1e12


def floor_rates() -> tuple[float, float]:
    """(copy GB/s, bf16 GEMM TFLOP/s) measured in this run, printed: what the floors divide by."""
    copy_gbs = timing.report_copy_bandwidth()
    tflops = gemm_tflops()
    print(f"bf16 GEMM 8192^3: {tflops:.0f} TFLOP/s")
    return copy_gbs, tflops


def live_ids(ids, lo, local):
    """The routed ids of the local experts lo..lo + local - 1 (one per live pair)."""
    return ids[(ids >= lo) & (ids < lo + local)]


def floor_us(routes, lo, local, hidden, inter, copy_gbs, tflops) -> float:
    """Mean over the routings of max(weight bytes of the distinct live experts / copy rate, FLOPs / GEMM rate)."""
    per_expert = 3 * hidden * inter * 2
    floors = []
    for _, ids in routes:
        live = live_ids(ids, lo, local)
        bytes_us = live.unique().numel() * per_expert / (copy_gbs * 1e3)
        flops_us = 2 * live.numel() * 3 * hidden * inter / (tflops * 1e6)
        floors.append(max(bytes_us, flops_us))
    return sum(floors) / len(floors)


def layer(shape, local_share):
    hidden, experts, top_k, inter = SHAPES[shape]
    local = experts if local_share == "all" else experts // 8
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(shape.encode()))
    w13 = (torch.randn(local, 2 * inter, hidden, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(local, hidden, inter, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    return hidden, experts, top_k, inter, local, w13, w2


def even_bmm(routes, local, hidden, inter, w13, w2):
    """Per routing, cuBLAS's two batched GEMMs over as many experts as it routes to (a contiguous slice of the
    weights, another for each routing while they last, so they come from HBM) with its live pairs split evenly
    among them: the GEMMs without the gather, the activation, the combine or an uneven split, each expert's
    weights read once. What fused_experts is measured against where the floor is out of reach."""
    fns = []
    start = 0
    for _, ids in routes:
        live = live_ids(ids, 0, local)
        experts = live.unique().numel()
        if experts == 0:
            fns.append(lambda: None)
            continue
        rows = -(-live.numel() // experts)
        start = start if start + experts <= local else 0
        up_w, down_w = (w[start : start + experts].transpose(1, 2) for w in (w13, w2))
        start += experts
        x = torch.randn(experts, rows, hidden, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(experts, rows, inter, device="cuda", dtype=torch.bfloat16)
        fns.append(lambda x=x, a=a, u=up_w, d=down_w: (torch.bmm(x, u), torch.bmm(a, d)))
    return fns


def calls(fn, xs, routes, *args):
    return [lambda x=x, w=w, ids=ids: fn(x, w, ids, *args) for x, (w, ids) in zip(xs, routes)]


def bench(args, copy_gbs, tflops):
    rows = []
    token_list = list(map(int, args.tokens.split(",")))
    autotune_at = set(token_list) if args.autotune == "all" else {int(t) for t in args.autotune.split(",") if t}
    names = ["inductor", "grouped runner", "fused_experts", "cuBLAS bmm, even rows"]
    names += ["inductor max-autotune"] if autotune_at else []
    title = "Routed experts, bf16, µs per call in a CUDA graph of 4 routings (x the floor)"
    header = [
        *("shape", "local experts", "T", "floor", *names),
        *("fused_experts / inductor", "fused_experts / bmm", "max rel. diff to eager"),
    ]
    with timing.emitted(title, header, rows):
        for shape, local_share in itertools.product(args.shapes.split(","), args.locals.split(",")):
            hidden, experts, top_k, inter, local, w13, w2 = layer(shape, local_share)
            for tokens in token_list:
                routes = routings(tokens, experts, top_k, seed=tokens)
                xs = [torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16) for _ in routes]
                torch._dynamo.reset()
                variants = {
                    "inductor": torch.compile(grouped_experts, dynamic=False),
                    "grouped runner": grouped_runner,
                    "fused_experts": lambda x, w, ids, w13, w2, lo: im.fused_experts(
                        x, w13, w2, w, ids, "silu", (lo, lo + w13.shape[0])
                    ),
                }
                if tokens in autotune_at:
                    variants["inductor max-autotune"] = torch.compile(
                        grouped_experts, dynamic=False, mode="max-autotune-no-cudagraphs"
                    )
                want = grouped_experts(xs[0], *routes[0], w13, w2, 0).float()
                got = variants["fused_experts"](xs[0], *routes[0], w13, w2, 0).float()
                err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
                timed = {name: calls(fn, xs, routes, w13, w2, 0) for name, fn in variants.items()}
                timed["cuBLAS bmm, even rows"] = even_bmm(routes, local, hidden, inter, w13, w2)
                times = timing.interleaved_us(timed, lambda fns: timing.graph_us(fns))
                floor = floor_us(routes, 0, local, hidden, inter, copy_gbs, tflops)
                # a routing with no live pair (1/8 local at T=1) has no floor: no ratio
                cols = [_cell(times.get(n), floor) for n in names]
                rows.append(
                    [
                        shape,
                        local_share,
                        tokens,
                        f"{floor:.1f}",
                        *cols,
                        f"**{times['fused_experts'] / times['inductor']:.2f}**",
                        _ratio(times["fused_experts"], times["cuBLAS bmm, even rows"]),
                        f"{err:.1e}",
                    ]
                )
                print(rows[-1], flush=True)


def _ratio(us, bound) -> str:
    return f"{us / bound:.2f}" if bound > 0.1 else "-"  # no routing with a live pair: nothing to bound


def _cell(us, floor) -> str:
    if us is None:
        return "not run"
    return f"{us:.1f} ({us / floor:.2f}x)" if floor else f"{us:.1f}"


# ------------------------------------------------------------------------------------------------------------
# Tuning


def _tiles(rows, tma=()):
    """Tiles from (block_m, block_n, block_k, group_m, num_warps, num_stages) rows; those listed in ``tma`` also
    with TMA boxes."""
    return [kernel.Tile(*row) for row in rows] + [kernel.Tile(*row, tma=True) for row in tma]


# narrow, deep tiles for decode (16 columns: Qwen3's up GEMM at T=1 is 8 experts x 768 / 64 = 96 programs with
# 64, fewer than the H100's 132 SMs, each streaming 512 KB), wide ones with grouped order for the compute-bound
# points; the down GEMM (one accumulator) also tries 256 columns
_DECODE = [
    (16, 32, 128, 1, 4, 4),
    (16, 64, 128, 1, 4, 4),
    (16, 64, 64, 1, 4, 4),
    (16, 32, 256, 1, 4, 3),
    (16, 16, 256, 1, 4, 3),
    (16, 16, 512, 1, 4, 3),
]
_DECODE_TMA = [(16, 32, 128, 1, 4, 4), (16, 32, 256, 1, 4, 3), (16, 64, 128, 1, 4, 4)]
# tens of rows an expert (1/8 of Qwen3's experts local at T=256: ~16): one row block an expert, narrow columns for
# programs enough to fill the SMs (16 experts x 768 / 64 = 192 up programs, 1.45 waves on 132 SMs)
_FEW_ROWS = [(32, 64, 128, 1, 4, 3), (32, 32, 128, 1, 4, 4), (64, 32, 128, 1, 4, 3), (32, 32, 256, 1, 4, 3)]
_WIDE = [(64, 128, 64, 8, 4, 4), (64, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4)]
TILES = {
    "up": _tiles(
        [
            *_DECODE,
            *_WIDE,
            (16, 128, 128, 1, 4, 3),
            *_FEW_ROWS,
            (64, 64, 64, 4, 4, 3),
            (128, 64, 64, 8, 4, 4),
        ],
        tma=[*_DECODE_TMA, *_WIDE, *_FEW_ROWS],
    ),
    "down": _tiles(
        [
            *_DECODE,
            *_WIDE,
            *_FEW_ROWS,
            (64, 64, 64, 4, 4, 3),
            (128, 256, 64, 8, 8, 3),
        ],
        tma=[*_DECODE_TMA, *_WIDE, (128, 256, 64, 8, 8, 3)],
    ),
}


# live pairs (a routing's mean) up to which --tune also times the pair-order paths (past it, experts repeat across
# pairs; with 1/8 of the experts local, T=16 has 16 of its 128 pairs live)
PAIRS_MAX = 64
# the "decode" path's tiles: its up GEMM's (block_n intermediate columns a program, as in _DECODE), and the hidden
# columns a step of its down GEMM
_DECODE_FUSED = [
    ((16, 32, 128, 1, 4, 4), 64),
    ((16, 32, 256, 1, 4, 3), 64),
    ((16, 64, 128, 1, 4, 4), 64),
    ((16, 32, 128, 1, 4, 4), 128),
    ((16, 64, 128, 1, 4, 3), 128),
    ((16, 16, 256, 1, 4, 3), 128),
]


def tune(args):
    table = json.loads(kernel.CONFIGS.read_text()) if kernel.CONFIGS.exists() else {}
    device = torch.cuda.get_device_name()
    entries = table.setdefault(device, {})
    for shape, local_share in itertools.product(args.shapes.split(","), args.locals.split(",")):
        hidden, experts, top_k, inter, local, w13, w2 = layer(shape, local_share)
        gate, up = w13.chunk(2, dim=1)
        key = kernel.shape_key(local, inter, hidden, top_k)
        for tokens in map(int, args.tokens.split(",")):
            routes = routings(tokens, experts, top_k, seed=tokens)
            xs = [torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16) for _ in routes]
            sorts = [im.expert_sort(ids, (0, local)) for _, ids in routes]
            n = tokens * top_k
            live = sum(live_ids(ids, 0, local).numel() for _, ids in routes) / len(routes)
            a = torch.empty(n, inter, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(n, hidden, device="cuda", dtype=torch.bfloat16)
            best = {}
            for which in ("up", "down"):
                timed = {}
                for tile in TILES[which]:
                    if live <= PAIRS_MAX and tile.block_m > 16:  # decode: a pair's row is a block of its own
                        continue
                    if which == "up":
                        fns = [
                            lambda x=x, s=s, t=tile: kernel.up(x, gate, up, s[0], s[1], a, "silu", top_k, t)
                            for x, s in zip(xs, sorts)
                        ]
                    else:
                        fns = [lambda s=s, t=tile: kernel.down(a, w2, s[1], y, t) for s in sorts]
                    try:
                        timed[tile] = timing.graph_us(fns)
                    except Exception as e:  # a tile past the shared memory of this device
                        print(f"  {which} {tile}: {type(e).__name__}", flush=True)
                best[which] = min(timed, key=timed.get)
                print(shape, tokens, which, best[which], f"{timed[best[which]]:.1f} us", flush=True)
            # end to end: the heuristic's tiles, the tuned ones, and torch's grouped GEMMs on the same sort
            paths = {
                "heuristic": kernel.heuristic_config(tokens, local, top_k, torch.bfloat16),
                "triton": kernel.Config(best["up"], best["down"]),
                "grouped_mm": kernel.Config(best["up"], best["down"], "grouped_mm"),
            }
            if live <= PAIRS_MAX:  # decode: a row block a pair, without the grouping kernel (and the combine's)
                for path in ("pairs", "pairs_combine"):
                    paths[path] = kernel.Config(best["up"], best["down"], path)
            for row, block_h in _DECODE_FUSED:  # both GEMMs in one kernel: its own tiles
                for tma in (False, True):
                    cfg = kernel.Config(kernel.Tile(*row, tma=tma), kernel.Tile(16, block_h, 64), "decode")
                    if kernel.decode_fits(n, inter, hidden, cfg):
                        paths[f"decode {row} {block_h}{' tma' if tma else ''}"] = cfg
            end_to_end = {}
            for label, cfg in paths.items():
                fns = [
                    lambda x=x, w=w, ids=ids, c=cfg: run_kernels(x, w13, w2, w, ids, "silu", 0, False, None, tiles=c)
                    for x, (w, ids) in zip(xs, routes)
                ]
                try:
                    end_to_end[label] = timing.graph_us(fns)
                except Exception as e:  # a tile past the shared memory of this device
                    print(f"  {label}: {type(e).__name__}", flush=True)
                    continue
                print(f"  {label}: {end_to_end[label]:.1f} us", flush=True)
            fastest = paths[min((label for label in end_to_end if label != "heuristic"), key=end_to_end.get)]
            entry = {"up": dataclasses.asdict(fastest.up), "down": dataclasses.asdict(fastest.down)}
            if fastest.path != "triton":
                entry["path"] = fastest.path
            entries.setdefault(key, {})[str(kernel.token_bucket(tokens))] = entry
            kernel.CONFIGS.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")  # point by point


def kernel_bytes(routes, local, hidden, inter) -> dict[str, float]:
    """Mean bytes each GEMM and the combine move a call (bf16), by kernel name: the distinct live experts'
    weights, the rows they read and write (the gathered hidden rows counted once a pair, though mostly L2 hits),
    the combine's rows (moe_combine's JIT CUDA kernel is ``inductor_moe_kernel``)."""
    out = {"fused_up_kernel": 0.0, "fused_down_kernel": 0.0, "inductor_moe_kernel": 0.0}
    for _, ids in routes:
        live = live_ids(ids, 0, local)
        experts, pairs = live.unique().numel(), live.numel()
        out["fused_up_kernel"] += 2 * (experts * 2 * inter * hidden + pairs * (hidden + inter))
        out["fused_down_kernel"] += 2 * (experts * hidden * inter + pairs * (inter + hidden))
        out["inductor_moe_kernel"] += 2 * (pairs * hidden + ids.shape[0] * hidden)
    out["fused_decode_kernel"] = out["fused_up_kernel"] + out["fused_down_kernel"]  # both GEMMs in one
    return {name: b / len(routes) for name, b in out.items()}


@functools.cache
def _stream_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def stream(w_ptr, experts_ptr, out_ptr, expert_elems, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """Program (i, c): sum chunk c of expert experts[i]'s weights (read, nothing else)."""
        e = tl.load(experts_ptr + tl.program_id(0)).to(tl.int64)
        base = w_ptr + e * expert_elems + tl.program_id(1).to(tl.int64) * CHUNK
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, CHUNK, BLOCK):
            acc += tl.load(base + i + tl.arange(0, BLOCK)).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(acc, 0))

    return stream


def read_floor_us(w, routes, local) -> float:
    """µs a read-only kernel takes to stream the distinct live experts' slices of ``w`` (contiguous [E, ...]),
    the fastest of a few chunk sizes: what reading those bytes costs a kernel of this size, ramp and tail
    included, where the copy rate is a 1 GiB stream's."""
    stream = _stream_kernel()
    per_expert = w[0].numel()
    lists = [live_ids(ids, 0, local).unique().to(torch.int32) for _, ids in routes]
    best = float("inf")
    for chunk in (1 << 15, 1 << 16, 1 << 17, 1 << 18):
        if per_expert % chunk:
            continue
        outs = [torch.empty(len(e), per_expert // chunk, device="cuda") for e in lists]
        fns = [  # a routing with no live expert reads nothing
            lambda e=e, o=o: (
                stream[(len(e), per_expert // chunk)](w, e, o, per_expert, CHUNK=chunk, BLOCK=2048) if len(e) else None
            )
            for e, o in zip(lists, outs)
        ]
        best = min(best, timing.graph_us(fns))
    return best


def profile(args):
    """fused_experts at each point, kernel by kernel: each kernel's median µs in a CUDA graph cycling through the
    routings, the gap before it, and for the GEMMs and the combine the bytes they move over that time as a share
    of the copy rate; the span of a call; and the read floor of each GEMM's weights (:func:`read_floor_us`).
    With PDL a kernel starts before the one it waits for ends, so run it with INDUCTOR_MOE_PDL=0 for each kernel's
    own time (the benchmark's table times the op with PDL)."""
    from profile_moe_block import profile as profile_graph

    copy_gbs = timing.report_copy_bandwidth()
    for shape, local_share in itertools.product(args.shapes.split(","), args.locals.split(",")):
        hidden, experts, top_k, inter, local, w13, w2 = layer(shape, local_share)
        for tokens in map(int, args.tokens.split(",")):
            routes = routings(tokens, experts, top_k, seed=tokens)
            xs = [torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16) for _ in routes]
            fns = calls(lambda x, w, ids: im.fused_experts(x, w13, w2, w, ids, "silu", (0, local)), xs, routes)
            step = itertools.count()
            rows, span = profile_graph(lambda: fns[next(step) % len(fns)]())
            moved = kernel_bytes(routes, local, hidden, inter)
            print(f"\n{shape} {local_share} T={tokens}: {span:.1f} us a call; kernel µs, gap before it")
            for name, us, gap in rows:
                nbytes = moved.get(name)
                note = f"  {nbytes / 1e6:.1f} MB, {nbytes / (us * 1e3) / copy_gbs:.0%} of copy" if nbytes else ""
                print(f"  {name[:60]:<60} {us:8.1f} {gap:6.1f}{note}")
            if tokens:
                floors = [read_floor_us(w, routes, local) for w in (w13, w2)]
                print(f"  read floor of the weights: up {floors[0]:.1f} us, down {floors[1]:.1f} us")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="qwen3,mixtral")
    parser.add_argument("--tokens", default="1,16,256,2048")
    parser.add_argument("--locals", default="all,1/8", help="local experts: all, 1/8 or both")
    parser.add_argument(
        "--autotune", default="", help="'all' or the T (comma-separated) at which to also time stock max-autotune"
    )
    parser.add_argument("--tune", action="store_true", help="tune the tile configs instead of benchmarking")
    parser.add_argument("--profile", action="store_true", help="fused_experts kernel by kernel instead")
    args = timing.cli(parser)
    timing.header()
    if args.tune or args.profile:
        (tune if args.tune else profile)(args)
        return
    bench(args, *floor_rates())


if __name__ == "__main__":
    main()
