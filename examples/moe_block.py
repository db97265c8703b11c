"""Demo: plain-PyTorch MoE blocks compiled with the stock backend and with inductor_moe.

    python examples/moe_block.py

For each block of inductor_moe/testing.py (a loop over experts; a grouped-GEMM block with expert parallelism)
it prints which rewrites fired (``inductor_moe.explain``), the largest difference from eager of each compiled
version and of our MoE runner called directly (``inductor_moe.moe.moe``), and the time of each. On a GPU it
uses Qwen3-30B-A3B-like sizes; on a CPU-only machine it uses small ones and rewrites CPU graphs too
(INDUCTOR_MOE_DEVICES=cpu,cuda), where the ops run their reference and the timings mean little.
"""

from __future__ import annotations

import contextlib
import time

import torch

import inductor_moe as im
from inductor_moe.testing import GroupedMoE, LoopMoE

CUDA = torch.cuda.is_available()
# tokens, hidden, expert intermediate, experts, top-k; expert parallelism: this rank owns 1/8 of the experts
TOKENS, HIDDEN, INTER, EXPERTS, TOP_K = (256, 2048, 768, 128, 8) if CUDA else (32, 128, 64, 8, 2)


def timed(fn, *args, repeats: int = 10) -> float:
    """ms per call, after a warm-up call."""
    fn(*args)
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    if CUDA:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if CUDA else "cpu"
    print(f"inductor_moe {im.__version__}, torch {torch.__version__}, device {device}")
    if not CUDA:
        print("no GPU: rewriting CPU graphs too; the ops run their plain-PyTorch reference, so timings mean little")
    x = torch.randn(TOKENS, HIDDEN, device=device, dtype=torch.bfloat16)
    logits = torch.randn(TOKENS, EXPERTS, device=device)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, device=device) / HIDDEN**0.5).to(torch.bfloat16)
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, device=device) / INTER**0.5).to(torch.bfloat16)
    local = (0, EXPERTS // 8)
    blocks = {
        "loop over experts": (LoopMoE(w13, w2, TOP_K), None),
        f"grouped GEMMs, local experts [{local[0]}, {local[1]})": (
            GroupedMoE(w13[local[0] : local[1]], w2[local[0] : local[1]], TOP_K, local),
            local,
        ),
    }
    settings = contextlib.nullcontext() if CUDA else im.config.override(devices="cpu,cuda")
    # torch.where(ids == e) has a data-dependent size: captured, the loop block is one graph (otherwise the
    # graph break inside the loop leaves the whole forward to eager)
    capture = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
    with settings, capture, torch.no_grad():
        for name, (block, expert_range) in blocks.items():
            print(f"\n== {name}: T={TOKENS}, H={HIDDEN}, I={INTER}, E={EXPERTS}, top-{TOP_K}")
            print(im.explain(block, x, logits))
            eager = block(x, logits)
            weights = (block.w13, block.w2)
            runs = {
                "eager": block,
                "inductor": torch.compile(block, backend="inductor"),
                "inductor_moe": torch.compile(block, backend="inductor_moe"),
                "runner": lambda x, logits: im.moe.moe(x, logits, *weights, TOP_K, expert_range=expert_range),
            }
            for label, fn in runs.items():
                out = fn(x, logits)
                err = (out.float() - eager.float()).abs().max().item()
                print(f"  {label:<13} max |out - eager| {err:.4f}   {timed(fn, x, logits):8.3f} ms")


if __name__ == "__main__":
    main()
