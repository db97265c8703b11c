"""expert_sort: the grouping against the reference exactly (CPU reference in CI; the Triton kernel on the GPU and
under TRITON_INTERPRET=1 on the CPU; the ATen chain past one program), edge ids, bad inputs, opcheck,
torch.compile across batch sizes, CUDA graphs."""

from __future__ import annotations

import math

import pytest
import torch
import triton

import inductor_moe as im
from inductor_moe import indexing, ops, reference
from inductor_moe.kernels.triton import expert_sort as kernel

from helpers import DEVICES, captured, interpreter_results, routed_ids

INDEX_DTYPES = [torch.int32, torch.int64]
# (lo, hi): all of 8, a middle slice, one expert, the last 16 of 128 (expert parallelism), no expert at all
RANGES = [(0, 8), (2, 5), (3, 4), (112, 128), (4, 4)]


def assert_same_groups(got, topk_ids, lo, hi):
    want = reference.expert_sort_ref(topk_ids, lo, hi)
    for name, g, w in zip(("order", "offs", "src_rows"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.device == topk_ids.device, name
        assert torch.equal(g.cpu(), w.cpu()), f"{name}: {g[:16].tolist()} != {w[:16].tolist()}"


def test_reference_by_hand():
    # pairs: 3, dead (-1), 0, 3, dead (7 >= hi), 1  ->  groups 3, 4, 0, 3, 4, 1 over (0, 4)
    ids = torch.tensor([[3, -1], [0, 3], [7, 1]])
    order, offs, src_rows = reference.expert_sort_ref(ids, 0, 4)
    assert order.tolist() == [2, 5, 0, 3, 1, 4]  # stable: pair 0 before pair 3, pair 1 before pair 4
    assert offs.tolist() == [1, 2, 2, 4]  # expert 2 has no rows; the dead ones start at offs[-1]
    assert src_rows.tolist() == [2, 4, 0, 3, 5, 1]
    assert torch.equal(order[src_rows], torch.arange(6))
    # a local range: ids 2 and 3 are this rank's experts 0 and 1
    order, offs, _ = reference.expert_sort_ref(ids, 2, 4)
    assert order.tolist() == [0, 3, 1, 2, 4, 5] and offs.tolist() == [0, 2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", INDEX_DTYPES)
@pytest.mark.parametrize("lo,hi", RANGES)
# (128, 8) and (1, 1024): one program at its largest; (1025, 1) and (1000, 8): past it, the ATen chain on the GPU
@pytest.mark.parametrize("shape", [(0, 8), (1, 2), (1, 8), (7, 3), (37, 8), (128, 8), (1, 1024), (1025, 1), (1000, 8)])
def test_op_matches_reference(device, dtype, lo, hi, shape):
    ids = routed_ids(shape, lo, hi, dtype, device, seed=math.prod(shape))
    assert_same_groups(im.expert_sort(ids, (lo, hi)), ids, lo, hi)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "column slice", "3-D"])
def test_strided_ids(device, layout):
    base = routed_ids((24, 40), 0, 16, torch.int64, device)
    ids = {"transposed": base.t(), "column slice": base[:, 5:13], "3-D": base.view(4, 6, 40)[:, :, :8]}[layout]
    assert_same_groups(im.expert_sort(ids, (0, 16)), ids, 0, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("live", ["none", "all"])
def test_every_pair_dead_or_live(device, live):
    ids = torch.randint(0, 8, (37, 8), device=device)
    if live == "none":
        ids = ids + 8  # another rank's experts
    order, offs, src_rows = im.expert_sort(ids, (0, 8))
    assert_same_groups((order, offs, src_rows), ids, 0, 8)
    assert offs[-1].item() == (0 if live == "none" else ids.numel())
    if live == "none":  # nothing moves
        assert torch.equal(order.cpu(), torch.arange(ids.numel())) and torch.equal(src_rows, order)


@pytest.mark.parametrize("groups", [255, 256, kernel.MAX_GROUPS, kernel.MAX_GROUPS + 1, 40000])
def test_aten_chain_matches_reference(groups):
    # the chain the op takes past one program, on the CPU: its key narrowed to uint8 / int16 / int32
    ids = routed_ids((3000, 8), 0, groups, torch.int64, "cpu", seed=groups)
    assert_same_groups(ops.expert_sort_aten(ids, 0, groups), ids, 0, groups)
    assert_same_groups(ops.expert_sort_aten(ids.int(), 7, groups), ids.int(), 7, groups)


def test_kernel_limits():
    assert kernel.fits(kernel.MAX_PAIRS, kernel.MAX_GROUPS)
    assert not kernel.fits(kernel.MAX_PAIRS + 1, 8) and not kernel.fits(16, kernel.MAX_GROUPS + 1)
    # the packed (group << LOG_BLOCK) | pair of the largest program stays below 2**31
    block, bins = triton.next_power_of_2(kernel.MAX_PAIRS), triton.next_power_of_2(kernel.MAX_GROUPS + 2)
    assert bins <= 1024 and (bins - 1) * block + block - 1 < 2**31


def launch_poisoned(ids, lo, hi):
    """The kernel's launcher (interpreted in run_interpreter_cases' child process) over outputs filled with a value
    no output holds, so unwritten elements show."""
    n, groups = ids.numel(), hi - lo
    order = torch.full((n,), -7, dtype=torch.int64, device=ids.device)
    src_rows = torch.full((n,), -7, dtype=torch.int64, device=ids.device)
    offs = torch.full((groups,), -7, dtype=torch.int32, device=ids.device)
    kernel.expert_sort(ids, indexing.row_strides(ids), lo, groups, order, offs, src_rows)
    return order, offs, src_rows


# (ids dtype, lo, hi, shape): up to the most groups one program takes; and once its most pairs, 1024
INTERPRETER_CASES = [
    (dtype, lo, hi, shape)
    for dtype in ("int32", "int64")
    for lo, hi in ((0, 8), (112, 128), (4, 4), (0, kernel.MAX_GROUPS))
    for shape in ((0, 8), (1, 2), (7, 3), (33, 1), (64, 8))
] + [("int32", 112, 128, (128, 8))]


def run_interpreter_cases() -> dict[str, str]:
    """Every INTERPRETER_CASES entry through the kernel, row-major and column-major: "ok" or what failed. Called
    in a child process that set TRITON_INTERPRET=1 before importing triton."""
    assert type(kernel.expert_sort_kernel).__name__ == "InterpretedFunction"
    results = {}
    for dtype, lo, hi, shape in INTERPRETER_CASES:
        ids = routed_ids(shape, lo, hi, getattr(torch, dtype), "cpu", seed=math.prod(shape))
        try:
            for layout in (ids, ids.t().contiguous().t()):
                assert_same_groups(launch_poisoned(layout, lo, hi), layout, lo, hi)
            results[repr((dtype, lo, hi, shape))] = "ok"
        except AssertionError as e:
            results[repr((dtype, lo, hi, shape))] = str(e)
    return results


def test_triton_kernel_in_interpreter():
    # in a child process, all in one: the kernel calls tl.sort, a @triton.jit function of Triton's standard library
    results = interpreter_results("test_expert_sort", "run_interpreter_cases", timeout=600)
    assert len(results) == len(INTERPRETER_CASES)
    failed = {case: why for case, why in results.items() if why != "ok"}
    assert not failed, failed


# ------------------------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", INDEX_DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (37, 8), (128, 8), (512, 8), (1, 4096)])  # the last two: past MAX_PAIRS
def test_cuda_kernel_writes_every_output(dtype, shape):
    ids = routed_ids(shape, 16, 32, dtype, "cuda", seed=math.prod(shape))
    assert_same_groups(launch_poisoned(ids, 16, 32), ids, 16, 32)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(16, 8), (200, 8)])  # the kernel, the ATen chain
def test_cuda_graph_replay(shape):
    ids = routed_ids(shape, 0, 16, torch.int64, "cuda")
    graph, groups = captured(lambda: im.expert_sort(ids, (0, 16)))
    for seed in range(3):
        ids.copy_(routed_ids(shape, 0, 16, torch.int64, "cuda", seed=seed + 1))
        graph.replay()
        assert_same_groups(groups, ids, 0, 16)
