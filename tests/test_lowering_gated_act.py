"""Lowering of the gated activation and its expert masks (CPU graphs, rewritten with INDUCTOR_MOE_DEVICES=cpu):
every spelling is rewritten exactly once and computes what the op computes (bit for bit: the CPU op is the
reference); masks become the op's filter with the same dead rows for every id value; near misses are not
rewritten and say why; symbolic batch and d match and do not recompile."""

from __future__ import annotations

import re

import expecttest
import pytest
import torch
import torch.nn.functional as F

from inductor_moe import reference

from helpers import DTYPES, TOL, assert_compiles_once, compile_rewrite, extreme_ids, families, randn

ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}
MODULES = {"silu": torch.nn.SiLU(), "gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU(approximate="tanh")}


def _half(x):
    return x.shape[-1] // 2


SPELLINGS = {
    "slice": lambda a, x: ACTS[a](x[..., : _half(x)]) * x[..., _half(x) :],
    "narrow": lambda a, x: ACTS[a](x.narrow(-1, 0, _half(x))) * x.narrow(-1, _half(x), _half(x)),
    "chunk": lambda a, x: (lambda g, u: ACTS[a](g) * u)(*x.chunk(2, dim=-1)),
    "split": lambda a, x: (lambda g, u: ACTS[a](g) * u)(*x.split(_half(x), dim=-1)),
    "split list, up first": lambda a, x: (lambda g, u: u * ACTS[a](g))(*x.split([_half(x)] * 2, dim=-1)),
    "module": lambda a, x: MODULES[a](x[..., : _half(x)]) * x[..., _half(x) :],
    "view [..., 2, d], halves selected": lambda a, x: (lambda y: ACTS[a](y[..., 0, :]) * y[..., 1, :])(
        x.view(*x.shape[:-1], 2, _half(x))
    ),
    "unflatten + unbind": lambda a, x: (lambda g, u: ACTS[a](g) * u)(*x.unflatten(-1, (2, _half(x))).unbind(-2)),
    "fp32 math (the reference)": lambda a, x: reference.act_and_mul_ref(x, a),
}
SILU_SPELLINGS = {
    "g * sigmoid(g) * u": lambda x: (lambda g, u: g * torch.sigmoid(g) * u)(*x.chunk(2, -1)),
    "u * (sigmoid(g) * g)": lambda x: (lambda g, u: u * (torch.sigmoid(g) * g))(*x.chunk(2, -1)),
}


def assert_rewritten(fn, x, activation, ulps=1):
    """fn(x) compiles to one gated_act rewrite, equals the op (the reference) bit for bit, and eager within
    ``ulps`` ulps of the dtype (eager bf16/fp16 rounds the activation before the product)."""
    out, report = compile_rewrite(fn, x)
    assert families(report) == ["gated_act"], report
    assert torch.equal(out, reference.act_and_mul_ref(x, activation))
    tol = TOL[x.dtype]
    torch.testing.assert_close(out, fn(x), rtol=tol["rtol"] * ulps, atol=tol["atol"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_spellings(spelling, activation, dtype):
    x = randn(6, 2 * 40, dtype=dtype)
    assert_rewritten(lambda x: SPELLINGS[spelling](activation, x), x, activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spelling", list(SILU_SPELLINGS))
def test_silu_as_sigmoid_product(spelling, dtype):
    # eager rounds sigmoid, the product with the gate and the product with up: up to two ulps from the op
    x = randn(7, 2 * 24, dtype=dtype)
    assert_rewritten(SILU_SPELLINGS[spelling], x, "silu", ulps=2)


def test_leading_dims_and_odd_d():
    x = randn(3, 5, 2 * 37, dtype=torch.bfloat16)
    assert_rewritten(lambda x: SPELLINGS["chunk"]("gelu", x), x, "gelu")


def test_two_gated_activations_in_one_graph():
    def fn(x):
        y = SPELLINGS["slice"]("silu", x)
        return SPELLINGS["chunk"]("gelu_tanh", y)

    x = randn(4, 4 * 16, dtype=torch.float16)
    out, report = compile_rewrite(fn, x)
    assert families(report) == ["gated_act", "gated_act"]
    expected = reference.act_and_mul_ref(reference.act_and_mul_ref(x, "silu"), "gelu_tanh")
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------------------------------
# Expert masks folded into the filter


def _y(x):
    return SPELLINGS["slice"]("silu", x)


def _index_put(x, ids):
    y = _y(x)
    y[ids < 0] = 0
    return y


MASKS = {
    # name: (fn(x, ids), the rows it zeroes, as a function of ids)
    "where(ids == -1, 0, y)": (lambda x, ids: torch.where((ids == -1)[:, None], 0, _y(x)), lambda ids: ids == -1),
    "where(ids < 0, 0.0, y)": (lambda x, ids: torch.where(ids.unsqueeze(-1) < 0, 0.0, _y(x)), lambda ids: ids < 0),
    "masked_fill(ids >= 8)": (lambda x, ids: _y(x).masked_fill((ids >= 8)[:, None], 0), lambda ids: ids >= 8),
    "where(live range, y, 0)": (
        lambda x, ids: torch.where(((ids >= 2) & (ids < 6)).unsqueeze(1), _y(x), 0),
        lambda ids: (ids < 2) | (ids >= 6),
    ),
    "where(~live range, 0, y)": (
        lambda x, ids: torch.where(~((ids >= 2) & (ids < 6))[:, None], 0, _y(x)),
        lambda ids: (ids < 2) | (ids >= 6),
    ),
    "where((ids < 0) | (ids >= 8), 0, y)": (
        lambda x, ids: torch.where(((ids < 0) | (ids >= 8))[:, None], 0, _y(x)),
        lambda ids: (ids < 0) | (ids >= 8),
    ),
    "where(ids != -1, y, 0)": (lambda x, ids: torch.where((ids != -1)[:, None], _y(x), 0), lambda ids: ids == -1),
    "y[ids < 0] = 0": (_index_put, lambda ids: ids < 0),
    "where(ids == -1, zeros_like(y), y)": (
        lambda x, ids: (lambda y: torch.where((ids == -1)[:, None], torch.zeros_like(y), y))(_y(x)),
        lambda ids: ids == -1,
    ),
    "where(live expand_as y, y, 0)": (
        lambda x, ids: (lambda y: torch.where((ids >= 0)[:, None].expand_as(y), y, 0.0))(_y(x)),
        lambda ids: ids < 0,
    ),
    "input: where(ids == -1, 0, x)": (
        lambda x, ids: _y(torch.where((ids == -1)[:, None], 0, x)),
        lambda ids: ids == -1,
    ),
    "input: masked_fill(ids >= 8)": (lambda x, ids: _y(x.masked_fill((ids >= 8)[:, None], 0)), lambda ids: ids >= 8),
}


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mask", list(MASKS))
def test_masks_become_the_filter(mask, ids_dtype):
    fn, dead = MASKS[mask]
    ids = extreme_ids(ids_dtype, "cpu")  # both ends of the dtype and every bound above
    x = randn(ids.numel(), 2 * 24, dtype=torch.bfloat16)
    out, report = compile_rewrite(fn, x, ids)
    assert families(report) == ["gated_act", "gated_act"], report
    # one filtered op computes the result (inputs are numbered in dynamo's order)
    assert re.fullmatch(
        r"v0 = inductor_moe.act_and_mul\(in\d, 'silu', in\d, 1, -?\d+, -?\d+\)\nreturn \[v0\]", report.graphs[0]
    )
    # the same dead rows as the spelling for every id value, exact zeros there, the op's result elsewhere
    expected = torch.where(dead(ids)[:, None], 0, reference.act_and_mul_ref(x, "silu"))
    assert torch.equal(out, expected)
    torch.testing.assert_close(out, fn(x, ids), **TOL[torch.bfloat16])


@pytest.mark.parametrize("block", [1, 4])
def test_per_block_ids(block):
    rows = 4 * 9 + (block - 1)  # the last block is partial when block > 1
    ids = torch.randint(-1, 4, ((rows + block - 1) // block,), dtype=torch.int32)
    x = randn(rows, 2 * 16, dtype=torch.float16)

    def fn(x, ids):
        dead = (ids == -1).repeat_interleave(block)[: x.shape[0]]
        return torch.where(dead[:, None], 0, _y(x))

    out, report = compile_rewrite(fn, x, ids)
    assert families(report) == ["gated_act", "gated_act"], report
    assert re.search(rf"act_and_mul\(in\d, 'silu', in\d, {block}, 0, -1\)", report.graphs[0]), report.graphs[0]
    assert torch.equal(out, reference.act_and_mul_ref(x, "silu", ids, block, 0, -1))


@pytest.mark.parametrize("descending", [False, True])
def test_ids_of_sorted_rows_read_through_the_sort(descending):
    # a grouped-GEMM block's rows are sorted by expert: the mask is over ids gathered by the sort's indices,
    # which the op reads through the index (a permutation: never negative, never out of range)
    torch.manual_seed(0)
    ids = torch.randint(-1, 6, (37,))
    x = randn(37, 2 * 24, dtype=torch.bfloat16)

    def fn(x, ids):
        order = torch.argsort(ids, descending=descending)
        return torch.where((ids[order] == -1)[:, None], 0, _y(x))

    out, report = compile_rewrite(fn, x, ids)
    assert families(report) == ["gated_act", "gated_act"], report
    graph = report.graphs[-1]
    assert re.search(r"act_and_mul\(in\d, 'silu', in\d, 1, 0, -1, v\d+\)", graph) and "aten.index(" not in graph, graph
    order = torch.argsort(ids, descending=descending)
    assert torch.equal(out, reference.act_and_mul_ref(x, "silu", ids[order], 1, 0, -1))
    assert torch.equal(out, reference.act_and_mul_ref(x, "silu", ids, 1, 0, -1, expert_ids_index=order))


def test_ids_gathered_by_any_index_stay_gathered():
    # an arbitrary index may wrap around (negative) where the op's index may not: the gathered ids are passed
    ids = torch.randint(-1, 6, (8,))
    index = torch.tensor([0, -1, 3, 3, 7, -8, 2, 5])
    x = randn(8, 2 * 16, dtype=torch.bfloat16)

    def fn(x, ids, index):
        return torch.where((ids[index] == -1)[:, None], 0, _y(x))

    out, report = compile_rewrite(fn, x, ids, index)
    assert families(report) == ["gated_act", "gated_act"], report
    assert re.search(r"act_and_mul\(in\d, 'silu', v\d+, 1, 0, -1\)", report.graphs[-1]), report.graphs[-1]
    assert torch.equal(out, reference.act_and_mul_ref(x, "silu", ids[index], 1, 0, -1))


# ------------------------------------------------------------------------------------------------------------
# Near misses: not rewritten (or the mask not folded), with the reason recorded; results still right


def _rejections(report):
    return " | ".join(r.reason for r in report.rejected)


NEAR_MISSES = {
    # name: (fn, input, gated_act rewrites, a phrase of the recorded reason)
    "slices of dim 0": (lambda x: F.silu(x[:4]) * x[4:], randn(8, 16), 0, "not of the last dim"),
    "d is not half": (lambda x: F.silu(x[..., :8]) * x[..., 8:16], randn(4, 18), 0, "not the first and second half"),
    "halves swapped": (lambda x: F.silu(x[..., 8:]) * x[..., :8], randn(4, 16), 0, "not the first and second half"),
    "transposed input": (lambda x: _y(x.t()), randn(16, 6), 0, "layout"),
    "view halves swapped": (
        lambda x: (lambda y: F.silu(y[:, 1]) * y[:, 0])(x.view(4, 2, 8)),
        randn(4, 16),
        0,
        "not the first and second half",
    ),
    "view into quarters": (
        lambda x: (lambda y: F.silu(y[:, 0]) * y[:, 1])(x.view(4, 4, 4)),
        randn(4, 16),
        0,
        "does not split the last dim",
    ),
    "view over the rows too": (
        lambda x: (lambda y: F.silu(y[:, :, 0]) * y[:, :, 1])(x.view(2, 2, 2, 8)),
        randn(4, 16),
        0,
        "does not split the last dim",
    ),
    "unbind of the rows of a split view": (
        lambda x: (lambda g, u: F.silu(g) * u)(*x.view(2, 2, 8).unbind(0)),
        randn(2, 16),
        0,
        "not one of its two halves",
    ),
    "mask over columns": (
        lambda x: torch.where(torch.arange(8) < 3, 0.0, _y(x)),
        randn(4, 16),
        1,
        "not one value per row",
    ),
    "multiplied by a 0/1 mask": (
        lambda x: _y(x) * (torch.arange(4) % 2 == 0).float()[:, None],
        randn(4, 16),
        1,
        "0/1 mask",
    ),
    "dead rows get fp32 zeros": (
        lambda x: torch.where((torch.arange(4) % 2 == 0)[:, None], torch.zeros(4, 8), _y(x)),
        randn(4, 16, dtype=torch.bfloat16),
        1,
        "not 0",
    ),
    "dead rows get -0.0": (
        lambda x: torch.where((torch.arange(4) % 2 == 0)[:, None], -0.0, _y(x)),
        randn(4, 16),
        1,
        "not 0",
    ),
    "mask of a float": (
        lambda x: torch.where((x[:, 0] > 0)[:, None], 0.0, _y(x)),
        randn(4, 16),
        1,
        "not int32 or int64 expert ids",
    ),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_near_misses(case):
    fn, x, rewrites, reason = NEAR_MISSES[case]
    out, report = compile_rewrite(fn, x)
    assert families(report) == ["gated_act"] * rewrites, report
    assert reason in _rejections(report), report
    torch.testing.assert_close(out, fn(x), **TOL[x.dtype])


def test_mask_of_two_id_tensors_or_a_tensor_bound():
    x, a, b = randn(6, 16), torch.tensor([0, -1, 2, 3, -1, 5]), torch.tensor([1, 1, -1, 1, 1, 1])
    fn = lambda x, a, b: torch.where(((a < 0) | (b < 0))[:, None], 0, _y(x))  # noqa: E731
    out, report = compile_rewrite(fn, x, a, b)
    assert families(report) == ["gated_act"] and "two id tensors" in _rejections(report)
    assert torch.equal(out, torch.where(((a < 0) | (b < 0))[:, None], 0, reference.act_and_mul_ref(x, "silu")))
    fn = lambda x, a, e: torch.where((a >= e)[:, None], 0, _y(x))  # noqa: E731
    out, report = compile_rewrite(fn, x, a, torch.tensor(3))
    assert families(report) == ["gated_act"]
    torch.testing.assert_close(out, fn(x, a, torch.tensor(3)))


def test_settings_turn_rewriting_off():
    from inductor_moe import config

    x = randn(4, 16)
    out, report = compile_rewrite(_y, x)
    assert families(report) == ["gated_act"]
    with config.override(families="topk_pack,combine"):
        out, report = compile_rewrite(_y, x)
    assert families(report) == [] and not report.rejected
    # CPU graphs are not rewritten by default (compile_rewrite turns them on), and the report says so
    import inductor_moe as im

    report = im.explain(_y, x)
    assert families(report) == [] and "cpu graphs are not rewritten" in _rejections(report)


# ------------------------------------------------------------------------------------------------------------
# Symbolic sizes


@pytest.mark.parametrize("spelling", ["chunk", "unflatten + unbind"])
def test_symbolic_batch_and_d_match_without_recompiles(spelling):
    from inductor_moe import backend, config

    xs = []

    def make_args(size):
        rows, d = size
        xs[:] = [randn(rows, 2 * d)]
        return tuple(xs)

    with config.override(devices="cpu"), backend.reporting() as report:
        assert_compiles_once(
            lambda x: SPELLINGS[spelling]("gelu", x),
            make_args,
            [(3, 8), (17, 8), (64, 24), (1, 40), (0, 8)],
            lambda out, _: torch.equal(out, reference.act_and_mul_ref(xs[0], "gelu")) or pytest.fail("not exact"),
            backend="inductor_moe",
            dims=(0, 1),
        )
    assert families(report) == ["gated_act"]


# ------------------------------------------------------------------------------------------------------------
# Graph snapshots (EXPECTTEST_ACCEPT=1 pytest ... rewrites them)


class TestSnapshots(expecttest.TestCase):
    def graph(self, fn, *args):
        _, report = compile_rewrite(fn, *args)
        return report.graphs[-1]

    def test_plain(self):
        self.assertExpectedInline(
            self.graph(_y, randn(4, 16, dtype=torch.bfloat16)),
            """\
v0 = inductor_moe.act_and_mul(in0, 'silu')
return [v0]""",
        )

    def test_where_after(self):
        fn, _ = MASKS["where(ids == -1, 0, y)"]
        self.assertExpectedInline(
            self.graph(fn, randn(4, 16), torch.tensor([0, -1, 2, 3])),
            """\
v0 = inductor_moe.act_and_mul(in1, 'silu', in0, 1, 0, -1)
return [v0]""",
        )

    def test_mask_on_input(self):
        fn, _ = MASKS["input: masked_fill(ids >= 8)"]
        self.assertExpectedInline(
            self.graph(fn, randn(4, 16), torch.tensor([0, 9, 2, 3])),
            """\
v0 = inductor_moe.act_and_mul(in0, 'silu', in1, 1, -9223372036854775808, 8)
return [v0]""",
        )

    def test_mask_multiplied_is_kept(self):
        fn, x, _, _ = NEAR_MISSES["multiplied by a 0/1 mask"]
        self.assertExpectedInline(
            self.graph(fn, x),
            """\
v0 = inductor_moe.act_and_mul(in0, 'silu')
v1 = prims.iota(4, start=0, step=1, dtype=int64, device=device(type='cpu'), requires_grad=False)
v2 = aten.remainder(v1, 2)
v3 = aten.eq(v2, 0)
v4 = prims.convert_element_type(v3, float32)
v5 = aten.unsqueeze(v4, 1)
v6 = aten.mul(v0, v5)
return [v6]""",
        )
