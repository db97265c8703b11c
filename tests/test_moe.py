"""The MoE runner against the fp32 reference MoE (expert by expert), with and without an expert-parallel
range, eager and compiled (one graph, the ops in it), on the CPU and the GPU."""

from __future__ import annotations

import pytest
import torch

import inductor_moe as im
from inductor_moe import reference

from helpers import DEVICES, compile_rewrite

# bf16 runs round h, the activation and y to bf16 (the fp32 reference does not): a few bf16 ulps of the result
MOE_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=4e-2, atol=2e-2)}


def make_layer(tokens, hidden=64, inter=32, experts=8, dtype=torch.bfloat16, device="cpu", local=None):
    torch.manual_seed(tokens)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    logits = torch.randn(tokens, experts, device=device)
    count = experts if local is None else local[1] - local[0]
    w13 = (torch.randn(count, 2 * inter, hidden, device=device) / hidden**0.5).to(dtype)
    w2 = (torch.randn(count, hidden, inter, device=device) / inter**0.5).to(dtype)
    return x, logits, w13, w2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [0, 1, 7, 37, 1400])  # 1400 x 3 pairs: past one program of expert_sort
@pytest.mark.parametrize("local", [None, (2, 5)])
def test_runner_matches_reference(device, dtype, tokens, local):
    x, logits, w13, w2 = make_layer(tokens, dtype=dtype, device=device, local=local)
    out = im.moe.moe(x, logits, w13, w2, top_k=3, expert_range=local)
    ref = reference.moe_ref(x, logits, w13, w2, top_k=3, expert_range=local)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **MOE_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_tokens_routed_only_elsewhere_are_zero(device):
    # expert parallelism: every pair of these tokens is another rank's
    x, logits, w13, w2 = make_layer(5, device=device, local=(6, 8))
    logits[:, 6:] = -1e9
    out = im.moe.moe(x, logits, w13, w2, top_k=2, expert_range=(6, 8))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_runner_is_one_graph_of_the_ops(device):
    x, logits, w13, w2 = make_layer(37, device=device, local=(2, 6))

    def layer(x, logits, w13, w2):
        return im.moe.moe(x, logits, w13, w2, top_k=2, expert_range=(2, 6))

    out, report = compile_rewrite(layer, x, logits, w13, w2)  # fullgraph: no host sync, no graph break
    graph = report.graphs[0]
    assert "inductor_moe.fused_experts" in graph, graph
    torch.testing.assert_close(out, layer(x, logits, w13, w2), **MOE_TOL[torch.bfloat16])
