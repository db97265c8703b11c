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
    "view * w.view(T, K, 1), sum(1)": lambda eo, w: (rows(eo, w) * w.view(*w.shape, 1)).sum(1),
    "bmm": lambda eo, w: torch.bmm(w.unsqueeze(1), rows(eo, w)).squeeze(1),
    "matmul": lambda eo, w: (w.unsqueeze(1) @ rows(eo, w)).squeeze(1),
    "einsum": lambda eo, w: torch.einsum("tkh,tk->th", rows(eo, w), w),
    "einsum, weights first": lambda eo, w: torch.einsum("tk,tkh->th", w, rows(eo, w)),
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


@pytest.mark.parametrize("spelling", ["view * w[..., None], sum(1)", "view * w.view(T, K, 1), sum(1)"])
def test_one_expert_per_token(spelling):
    # k = 1: expert_out viewed as [tokens, 1, hidden] inserts a 1 before the last dim, which stays a reshape
    # (canonicalize.py turns only an appended 1 into unsqueeze)
    eo, w = randn(6, 24, dtype=torch.bfloat16), torch.rand(6, 1, dtype=torch.bfloat16)
    out, report = compile_rewrite(SPELLINGS[spelling], eo, w)
    assert families(report) == ["combine"], report
    assert torch.equal(out, reference.moe_combine_ref(eo, w))


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
    "where(ids == -1, zeros_like(terms), terms).sum(1)": (
        lambda eo, w, ids: (lambda t: torch.where((ids == -1)[..., None], torch.zeros_like(t), t))(
            rows(eo, w) * w[..., None]
        ).sum(1),
        lambda ids: ids == -1,
        torch.bfloat16,
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


# ------------------------------------------------------------------------------------------------------------
# Rows gathered back to token order (grouped-GEMM MoE blocks)


def grouped_tail(
    y,
    w,
    ids,
    lo,
    num_local,
    inverse=lambda order: torch.argsort(order),
    zero=lambda y: 0,
    return_inverse=False,
    scatter=None,
):
    """The tail of inductor_moe/testing.py's GroupedMoE: y holds the rows sorted by local expert (other ranks'
    experts last, under a sentinel); zero those, put the rows back in token order, weight and sum over k.
    With ``return_inverse`` also the inverse permutation it put them back with; with ``scatter`` (one of
    SCATTERS) the rows are scattered to their pairs instead of gathered through the inverse."""
    local = ids - lo
    sentinel = torch.where((local >= 0) & (local < num_local), local, num_local).view(-1)
    order = torch.argsort(sentinel, stable=True)
    remote = sentinel[order] == num_local
    masked = torch.where(remote[:, None], zero(y), y)
    if scatter is None:
        inv = inverse(order)
        back = masked[inv]
    else:
        inv, back = None, SCATTERS[scatter](masked, order)
    out = (back.view(*w.shape, -1) * w[..., None]).sum(1).to(y.dtype)
    return (out, inv) if return_inverse else out


def _setitem(rows, order):
    back = torch.empty_like(rows)
    back[order] = rows
    return back


# ways of putting sorted rows back in pair order without the inverse: out[order[i]] = rows[i]
SCATTERS = {
    "out[order] = rows": _setitem,
    "zeros.index_copy(0, order, rows)": lambda rows, order: torch.zeros_like(rows).index_copy(0, order, rows),
}


def grouped_case(tokens=6, k=4, hidden=24, lo=3, num_local=4):
    ids = torch.stack([torch.randperm(12)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k)
    local = ids - lo
    remote = ((local < 0) | (local >= num_local)).view(-1)
    y = randn(tokens * k, hidden, dtype=torch.bfloat16)
    # the sorted layout puts remote rows last, where a grouped GEMM writes nothing: NaN there must not show
    y[len(y) - int(remote.sum()) :] = float("nan")
    return y, w, ids, remote.view(tokens, k)


@pytest.mark.parametrize("zero", [lambda y: 0, torch.zeros_like], ids=["0", "zeros_like"])
def test_gathered_masked_rows_become_src_rows_and_filter(zero):
    torch.manual_seed(0)
    y, w, ids, remote = grouped_case()
    assert remote.any() and (~remote).any()
    out, report = compile_rewrite(lambda *a: grouped_tail(*a, zero=zero), y, w, ids, 3, 4)
    assert families(report) == ["expert_sort", "combine"], report
    graph = report.graphs[-1]
    # y read through the inverse permutation, the sentinel ids as the pairs' filter (live iff id != 4: the
    # wrapped range (5, 4)), dead pairs adding w * 0; neither gather nor the rows' where is left
    assert re.search(r"inductor_moe\.moe_combine\(in\d, in\d, v\d+, 5, 4, v\d+, True\)", graph), graph
    assert "aten.index(" not in graph and graph.count("aten.where(") == 1, graph
    # argsort(order) of the permutation order is its inverse: scattered (indexing.inverse_permutation), not sorted
    assert graph.count("aten.sort(") == 1 and re.search(r"aten\.index_put_\(v\d+, \[v\d+\], v\d+\)", graph), graph
    assert not out.isnan().any()
    # the same pairs dropped (the remote ones), the rest the op's sum over the rows put back in order
    local = ids - 3
    sentinel = torch.where((local >= 0) & (local < 4), local, 4).view(-1)
    inverse = torch.argsort(torch.argsort(sentinel, stable=True)).view(w.shape)
    expected = reference.moe_combine_ref(y, w, torch.where(remote, -1, 0), src_rows=inverse)
    assert torch.equal(out, expected)
    tol = TOL[torch.bfloat16]["rtol"]
    torch.testing.assert_close(out, grouped_tail(y.nan_to_num(), w, ids, 3, 4), rtol=4 * tol, atol=4 * tol)


@pytest.mark.parametrize("scatter", list(SCATTERS))
def test_scattered_masked_rows_become_src_rows_and_filter(scatter):
    # the rows scattered back to their pairs instead of gathered: the same op call, reading y through the
    # scattered inverse; the scattered copy of y is never made
    torch.manual_seed(4)
    y, w, ids, remote = grouped_case()
    out, report = compile_rewrite(lambda *a: grouped_tail(*a, scatter=scatter), y, w, ids, 3, 4)
    assert families(report) == ["expert_sort", "combine"], report
    graph = report.graphs[-1]
    assert re.search(r"inductor_moe\.moe_combine\(in\d, in\d, v\d+, 5, 4, v\d+, True\)", graph), graph
    assert "aten.index_put(" not in graph and graph.count("aten.index_put_(") == 1, graph  # only the inverse's
    local = ids - 3
    sentinel = torch.where((local >= 0) & (local < 4), local, 4).view(-1)
    inverse = torch.argsort(torch.argsort(sentinel, stable=True)).view(w.shape)
    assert torch.equal(out, reference.moe_combine_ref(y, w, torch.where(remote, -1, 0), src_rows=inverse))
    tol = TOL[torch.bfloat16]["rtol"]
    eager = grouped_tail(y.nan_to_num(), w, ids, 3, 4, scatter=scatter)
    torch.testing.assert_close(out, eager, rtol=4 * tol, atol=4 * tol)


@pytest.mark.parametrize("scatter", list(SCATTERS))
def test_scattered_rows_are_read_in_place(scatter):
    # no mask: rows sorted by any key, scattered back; the op reads them through the inverse, unfiltered
    torch.manual_seed(6)
    y, w, key = randn(24, 16, dtype=torch.bfloat16), torch.rand(6, 4), torch.randint(0, 5, (24,))

    def fn(y, w, key):
        back = SCATTERS[scatter](y, torch.argsort(key, stable=True))
        return (back.view(6, 4, -1) * w[..., None]).sum(1).to(y.dtype)

    out, report = compile_rewrite(fn, y, w, key)
    assert families(report) == ["combine"], report
    graph = report.graphs[-1]
    assert re.search(r"inductor_moe\.moe_combine\(in\d, in\d, None, 0, 2147483647, v\d+\)", graph), graph
    assert "aten.index_put(" not in graph, graph
    inverse = torch.argsort(torch.argsort(key, stable=True)).view(6, 4)
    assert torch.equal(out, reference.moe_combine_ref(y, w, src_rows=inverse))


SCATTERS_KEPT = {
    # accumulated: rows sharing an index would add up, so it is no reordering (here the index is a permutation)
    "accumulated": lambda y, order: torch.zeros_like(y).index_put((torch.argsort(order),), y, accumulate=True),
    # by an index that need not be a permutation (an input)
    "by an input index": lambda y, order: torch.zeros_like(y).index_copy(0, order, y),
}


@pytest.mark.parametrize("case", list(SCATTERS_KEPT))
def test_scatters_that_are_not_a_reordering_stay(case):
    # the scattered copy is materialised and the op reads it
    torch.manual_seed(5)
    y, w, order = randn(12, 16, dtype=torch.bfloat16), torch.rand(3, 4), torch.randperm(12)
    scattered = SCATTERS_KEPT[case]

    def fn(y, w, order):
        return (scattered(y, order).view(3, 4, -1) * w[..., None]).sum(1).to(y.dtype)

    out, report = compile_rewrite(fn, y, w, order)
    assert families(report) == ["combine"], report
    graph = report.graphs[-1]
    assert re.search(r"inductor_moe\.moe_combine\(v\d+, in\d\)", graph) and "aten.index_put(" in graph, graph
    assert torch.equal(out, reference.moe_combine_ref(scattered(y, order), w))


def test_gathered_masked_rows_keep_nan_weights():
    # the spelling multiplies a zeroed row by its weight: a NaN or inf weight of a remote pair gives NaN, which
    # the rewrite keeps (zero_dead_rows), while a finite one changes nothing
    torch.manual_seed(1)
    y, w, ids, remote = grouped_case()
    t_nan, t_inf = [int(t) for t in remote.any(1).nonzero()[:2, 0]]
    w[t_nan][remote[t_nan]] = float("nan")
    w[t_inf][remote[t_inf]] = float("inf")
    out, report = compile_rewrite(grouped_tail, y, w, ids, 3, 4)
    assert families(report) == ["expert_sort", "combine"], report
    eager = grouped_tail(y.nan_to_num(), w, ids, 3, 4)
    assert out[t_nan].isnan().all() and out[t_inf].isnan().all()
    assert eager[t_nan].isnan().all() and eager[t_inf].isnan().all()
    finite = torch.ones(len(w), dtype=torch.bool)
    finite[[t_nan, t_inf]] = False
    assert not out[finite].isnan().any()


def test_gathered_rows_without_a_provable_inverse():
    # argsort(order, descending) is a permutation (so a gather through src_rows), but not order's inverse: the
    # rows' mask is no longer the pairs' and stays a where, read as it is
    torch.manual_seed(2)
    y, w, ids, _ = grouped_case()
    y = y.nan_to_num()

    def descending(order):
        return torch.argsort(order, descending=True)

    out, report = compile_rewrite(lambda *a: grouped_tail(*a, inverse=descending), y, w, ids, 3, 4)
    assert families(report) == ["expert_sort", "combine"], report
    graph = report.graphs[-1]
    assert re.search(r"inductor_moe\.moe_combine\(v\d+, in\d, None, 0, 2147483647, v\d+\)", graph), graph
    assert "aten.where(" in graph and graph.count("aten.sort(") == 2 and "index_put" not in graph, graph
    eager = grouped_tail(y, w, ids, 3, 4, inverse=descending)
    tol = TOL[torch.bfloat16]["rtol"]
    torch.testing.assert_close(out, eager, rtol=4 * tol, atol=4 * tol)


def test_gathered_rows_under_symbolic_tokens():
    # the grouped tail with a dynamic batch: one graph, the sort narrowed and the inverse scattered at every size
    from torch._dynamo.testing import CompileCounterWithBackend

    from inductor_moe import backend, config

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor_moe")
    compiled = torch.compile(lambda *a: grouped_tail(*a, 3, 4), backend=counter, fullgraph=True, dynamic=True)
    with config.override(devices="cpu"), backend.reporting() as report:
        for tokens in (5, 11, 40):  # not 6: 6 * 4 pairs would duck-size to the hidden size 24
            torch.manual_seed(tokens)
            y, w, ids, remote = grouped_case(tokens=tokens)
            local = ids - 3
            sentinel = torch.where((local >= 0) & (local < 4), local, 4).view(-1)
            inverse = torch.argsort(torch.argsort(sentinel, stable=True)).view(w.shape)
            expected = reference.moe_combine_ref(y, w, torch.where(remote, -1, 0), src_rows=inverse)
            assert torch.equal(compiled(y, w, ids), expected)
    assert counter.frame_count == 1
    assert families(report) == ["expert_sort", "combine"], report
    assert "aten.index_put_(" in report.graphs[-1] and report.graphs[-1].count("aten.sort(") == 1, report.graphs[-1]


def test_inverse_used_elsewhere_stays_a_sort():
    # an argsort(order) that the program returns too is sorted anyway: the combine reads it, no second copy
    torch.manual_seed(3)
    y, w, ids, _ = grouped_case()
    (out, inv), report = compile_rewrite(lambda *a: grouped_tail(*a, return_inverse=True), y, w, ids, 3, 4)
    assert families(report) == ["expert_sort", "combine"], report
    graph = report.graphs[-1]
    assert graph.count("aten.sort(") == 2 and "index_put" not in graph, graph
    assert torch.equal(inv, grouped_tail(y, w, ids, 3, 4, return_inverse=True)[1])
    assert torch.equal(out, compile_rewrite(grouped_tail, y, w, ids, 3, 4)[0])


def test_rows_gathered_by_any_index_are_materialised():
    # an arbitrary index may be negative (it wraps around) or repeat: only a sort's indices become src_rows
    y, w = randn(12, 16, dtype=torch.bfloat16), torch.rand(3, 4)
    index = torch.tensor([3, -1, 0, 5, 5, 2, 7, 1, 11, -12, 4, 6])

    def fn(y, w, index):
        return (y[index].view(3, 4, -1) * w[..., None]).sum(1).to(y.dtype)

    out, report = compile_rewrite(fn, y, w, index)
    assert families(report) == ["combine"], report
    assert re.search(r"inductor_moe\.moe_combine\(v\d+, in\d\)", report.graphs[-1]), report.graphs[-1]
    assert torch.equal(out, reference.moe_combine_ref(y[index], w))


# ------------------------------------------------------------------------------------------------------------
# Top-k renormalisation folded into the op


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_renormalized_weights_are_folded(w_dtype):
    eo, w = randn(5 * 8, 24, dtype=torch.bfloat16), torch.rand(5, 8).to(w_dtype)

    def fn(eo, w):
        w = w / w.sum(dim=-1, keepdim=True)
        return (rows(eo, w) * w[..., None]).sum(1).to(eo.dtype)

    out, report = compile_rewrite(fn, eo, w)
    assert families(report) == ["combine"], report
    assert re.fullmatch(
        r"v0 = inductor_moe.moe_combine\(in\d, in\d, None, 0, 2147483647, None, False, True\)\nreturn \[v0\]",
        report.graphs[-1],
    )
    assert torch.equal(out, reference.moe_combine_ref(eo, w, renormalize=True))
    tol = TOL[torch.bfloat16]["rtol"]
    torch.testing.assert_close(out, fn(eo, w), rtol=4 * tol, atol=4 * tol)


def test_renormalized_weights_used_elsewhere_are_not_folded():
    # the normalised weights are an output too: they are computed anyway, and the op takes them as they are
    eo, w = randn(3 * 4, 16, dtype=torch.bfloat16), torch.rand(3, 4)

    def fn(eo, w):
        w = w / w.sum(dim=-1, keepdim=True)
        return (rows(eo, w) * w[..., None]).sum(1).to(eo.dtype), w

    (out, wn), report = compile_rewrite(fn, eo, w)
    assert families(report) == ["combine"], report
    assert "renormalize" not in report.graphs[-1] and "aten.div(" in report.graphs[-1]
    assert torch.equal(out, reference.moe_combine_ref(eo, wn))
