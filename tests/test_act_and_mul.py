"""act_and_mul / act_and_mul_out: reference semantics, the op on every device against the reference, the
expert filter, bad inputs, opcheck, fake functions and torch.compile.

Tests taking ``device`` run on the CPU in CI (the op's CPU implementation is the reference, so there they
prove the dispatch, checks and shapes) and on the GPU on the device machine (there they prove the kernel).
"""

from __future__ import annotations

import math

import pytest
import torch

import inductor_moe as im
from inductor_moe import reference

from helpers import (
    DEVICES,
    DTYPES,
    FILTER_RANGES,
    TOL,
    assert_matches_reference,
    captured,
    extreme_ids,
    id_in_range,
    poison_allocator,
    poisoned_like,
    randn,
)

ACTIVATIONS = list(reference.ACTIVATIONS)


# ------------------------------------------------------------------------------------------------------------
# Reference semantics: the spec checked against independent float64 formulas


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_formulas(activation):
    x = randn(37, 2 * 19, dtype=torch.float64)
    g, u = x[:, :19], x[:, 19:]
    if activation == "silu":
        expected = g * torch.sigmoid(g) * u
    elif activation == "gelu":
        expected = 0.5 * g * (1 + torch.erf(g / math.sqrt(2))) * u
    else:
        expected = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) * u
    torch.testing.assert_close(reference.act_and_mul_ref(x, activation), expected, rtol=1e-12, atol=1e-12)


def test_reference_rounds_once():
    # fp32 math rounded once: within one bf16 ulp of the exact result and almost always equal to it, unlike
    # the double rounding of silu(g.bf16) * u.bf16, which the kernels (and Inductor's fused code) do not do.
    x = randn(4096, 64, dtype=torch.bfloat16)
    exact = reference.act_and_mul_ref(x.double(), "silu").to(torch.bfloat16)
    single = reference.act_and_mul_ref(x, "silu")
    d = x.shape[-1] // 2
    double = torch.nn.functional.silu(x[:, :d]) * x[:, d:]
    torch.testing.assert_close(single, exact, rtol=2**-7, atol=0)
    assert (single != exact).float().mean() < 0.002
    assert (double != exact).float().mean() > 0.05


def test_reference_filter_semantics():
    x = randn(6, 8)
    ids = torch.tensor([0, -1, 3, 8, -5, 7])
    y = reference.act_and_mul_ref(x, "silu")
    # default range: only negative ids are dead
    z = reference.act_and_mul_ref(x, "silu", ids)
    live = torch.tensor([True, False, True, True, False, True])
    assert torch.equal(z[live], y[live]) and torch.equal(z[~live], torch.zeros_like(z[~live]))
    # (0, 8): id >= 8 is dead too; untouched mode leaves dead rows alone
    out = torch.full((6, 4), 5.0)
    reference.act_and_mul_ref(x, "silu", ids, expert_hi=8, out=out)
    live = torch.tensor([True, False, True, False, False, True])
    assert torch.equal(out[live], y[live]) and torch.equal(out[~live], torch.full((3, 4), 5.0))
    # per-block ids: rows 0-3 follow ids[0], rows 4-5 follow ids[1]
    z = reference.act_and_mul_ref(x, "silu", torch.tensor([-1, 2]), expert_step=4)
    assert torch.equal(z[:4], torch.zeros(4, 4)) and torch.equal(z[4:], y[4:])


# ------------------------------------------------------------------------------------------------------------
# The op against the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "rows,d",
    # accesses of 4 elements (37x4100: d % 8 == 4), of 8 (4097 rows), of 1 (d % 4 != 0)
    [
        (0, 64),
        (1, 1),
        (1, 14336),
        (7, 13),
        (37, 1024),
        (37, 4100),
        (37, 1030),
        (4097, 13),
        (4097, 776),
        (4097, 1024),
        (64, 2 * 4096 + 8),
    ],
)
def test_op_matches_reference(device, dtype, activation, rows, d):
    x = randn(rows, 2 * d, dtype=dtype, device=device)
    poison_allocator((rows, d), dtype, device)
    out = im.act_and_mul(activation, x)
    assert out.is_contiguous()
    assert_matches_reference(out, reference.act_and_mul_ref(x, activation))
    # out= variant, into a poisoned buffer: every element must be written
    out2 = poisoned_like(out)
    assert im.act_and_mul(activation, x, out=out2) is out2
    assert torch.equal(out2, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_16_bit_input(device, dtype, activation):
    # every finite gate value of the dtype (silu's approximate exp covers 16-bit inputs only), up = 1, in rows
    # of 8 (16-byte accesses): within the tolerance of the reference and one-ulp differences rare. Magnitudes
    # of 2**126 and up are left out: there torch's CPU gelu overflows in x * (1 + erf) where its CUDA kernel
    # (and ours) compute 0.5 * x first.
    gate = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    gate = gate[gate.isfinite() & (gate.float().abs() < 2.0**126)]
    gate = gate[: gate.numel() // 8 * 8].view(-1, 8)
    x = torch.cat([gate, torch.ones_like(gate)], dim=1).to(device)
    assert_matches_reference(im.act_and_mul(activation, x), reference.act_and_mul_ref(x, activation))


@pytest.mark.parametrize("device", DEVICES)
def test_public_names(device):
    x = randn(5, 2 * 24, dtype=torch.bfloat16, device=device)
    for fn, act in [(im.silu_and_mul, "silu"), (im.gelu_and_mul, "gelu"), (im.gelu_tanh_and_mul, "gelu_tanh")]:
        assert torch.equal(fn(x), im.act_and_mul(act, x))
        assert torch.equal(fn(x), torch.ops.inductor_moe.act_and_mul(x, act))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims(device, dtype):
    x = randn(3, 5, 2 * 40, dtype=dtype, device=device)
    ids = torch.randint(-1, 4, (3, 5), device=device)
    out = im.silu_and_mul(x, expert_ids=ids)
    assert out.shape == (3, 5, 40)
    assert_matches_reference(out, reference.act_and_mul_ref(x, "silu", ids))
    # ids flattened to [rows] mean the same thing
    assert torch.equal(im.silu_and_mul(x, expert_ids=ids.flatten()), out)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows(device):
    # rows with a stride larger than the row: a slice of a wider buffer, for input and out
    big = randn(37, 2 * 64 + 24, dtype=torch.bfloat16, device=device)
    x = big[:, : 2 * 64]
    out_big = torch.full((37, 80), float("nan"), dtype=torch.bfloat16, device=device)
    out = out_big[:, :64]
    im.silu_and_mul(x, out=out)
    assert_matches_reference(out, reference.act_and_mul_ref(x, "silu"))
    assert out_big[:, 64:].isnan().all()  # nothing written past the view
    # a stride over leading dims that still flattens (size-1 dims are ignored)
    y = randn(1, 37, 1, 2 * 16, device=device)
    assert_matches_reference(im.silu_and_mul(y), reference.act_and_mul_ref(y, "silu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_storage(device, dtype):
    # storage offset of one element: no 16-byte accesses possible, the element-wise path must be right
    buf = randn(7 * 2 * 64 + 1, dtype=dtype, device=device)
    x = buf[1:].view(7, 2 * 64)
    assert_matches_reference(im.gelu_and_mul(x), reference.act_and_mul_ref(x, "gelu"))


# ------------------------------------------------------------------------------------------------------------
# The expert filter


def make_ids(blocks, case, convention, device, num_experts=8):
    live = torch.randint(0, num_experts, (blocks,), device=device)
    if convention == "minus_one":
        dead = torch.full_like(live, -1)
    else:  # "ge_num_experts": ids >= E mark experts that live elsewhere
        dead = torch.randint(num_experts, 2 * num_experts, (blocks,), device=device)
    if case == "none_dead":
        return live
    if case == "all_dead":
        return dead
    return torch.where(torch.rand(blocks, device=device) < 0.4, dead, live)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["random", "all_dead", "none_dead"])
@pytest.mark.parametrize("expert_step", [1, 64])
@pytest.mark.parametrize("convention", ["minus_one", "ge_num_experts"])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_filter(device, dtype, case, expert_step, convention, ids_dtype):
    rows, d = 37 * 7, 104  # rows not a multiple of expert_step: the last block is partial
    x = randn(rows, 2 * d, dtype=dtype, device=device)
    ids = make_ids(math.ceil(rows / expert_step), case, convention, device).to(ids_dtype)
    expert_range = None if convention == "minus_one" else (0, 8)
    lo, hi = expert_range or (reference.EXPERT_LO, reference.EXPERT_HI)
    live = reference.live_rows_ref(ids, rows, expert_step, lo, hi)
    kwargs = dict(expert_ids=ids, expert_step=expert_step, expert_range=expert_range)

    # zero mode: dead rows are zero
    poison_allocator((rows, d), dtype, device)
    out = im.silu_and_mul(x, **kwargs)
    ref = reference.act_and_mul_ref(x, "silu", ids, expert_step, lo, hi)
    assert_matches_reference(out, ref)
    assert torch.equal(out[~live], torch.zeros_like(out[~live]))

    # untouched mode: dead rows keep the poison, live rows are written
    out2 = poisoned_like(out)
    im.silu_and_mul(x, out=out2, **kwargs)
    assert out2[~live].isnan().all()
    assert torch.equal(out2[live], out[live])

    if case == "none_dead":  # the filter must not change a single bit of the live rows
        assert torch.equal(out, im.silu_and_mul(x))
    if case == "all_dead":
        assert not out.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("expert_step,rows,d", [(1, 37, 104), (1, 4097, 768), (64, 37 * 7, 40)])
def test_ids_through_index(device, ids_dtype, index_dtype, expert_step, rows, d):
    # row r's id is ids[index[r // step]]: exactly the filter of the gathered ids ids[index], in both modes
    slots = math.ceil(rows / expert_step)
    ids = torch.randint(-1, 3, (slots + 5,), device=device).to(ids_dtype)  # longer than the index needs
    index = torch.randint(0, slots + 5, (slots,), device=device).to(index_dtype)  # repeats allowed
    x = randn(rows, 2 * d, dtype=torch.bfloat16, device=device)
    gathered = ids[index.long()]
    live = reference.live_rows_ref(gathered, rows, expert_step)
    poison_allocator((rows, d), torch.bfloat16, device)
    out = im.silu_and_mul(x, expert_ids=ids, expert_step=expert_step, expert_ids_index=index)
    assert torch.equal(out, im.silu_and_mul(x, expert_ids=gathered, expert_step=expert_step))
    assert torch.equal(live, reference.live_rows_ref(ids, rows, expert_step, expert_ids_index=index))
    out2 = poisoned_like(out)
    im.silu_and_mul(x, out=out2, expert_ids=ids, expert_step=expert_step, expert_ids_index=index)
    assert out2[~live].isnan().all() and torch.equal(out2[live], out[live])


def test_ids_index_out_of_range_is_an_error():
    # the reference (and so the CPU op) refuses an index outside expert_ids, negative ones included (no wrap)
    x = randn(4, 16)
    ids = torch.zeros(6, dtype=torch.int32)
    for bad in (6, -1):
        index = torch.tensor([0, 1, bad, 2])
        with pytest.raises(IndexError, match=f"expert_ids_index holds {bad}, outside expert_ids' 6 entries"):
            im.silu_and_mul(x, expert_ids=ids, expert_ids_index=index)


@pytest.mark.parametrize("device", DEVICES)
def test_filter_local_expert_range(device):
    # expert parallelism: this rank owns experts [16, 32) of 128; everything else is dead
    x = randn(500, 2 * 48, dtype=torch.bfloat16, device=device)
    ids = torch.randint(0, 128, (500,), device=device, dtype=torch.int32)
    out = im.gelu_tanh_and_mul(x, expert_ids=ids, expert_range=(16, 32))
    live = (ids >= 16) & (ids < 32)
    assert_matches_reference(out, reference.act_and_mul_ref(x, "gelu_tanh", ids, 1, 16, 32))
    assert torch.equal(out[live], im.gelu_tanh_and_mul(x)[live])


@pytest.mark.cuda
@pytest.mark.parametrize(
    "rows,d",
    [
        (37, 768),  # a warp a row, accesses of 4 elements, first pack read ahead of the id (inputs up to 2 MiB)
        (1000, 768),  # a warp a row, 4 elements, no read-ahead
        (4097, 768),  # a warp a row, 8-element accesses, a partial last block of rows
        (37, 2048),
        (4097, 2048),
        (4097, 2056),  # wide blocks above d = 2048
    ],
)
@pytest.mark.parametrize("layout", ["random", "half", "sorted", "none_dead", "all_dead"])
def test_filter_launch_shapes(rows, d, layout):
    x = randn(rows, 2 * d, dtype=torch.bfloat16, device="cuda")
    arange = torch.arange(rows, device="cuda")
    live = {
        "random": torch.rand(rows, device="cuda") >= 0.875,
        "half": torch.rand(rows, device="cuda") >= 0.5,
        "sorted": arange < rows // 8,  # the runner's layout: live rows first
        "none_dead": arange >= 0,
        "all_dead": arange < 0,
    }[layout]
    ids = torch.where(live, 3, -1)
    out = poisoned_like(torch.empty(rows, d, dtype=torch.bfloat16, device="cuda"))
    im.silu_and_mul(x, out=out, expert_ids=ids)
    assert out[~live].isnan().all()
    unfiltered = im.silu_and_mul(x)
    assert torch.equal(out[live], unfiltered[live])  # the filter changes no bit of a live row
    assert_matches_reference(out[live], reference.act_and_mul_ref(x[live], "silu"))
    poison_allocator((rows, d), torch.bfloat16, "cuda")
    zeroed = im.silu_and_mul(x, expert_ids=ids)
    assert torch.equal(zeroed[live], out[live]) and not zeroed[~live].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("lo,hi", FILTER_RANGES)
def test_filter_range_edges(device, ids_dtype, lo, hi):
    # every id at the edges of its dtype, against ranges that are plain, empty and wrapped around
    ids = extreme_ids(ids_dtype, device)
    x = randn(ids.numel(), 2 * 40, device=device)
    live = torch.tensor([id_in_range(i, lo, hi) for i in ids.tolist()], device=device)
    out = im.silu_and_mul(x, expert_ids=ids, expert_range=(lo, hi))
    assert torch.equal(out[live], im.silu_and_mul(x)[live])
    assert not out[~live].any()
    assert torch.equal(reference.live_rows_ref(ids, ids.numel(), 1, lo, hi), live)


# ------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, never a crash or garbage


# ------------------------------------------------------------------------------------------------------------
# opcheck, fake functions under symbolic shapes, torch.compile


def test_fake_symbolic_shapes():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, ids):
        return torch.ops.inductor_moe.act_and_mul(x, "silu", ids)

    gm = make_fx(f, tracing_mode="symbolic")(randn(6, 2 * 10), torch.zeros(6, dtype=torch.int64))
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    x_val, out_val = node.args[0].meta["val"], node.meta["val"]
    assert isinstance(out_val.shape[0], torch.SymInt) and isinstance(out_val.shape[1], torch.SymInt)
    assert out_val.shape[0] == x_val.shape[0]
    assert str(out_val.shape[1]) == str(x_val.shape[1] // 2)
    assert out_val.stride() == (out_val.shape[1], 1)
    # the batch stayed symbolic: the same graph runs other sizes
    x = randn(9, 2 * 7)
    ids = torch.tensor([0, -1, 2, 3, -1, 0, 1, 1, -1])
    assert torch.equal(gm(x, ids), reference.act_and_mul_ref(x, "silu", ids))


# ------------------------------------------------------------------------------------------------------------
# GPU only: PDL, CUDA graphs, streams, 64-bit offsets


def _chain(x, steps):
    """Each launch reads what the previous one wrote: with PDL, a missing or late wait shows up here."""
    outs = [x]
    for _ in range(steps):
        outs.append(im.silu_and_mul(outs[-1]))
    return outs


@pytest.mark.cuda
def test_pdl_on_and_off(monkeypatch):
    x = randn(4097, 2 * 2048, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(-1, 8, (4097,), device="cuda")
    results = {}
    for pdl in ("0", "1"):
        monkeypatch.setenv("INDUCTOR_MOE_PDL", pdl)
        results[pdl] = (im.silu_and_mul(x, expert_ids=ids), _chain(x, 4))
    assert torch.equal(results["0"][0], results["1"][0])
    for a, b in zip(results["0"][1], results["1"][1]):
        assert torch.equal(a, b)
    outs = results["1"][1]
    for prev, nxt in zip(outs, outs[1:]):
        assert_matches_reference(nxt, reference.act_and_mul_ref(prev, "silu"))


@pytest.mark.cuda
@pytest.mark.parametrize("pdl", ["0", "1"])
def test_cuda_graph_capture_and_replay(monkeypatch, pdl):
    monkeypatch.setenv("INDUCTOR_MOE_PDL", pdl)
    x = randn(300, 2 * 1024, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(-1, 8, (300,), device="cuda", dtype=torch.int32)
    out = torch.empty(300, 1024, dtype=torch.bfloat16, device="cuda")

    def step():
        y = im.silu_and_mul(x, expert_ids=ids)  # zero mode
        im.gelu_and_mul(x, out=out, expert_ids=ids)  # untouched mode
        return y, im.gelu_tanh_and_mul(y)  # a dependent launch inside the graph

    graph, (y, z) = captured(step)
    for _ in range(3):
        x.copy_(randn(300, 2 * 1024, dtype=torch.bfloat16, device="cuda"))
        ids.copy_(torch.randint(-1, 8, (300,), device="cuda", dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        live = ids >= 0
        assert_matches_reference(y, reference.act_and_mul_ref(x, "silu", ids))
        assert_matches_reference(z, reference.act_and_mul_ref(y, "gelu_tanh"))
        assert out[~live].isnan().all()
        assert_matches_reference(out[live], reference.act_and_mul_ref(x, "gelu")[live])


def _edge_types(graph) -> dict[tuple[int, int], int]:
    """{(i, j): edge type} between the kernel nodes of a captured graph, numbered in capture order (a chain)."""
    from cuda.bindings import driver

    raw = driver.CUgraph(graph.raw_cuda_graph())
    err, *_, n = driver.cuGraphGetEdges(raw, 0)
    assert err == driver.CUresult.CUDA_SUCCESS
    err, src, dst, data, n = driver.cuGraphGetEdges(raw, n)
    assert err == driver.CUresult.CUDA_SUCCESS
    edges = {int(s): (int(d), int(e.type)) for s, d, e in zip(src[:n], dst[:n], data[:n])}
    (first,) = set(edges) - {d for d, _ in edges.values()}
    order, types = [first], {}
    while order[-1] in edges:
        nxt, kind = edges[order[-1]]
        types[len(order) - 1, len(order)] = kind
        order.append(nxt)
    return types


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm90+"
)
@pytest.mark.parametrize("pdl", ["0", "1"])
def test_captured_launches_use_pdl_where_it_pays(monkeypatch, pdl):
    # A captured chain, and the edge into each launch (launcher.h, Pdl): the activations use PDL only after
    # kernels launched with it (ours, noted by the launcher, or another library's, which has a programmatic edge
    # in), the combine and the packing kernel always; with PDL off no edge is programmatic.
    monkeypatch.setenv("INDUCTOR_MOE_PDL", pdl)
    x = randn(64, 2 * 512, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, 8, (64, 2), device="cuda", dtype=torch.int32)
    w = torch.rand(64, 2, device="cuda")

    def step():
        a = im.silu_and_mul(x)  # 0: the capture's first node
        b = im.gelu_and_mul(a)  # 1: after our PDL launch (no edge into it: only the launcher knows)
        c = torch.neg(b)  # 2: an ATen kernel, launched plain
        d = im.silu_and_mul(c)  # 3: after a plain launch: plain
        e = im.moe_combine(d.view(128, 64), w)  # 4: always PDL
        packed = im.pack_topk_ids_weights(ids, w)  # 5: Triton, always PDL
        f = im.silu_and_mul(e)  # 6: after another library's PDL launch
        return a, b, c, d, e, packed, f

    step()
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph):
        a, b, c, d, e, packed, f = step()
    on = 1 if pdl == "1" else 0  # CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC with PDL on, else the default edge
    assert _edge_types(graph) == {(0, 1): on, (1, 2): 0, (2, 3): 0, (3, 4): on, (4, 5): on, (5, 6): on}
    graph.replay()
    assert_matches_reference(a, reference.act_and_mul_ref(x, "silu"))
    assert_matches_reference(b, reference.act_and_mul_ref(a, "gelu"))
    assert_matches_reference(d, reference.act_and_mul_ref(c, "silu"))
    torch.testing.assert_close(e, reference.moe_combine_ref(d.view(128, 64), w), **TOL[torch.bfloat16])
    assert torch.equal(packed, reference.pack_topk_ids_weights_ref(ids, w))
    assert_matches_reference(f, reference.act_and_mul_ref(e, "silu"))


@pytest.mark.cuda
def test_current_stream_is_used():
    # the input is written on a side stream behind ~50 ms of sleep, and the op is called on that stream: a launch
    # on any other stream would read the input's NaN poison before the copy lands
    x = randn(2048, 2 * 4096, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        staged = torch.full_like(x, float("nan"))
        torch.cuda._sleep(50_000_000)  # cycles: tens of ms on any GPU this runs on
        staged.copy_(x)
        out = im.silu_and_mul(staged)
    side.synchronize()
    assert_matches_reference(out, reference.act_and_mul_ref(x, "silu"))


@pytest.mark.cuda
def test_offsets_past_32_bits():
    # 131073 rows x 16384 columns = 2**31 + 16384 input elements: row offsets need 64 bits
    rows, d = 2**17 + 1, 8192
    x = torch.empty(rows, 2 * d, dtype=torch.bfloat16, device="cuda")
    x[:8].normal_()
    x[-8:].normal_()
    ids = torch.zeros(rows, dtype=torch.int32, device="cuda")
    ids[-3] = -1
    out = im.silu_and_mul(x, expert_ids=ids)
    assert_matches_reference(out[:8], reference.act_and_mul_ref(x[:8], "silu"))
    assert_matches_reference(out[-8:], reference.act_and_mul_ref(x[-8:], "silu", ids[-8:]))
    assert not out[-3].any()
