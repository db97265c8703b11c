"""Routing after the router's GEMM: eager PyTorch vs default torch.compile vs the ``route`` op (one Triton kernel).

    python benchmarks/bench_route.py

transformers' Qwen3-MoE router (E=128, K=8: fp32 softmax, top-k, renormalisation, cast to bf16) and DeepSeek-V3's
(E=256, K=8: sigmoid, correction bias, 8 groups of which the best 4 are eligible, top-k, gather, renormalisation,
scaling), from bf16 / fp32 logits as those models compute them. µs per call inside a CUDA graph of 4 different
logits (benchmarks/timing.py), the columns of a row timed in rotated order (median of three rounds).
``--sweep`` times the kernel alone at every (tokens a program, warps) instead, against its launch_config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import inductor_moe as im  # noqa: E402
from inductor_moe.kernels.triton import route as kernel  # noqa: E402
from inductor_moe.testing import grouped_sigmoid_router, softmax_router  # noqa: E402

import timing  # noqa: E402

ROUTERS = {
    # name: (experts, logits dtype, the model's spelling, the op's arguments after top_k)
    "qwen3": (128, torch.bfloat16, lambda x, b: softmax_router(x, 8), ("softmax", True, None, 1, 1, 0.0, 1.0)),
    "deepseek_v3": (
        256,
        torch.float32,
        lambda x, b: grouped_sigmoid_router(x, b, 8, 8, 4, 2.5),
        ("sigmoid", True, "bias", 8, 4, 1e-20, 2.5),
    ),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--routers", default="qwen3,deepseek_v3")
    parser.add_argument("--tokens", default="1,16,256,4096")
    parser.add_argument("--sweep", action="store_true", help="time every (tokens a program, warps) instead")
    args = timing.cli(parser)
    timing.header()
    if args.sweep:
        return sweep(args)
    rows = []
    for name in args.routers.split(","):
        experts, dtype, spelling, op_args = ROUTERS[name]
        bias = torch.randn(experts, device="cuda") / 10
        op_args = tuple(bias if a == "bias" else a for a in op_args)
        weights_dtype = dtype if name == "qwen3" else None
        torch._dynamo.reset()
        compiled = torch.compile(spelling, dynamic=False, fullgraph=True)
        for tokens in map(int, args.tokens.split(",")):
            xs = [torch.randn(tokens, experts, device="cuda").to(dtype) for _ in range(4)]
            want = [spelling(x, bias) for x in xs]
            got = [im.route(x, 8, *op_args, weights_dtype=weights_dtype) for x in xs]
            for x, (w, i), (gw, gi) in zip(xs, want, got):
                # the same choice up to ties (torch.topk's order among equal values is its own): the chosen
                # experts' ranking values alike, the weights alike as sorted sets
                rank = x.float() if name == "qwen3" else x.float().sigmoid() + bias
                assert torch.equal(rank.gather(1, gi).sort(-1).values, rank.gather(1, i).sort(-1).values), name
                torch.testing.assert_close(gw.float().sort(-1).values, w.float().sort(-1).values, rtol=1e-2, atol=1e-6)
            us = timing.interleaved_us(
                {
                    "eager": [lambda x=x: spelling(x, bias) for x in xs],
                    "inductor": [lambda x=x: compiled(x, bias) for x in xs],
                    "route": [lambda x=x: im.route(x, 8, *op_args, weights_dtype=weights_dtype) for x in xs],
                },
                timing.graph_us,
            )
            rows.append([name, tokens, *(f"{v:.2f}" for v in us.values()), f"**{us['route'] / us['inductor']:.2f}**"])
            print(rows[-1], flush=True)
    timing.table(
        "Routing after the router GEMM, µs per call in a CUDA graph of 4 logits",
        ["router", "T", "eager", "inductor", "route", "route / inductor"],
        rows,
    )


def sweep(args):
    rows = []
    for name in args.routers.split(","):
        experts, dtype, _, (scoring, renormalize, bias, n_group, topk_group, eps, scaling) = ROUTERS[name]
        bias = torch.randn(experts, device="cuda") / 10 if bias == "bias" else None
        for tokens in map(int, args.tokens.split(",")):
            xs = [torch.randn(tokens, experts, device="cuda").to(dtype) for _ in range(4)]
            weights = torch.empty(tokens, 8, device="cuda")
            ids = torch.empty(tokens, 8, device="cuda", dtype=torch.int64)
            lanes = max(experts, 32)
            blocks = [(b, w) for b in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8) if b * lanes <= 8192 and b <= tokens]
            us = {}
            for block in blocks:
                fns = [
                    lambda x=x, block=block: kernel.route(
                        x, bias, weights, ids, scoring, renormalize, n_group, topk_group, eps, scaling, block
                    )
                    for x in xs
                ]
                us[block] = timing.graph_us(fns)
            best = min(us, key=us.get)
            default = kernel.launch_config(tokens, experts)
            rows.append([name, tokens, f"{best} {us[best]:.2f}", f"{default} {us[default]:.2f}"])
            print(rows[-1], {str(b): round(v, 2) for b, v in us.items()}, flush=True)
    timing.table(
        "route kernel by (tokens a program, warps), µs in a CUDA graph of 4 logits",
        ["router", "T", "fastest", "launch_config"],
        rows,
    )


if __name__ == "__main__":
    main()
