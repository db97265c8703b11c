"""Lowering of the weighted top-k combine: view+mul+sum (either order, cast back or not, fp32 math), bmm and
einsum spellings are rewritten into moe_combine and equal the op (the reference) exactly and eager within the
rounding of its products; shapes that only look alike are not, with the reason recorded."""

from __future__ import annotations

import re

import expecttest
import pytest
import torch

from inductor_moe import reference

from helpers import TOL, compile_rewrite, extreme_ids, families, randn


def rows(eo, w):
    return eo.view(w.shape[0], w.shape[1], -1)


SPELLINGS = {
    "view * w[..., None], sum(1)": lambda eo, w: (rows(eo, w) * w[..., None]).sum(dim=1),
    "w.unsqueeze(2) * view, sum(-2)": lambda eo, w: (w.unsqueeze(2) * rows(eo, w)).sum(-2),
    "fp32 math, cast back": lambda eo, w: (rows(eo, w).float() * w.float()[..., None]).sum(1).to(eo.dtype),
    "bmm": lambda eo, w: torch.bmm(w.unsqueeze(1), rows(eo, w)).squeeze(1),
    "einsum": lambda eo, w: torch.einsum("tkh,tk->th", rows(eo, w), w),
}

DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32)]


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_spellings(spelling, dtypes):
    eo_dtype, w_dtype = dtypes
    tokens, k, hidden = 5, 4, 40
    eo, w = randn(tokens * k, hidden, dtype=eo_dtype), torch.rand(tokens, k).to(w_dtype)
    fn = SPELLINGS[spelling]
    out, report = compile_rewrite(fn, eo, w)
    assert families(report) == ["combine"], report
    assert torch.equal(out, reference.moe_combine_ref(eo, w))
    # eager rounds each product (and bmm sums in its own order): a few ulps over K = 4 terms
    tol = TOL[eo_dtype]
    torch.testing.assert_close(out, fn(eo, w), rtol=4 * tol["rtol"], atol=4 * tol["rtol"])


def test_fp32_weights_cast_back():
    eo, w = randn(12, 24, dtype=torch.bfloat16), torch.rand(3, 4)
    fn = lambda eo, w: (rows(eo, w) * w[..., None]).sum(1).to(torch.bfloat16)  # noqa: E731
    out, report = compile_rewrite(fn, eo, w)
    assert families(report) == ["combine"]
    assert torch.equal(out, reference.moe_combine_ref(eo, w))
    assert torch.equal(out, fn(eo, w))  # fp32 products, fp32 sum, one rounding: the same computation


NEAR_MISSES = {
    "result stays fp32": (lambda eo, w: (rows(eo, w) * w[..., None]).sum(1), "stays torch.float32"),
    "sum over hidden": (lambda eo, w: (rows(eo, w) * w[..., None]).sum(2), "not over k"),
    "weights over hidden": (
        lambda eo, w: (eo.view(3, 4, 4) * w[:, None, :]).sum(1).to(torch.bfloat16),
        "broadcast as",
    ),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_near_misses(case):
    fn, reason = NEAR_MISSES[case]
    eo, w = randn(12, 4, dtype=torch.bfloat16), torch.rand(3, 4)
    out, report = compile_rewrite(fn, eo, w)
    assert families(report) == [], report
    assert any(reason in r.reason for r in report.rejected), report
    torch.testing.assert_close(out, fn(eo, w))


def test_symbolic_tokens():
    from torch._dynamo.testing import CompileCounterWithBackend

    from inductor_moe import backend, config

    fn = SPELLINGS["view * w[..., None], sum(1)"]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor_moe")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    with config.override(devices="cpu"), backend.reporting() as report:
        for tokens in (3, 9, 33, 2):
            eo, w = randn(tokens * 8, 16), torch.rand(tokens, 8)
            torch._dynamo.mark_dynamic(eo, 0)
            torch._dynamo.mark_dynamic(w, 0)
            assert torch.equal(compiled(eo, w), reference.moe_combine_ref(eo, w))
    assert counter.frame_count == 1
    assert families(report) == ["combine"]


class TestSnapshots(expecttest.TestCase):
    def test_einsum(self):
        _, report = compile_rewrite(SPELLINGS["einsum"], randn(8, 16), torch.rand(2, 4))
        self.assertExpectedInline(
            report.graphs[-1],
            """\
v0 = inductor_moe.moe_combine(in0, in1)
return [v0]""",
        )


FILTERED = {
    # name: (fn(eo, w, ids), the pairs it drops, the weights' dtype)
    "where(ids == -1, 0, terms).sum(1), bf16 weights": (
        lambda eo, w, ids: torch.where((ids == -1)[..., None], 0.0, rows(eo, w) * w[..., None]).sum(1),
        lambda ids: ids == -1,
        torch.bfloat16,
    ),
    "where(live range, terms, 0).sum(1).to(dtype)": (
        lambda eo, w, ids: (
            torch.where(((ids >= 2) & (ids < 6)).unsqueeze(-1), rows(eo, w) * w[..., None], 0).sum(1).to(eo.dtype)
        ),
        lambda ids: (ids < 2) | (ids >= 6),
        torch.float32,
    ),
}


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", list(FILTERED))
def test_masked_terms_become_the_filter(case, ids_dtype):
    fn, dropped, w_dtype = FILTERED[case]
    ids = extreme_ids(ids_dtype, "cpu").view(2, 7)  # every id at the edges of the dtype
    eo, w = randn(14, 24, dtype=torch.bfloat16), torch.rand(2, 7).to(w_dtype)
    eo[dropped(ids).view(-1)] = float("nan")  # dropped pairs' rows are never read: NaN there must not show
    out, report = compile_rewrite(fn, eo, w, ids)
    assert families(report) == ["combine"], report
    assert re.fullmatch(
        r"v0 = inductor_moe.moe_combine\(in\d, in\d, in\d, -?\d+, -?\d+\)\nreturn \[v0\]", report.graphs[0]
    )
    # the same pairs dropped as the spelling, for every id value; the op's result on the others
    assert torch.equal(out, reference.moe_combine_ref(eo, w, torch.where(dropped(ids), -1, 0)))
    # eager rounds each product to bf16 (bf16 weights) or sums in another order: a few ulps over 7 terms
    tol = TOL[torch.bfloat16]["rtol"]
    torch.testing.assert_close(out, fn(eo, w, ids), rtol=4 * tol, atol=4 * tol)
