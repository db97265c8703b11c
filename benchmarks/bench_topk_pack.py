"""Top-k id/weight packing: eager PyTorch vs default torch.compile vs inductor_moe (Triton + PDL).

    python benchmarks/bench_topk_pack.py

µs per kernel inside a CUDA graph (benchmarks/timing.py), the columns of a row timed in rotated order (median
of three rounds, timing.interleaved_us), at K=8: 32 independent launches on one input, and a
chain of 32 dependent launches (each packs the previous one's output as its ids), with and without PDL.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import inductor_moe as im  # noqa: E402
from inductor_moe import reference  # noqa: E402

import timing  # noqa: E402

K = 8


def with_pdl(pdl: bool, fn):
    os.environ["INDUCTOR_MOE_PDL"] = "1" if pdl else "0"  # read at launch, so at capture
    try:
        return fn()
    finally:
        os.environ.pop("INDUCTOR_MOE_PDL")


def main():
    torch.manual_seed(0)
    timing.cli()
    timing.header()
    rows = []
    for t in (1, 64, 1024, 8192):
        ids = torch.randint(0, 256, (t, K), device="cuda", dtype=torch.int32)
        w = torch.rand(t, K, device="cuda")
        eager = reference.pack_topk_ids_weights_ref
        torch._dynamo.reset()
        comp = torch.compile(eager, dynamic=False, fullgraph=True)

        def chain():
            x = ids
            for _ in range(32):
                x = im.pack_topk_ids_weights(x, w)

        def ours(pdl):
            return with_pdl(pdl, lambda: timing.graph_us([lambda: im.pack_topk_ids_weights(ids, w)]))

        def ours_chain(pdl):
            return with_pdl(pdl, lambda: timing.graph_us([chain]) / 32)

        # each call returns its own µs, so the timer only runs it
        us = timing.interleaved_us(
            {
                "eager": lambda: timing.graph_us([lambda: eager(ids, w)]),
                "compile": lambda: timing.graph_us([lambda: comp(ids, w)]),
                "ours pdl=False": lambda: ours(False),
                "chain pdl=False": lambda: ours_chain(False),
                "ours pdl=True": lambda: ours(True),
                "chain pdl=True": lambda: ours_chain(True),
            },
            lambda measure: measure(),
        )
        rows.append([f"{t}×{K}"] + [f"{v:.2f}" for v in us.values()])
    timing.table(
        "pack_topk_ids_weights, int32 ids + fp32 weights -> int32, µs per kernel in a CUDA graph",
        [
            "T×K",
            "eager",
            "torch.compile",
            "ours, PDL off",
            "ours chain of 32, PDL off",
            "ours, PDL on",
            "ours chain of 32, PDL on",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
