"""The route lowering on transformers' own routers (Qwen3-MoE, Mixtral, DeepSeek-V3: tiny configs) and the
plain spellings of inductor_moe.testing: the top-k choice after the router's GEMM becomes one route op (counted),
the result matches eager, one compile serves every batch size, snapshots of the rewritten graphs; near misses
are left alone with their reason."""

from __future__ import annotations

import expecttest
import pytest
import torch

from inductor_moe.testing import grouped_sigmoid_router, softmax_router

from helpers import OnlineSoftmax, compile_rewrite, families

transformers = pytest.importorskip("transformers")
from transformers.models.cohere2_moe.modeling_cohere2_moe import Cohere2MoeTopKRouter  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter  # noqa: E402
from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeTopKRouter  # noqa: E402
from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import (  # noqa: E402
    Qwen3MoeSparseMoeBlock,
    Qwen3MoeTopKRouter,
)

HIDDEN = 64


def _init(router, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        for b in router.buffers():
            b.copy_(torch.randn(b.shape, generator=gen) / 10)
    return router.to(dtype).eval()


def qwen3(norm=True):
    cfg = transformers.Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=24, num_experts_per_tok=4, norm_topk_prob=norm)
    return _init(Qwen3MoeTopKRouter(cfg))


def mixtral():
    cfg = transformers.MixtralConfig(hidden_size=HIDDEN, num_local_experts=8, num_experts_per_tok=2)
    return _init(MixtralTopKRouter(cfg))


def deepseek_v3(n_group=8, topk_group=3):
    cfg = transformers.DeepseekV3Config(
        hidden_size=HIDDEN,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.5,
    )
    return _init(DeepseekV3TopkRouter(cfg))


def glm4_moe():
    cfg = transformers.Glm4MoeConfig(
        hidden_size=HIDDEN, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=False
    )
    return _init(Glm4MoeTopkRouter(cfg))


class MiniMaxM2(torch.nn.Module):
    """MiniMax-M2's router, which takes its correction bias as an argument (the block holds it): sigmoid, the
    bias for the choice, no groups, renormalised without an epsilon."""

    def __init__(self):
        super().__init__()
        cfg = transformers.MiniMaxM2Config(hidden_size=HIDDEN, num_local_experts=24, num_experts_per_tok=4)
        self.router = MiniMaxM2TopKRouter(cfg)
        self.e_score_correction_bias = torch.nn.Buffer(torch.zeros(24))

    def forward(self, x):
        return self.router(x, self.e_score_correction_bias)


def assert_same_choice(got, want, rank, sorted_ids=True):
    """The same choice as the spelling's top-k: the chosen experts' ``rank`` values (what the spelling ranks by)
    alike, the ids alike (as sets where the spelling's top-k is unsorted) on rows without ties, and there the
    weights by id to a few fp32 ulps before the weights' rounding (one ulp of a 16-bit dtype)."""
    (w, ids), (want_w, want_ids) = got, want
    rank = rank.float()
    assert torch.equal(rank.gather(1, ids).sort(-1).values, rank.gather(1, want_ids).sort(-1).values)
    if not sorted_ids:
        w, ids = w.gather(1, ids.argsort(-1)), ids.sort(-1).values
        want_w, want_ids = want_w.gather(1, want_ids.argsort(-1)), want_ids.sort(-1).values
    untied = (rank.sort(-1).values.diff(dim=-1) != 0).all(-1)
    assert untied.float().mean() > 0.25  # not a vacuous comparison: many rows without ties
    assert torch.equal(ids[untied], want_ids[untied])
    assert w.dtype == want_w.dtype
    rtol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[w.dtype]
    torch.testing.assert_close(w[untied], want_w[untied], rtol=rtol, atol=1e-7)


def sigmoid_rank(router, logits):
    return logits.float().sigmoid() + router.e_score_correction_bias.float()


ROUTERS = {"qwen3": (qwen3, True), "qwen3 unnormalised": (lambda: qwen3(False), True), "mixtral": (mixtral, True)}


SIGMOID_ROUTERS = {
    "deepseek_v3": deepseek_v3,
    # one group chosen: Inductor turns the scatter of one index into a one-hot (where(idx == iota, 1, 0))
    "deepseek_v3 one of 4 groups": lambda: deepseek_v3(4, 1),
    "deepseek_v3 one group (Kimi-K2, GLM-4.5)": lambda: deepseek_v3(1, 1),
    "glm4_moe": glm4_moe,
    "minimax_m2": lambda: _init(MiniMaxM2()),
}


@pytest.mark.parametrize("name", [*ROUTERS, *SIGMOID_ROUTERS])
def test_transformers_router_becomes_one_route(name):
    router, sorted_ids = ROUTERS.get(name, (SIGMOID_ROUTERS.get(name), False))
    router = router()
    x = torch.randn(37, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        (logits, w, ids), report = compile_rewrite(router, x)
        want_logits, want_w, want_ids = router(x)
    assert torch.equal(logits, want_logits)
    assert families(report) == ["route"], report
    graph = report.graphs[-1]
    for gone in ("topk", "amax", "exp", "aten.sigmoid", "gather", "scatter", "aten.div"):
        assert gone not in graph, graph
    assert "aten.mm(" in graph  # the router's GEMM stays stock
    rank = logits if sorted_ids else sigmoid_rank(router, logits)
    assert_same_choice((w, ids), (want_w, want_ids), rank, sorted_ids)


@pytest.mark.parametrize("name", ["qwen3", "mixtral", "gpt_oss"])
def test_online_softmax_routers(name):
    """On CUDA, Inductor's own post-grad patterns turn a softmax's amax and sum into one prepare_softmax_online
    before this pass runs: the softmax routers are matched in that form too."""
    if name in ROUTERS:
        router, outputs = ROUTERS[name][0](), lambda out: out
    else:
        make, outputs = TOPK_SOFTMAX[name]
        router = _init(make())
    online = OnlineSoftmax()
    x = torch.randn(37, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad(), online.patched():
        got, report = compile_rewrite(router, x)
        want = router(x)
    assert online.applied == 1
    assert families(report) == ["route"], report
    graph = report.graphs[-1]
    for gone in ("topk", "prepare_softmax_online", "exp", "aten.div"):
        assert gone not in graph, graph
    (logits, w, ids), (want_logits, want_w, want_ids) = outputs(got), outputs(want)
    assert torch.equal(logits, want_logits)
    assert_same_choice((w, ids), (want_w, want_ids), logits, sorted_ids=name in ROUTERS)


# routers that take the k largest logits, then the softmax of those k: (router, its outputs as (logits, w, ids))
TOPK_SOFTMAX = {
    "gpt_oss": (
        lambda: GptOssTopKRouter(transformers.GptOssConfig(hidden_size=HIDDEN, num_local_experts=32)),
        lambda out: out,
    ),
    "cohere2_moe": (
        lambda: Cohere2MoeTopKRouter(transformers.Cohere2MoeConfig(hidden_size=HIDDEN, num_experts=32)),
        lambda out: out,
    ),
    "granitemoe": (
        lambda: GraniteMoeTopKRouter(transformers.GraniteMoeConfig(hidden_size=HIDDEN, num_local_experts=32)),
        lambda out: (out[2], out[1], out[0]),
    ),
}


@pytest.mark.parametrize("name", TOPK_SOFTMAX)
def test_transformers_topk_then_softmax_router_becomes_one_route(name):
    make, outputs = TOPK_SOFTMAX[name]
    router = _init(make())
    x = torch.randn(37, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        got, report = compile_rewrite(router, x)
        want = router(x)
    assert families(report) == ["route"], report
    assert "route(" in report.graphs[-1] and ", 'softmax', True," in report.graphs[-1]
    for gone in ("topk", "amax", "exp", "aten.div"):
        assert gone not in report.graphs[-1], report.graphs[-1]
    (logits, w, ids), (want_logits, want_w, want_ids) = outputs(got), outputs(want)
    assert torch.equal(logits, want_logits)
    assert_same_choice((w, ids), (want_w, want_ids), logits)


@pytest.mark.parametrize(
    "spelling",
    [
        lambda x: softmax_router(x, 4),
        lambda x: softmax_router(x.float(), 4, True, False),
        lambda x: torch.topk(torch.softmax(x.float(), -1), 3),  # no renormalisation, fp32 weights
        lambda x: torch.topk(x.float().sigmoid(), 3),  # sigmoid, neither bias nor groups: topk's values
        lambda x: (lambda w, i: (w * 2.5, i))(*torch.topk(x.float().sigmoid(), 3)),
    ],
    ids=["qwen3", "mixtral", "softmax only", "sigmoid only", "sigmoid scaled"],
)
def test_plain_spellings(spelling):
    x = torch.randn(13, 24, dtype=torch.bfloat16)
    got, report = compile_rewrite(spelling, x)
    assert families(report) == ["route"]
    assert_same_choice(got, spelling(x), x)


def test_grouped_sigmoid_with_bf16_bias():
    bias = (torch.randn(32) / 10).bfloat16()  # a model cast to bf16 whole: the bias upcast in the spelling

    def spelling(x):
        return grouped_sigmoid_router(x.float(), bias, 6, 4, 2, 1.0)

    x = torch.randn(13, 32)
    got, report = compile_rewrite(spelling, x)
    assert families(report) == ["route"]
    assert "bfloat16" not in report.graphs[-1].split("route(")[0]  # the op reads the bias as it is stored
    assert_same_choice(got, spelling(x), x.sigmoid() + bias.float(), sorted_ids=False)


def test_one_compile_across_batch_sizes():
    router = deepseek_v3()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor_moe")
    from inductor_moe import config

    compiled = torch.compile(router, backend=counter, dynamic=None)
    with torch.no_grad(), config.override(devices="cpu,cuda"):
        for tokens in (2, 3, 17, 128, 512):
            x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16)
            logits, w, ids = compiled(x)
            _, want_w, want_ids = router(x)
            assert_same_choice((w, ids), (want_w, want_ids), sigmoid_rank(router, logits), sorted_ids=False)
    assert counter.frame_count == 2  # the first size, then one symbolic graph


def _rejected(report):
    return [r.reason for r in report.rejected if r.family == "route"]


def test_probabilities_read_elsewhere_are_left_alone():
    def spelling(x):  # a load-balancing loss reads every probability
        probs = torch.softmax(x, dim=-1, dtype=torch.float)
        w, ids = torch.topk(probs, 4)
        return w, ids, probs.mean(0)

    x = torch.randn(13, 24, dtype=torch.bfloat16)
    got, report = compile_rewrite(spelling, x)
    assert "route" not in families(report)
    assert any("is also read outside the router" in r for r in _rejected(report)), _rejected(report)
    want = spelling(x)
    assert torch.equal(got[1], want[1])


def test_training_graphs_are_left_alone():
    # the op has no gradient: where the weights need one, what the backward saves is read outside the router
    x = torch.randn(13, 24, requires_grad=True)

    def loss(x):
        w, ids = softmax_router(x, 4, True, False)
        return (w * ids).sum()

    out, report = compile_rewrite(loss, x)
    out.backward()
    assert "route" not in families(report)
    assert any("is also read outside the router" in r for r in _rejected(report)), _rejected(report)
    grad, x.grad = x.grad, None
    loss(x).backward()
    torch.testing.assert_close(grad, x.grad)


def test_softmax_in_16_bits_is_left_alone():
    def spelling(x):  # probabilities rounded to bf16 tie where the logits do not
        return torch.topk(torch.softmax(x, dim=-1), 4)

    got, report = compile_rewrite(spelling, torch.randn(13, 24, dtype=torch.bfloat16))
    assert "route" not in families(report)
    assert any("rounded to 16 bits" in r for r in _rejected(report)), _rejected(report)


def one_hot_groups(bias, start=0):
    """Group-limited sigmoid top-k whose group mask is a one-hot of the best group against ``arange(start,
    start + 4)``: the chosen group's mask at start 0, another group's past it."""

    def spelling(x):
        scores = x.float().sigmoid()
        choice = scores + bias
        best = choice.view(-1, 4, 6).topk(2, -1)[0].sum(-1).topk(1, -1)[1]
        mask = torch.where(best == torch.arange(start, start + 4), 1.0, 0.0)
        keep = mask.unsqueeze(-1).expand(-1, 4, 6).reshape(-1, 24).bool()
        ids = choice.masked_fill(~keep, float("-inf")).topk(4, -1, sorted=False)[1]
        return scores.gather(1, ids), ids

    return spelling


def test_one_hot_group_mask():
    # the one-hot Inductor makes of a one-column scatter, here spelled by hand: the same choice
    bias = torch.randn(24) / 10
    spelling = one_hot_groups(bias)
    x = torch.randn(37, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        got, report = compile_rewrite(spelling, x)
    assert families(report) == ["route"], report
    assert_same_choice(got, spelling(x), x.float().sigmoid() + bias, sorted_ids=False)


@pytest.mark.parametrize(
    "case,reason",
    [
        ("one-hot of another group", "the group mask is not ones scattered into zeros"),
        ("3-D logits", "the logits are 3-D"),
        ("600 experts", "600 experts"),
        ("k = 17", "k = 17"),
        ("smallest", "not the k largest"),
        ("biased values", "the weights are the biased or masked top-k values"),
    ],
)
def test_near_misses(case, reason):
    bias = torch.randn(24) / 10
    spellings = {
        "3-D logits": (lambda x: torch.topk(torch.softmax(x.view(1, 13, -1), -1, dtype=torch.float), 4), 24),
        "600 experts": (lambda x: torch.topk(torch.softmax(x, -1, dtype=torch.float), 4), 600),
        "k = 17": (lambda x: torch.topk(torch.softmax(x, -1, dtype=torch.float), 17), 24),
        "smallest": (lambda x: torch.topk(torch.softmax(x, -1, dtype=torch.float), 4, largest=False), 24),
        "biased values": (lambda x: torch.topk(x.float().sigmoid() + bias, 4), 24),
        "one-hot of another group": (one_hot_groups(bias, start=1), 24),
    }
    spelling, experts = spellings[case]
    x = torch.randn(13, experts, dtype=torch.bfloat16)
    got, report = compile_rewrite(spelling, x)
    assert "route" not in families(report)
    assert any(reason in r for r in _rejected(report)), _rejected(report)
    torch.testing.assert_close(got, spelling(x))


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_transformers_block_becomes_route_and_fused_experts(impl):
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True
    )
    cfg._experts_implementation = impl
    block = _init(Qwen3MoeSparseMoeBlock(cfg))
    with torch.no_grad():
        for p in block.experts.parameters():
            p.mul_(p.shape[-1] ** -0.5)
    x = torch.randn(1, 64, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        out, report = compile_rewrite(block, x)
        ref = block(x)
        logits = block.gate(x.view(-1, HIDDEN))[0].float()
    assert {"experts", "route"} <= set(families(report)), report  # gated_act made the act_and_mul experts took
    graph = report.graphs[-1]
    assert [line.split(" = ")[1].split("(")[0] for line in graph.splitlines()[:-1]] == [
        "aten.reshape", "aten.permute", "aten.mm", "inductor_moe.route", "getitem", "getitem",
        *(["aten.permute"] * 4 if impl == "grouped_mm" else []), "inductor_moe.fused_experts", "aten.reshape",
    ], graph  # fmt: skip
    # tokens whose logits tie may go to another of the tied experts than eager's torch.topk picks
    untied = (logits.sort(-1).values.diff(dim=-1) != 0).all(-1)
    assert untied.float().mean() > 0.5
    got, want = out.view(-1, HIDDEN)[untied].float(), ref.view(-1, HIDDEN)[untied].float()
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


class TestSnapshots(expecttest.TestCase):
    def test_qwen3(self):
        self.assertExpectedInline(
            _rewritten(qwen3()),
            """\
v0 = aten.permute(in1, [1, 0])
v1 = aten.mm(in0, v0)
v2 = inductor_moe.route(v1, 4, 'softmax', True, None, 1, 1, 0.0, 1.0, bfloat16)
v3 = getitem(v2, 0)
v4 = getitem(v2, 1)
return [v1, v3, v4]""",
        )

    def test_deepseek_v3(self):
        self.assertExpectedInline(
            _rewritten(deepseek_v3()),
            """\
v0 = prims.convert_element_type(in0, float32)
v1 = prims.convert_element_type(in1, float32)
v2 = aten.permute(v1, [1, 0])
v3 = aten.mm(v0, v2)
v4 = inductor_moe.route(v3, 4, 'sigmoid', True, in2, 8, 3, 1e-20, 2.5, None)
v5 = getitem(v4, 0)
v6 = getitem(v4, 1)
return [v3, v5, v6]""",
        )


def _rewritten(router) -> str:
    with torch.no_grad():
        _, report = compile_rewrite(router, torch.randn(5, HIDDEN, dtype=torch.bfloat16))
    return report.graphs[-1]
