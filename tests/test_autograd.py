"""Gradients of the differentiable ops (act_and_mul, moe_combine) against autograd through the reference, eager
and compiled; the out= form refuses a gradient (tests/contracts.py); the integer ops have none to give."""

from __future__ import annotations

import pytest
import torch

import inductor_moe as im
from inductor_moe import reference

from helpers import DEVICES, TOL, combine_case, randn

# fp32 gradients: the formulas and autograd through the reference differ in the order of a few fp32 operations
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: TOL[torch.bfloat16]}


def _grads(fn, *inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    fn(*inputs).backward(grad_out)
    return [t.grad for t in inputs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", list(reference.ACTIVATIONS))
@pytest.mark.parametrize("filtered", ["none", "per row", "per block", "through an index"])
def test_act_and_mul_gradient(device, dtype, activation, filtered):
    x = randn(37, 2 * 20, dtype=dtype, device=device)
    kwargs, ref_args = {}, ()
    if filtered == "per row":
        ids = torch.randint(-1, 4, (37,), device=device)
        kwargs, ref_args = dict(expert_ids=ids), (ids,)
    elif filtered == "per block":
        ids = torch.tensor([0, -1, 3, -1, 2], device=device)
        kwargs, ref_args = dict(expert_ids=ids, expert_step=8), (ids, 8)
    elif filtered == "through an index":
        ids = torch.randint(-1, 4, (50,), device=device)
        index = torch.randint(0, 50, (37,), device=device)
        kwargs = dict(expert_ids=ids, expert_ids_index=index)
        ref_args = (ids, 1, reference.EXPERT_LO, reference.EXPERT_HI, None, index)
    dy = randn(37, 20, dtype=dtype, device=device)
    (got,) = _grads(lambda t: im.act_and_mul(activation, t, **kwargs), x, grad_out=dy)
    (want,) = _grads(lambda t: reference.act_and_mul_ref(t, activation, *ref_args), x, grad_out=dy)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **GRAD_TOL[dtype])
    if filtered != "none":
        dead = ~reference.live_rows_ref(
            ids, 37, kwargs.get("expert_step", 1), expert_ids_index=kwargs.get("expert_ids_index")
        )
        assert not got[dead].any()  # dead rows are zero in the output: their inputs get no gradient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids_dtype,rows_dtype", [(None, None), (torch.int32, None), (torch.int64, torch.int32)])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("zero_dead_rows", [False, True])
def test_moe_combine_gradient(device, w_dtype, ids_dtype, rows_dtype, renormalize, zero_dead_rows):
    eo, w, ids, rows = combine_case(9, 4, 24, torch.float32, w_dtype, ids_dtype, rows_dtype, device)
    eo = eo.nan_to_num()  # unread rows: zero gradient either way, but NaN * 0 would poison the reference's
    args = (ids, 0, 8, rows, zero_dead_rows, renormalize)
    dy = randn(9, 24, device=device)

    def op(e, weights):
        return im.moe_combine(e, weights, ids, (0, 8), rows, zero_dead_rows, renormalize)

    got = _grads(op, eo, w, grad_out=dy)
    # the spec's gradient in float64 (autograd through bf16 arithmetic would round every intermediate)
    want = _grads(
        lambda e, weights: reference.moe_combine_ref(e, weights, *args), eo.double(), w.double(), grad_out=dy.double()
    )
    assert got[0].dtype == eo.dtype and got[1].dtype == w_dtype
    # the op's w / sum is rounded to w's dtype, as its forward uses it: one ulp of it (through a difference, for
    # the weights' own gradient)
    torch.testing.assert_close(got[0], want[0].float(), **GRAD_TOL[w_dtype if renormalize else torch.float32])
    scale = want[1].abs().max().item()
    tol = GRAD_TOL[w_dtype]
    torch.testing.assert_close(got[1].double(), want[1], rtol=tol["rtol"], atol=tol["rtol"] * scale + tol["atol"])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_matches_eager(device):
    # a MoE tail with both ops in a compiled forward and backward (AOTAutograd traces the backward formulas)
    def tail(h, w, ids):
        a = im.silu_and_mul(h, expert_ids=ids.view(-1), expert_range=(0, 4))
        return im.moe_combine(a, w, ids, (0, 4), renormalize=True)

    h = randn(16 * 2, 2 * 32, device=device)
    w = torch.rand(16, 2, device=device)
    ids = torch.randint(-1, 5, (16, 2), device=device)
    dy = randn(16, 32, device=device)
    eager = _grads(lambda a, b: tail(a, b, ids), h, w, grad_out=dy)
    compiled_tail = torch.compile(tail, fullgraph=True)
    compiled = _grads(lambda a, b: compiled_tail(a, b, ids), h, w, grad_out=dy)
    for g, e in zip(compiled, eager):
        torch.testing.assert_close(g, e, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_integer_ops_return_no_gradient(device):
    w = torch.rand(4, 2, device=device, requires_grad=True)
    ids = torch.randint(0, 8, (4, 2), device=device)
    packed = im.pack_topk_ids_weights(ids, w)
    assert packed.dtype == torch.int32 and not packed.requires_grad
    assert not any(t.requires_grad for t in im.expert_sort(ids, (0, 8)))
