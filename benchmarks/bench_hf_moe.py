"""transformers' own MoE blocks, unmodified, at their real sizes: eager, stock torch.compile and inductor_moe.

    python benchmarks/bench_hf_moe.py [--models qwen3,mixtral] [--impls grouped_mm,batched_mm]
        [--tokens 1,16,256,2048] [--autotune all|16,256] [--profile]

Blocks: ``Qwen3MoeSparseMoeBlock`` (Qwen3-30B-A3B: hidden 2048, 128 experts, top-8, intermediate 768, top-k
renormalised) and ``MixtralSparseMoeBlock`` (Mixtral-8x7B: hidden 4096, 8 experts, top-2, intermediate 14336),
bf16, weights N(0, 0.02), each with transformers' ``grouped_mm`` and ``batched_mm`` experts implementations
(``config._experts_implementation``; ``generate`` switches to batched_mm for decoding). Columns, each the whole
block from hidden states to output, router included:

- floor: the distinct routed experts' weight bytes over the copy rate, or their FLOPs over a bf16 GEMM's rate,
  whichever is larger (both measured in this run), as bench_fused_experts.py computes it;
- eager; inductor: ``torch.compile`` (default mode; with ``--autotune`` also ``max-autotune-no-cudagraphs`` at
  the T listed); inductor_moe: ``backend="inductor_moe"``, which rewrites the expert computation into
  ``fused_experts`` and the router's top-k into ``route``; inductor_moe −route: the same without the route
  family (what the router costs stock).

Four inputs per CUDA graph (the replay cycles through them), so each call routes differently and streams its
experts' weights from HBM. Each compile is checked to give eager's output within bf16 rounding. ``--profile``:
each block under inductor and inductor_moe kernel by kernel instead (profile_moe_block.py's profiler).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_fused_experts import floor_rates, floor_us  # noqa: E402

from inductor_moe import config  # noqa: E402

import timing  # noqa: E402

INPUTS = 4
# batched_mm copies every routed pair's expert weights (Mixtral: 352 MB a pair): points that would copy more
# than this are not run
MAX_COPY_BYTES = 16 << 30


def block(model: str, impl: str):
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    if model == "qwen3":
        cfg = transformers.Qwen3MoeConfig(
            hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True
        )
        cls = Qwen3MoeSparseMoeBlock
    else:
        cfg = transformers.MixtralConfig(
            hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2
        )
        cls = MixtralSparseMoeBlock
    cfg._experts_implementation = impl
    with torch.device("cuda"):
        module = cls(cfg).to(torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, device="cuda", generator=gen) * 0.02)
    return module, cfg


def routes_of(module, xs):
    """The (weights, ids) the block's router gives each input, for the floor."""
    with torch.no_grad():
        return [module.gate(x.view(-1, x.shape[-1]))[1:] for x in xs]


def bench(args, copy_gbs, tflops):
    tokens_list = list(map(int, args.tokens.split(",")))
    autotune_at = set(tokens_list) if args.autotune == "all" else {int(t) for t in args.autotune.split(",") if t}
    names = ["eager", "inductor", "inductor_moe", "inductor_moe −route"]
    names += ["inductor max-autotune"] if autotune_at else []
    rows = []
    title = "transformers' MoE blocks, bf16, µs per call in a CUDA graph of 4 inputs (x the floor)"
    header = ["model", "experts implementation", "T", "floor", *names, "inductor_moe / inductor"]
    with timing.emitted(title, header, rows):
        for model, impl in itertools.product(args.models.split(","), args.impls.split(",")):
            module, cfg = block(model, impl)
            experts = module.experts
            hidden, inter = cfg.hidden_size, experts.down_proj.shape[-1]
            local = experts.gate_up_proj.shape[0]
            for tokens in tokens_list:
                gen = torch.Generator(device="cuda").manual_seed(tokens)
                copied = tokens * cfg.num_experts_per_tok * 3 * hidden * inter * 2
                if impl == "batched_mm" and copied > MAX_COPY_BYTES:
                    skipped = f"not run (copies {copied / 2**30:.0f} GiB)"
                    rows.append([model, impl, tokens, "", *[skipped] * len(names), ""])
                    continue
                xs = [
                    torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
                    for _ in range(INPUTS)
                ]
                torch._dynamo.reset()
                variants = {
                    "eager": module,
                    "inductor": torch.compile(module, dynamic=False),
                    "inductor_moe": torch.compile(module, backend="inductor_moe", dynamic=False),
                    "inductor_moe −route": without_route(
                        torch.compile(Same(module), backend="inductor_moe", dynamic=False)
                    ),
                }
                if tokens in autotune_at:
                    variants["inductor max-autotune"] = torch.compile(
                        module, dynamic=False, mode="max-autotune-no-cudagraphs"
                    )
                with torch.no_grad():
                    want = module(xs[0]).float().view(tokens, -1)
                    # a token whose k-th and (k+1)-th logits tie may go to either expert (route picks the lower
                    # index, torch.topk's order among equal values is its own): compared on the others
                    ranked = module.gate(xs[0].view(tokens, -1))[0].float().sort(-1, descending=True).values
                    k = cfg.num_experts_per_tok
                    untied = ranked[:, k - 1] != ranked[:, k]
                    for name, fn in variants.items():
                        got = fn(xs[0]).float().view(tokens, -1)
                        diff = (got - want)[untied].abs().max() if untied.any() else got.new_zeros(())
                        err = (diff / want.abs().max().clamp_min(1e-6)).item()
                        assert err < 5e-2, f"{model} {impl} T={tokens} {name}: max rel. diff {err:.1e} to eager"
                    times = timing.interleaved_us(
                        {name: [lambda fn=fn, x=x: fn(x) for x in xs] for name, fn in variants.items()},
                        lambda fns: timing.graph_us(fns),
                    )
                floor = floor_us(routes_of(module, xs), 0, local, hidden, inter, copy_gbs, tflops)
                cols = [f"{times[n]:.1f} ({times[n] / floor:.2f}x)" if n in times else "not run" for n in names]
                rows.append(
                    [model, impl, tokens, f"{floor:.1f}", *cols, f"**{times['inductor_moe'] / times['inductor']:.2f}**"]
                )
                print(rows[-1], flush=True)
            del module, experts
            torch.cuda.empty_cache()


class Same(torch.nn.Module):
    """``module`` behind a forward of its own: torch.compile caches compiled code by the code object it runs, so
    a second compile of ``module`` itself with the same backend would reuse the first one's graph, rewrites and
    all."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def without_route(compiled):
    """``compiled`` called (so compiled, at its first call) with every family but route."""
    families = [f for f in config.FAMILIES if f != "route"]

    def call(x):
        with config.override(families=families):
            return compiled(x)

    return call


def profile(args):
    """Each block under inductor and inductor_moe kernel by kernel: each kernel's median µs in a CUDA graph
    cycling through the inputs, the gap before it, and the span of a call (where the block's time goes beside
    the experts')."""
    from profile_moe_block import profile as profile_graph

    for model, impl in itertools.product(args.models.split(","), args.impls.split(",")):
        module, cfg = block(model, impl)
        for tokens in map(int, args.tokens.split(",")):
            xs = [torch.randn(1, tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16) for _ in range(INPUTS)]
            torch._dynamo.reset()
            for name, backend in (("inductor", "inductor"), ("inductor_moe", "inductor_moe")):
                fn = torch.compile(module, backend=backend, dynamic=False)
                step = itertools.count()
                with torch.no_grad():
                    for x in xs:
                        fn(x)
                    rows, span = profile_graph(lambda fn=fn: fn(xs[next(step) % len(xs)]))
                print(f"\n{model} {impl} T={tokens} {name}: {span:.1f} us a call; kernel µs, gap before it")
                for kernel, us, gap in rows:
                    print(f"  {kernel[:70]:<70} {us:8.1f} {gap:6.1f}")
        del module
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="qwen3,mixtral")
    parser.add_argument("--impls", default="grouped_mm,batched_mm")
    parser.add_argument("--tokens", default="1,16,256,2048")
    parser.add_argument(
        "--autotune", default="", help="'all' or the T (comma-separated) at which to also time stock max-autotune"
    )
    parser.add_argument("--profile", action="store_true", help="each block kernel by kernel instead")
    args = timing.cli(parser)
    timing.header()
    if args.profile:
        profile(args)
        return
    bench(args, *floor_rates())


if __name__ == "__main__":
    main()
