"""route: the reference by hand and against the routers' own spellings (Qwen3-MoE/Mixtral softmax, DeepSeek-V3
grouped sigmoid), the Triton kernel against the reference (under TRITON_INTERPRET=1 on the CPU, and on the GPU
into poisoned outputs): ties, all-equal logits, -inf and NaN logits, E not a power of two, every dtype, odd
token counts, CUDA graphs with PDL on and off. Contracts (opcheck, bad inputs, compile once): test_contracts."""

from __future__ import annotations

import pytest
import torch

import inductor_moe as im
from inductor_moe import reference
from inductor_moe.kernels.triton import route as kernel
from inductor_moe.testing import grouped_sigmoid_router, softmax_router

from helpers import captured, interpreter_results

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_reference_by_hand():
    logits = torch.tensor([[1.0, 3.0, 3.0, -0.0, 0.0, 2.0], [float("nan"), -float("inf"), 0.0, 5.0, 5.0, 1.0]])
    weights, ids = reference.route_ref(logits, 4)
    assert ids.tolist() == [[1, 2, 5, 0], [0, 3, 4, 5]]  # ties to the lower index; NaN first
    probs = torch.softmax(logits[0], 0)
    assert torch.equal(weights[0], probs[[1, 2, 5, 0]]) and weights[1].isnan().all()  # a NaN logit: NaN row
    _, ids = reference.route_ref(logits[:1], 6)
    assert ids.tolist() == [[1, 2, 5, 0, 3, 4]]  # -0 and +0 tie: index order
    # sigmoid, 3 groups of 2 by the sum of their two best (biased) scores; pick 2 groups, then 3 experts
    logits = torch.tensor([[0.0, 4.0, 1.0, 1.0, 3.0, -3.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 0.0])
    s = torch.sigmoid(logits[0])
    # groups: s0 + s1 = 1.48, s2 + s3 = 1.46, (s4 - 1) + s5 = -0.00... -> groups 0 and 1
    weights, ids = reference.route_ref(logits, 3, "sigmoid", True, bias, 3, 2, 1e-20, 2.0)
    assert ids.tolist() == [[1, 2, 3]]
    torch.testing.assert_close(weights[0], 2.0 * s[[1, 2, 3]] / (s[[1, 2, 3]].sum() + 1e-20), rtol=0, atol=0)
    _, ids = reference.route_ref(logits, 3, "sigmoid", False, bias)  # no groups: expert 4 (0.95 - 1) loses
    assert ids.tolist() == [[1, 2, 3]]
    _, ids = reference.route_ref(logits, 3, "sigmoid")  # no bias: expert 4 wins
    assert ids.tolist() == [[1, 4, 2]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("cast", [False, True])
def test_reference_is_the_softmax_router(dtype, renormalize, cast):
    logits = torch.randn(300, 128).to(dtype)
    weights, ids = softmax_router(logits, 8, renormalize, cast)
    got_w, got_ids = reference.route_ref(logits, 8, "softmax", renormalize, weights_dtype=weights.dtype)
    tied = (torch.sort(logits.float(), dim=-1).values.diff(dim=-1) == 0).any(dim=-1)  # bf16 logits tie often
    assert torch.equal(got_ids[~tied], ids[~tied])
    torch.testing.assert_close(got_w, weights, rtol=2e-7 if not cast else 0, atol=0)


def test_reference_is_the_grouped_sigmoid_router():
    logits = torch.randn(300, 256)
    bias = torch.randn(256) / 10
    weights, ids = grouped_sigmoid_router(logits, bias, 8, 8, 4, 2.5)
    got_w, got_ids = reference.route_ref(logits, 8, "sigmoid", True, bias, 8, 4, 1e-20, 2.5)
    # topk(sorted=False) returns its choice in no set order: compare sets, weights by id (sums: a few ulps)
    assert torch.equal(got_ids.sort(dim=-1).values, ids.sort(dim=-1).values)
    order = got_ids.argsort(dim=-1)
    torch.testing.assert_close(got_w.gather(1, order), weights.gather(1, ids.argsort(dim=-1)), rtol=5e-7, atol=0)


# (tokens, experts, top_k, scoring, n_group, topk_group, renormalize, logits dtype, weights dtype, values)
CASES = [
    (1, 8, 2, "softmax", 1, 1, True, "bfloat16", "bfloat16", "randn"),
    (7, 128, 8, "softmax", 1, 1, False, "float32", None, "randn"),
    (37, 60, 6, "softmax", 1, 1, True, "float16", None, "randn"),
    (33, 512, 16, "softmax", 1, 1, True, "bfloat16", "bfloat16", "randn"),
    (5, 256, 8, "sigmoid", 8, 4, True, "float32", None, "randn"),
    (9, 160, 7, "sigmoid", 8, 3, False, "bfloat16", None, "randn"),
    (11, 96, 6, "sigmoid", 4, 1, True, "float32", None, "randn"),  # one group chosen
    (3, 16, 16, "sigmoid", 1, 1, True, "float32", "float16", "randn"),
    (0, 64, 4, "softmax", 1, 1, True, "float32", None, "randn"),
    (7, 24, 5, "softmax", 1, 1, False, "float32", None, "ties"),
    (7, 24, 5, "sigmoid", 4, 2, True, "float32", None, "ties"),
    (4, 24, 5, "softmax", 1, 1, True, "float32", None, "equal"),
    (4, 24, 5, "sigmoid", 4, 2, True, "bfloat16", None, "equal"),
    (6, 24, 5, "softmax", 1, 1, True, "float32", None, "special"),
    (6, 24, 5, "sigmoid", 4, 2, True, "float32", None, "special"),
]


def case_inputs(case, device):
    tokens, experts, top_k, scoring, n_group, topk_group, renormalize, dtype, w_dtype, values = case
    gen = torch.Generator().manual_seed(tokens * experts + top_k)
    if values == "randn":
        logits = torch.randn(tokens, experts, generator=gen)
    elif values == "ties":  # few distinct values: ties everywhere, within and across groups
        logits = torch.randint(-2, 3, (tokens, experts), generator=gen).float()
    elif values == "equal":
        logits = torch.full((tokens, experts), 0.5)
    else:  # -inf, +inf, NaN, -0 and +0 among ordinary values, and rows of -inf only
        logits = torch.randn(tokens, experts, generator=gen)
        logits[0, 3] = logits[1, 5] = float("nan")
        logits[2, :7] = float("-inf")
        logits[3, 2] = float("inf")
        logits[4, ::2], logits[4, 1::2] = -0.0, 0.0
        logits[5] = float("-inf")
    bias = None
    if scoring == "sigmoid" and values == "randn":
        bias = torch.randn(experts, generator=gen) / 10
    elif scoring == "sigmoid":  # multiples of 1/8: biased scores tie too
        bias = torch.randint(-1, 2, (experts,), generator=gen) / 8
    logits = logits.to(getattr(torch, dtype)).to(device)
    bias = None if bias is None else bias.to(device)
    eps = 1e-20 if scoring == "sigmoid" else 0.0
    return logits, (
        top_k,
        scoring,
        renormalize,
        bias,
        n_group,
        topk_group,
        eps,
        1.5,
        w_dtype and getattr(torch, w_dtype),
    )


def assert_matches_reference(got, logits, args):
    want = reference.route_ref(logits.cpu(), *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    weights, ids = (t.cpu() for t in got)
    assert ids.dtype == torch.int64 and weights.dtype == want[0].dtype and weights.shape == want[0].shape
    assert torch.equal(ids, want[1]), f"{ids.tolist()} != {want[1].tolist()}"
    # the kernel's exp and sums against torch's: a few fp32 ulps, then one rounding to the weights' dtype
    rtol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[weights.dtype]
    torch.testing.assert_close(weights, want[0], rtol=rtol, atol=1e-7, equal_nan=True)


def launch_poisoned(logits, args):
    top_k, scoring, renormalize, bias, n_group, topk_group, eps, scaling, w_dtype = args
    weights = torch.full((logits.shape[0], top_k), float("nan"), dtype=w_dtype or torch.float32, device=logits.device)
    ids = torch.full((logits.shape[0], top_k), -7, dtype=torch.int64, device=logits.device)
    kernel.route(logits, bias, weights, ids, scoring, renormalize, n_group, topk_group, eps, scaling)
    return weights, ids


def run_interpreter_cases() -> dict[str, str]:
    """Every CASES entry through the kernel, row-major and column-major logits: "ok" or what failed. Called in a
    child process that set TRITON_INTERPRET=1 before importing triton."""
    assert type(kernel.route_kernel).__name__ == "InterpretedFunction"
    results = {}
    for case in CASES:
        logits, args = case_inputs(case, "cpu")
        try:
            for layout in (logits, logits.t().contiguous().t()):
                assert_matches_reference(launch_poisoned(layout, args), layout, args)
            results[repr(case)] = "ok"
        except AssertionError as e:
            results[repr(case)] = str(e)[-2000:]
    return results


def test_triton_kernel_in_interpreter():
    results = interpreter_results("test_route", "run_interpreter_cases", timeout=600)
    assert len(results) == len(CASES)
    failed = {case: why for case, why in results.items() if why != "ok"}
    assert not failed, failed


def test_op_on_cpu_is_the_reference():
    logits, args = case_inputs(CASES[4], "cpu")
    got = im.route(logits, *args)
    want = reference.route_ref(logits, *args)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ------------------------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_kernel_on_gpu(case):
    logits, args = case_inputs(case, "cuda")
    for layout in (logits, logits.t().contiguous().t()):
        assert_matches_reference(launch_poisoned(layout, args), layout, args)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 7, 37, 4097])
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_equals_torch_topk_on_gpu(tokens, dtype):
    # the routers' own spellings on the GPU, on rows without ties in what they rank
    logits = torch.randn(tokens, 128, device="cuda").to(dtype)
    weights, ids = im.route(logits, 8, "softmax", True, weights_dtype=dtype)
    want_w, want_ids = softmax_router(logits, 8, True, True)
    tied = (torch.sort(logits.float(), dim=-1).values.diff(dim=-1) == 0).any(dim=-1)
    assert torch.equal(ids[~tied], want_ids[~tied])
    torch.testing.assert_close(weights, want_w, rtol={torch.float32: 2e-6}.get(dtype, 1e-2), atol=1e-7)
    bias = torch.randn(256, device="cuda") / 10
    logits = torch.randn(tokens, 256, device="cuda")
    weights, ids = im.route(logits, 8, "sigmoid", True, bias, 8, 4, 1e-20, 2.5)
    want_w, want_ids = grouped_sigmoid_router(logits, bias, 8, 8, 4, 2.5)
    assert torch.equal(ids.sort(dim=-1).values, want_ids.sort(dim=-1).values)
    torch.testing.assert_close(
        weights.gather(1, ids.argsort(dim=-1)), want_w.gather(1, want_ids.argsort(dim=-1)), rtol=2e-6, atol=1e-7
    )


@pytest.mark.cuda
@pytest.mark.parametrize("pdl", ["1", "0"])
def test_cuda_graph_chain(pdl, monkeypatch):
    # the op after a PDL-launched op and before another, in a CUDA graph: the wait orders each after the last
    monkeypatch.setenv("INDUCTOR_MOE_PDL", pdl)
    logits = torch.randn(300, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        weights, ids = im.route(im.silu_and_mul(torch.cat([logits, logits], dim=1)), 8, "softmax", True)
        return im.pack_topk_ids_weights(ids, weights)

    graph, packed = captured(step)
    logits.normal_()
    graph.replay()
    weights, ids = reference.route_ref(im.silu_and_mul(torch.cat([logits, logits], dim=1)).cpu(), 8, "softmax", True)
    assert torch.equal((packed.cpu() >> 16).long(), ids)
