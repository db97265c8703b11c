"""transformers' MoE blocks across model families (tiny configs of the installed release, bf16, the grouped_mm
and batched_mm experts implementations), compiled with the backend on the CPU: the router becomes one ``route``
and the experts one ``fused_experts`` wherever the block is spelled as those ops compute, with eager's result;
where it is not, the rejection says why. Where the router is rewritten, the graphs are those a CUDA compile sees
(softmaxes in Inductor's online form, helpers.OnlineSoftmax; a softmax left in that form has no CPU code)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from helpers import OnlineSoftmax, compile_rewrite, families

transformers = pytest.importorskip("transformers")

HIDDEN, EXPERTS, TOP_K, TOKENS = 64, 16, 2, 24
SIZES = dict(
    hidden_size=HIDDEN,
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_experts=EXPERTS,
    n_routed_experts=EXPERTS,
    num_local_experts=EXPERTS,
    num_experts_per_tok=TOP_K,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    first_k_dense_replace=0,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)

# (model type, config beside SIZES, families rewritten, rejection expected of the experts family or None)
MODELS = [
    ("qwen3_moe", {}, {"route", "experts"}, None),
    ("mixtral", {}, {"route", "experts"}, None),
    ("qwen2_moe", {}, {"route", "experts"}, None),  # and a shared expert beside them
    ("olmoe", {}, {"route", "experts"}, None),
    ("minimax", {}, {"route", "experts"}, None),
    ("granitemoe", {}, {"route", "experts"}, None),
    ("hunyuan_v1_moe", {}, {"route", "experts"}, None),
    ("deepseek_v3", {"n_group": 4, "topk_group": 2}, {"route", "experts"}, None),
    ("deepseek_v3", {"n_group": 1, "topk_group": 1}, {"route", "experts"}, None),  # Kimi-K2's groups
    ("glm4_moe", {"n_group": 1, "topk_group": 1}, {"route", "experts"}, None),
    ("gpt_oss", {}, {"route"}, "the expert projections add biases"),
    ("phimoe", {}, {"experts"}, None),  # its router (sparsemixer: two argmax choices) is not a top-k
]


def moe_block(model_type: str, extra: dict, impl: str = "grouped_mm"):
    """The first MoE block of a one-layer model of ``model_type``, bf16, its weights N(0, 1/fan-in)."""
    cfg = transformers.AutoConfig.for_model(model_type)
    for key, value in {**SIZES, **extra}.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    block = next(m for name, m in model.named_modules() if hasattr(m, "experts") and not name.endswith("experts"))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
    return block


def router_weight(block) -> torch.Tensor:
    (weight,) = [
        p for name, p in block.named_parameters() if tuple(p.shape) == (EXPERTS, HIDDEN) and "experts" not in name
    ]
    return weight


def untied_tokens(block, x) -> torch.Tensor:
    """Tokens whose router logits, in fp32 and rounded to bf16, hold no two equal values: there the kernels'
    choice (the lower index among equals) and torch.topk's (unspecified) are the same experts."""
    w = router_weight(block)
    x = x.view(-1, HIDDEN)
    untied = torch.ones(x.shape[0], dtype=torch.bool)
    for logits in (x.float() @ w.float().T, (x @ w.T).float()):
        untied &= (logits.sort(-1).values.diff(dim=-1) != 0).all(-1)
    return untied


@pytest.mark.parametrize(
    "model_type, extra, rewritten, rejected",
    MODELS,
    ids=[model + "".join(f"-{k}={v}" for k, v in extra.items()) for model, extra, _, _ in MODELS],
)
@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_model_block(model_type, extra, rewritten, rejected, impl):
    block = moe_block(model_type, extra, impl)
    x = torch.randn(1, TOKENS, HIDDEN, dtype=torch.bfloat16)
    cuda_form = OnlineSoftmax().patched() if "route" in rewritten else contextlib.nullcontext()
    with torch.no_grad(), cuda_form:
        out, report = compile_rewrite(block, x)
        want = block(x)
    out, want = (t[0] if isinstance(t, tuple) else t for t in (out, want))
    for family in ("route", "experts"):
        assert families(report).count(family) == (family in rewritten), report
    if rejected is not None:
        assert any(rejected in r.reason for r in report.rejected if r.family == "experts"), report
    untied = untied_tokens(block, x)
    assert untied.float().mean() > 0.5
    got, ref = out.view(-1, HIDDEN)[untied].float(), want.view(-1, HIDDEN)[untied].float()
    # the spelling rounds gate and up, the activation and each weighted row to bf16; the ops fewer of them
    torch.testing.assert_close(got, ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
