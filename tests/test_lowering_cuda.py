"""The lowerings on the GPU (device machine): a compiled MoE-style function with every family runs our
kernels (the generated code calls the ops), matches eager within the documented rounding, and works under
mode="reduce-overhead" (CUDA graphs); a grouped-GEMM MoE block's ops read its sorted rows through the sort."""

from __future__ import annotations

import re

import pytest
import torch

from inductor_moe import reference
from inductor_moe.testing import GroupedMoE, TorchtitanMoE, moe_tail

from helpers import TOL, randn

pytestmark = pytest.mark.cuda

T, K, I, H = 37, 4, 96, 72


def inputs():
    h = randn(T * K, 2 * I, dtype=torch.bfloat16, device="cuda")
    row_ids = torch.randint(-1, 8, (T * K,), device="cuda")
    topk_ids = torch.randint(0, 128, (T, K), device="cuda")
    w = torch.rand(T, K, device="cuda")
    expert_out = randn(T * K, H, dtype=torch.bfloat16, device="cuda")
    return h, row_ids, topk_ids, w, expert_out


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_tail_runs_our_kernels(mode):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    args = inputs()
    compiled = torch.compile(moe_tail, backend="inductor_moe", mode=mode)
    (act, packed, out), code = run_and_get_code(compiled, *args)
    code = "\n".join(code)
    for op in ("act_and_mul", "pack_topk_ids_weights", "moe_combine"):
        assert f"torch.ops.inductor_moe.{op}.default" in code, op
    h, row_ids, topk_ids, w, expert_out = args
    dead = (row_ids == -1)[:, None]
    torch.testing.assert_close(act, torch.where(dead, 0, reference.act_and_mul_ref(h, "silu")), **TOL[h.dtype])
    assert act[dead.expand_as(act)].eq(0).all()
    assert torch.equal(packed, reference.pack_topk_ids_weights_ref(topk_ids, w))
    torch.testing.assert_close(out, reference.moe_combine_ref(expert_out, w), **TOL[torch.bfloat16])
    eager = moe_tail(*args)
    for got, want in zip((act, packed, out), eager):
        torch.testing.assert_close(got, want, rtol=2 * TOL[torch.bfloat16]["rtol"], atol=1e-2)
    for _ in range(3):  # replays (CUDA graphs under reduce-overhead) on new data give new results
        args = inputs()
        got = compiled(*args)
        assert torch.equal(got[1], reference.pack_topk_ids_weights_ref(args[2], args[3]))


def test_compiled_filtered_combine_skips_dead_rows():
    from torch._inductor.utils import run_and_get_code

    def combine(expert_out, w, ids):
        terms = expert_out.view(T, K, -1) * w[..., None]
        return torch.where((ids < 0)[..., None], 0.0, terms).sum(1).to(expert_out.dtype)

    torch._dynamo.reset()
    expert_out = randn(T * K, H, dtype=torch.bfloat16, device="cuda")
    w = torch.rand(T, K, device="cuda")
    ids = torch.where(torch.rand(T, K, device="cuda") < 0.5, -1, 3)
    expert_out[(ids < 0).view(-1)] = float("nan")  # a dead pair's row is never read
    out, code = run_and_get_code(torch.compile(combine, backend="inductor_moe"), expert_out, w, ids)
    assert "torch.ops.inductor_moe.moe_combine.default" in "\n".join(code)
    assert not out.isnan().any()
    torch.testing.assert_close(out, reference.moe_combine_ref(expert_out, w, ids), **TOL[torch.bfloat16])


@pytest.mark.parametrize("experts_family", [False, True])
@pytest.mark.parametrize("tokens", [1, 37])
def test_compiled_grouped_block_reads_through_the_sort(tokens, experts_family):
    # inductor_moe/testing.py's GroupedMoE with a local range: without the experts family, the activation's ids
    # and the combine's rows are both gathers by the expert sort, which the ops take as expert_ids_index and
    # src_rows (no gathered copies); the grouped GEMM leaves the remote rows unwritten, which must never reach the
    # result. With it, the whole computation is one fused_experts (renormalised, dead pairs adding w * 0).
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    experts, hidden, inter, k = 16, 64, 48, 4
    w13 = (torch.randn(8, 2 * inter, hidden, device="cuda") / 8).bfloat16()
    w2 = (torch.randn(8, hidden, inter, device="cuda") / 7).bfloat16()
    block = GroupedMoE(w13, w2, k, (4, 12)).cuda()
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    logits = torch.randn(tokens, experts, device="cuda")
    with torch.no_grad(), families(experts_family):
        out, code = run_and_get_code(torch.compile(block, backend="inductor_moe", dynamic=True), x, logits)
        eager = block(x, logits)
    code = "\n".join(code)
    if experts_family:
        assert re.search(r"inductor_moe\.fused_experts\.default\(.*, 'silu', 0, True, None, True\)", code), code
        assert "_grouped_mm" not in code and "moe_combine" not in code, code
    else:
        # live iff the sentinel id != 8 (the wrapped range (9, 8)); the activation's index is a buffer (the sort's)
        assert re.search(r"inductor_moe\.act_and_mul\.default\(.*, 'silu', .*, 1, 9, 8, buf\d+\)", code), code
        assert re.search(r"inductor_moe\.moe_combine\.default\(.*, 9, 8, .*, True\)", code), code  # zero_dead_rows
    assert not out.isnan().any()
    torch.testing.assert_close(out, eager, rtol=2 * TOL[torch.bfloat16]["rtol"], atol=2e-2)


@pytest.mark.parametrize("tokens", [1, 37])
def test_compiled_transformers_block_is_route_and_fused_experts(tokens):
    # transformers' Qwen3-MoE block (tiny config): on CUDA Inductor's own patterns rewrite the router's softmax
    # into prepare_softmax_online before this pass runs; the router must still become one route
    transformers = pytest.importorskip("transformers")
    from torch._inductor.utils import run_and_get_code
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True
    )
    cfg._experts_implementation = "grouped_mm"
    with torch.device("cuda"):
        block = Qwen3MoeSparseMoeBlock(cfg).bfloat16().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    x = torch.randn(1, tokens, 64, device="cuda").bfloat16()
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(block, backend="inductor_moe"), x)
        eager = block(x)
    code = "\n".join(line for line in "\n".join(code).splitlines() if not line.lstrip().startswith("#"))
    assert "inductor_moe.route.default(" in code and "inductor_moe.fused_experts.default(" in code, code
    assert "topk" not in code and "_grouped_mm" not in code, code  # calls, not the comments naming source nodes
    logits = block.gate(x.view(tokens, -1))[0].float()
    untied = (logits.sort(-1).values.diff(dim=-1) != 0).all(-1)  # torch.topk's order among ties is its own
    torch.testing.assert_close(out.view(tokens, -1)[untied], eager.view(tokens, -1)[untied], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("experts_family", [False, True])
@pytest.mark.parametrize("tokens", [1, 37])
def test_compiled_torchtitan_style_grouping_reads_in_place(tokens, experts_family):
    # the grouping spelled the other common way: argsort of the routed ids themselves (narrowed to uint8 keys),
    # the rows scattered back (out[order] = y) rather than gathered; the op reads y through the scattered inverse
    from torch._inductor.utils import run_and_get_code

    experts, hidden, inter, k = 16, 64, 48, 4
    torch.manual_seed(1)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda") / 8).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device="cuda") / 7).bfloat16()

    block = TorchtitanMoE(w13, w2, k)

    torch._dynamo.reset()
    x = torch.randn(tokens, hidden, device="cuda").bfloat16()
    logits = torch.randn(tokens, experts, device="cuda")
    with torch.no_grad(), families(experts_family):
        out, code = run_and_get_code(torch.compile(block, backend="inductor_moe"), x, logits)
        eager = block(x, logits)
    code = "\n".join(code)
    if experts_family:  # every id below E (a top-k over E): no filter, nothing dead
        assert "inductor_moe.fused_experts.default(" in code and "_grouped_mm" not in code, code
    else:
        assert "inductor_moe.moe_combine.default(" in code and "inductor_moe.act_and_mul.default(" in code, code
    torch.testing.assert_close(out, eager, rtol=2 * TOL[torch.bfloat16]["rtol"], atol=2e-2)


def families(experts_family: bool):
    """Every family, or every family but experts (the ops the others make stay in the graph)."""
    from inductor_moe import config

    return config.override(families=[f for f in config.FAMILIES if experts_family or f != "experts"])


needs_pdl = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm90+"
)


def triton_kernels(code: str) -> dict[str, str]:
    """Each Triton kernel's source in Inductor's generated code, by name, from its def on."""
    found = re.findall(r"async_compile\.triton\('(\w+)', '''(.*?)'''", code, re.S)
    return {name: src[src.index("def triton_") :] for name, src in found}


def first_access(src: str) -> int:
    return min(i for i in (src.find("tl.load("), src.find("tl.store(")) if i >= 0)


@needs_pdl
def test_every_inductor_kernel_waits_before_its_first_access():
    # a fill kernel touches nothing its predecessor wrote: stock Inductor's PDL gives it no wait at all, which
    # lets the kernel after it start while older kernels still write (backend.py); under our backend every
    # kernel waits before its first access
    from torch._inductor.utils import run_and_get_code

    def f(x, y):
        return (x * 2).sum(-1), torch.zeros(x.shape[0] * 3, device=x.device), y + 1

    x, y = torch.randn(37, 64, device="cuda"), torch.randn(5, device="cuda")
    for backend, options in (("inductor", {"triton.enable_pdl": True}), ("inductor_moe", {})):
        torch._dynamo.reset()
        out, code = run_and_get_code(torch.compile(f, backend=backend, options=options), x, y)
        kernels = triton_kernels("\n".join(code))
        fills = [name for name, src in kernels.items() if "tl.load(" not in src]
        assert fills and len(kernels) > len(fills), kernels
        waits_first = {name: 0 <= src.find("gdc_wait") < first_access(src) for name, src in kernels.items()}
        if backend == "inductor":
            assert not any(waits_first[name] for name in fills), kernels
        else:  # and none triggers its dependents early (backend.py: that cost large batches)
            assert all(waits_first.values()), kernels
            assert not any("gdc_launch_dependents" in src for src in kernels.values()), kernels
        torch.testing.assert_close(out[0], (x * 2).sum(-1))
        assert out[1].eq(0).all() and torch.equal(out[2], y + 1)


@needs_pdl
@pytest.mark.parametrize("cudagraphs", [False, True])
def test_inductor_pdl_under_the_backend_is_race_free(cudagraphs):
    # backend="inductor_moe" launches Inductor's own Triton kernels with PDL (config.inductor_pdl); every
    # kernel of the block then overlaps its launch with the one before, so a missing wait would show up as a
    # result that changes between two runs on the same input, on some of many fresh inputs. Against the same
    # block compiled without PDL only rounding may differ: each compile autotunes its routing softmax's
    # reduction on its own, and two block sizes sum in two orders.
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    experts, hidden, inter, k = 16, 256, 192, 4
    w13 = (torch.randn(8, 2 * inter, hidden, device="cuda") / 16).bfloat16()
    w2 = (torch.randn(8, hidden, inter, device="cuda") / 14).bfloat16()
    block = GroupedMoE(w13, w2, k, (4, 12)).cuda()
    compiled = {
        pdl: torch.compile(
            block, backend="inductor_moe", options={"triton.enable_pdl": pdl, "triton.cudagraphs": cudagraphs}
        )
        for pdl in (True, False)
    }
    x = torch.randn(64, hidden, device="cuda").bfloat16()
    logits = torch.randn(64, experts, device="cuda")
    with torch.no_grad():
        _, code = run_and_get_code(compiled[True], x, logits)
        code = "\n".join(code)
        kernels = triton_kernels(code)
        assert kernels and all(0 <= src.find("gdc_wait") < first_access(src) for src in kernels.values()), kernels
        for _ in range(20):
            x = torch.randn(64, hidden, device="cuda").bfloat16()
            logits = torch.randn(64, experts, device="cuda")
            with_pdl = compiled[True](x, logits).clone()
            again = compiled[True](x, logits).clone()
            without = compiled[False](x, logits).clone()
            assert torch.equal(with_pdl, again), (with_pdl - again).abs().max()
            torch.testing.assert_close(with_pdl, without, rtol=2 * TOL[torch.bfloat16]["rtol"], atol=2e-2)
