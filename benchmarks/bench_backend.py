"""A MoE block's pointwise tail compiled with the stock backend and with inductor_moe, side by side.

    python benchmarks/bench_backend.py

The function (inductor_moe/testing.py's moe_tail at model sizes): the gated activation of the up
projection's output with an expert-parallel mask (where(ids == -1, 0, silu(gate) * up)), the packing of top-k
ids and weights, and the weighted combine of the expert outputs (view * w, sum over k, cast back). Qwen3-30B-A3B
sizes: top-8, expert intermediate 768, hidden 2048. µs per call inside a CUDA graph (benchmarks/timing.py),
with no row dead and with 7/8 of the rows dead (expert parallelism over 8 ranks); the columns of a row timed
in rotated order (median of three rounds, timing.interleaved_us).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import inductor_moe  # noqa: E402, F401  (the ops; the backend itself is found by name)
from inductor_moe.testing import moe_tail  # noqa: E402

import timing  # noqa: E402

K, I, H = 8, 768, 2048


def main():
    torch.manual_seed(0)
    timing.cli()
    timing.header()
    rows = []
    for t in (1, 16, 256, 4096):
        for dead in (0.0, 0.875):
            nbytes = t * K * (2 * I + I + 2 * H) * 2
            sets = timing.buffer_sets(nbytes)
            args = []
            for _ in range(sets):
                row_ids = torch.randint(0, 16, (t * K,), device="cuda")
                row_ids = torch.where(torch.rand(t * K, device="cuda") < dead, -1, row_ids)
                args.append(
                    (
                        torch.randn(t * K, 2 * I, device="cuda", dtype=torch.bfloat16),
                        row_ids,
                        torch.randint(0, 128, (t, K), device="cuda"),
                        torch.rand(t, K, device="cuda"),
                        torch.randn(t * K, H, device="cuda", dtype=torch.bfloat16),
                    )
                )
            torch._dynamo.reset()  # both backends' compiles then share dynamo's cache, guarded by backend
            calls = {}
            for name in ("eager", "inductor", "inductor_moe"):
                fn = moe_tail if name == "eager" else torch.compile(moe_tail, backend=name, dynamic=False)
                calls[name] = [lambda a=a, fn=fn: fn(*a) for a in args]
            times = timing.interleaved_us(calls, timing.graph_us)
            ratio = times["inductor_moe"] / times["inductor"]
            rows.append([f"{t}", f"{dead:.3f}", *(f"{times[n]:.2f}" for n in times), f"**{ratio:.2f}**"])
    timing.table(
        "MoE tail (gated act with EP mask + packing + combine), bf16, µs per call in a CUDA graph",
        ["T", "dead rows", "eager", "inductor", "inductor_moe", "inductor_moe / inductor"],
        rows,
    )


if __name__ == "__main__":
    main()
