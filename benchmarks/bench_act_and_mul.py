"""Gated activation: eager PyTorch vs default torch.compile vs inductor_moe, side by side in one run.

    python benchmarks/bench_act_and_mul.py            # full table (device machine)
    python benchmarks/bench_act_and_mul.py --quick    # a few shapes

µs per call inside a CUDA graph (benchmarks/timing.py), the columns of a row timed in rotated order (median of
three rounds, timing.interleaved_us), GB/s counting the bytes the op must move (read
gate+up, write out) and that as % of the device-to-device copy rate measured in the same run. Default
torch.compile gets one static compiled function per shape (fullgraph, no fallback to eager).
Also: the filtered kernel at several dead fractions (dead rows at random, and sorted last as the runner
sorts them), host cost per eager call, and JIT compile times.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import inductor_moe as im  # noqa: E402

import timing  # noqa: E402

ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def eager_act_and_mul(activation):
    act = ACT_FNS[activation]

    def f(x):
        d = x.shape[-1] // 2
        return act(x[..., :d]) * x[..., d:]

    return f


def eager_masked(x, ids):
    d = x.shape[-1] // 2
    return torch.where((ids >= 0).unsqueeze(-1), F.silu(x[..., :d]) * x[..., d:], 0.0)


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, fullgraph=True)


def inputs(t, d, dtype, sets):
    return [torch.randn(t, 2 * d, device="cuda", dtype=dtype) for _ in range(sets)]


def bench_unfiltered(shapes, activations, dtype, copy_gbs):
    rows = []
    ours_us = {}
    for activation in activations:
        for t, d in shapes:
            nbytes = 3 * t * d * dtype.itemsize
            xs = inputs(t, d, dtype, timing.buffer_sets(nbytes))
            eager = eager_act_and_mul(activation)
            comp = compiled(eager)
            us = timing.interleaved_us(
                {
                    "eager": [lambda x=x: eager(x) for x in xs],
                    "compile": [lambda x=x, c=comp: c(x) for x in xs],
                    "ours": [lambda x=x: im.act_and_mul(activation, x) for x in xs],
                },
                timing.graph_us,
            )
            us_eager, us_comp, us_ours = us["eager"], us["compile"], us["ours"]
            ours_us[(activation, t, d)] = us_ours
            gbs = nbytes / (us_ours * 1e-6) / 1e9
            rows.append(
                [
                    activation,
                    f"{t}×{d}",
                    f"{us_eager:.2f}",
                    f"{us_comp:.2f}",
                    f"**{us_ours:.2f}**",
                    f"{us_comp / us_ours:.2f}×",
                    f"{gbs:.0f}",
                    f"{100 * gbs / copy_gbs:.0f}%",
                ]
            )
            del xs, comp
    timing.table(
        f"Unfiltered, {dtype}, µs per call in a CUDA graph",
        ["act", "T×d", "eager", "torch.compile", "inductor_moe", "speedup vs compile", "GB/s", "% of copy"],
        rows,
    )
    return ours_us


def bench_filtered(shapes, cases, dtype, unfiltered_us):
    """``cases``: (dead fraction, layout), layout "random" or "last" (dead rows after the live ones, as the
    runner sorts them). Besides the issue's yardstick (unfiltered time × live fraction), each row times the
    unfiltered kernel over the live rows alone: what a kernel handed only those rows costs, its launch and
    tail included, which the yardstick leaves out."""
    rows = []
    for t, d in shapes:
        nbytes = 3 * t * d * dtype.itemsize
        sets = timing.buffer_sets(nbytes)
        xs = inputs(t, d, dtype, sets)
        outs = [torch.empty(t, d, device="cuda", dtype=dtype) for _ in range(sets)]
        comp = compiled(eager_masked)
        base = unfiltered_us[("silu", t, d)]
        for frac, layout in cases:
            dead = torch.rand(t, device="cuda") < frac
            if layout == "last":
                dead = torch.arange(t, device="cuda") >= t - int(dead.sum())
            ids = torch.where(dead, -1, torch.randint(0, 8, (t,), device="cuda")).to(torch.int32)
            n_live = int((~dead).sum())
            live = n_live / t
            calls = {
                "eager": [lambda x=x: eager_masked(x, ids) for x in xs],
                "compile": [lambda x=x, c=comp: c(x, ids) for x in xs],
                "zero": [lambda x=x: im.silu_and_mul(x, expert_ids=ids) for x in xs],
                "keep": [lambda x=x, o=o: im.silu_and_mul(x, out=o, expert_ids=ids) for x, o in zip(xs, outs)],
            }
            if n_live:
                calls["alone"] = [
                    lambda x=x[:n_live], o=o[:n_live]: im.silu_and_mul(x, out=o) for x, o in zip(xs, outs)
                ]
            us = timing.interleaved_us(calls, timing.graph_us)
            keep, alone = us["keep"], us.get("alone")
            rows.append(
                [
                    f"{t}×{d}",
                    f"{frac:.3f}" + (" (sorted last)" if layout == "last" else ""),
                    f"{us['eager']:.2f}",
                    f"{us['compile']:.2f}",
                    f"{us['zero']:.2f}",
                    f"**{keep:.2f}**",
                    f"{base * live:.2f}",
                    f"{keep / (base * live):.2f}" if n_live else "-",
                    f"{alone:.2f}" if n_live else "-",
                    f"{keep / alone:.2f}" if n_live else "-",
                ]
            )
        del xs, outs, comp
    timing.table(
        f"Filtered silu (per-row ids, -1 = dead), {dtype}, µs per call in a CUDA graph",
        [
            "T×d",
            "dead",
            "eager where",
            "torch.compile where",
            "ours zero mode",
            "ours untouched",
            "unfiltered × live",
            "untouched / (unfiltered × live)",
            "unfiltered, live rows alone",
            "untouched / live rows alone",
        ],
        rows,
    )


def bench_host_cost(dtype, calls=2000):
    """Host time per eager call, back to back: the GPU work is ~2 µs, so the CPU side sets the pace."""
    x = torch.randn(1, 2 * 2048, device="cuda", dtype=dtype)
    op = torch.ops.inductor_moe.act_and_mul.default
    eager = eager_act_and_mul("silu")
    cases = {
        "torch.ops.inductor_moe.act_and_mul": lambda: op(x, "silu", None, 1, 0, 2**31 - 1),
        "inductor_moe.silu_and_mul": lambda: im.silu_and_mul(x),
        "eager F.silu(g) * u (3 ops)": lambda: eager(x),
        "torch.ops.aten.alias (dispatch only, no kernel: this VM's floor)": lambda: torch.ops.aten.alias.default(x),
    }
    rows = []
    for name, fn in cases.items():
        for _ in range(100):
            fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - start) / calls * 1e6)
            torch.cuda.synchronize()
        rows.append([name, f"{best:.2f}"])
    timing.table("Host cost per eager call (1×2048, best of 5 loops)", ["call", "µs"], rows)


_JIT_PROBE = textwrap.dedent(
    """
    import time, torch
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    ids = torch.zeros(4, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    import inductor_moe as im
    t1 = time.perf_counter()
    im.load_cuda_kernels()
    t2 = time.perf_counter()
    im.silu_and_mul(x); torch.cuda.synchronize()
    t3 = time.perf_counter()
    im.gelu_and_mul(x, expert_ids=ids); torch.cuda.synchronize()
    t4 = time.perf_counter()
    print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f} {t4 - t3:.3f}")
    """
)


def bench_jit():
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, INDUCTOR_MOE_CACHE_DIR=cache)
        rows = []
        for label in ("cold (empty cache)", "warm (disk cache, new process)"):
            out = subprocess.run([sys.executable, "-c", _JIT_PROBE], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            rows.append([label, *out.stdout.split()])
    timing.table(
        "JIT: seconds for `import inductor_moe`, loading the host glue, then the first call of two variants",
        ["cache", "import", "host glue", "1st variant (bf16 silu)", "2nd variant (bf16 gelu, int32 ids)"],
        rows,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=["unfiltered", "filtered", "host", "jit"])
    parser.add_argument("--shapes", nargs="*", help="unfiltered shapes as TxD, e.g. 8192x14336")
    parser.add_argument("--acts", nargs="*", choices=list(ACT_FNS), help="activations of the unfiltered table")
    args = timing.cli(parser)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    timing.header()
    copy_gbs = timing.report_copy_bandwidth()
    if args.quick:
        shapes, activations = [(1, 2048), (64, 14336), (8192, 2048)], ["silu"]
        filt_shapes, filt_cases = [(8192, 2048)], [(0.0, "random"), (0.5, "random")]
    else:
        shapes = [(t, d) for t in (1, 64, 1024, 8192) for d in (768, 2048, 14336)]
        activations = list(ACT_FNS)
        filt_shapes = [(4096, 2048), (8192, 14336)]
        filt_cases = [(0.0, "random"), (0.25, "random"), (0.5, "random"), (0.875, "random"), (0.875, "last")]
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    if args.acts:
        activations = args.acts
    if "jit" not in args.skip:
        bench_jit()
    if "host" not in args.skip:
        bench_host_cost(dtype)
    unfiltered = {}
    if "unfiltered" not in args.skip:
        unfiltered = bench_unfiltered(shapes, activations, dtype, copy_gbs)
    if "filtered" not in args.skip:
        missing = [(t, d) for t, d in filt_shapes if ("silu", t, d) not in unfiltered]
        if missing:
            unfiltered.update(bench_unfiltered(missing, ["silu"], dtype, copy_gbs))
        bench_filtered(filt_shapes, filt_cases, dtype, unfiltered)


if __name__ == "__main__":
    main()
