"""Weighted top-k combine: eager PyTorch vs default torch.compile vs inductor_moe (JIT CUDA).

    python benchmarks/bench_combine.py

out[t] = sum_k w[t, k] * expert_out[t * K + k] with fp32 accumulation, K=8, H=7168, bf16 expert outputs and
fp32 weights; µs per call inside a CUDA graph (benchmarks/timing.py), the columns of a row timed in rotated
order (median of three rounds, timing.interleaved_us), GB/s over the bytes the op must move.
Also with the expert filter at half of the pairs dead: only the live rows are read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import inductor_moe as im  # noqa: E402

import timing  # noqa: E402

K, H = 8, 7168


def eager_combine(expert_out, w):
    t = w.shape[0]
    return (expert_out.view(t, K, H).float() * w.unsqueeze(-1)).sum(1).to(expert_out.dtype)


def eager_masked(expert_out, w, ids):
    return eager_combine(expert_out, torch.where(ids >= 0, w, 0.0))


def eager_bmm(expert_out, w):
    t = w.shape[0]
    return torch.bmm(w.to(expert_out.dtype).unsqueeze(1), expert_out.view(t, K, H)).squeeze(1)


def main():
    torch.manual_seed(0)
    timing.cli()
    timing.header()
    copy_gbs = timing.report_copy_bandwidth()
    rows = []
    for t in (1, 64, 1024, 8192):
        nbytes = (t * K * H + t * H) * 2
        sets = timing.buffer_sets(nbytes)
        eos = [torch.randn(t * K, H, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        w = torch.rand(t, K, device="cuda")
        ids = torch.where(torch.rand(t, K, device="cuda") < 0.5, -1, 0).to(torch.int32)
        torch._dynamo.reset()
        comp = torch.compile(eager_combine, dynamic=False, fullgraph=True)
        comp_masked = torch.compile(eager_masked, dynamic=False, fullgraph=True)
        us = timing.interleaved_us(
            {
                "eager": [lambda e=e: eager_combine(e, w) for e in eos],
                "bmm": [lambda e=e: eager_bmm(e, w) for e in eos],
                "compile": [lambda e=e: comp(e, w) for e in eos],
                "ours": [lambda e=e: im.moe_combine(e, w) for e in eos],
                "compile half dead": [lambda e=e: comp_masked(e, w, ids) for e in eos],
                "ours half dead": [lambda e=e: im.moe_combine(e, w, ids) for e in eos],
            },
            timing.graph_us,
        )
        us_eager, us_bmm, us_comp, us_ours = us["eager"], us["bmm"], us["compile"], us["ours"]
        us_comp_f, us_ours_f = us["compile half dead"], us["ours half dead"]
        gbs = nbytes / (us_ours * 1e-6) / 1e9
        rows.append(
            [
                f"{t}×{K}×{H}",
                f"{us_eager:.2f}",
                f"{us_bmm:.2f}",
                f"{us_comp:.2f}",
                f"**{us_ours:.2f}**",
                f"{gbs:.0f} ({100 * gbs / copy_gbs:.0f}%)",
                f"{us_comp_f:.2f}",
                f"**{us_ours_f:.2f}**",
                f"{us_ours_f / us_ours:.2f}",
            ]
        )
        del eos
    timing.table(
        "moe_combine, bf16 expert_out, fp32 weights, µs per call in a CUDA graph",
        [
            "T×K×H",
            "eager view·mul·sum",
            "eager bmm",
            "torch.compile",
            "ours",
            "ours GB/s (% copy)",
            "torch.compile, half dead",
            "ours, half dead",
            "half dead / all live",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
