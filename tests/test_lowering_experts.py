"""The experts lowering on transformers' own MoE blocks (tiny configs, the grouped_mm experts implementation):
the whole expert computation becomes one fused_experts, the result matches eager, one compile serves every
batch size; expert-parallel sentinels add w * 0; near misses are left alone with their reason."""

from __future__ import annotations

import inspect

import expecttest
import pytest
import torch
import torch.nn.functional as F

from inductor_moe import backend, config
from inductor_moe.lowerings import experts as experts_lowering
from inductor_moe.testing import GroupedMoE, TorchtitanMoE

from helpers import compile_rewrite, families

transformers = pytest.importorskip("transformers")
from transformers.integrations.moe import batched_mm_experts_forward, grouped_mm_experts_forward  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeSparseMoeBlock  # noqa: E402

HIDDEN, INTER, EXPERTS, TOP_K = 64, 32, 8, 2
# the spelling rounds gate and up, the activation, each pair's row and each weighted row to bf16, the op only the
# activation's output and each pair's row: a few bf16 ulps of the output's magnitude
TOL = 3e-2


@pytest.fixture(autouse=True)
def _without_route():
    """The experts family alone (with those before it): the route family would also take the router, whose
    choice on tied bf16 logits is the lower index where torch.topk's is unspecified (CPU: often the higher),
    which moves tokens to other experts than eager's. test_lowering_route.py compiles whole blocks with it."""
    with config.override(families=[f for f in config.FAMILIES if f != "route"]):
        yield


def qwen3_config(impl="grouped_mm"):
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K
    )
    cfg._experts_implementation = impl
    return cfg


def qwen3(impl="grouped_mm"):
    return _init(Qwen3MoeSparseMoeBlock(qwen3_config(impl)))


def mixtral(impl="grouped_mm"):
    cfg = transformers.MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K
    )
    cfg._experts_implementation = impl
    return _init(MixtralSparseMoeBlock(cfg))


def _init(block):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return block.to(torch.bfloat16).eval()


def assert_matches(out, ref):
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL, atol=TOL * scale)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("make", [qwen3, mixtral], ids=["qwen3", "mixtral"])
def test_transformers_block_becomes_one_fused_experts(make, impl):
    block = make(impl)
    x = torch.randn(2, 7, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        out, report = compile_rewrite(block, x)
        ref = block(x)
    assert [r.spelling for r in report.rewrites if r.family == "experts"] == [f"{impl} experts (transformers)"]
    graph = report.graphs[-1]
    # the grouping, both GEMMs, the weights gathered per pair (batched_mm's copy of every routed expert), the
    # put-back and the per-pair products are gone
    for gone in ("_grouped_mm", "bmm", "histc", "sort", "index_put", "aten.index(", "clamp", "aten.mul("):
        assert gone not in graph, graph
    assert "fused_experts(" in graph and ", False)" in graph  # ids from a top-k over E: no pair is dead
    assert_matches(out, ref)


def test_one_compile_across_batch_sizes():
    block = qwen3()
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    with torch.no_grad(), config.override(devices="cpu,cuda"), backend.reporting() as report:
        compiled = torch.compile(block, backend=_counted(counter), dynamic=True)
        for tokens in (2, 5, 37, 512):
            x = torch.randn(1, tokens, HIDDEN, dtype=torch.bfloat16)
            assert_matches(compiled(x), block(x))
    assert counter.frame_count == 1
    assert families(report).count("experts") == 1, report  # the symbolic-T graph is rewritten


def _counted(counter):
    from inductor_moe.backend import inductor_moe_backend

    def backend(gm, example_inputs):
        counter(gm, example_inputs)
        return inductor_moe_backend(gm, example_inputs)

    return backend


class ExpertParallel(torch.nn.Module):
    """A rank holding 8 of 16 experts: a top-k over 16 routes to ids 8..15, which transformers' grouped_mm
    experts treat as sentinels (rows zeroed, then weighted)."""

    def __init__(self):
        super().__init__()
        self.block = qwen3()
        self.block.experts._is_expert_parallel = True  # transformers >= 5.2x masks sentinels only then
        self.router = torch.nn.Linear(HIDDEN, 2 * EXPERTS, bias=False).to(torch.bfloat16)

    def forward(self, x, nan_weight: bool = False):
        w, ids = torch.topk(self.router(x).float().softmax(-1), TOP_K)
        w = w.to(x.dtype)
        if nan_weight:
            w = torch.where(ids >= EXPERTS, float("nan"), w)
        return grouped_mm_experts_forward(self.block.experts, x, ids, w)


def test_expert_parallel_sentinels_add_w_times_zero():
    module = ExpertParallel()
    x = torch.randn(33, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        for nan_weight in (False, True):
            out, report = compile_rewrite(module, x, nan_weight)
            ref = module(x, nan_weight)
            assert families(report).count("experts") == 1, report
            assert "fused_experts(" in report.graphs[-1] and ", True)" in report.graphs[-1]
            assert torch.equal(out.isnan(), ref.isnan())
            if nan_weight:
                assert ref.isnan().any()
            finite = ~ref.isnan().any(-1)
            assert_matches(out[finite], ref[finite])


def test_batched_mm_with_ids_past_the_experts_is_left_alone():
    # batched_mm clamps ids into [0, E) and computes them with expert E - 1: not what fused_experts computes
    module = ExpertParallel()
    experts = module.block.experts
    experts.config._experts_implementation = "batched_mm"
    x = torch.randn(9, HIDDEN, dtype=torch.bfloat16)

    def forward(x):
        w, ids = torch.topk(module.router(x).float().softmax(-1), TOP_K)
        return batched_mm_experts_forward(experts, x, ids, w.to(x.dtype))

    with torch.no_grad():
        out, report = compile_rewrite(forward, x)
        ref = forward(x)
    assert "experts" not in families(report)
    reasons = {r.spelling: r.reason for r in report.rejected if r.family == "experts"}
    clamped = "ids outside [0, E) are possible: the clamp computes them with expert 0 or E - 1"
    # transformers 5.17 clamps always; later releases also mask the sentinels' weights under expert parallelism
    masked = "masked_fill" in inspect.getsource(batched_mm_experts_forward)
    want = experts_lowering.MASKED_WEIGHTS if masked else clamped
    assert reasons == {"batched_mm experts (transformers)": want}, reasons
    assert_matches(out, ref)


def test_batched_mm_with_masked_weights_is_left_alone():
    # the expert-parallel batched_mm of transformers >= 5.2x: ids clamped into [0, E), the sentinels' weights
    # masked to 0, so a sentinel still adds a clamped expert's row * 0 (NaN for a non-finite row)
    module = ExpertParallel()
    experts = module.block.experts
    x = torch.randn(9, HIDDEN, dtype=torch.bfloat16)

    def forward(x):
        w, ids = torch.topk(module.router(x).float().softmax(-1), TOP_K)
        ids, w = ids.reshape(-1), w.to(x.dtype).reshape(-1)
        sentinel = ids >= EXPERTS
        ids = ids.clamp(0, EXPERTS - 1)
        rows = x.repeat_interleave(TOP_K, dim=0)
        gate, up = torch.bmm(experts.gate_up_proj[ids], rows[..., None]).squeeze(-1).chunk(2, dim=-1)
        y = torch.bmm(experts.down_proj[ids], (F.silu(gate) * up)[..., None]).squeeze(-1)
        return (y * w.masked_fill(sentinel, 0.0)[:, None]).view(-1, TOP_K, HIDDEN).sum(1)

    with torch.no_grad():
        out, report = compile_rewrite(forward, x)
        ref = forward(x)
    assert "experts" not in families(report)
    reasons = {r.spelling: r.reason for r in report.rejected if r.family == "experts"}
    assert reasons == {"batched_mm experts (transformers)": experts_lowering.MASKED_WEIGHTS}, reasons
    assert_matches(out, ref)


def test_an_activation_the_op_lacks_is_left_alone():
    cfg = qwen3_config()
    cfg.hidden_act = "relu"
    block = _init(Qwen3MoeSparseMoeBlock(cfg))
    x = torch.randn(1, 5, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        out, report = compile_rewrite(block, x)
        ref = block(x)
    assert "experts" not in families(report)
    reasons = [r.reason for r in report.rejected if r.family == "experts"]
    assert "the down projection's input is not a gated activation of silu, gelu or gelu_tanh" in reasons
    assert_matches(out, ref)


def test_ids_that_may_be_negative_are_left_alone():
    experts = _init(Qwen3MoeExperts(qwen3_config()))
    x = torch.randn(5, HIDDEN, dtype=torch.bfloat16)
    ids = torch.randint(0, EXPERTS, (5, TOP_K))
    w = torch.rand(5, TOP_K, dtype=torch.bfloat16)
    with torch.no_grad():
        out, report = compile_rewrite(lambda x, ids, w: grouped_mm_experts_forward(experts, x, ids, w), x, ids, w)
        ref = grouped_mm_experts_forward(experts, x, ids, w)
    assert "experts" not in families(report)
    reasons = [r.reason for r in report.rejected if r.family == "experts"]
    assert reasons == ["the ids may be negative: histc drops them, the sort puts them first among expert 0's rows"]
    assert_matches(out, ref)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("expert_range", [(0, EXPERTS), (3, 3 + EXPERTS)])
def test_grouped_gemm_block_through_the_combine(expert_range, dynamic):
    # inductor_moe.testing's grouped-GEMM block: the combine family makes its sum a moe_combine first, then the
    # whole computation, with its expert-parallel keys and renormalised weights, becomes one fused_experts
    gen = torch.Generator().manual_seed(1)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) * HIDDEN**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) * INTER**-0.5).to(torch.bfloat16)
    block = GroupedMoE(w13, w2, TOP_K, expert_range)
    x = torch.randn(11, HIDDEN, dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(11, 2 * EXPERTS, generator=gen)
    with torch.no_grad():
        out, report = compile_rewrite(block, x, logits, dynamic=dynamic)
        ref = block(x, logits)
    assert [r.spelling for r in report.rewrites if r.family == "experts"] == ["grouped GEMMs into moe_combine"]
    graph = report.graphs[-1]
    for gone in ("_grouped_mm", "moe_combine", "act_and_mul", "sort", "index_put", "scatter_add"):
        assert gone not in graph, graph
    assert "'silu', 0, True, None, True)" in graph  # renormalised, dead pairs add w * 0
    assert_matches(out, ref)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_expert_biases_are_left_alone(impl):
    # fused_experts has no biases
    block = qwen3(impl)
    experts = block.experts
    gen = torch.Generator().manual_seed(2)
    experts.has_bias = True
    experts.gate_up_proj_bias = torch.nn.Parameter(torch.randn(EXPERTS, 2 * INTER, generator=gen).to(torch.bfloat16))
    experts.down_proj_bias = torch.nn.Parameter(torch.randn(EXPERTS, HIDDEN, generator=gen).to(torch.bfloat16))
    x = torch.randn(1, 6, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        out, report = compile_rewrite(block, x)
        ref = block(x)
    assert "experts" not in families(report)
    reasons = [r.reason for r in report.rejected if r.family == "experts"]
    assert reasons == ["the expert projections add biases, which fused_experts has not"]
    assert_matches(out, ref)


def test_weights_masked_otherwise_are_left_alone():
    # transformers' grouped_mm experts with the sentinel rows' weights zeroed instead of the rows: the rows past
    # the groups are whatever the grouped GEMM left there, times 0 (NaN for a NaN or infinite leftover), which
    # fused_experts does not compute
    experts = _init(Qwen3MoeExperts(qwen3_config()))

    def forward(x, ids, w):
        flat = ids.reshape(-1)
        ids_g, perm = torch.sort(flat)
        rows = x[perm // TOP_K]
        offs = torch.cumsum(torch.histc(ids_g.float(), bins=EXPERTS, min=0, max=EXPERTS - 1), 0, dtype=torch.int32)
        h = torch._grouped_mm(rows, experts.gate_up_proj.transpose(1, 2), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, experts.down_proj.transpose(1, 2), offs=offs)
        w_g = w.reshape(-1)[perm] * (ids_g < EXPERTS)
        y = y * w_g[:, None]
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        return y[inv].view(x.shape[0], TOP_K, -1).sum(1)

    x = torch.randn(5, HIDDEN, dtype=torch.bfloat16)
    w, ids = torch.topk(torch.randn(5, EXPERTS).softmax(-1), TOP_K)
    with torch.no_grad():
        out, report = compile_rewrite(forward, x, ids, w.to(torch.bfloat16))
        ref = forward(x, ids, w.to(torch.bfloat16))
    assert "experts" not in families(report)
    reasons = [r.reason for r in report.rejected if r.family == "experts"]
    assert "the rows' weights are not the routing weights gathered by the sort's permutation" in reasons, reasons
    assert_matches(out, ref)


class TestSnapshots(expecttest.TestCase):
    def test_qwen3_grouped_mm(self):
        self.assertExpectedInline(
            _rewritten(qwen3("grouped_mm")),
            """\
v0 = aten.reshape(in0, [-1, 64])
v1 = aten.permute(in1, [1, 0])
v2 = aten.mm(v0, v1)
v3 = prims.convert_element_type(v2, float32)
v4 = aten.amax(v3, [-1], True)
v5 = aten.sub(v3, v4)
v6 = aten.exp(v5)
v7 = aten.sum(v6, [-1], True)
v8 = aten.div(v6, v7)
v9 = aten.topk(v8, 2)
v10 = getitem(v9, 0)
v11 = getitem(v9, 1)
v12 = aten.permute(in2, [0, 2, 1])
v13 = aten.permute(in3, [0, 2, 1])
v14 = prims.convert_element_type(v10, bfloat16)
v15 = aten.permute(v12, [0, 2, 1])
v16 = aten.permute(v13, [0, 2, 1])
v17 = inductor_moe.fused_experts(v0, v15, v16, v14, v11, 'silu', 0, False, None, False)
v18 = aten.reshape(v17, [1, 5, 64])
return [v18]""",
        )

    def test_mixtral_batched_mm(self):
        self.assertExpectedInline(
            _rewritten(mixtral("batched_mm")),
            """\
v0 = aten.reshape(in0, [-1, 64])
v1 = aten.permute(in1, [1, 0])
v2 = aten.mm(v0, v1)
v3 = prims.convert_element_type(v2, float32)
v4 = aten.amax(v3, [-1], True)
v5 = aten.sub(v3, v4)
v6 = aten.exp(v5)
v7 = aten.sum(v6, [-1], True)
v8 = aten.div(v6, v7)
v9 = aten.topk(v8, 2)
v10 = getitem(v9, 0)
v11 = getitem(v9, 1)
v12 = aten.sum(v10, [-1], True)
v13 = aten.div(v10, v12)
v14 = inductor_moe.fused_experts(v0, in2, in3, v13, v11, 'silu', 0, False, None, False)
v15 = aten.reshape(v14, [1, 5, 64])
return [v15]""",
        )


def _rewritten(block) -> str:
    with torch.no_grad():
        _, report = compile_rewrite(block, torch.randn(1, 5, HIDDEN, dtype=torch.bfloat16))
    return report.graphs[-1]


@pytest.mark.parametrize("dynamic", [False, True])
def test_torchtitan_style_block(dynamic):
    gen = torch.Generator().manual_seed(3)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) * HIDDEN**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) * INTER**-0.5).to(torch.bfloat16)
    block = TorchtitanMoE(w13, w2, TOP_K)
    x = torch.randn(13, HIDDEN, dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(13, EXPERTS, generator=gen)
    if dynamic:  # the tokens symbolic; the weights' sizes (E, I, H) and k stay static, as a model's are
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(logits, 0)
    with torch.no_grad():
        out, report = compile_rewrite(block, x, logits)
        ref = block(x, logits)
    assert [r.spelling for r in report.rewrites if r.family == "experts"] == ["grouped GEMMs into moe_combine"]
    graph = report.graphs[-1]
    assert "'silu', 0, False, None, False)" in graph  # ids from a top-k over E: nothing dead
    for gone in ("_grouped_mm", "sort", "index_put", "scatter_add"):
        assert gone not in graph, graph
    assert_matches(out, ref)
