"""pack_topk_ids_weights: the format, the op against the reference bit for bit (CPU reference in CI, Triton
kernel on the GPU and under TRITON_INTERPRET=1 on the CPU), bad inputs, opcheck, torch.compile, PDL and
CUDA graphs."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

import inductor_moe as im
from inductor_moe import indexing, reference

from helpers import DEVICES, DTYPES, assert_bit_exact, captured

INDEX_DTYPES = [torch.int32, torch.int64]


def special_weights(n, dtype, device):
    """Random weights with every edge value the rounding must get right mixed in."""
    specials = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        float("inf"),
        -float("inf"),
        float("nan"),
        -float("nan"),
        1.0 + 2**-8,
        1.0 + 3 * 2**-8,
        -(1.0 + 2**-8),  # exact ties: round to even, both directions
        1e-40,
        -1e-40,
        2**-133,
        3.3895e38,
        -3.3895e38,  # subnormals; values that round up to inf
        65504.0,
        6e-8,  # fp16 max, fp16 subnormal
    ]
    w = torch.randn(n, device=device) * torch.logspace(-6, 6, n, device=device)
    w[: len(specials)] = torch.tensor(specials, device=device)[:n]
    return w.to(dtype)


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.int32 else t


def test_format():
    ids = torch.tensor([0, 1, -1, 127, 32767, -32768, 5, 5])
    w = torch.tensor([0.5, -0.5, 1.0, -2.0, 0.0, -0.0, 3.0, -3.0])
    packed = reference.pack_topk_ids_weights_ref(ids, w)
    assert torch.equal(packed >> 16, ids.to(torch.int32))  # ids in [-32768, 32767] round-trip
    low = (packed & 0xFFFF).to(torch.int16)
    assert torch.equal(low.view(torch.bfloat16).float(), w)
    # a negative weight does not leak into the id bits (the `& 0xFFFF`)
    assert (packed[7] >> 16).item() == 5
    # outside the range only the low 16 bits of the id survive
    assert (reference.pack_topk_ids_weights_ref(torch.tensor([65536 + 7]), torch.ones(1)) >> 16).item() == 7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
# (8200, 9): past 65536 elements, programs of 512
@pytest.mark.parametrize("shape", [(0, 8), (1, 8), (7, 3), (37, 1), (4097, 8), (3, 5, 8), (8200, 9)])
def test_op_matches_reference(device, ids_dtype, w_dtype, shape):
    n = math.prod(shape)
    ids = torch.randint(-(2**31), 2**31 - 1, shape, device=device).to(ids_dtype)
    ids.view(-1)[: min(n, 4)] = torch.tensor([-1, 0, 32767, -32768], device=device)[: min(n, 4)].to(ids_dtype)
    w = special_weights(n, w_dtype, device).view(shape)
    assert_bit_exact(im.pack_topk_ids_weights(ids, w), reference.pack_topk_ids_weights_ref(ids, w))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    ids = torch.randint(-1, 128, (8, 300), device=device)
    w = torch.randn(8, 300, device=device)
    # transposed [K, T] -> [T, K] views, and a column slice of a wider buffer
    assert_bit_exact(im.pack_topk_ids_weights(ids.t(), w.t()), reference.pack_topk_ids_weights_ref(ids.t(), w.t()))
    assert_bit_exact(
        im.pack_topk_ids_weights(ids[:, 5:13], w[:, 100:108]),
        reference.pack_topk_ids_weights_ref(ids[:, 5:13], w[:, 100:108]),
    )


@pytest.fixture
def interpreted_topk_pack(monkeypatch):
    """A fresh copy of kernels/triton/topk_pack.py whose kernel runs in Triton's interpreter on the CPU."""
    # Imported before TRITON_INTERPRET is set: triton.jit picks the interpreter when the module is first
    # executed, and the op imports this module lazily, so an import under the variable would leave the op's
    # own kernel interpreted for the rest of the process (on a GPU machine under pytest-xdist, the CUDA tests
    # that a worker ran after this fixture then failed inside the interpreter).
    import inductor_moe.kernels.triton.topk_pack as installed

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton is a test dependency: no skip if it is missing
    spec = importlib.util.spec_from_file_location("inductor_moe.kernels.triton._interpreted", installed.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert type(module.topk_pack_kernel).__name__ == "InterpretedFunction"
    assert type(installed.topk_pack_kernel).__name__ == "JITFunction"
    return module


@pytest.mark.parametrize("ids_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (37, 3), (1500, 8), (8200, 9)])  # the last: programs of 512
def test_triton_kernel_in_interpreter(interpreted_topk_pack, ids_dtype, w_dtype, shape):
    n = math.prod(shape)
    ids = torch.randint(-(2**31), 2**31 - 1, shape).to(ids_dtype)
    w = special_weights(n, w_dtype, "cpu").view(shape)
    for i, wt in ((ids, w), (ids.t().contiguous().t(), w.t().contiguous().t())):  # contiguous and transposed
        out = torch.full(shape, 0x5A5A5A5A, dtype=torch.int32)  # poison
        interpreted_topk_pack.topk_pack(i, wt, indexing.row_strides(i), indexing.row_strides(wt), out)
        assert_bit_exact(out, reference.pack_topk_ids_weights_ref(i, wt))


# ------------------------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("pdl", ["0", "1"])
def test_cuda_graph_and_pdl_chain(monkeypatch, pdl):
    monkeypatch.setenv("INDUCTOR_MOE_PDL", pdl)
    ids = torch.randint(-1, 256, (512, 8), device="cuda", dtype=torch.int32)
    w = torch.randn(512, 8, device="cuda")

    def step():
        packed = im.pack_topk_ids_weights(ids, w)
        # a dependent launch: repack the packed ids (high half) with the packed weights (low half, as bf16)
        again = im.pack_topk_ids_weights(packed >> 16, (packed & 0xFFFF).to(torch.int16).view(torch.bfloat16))
        return packed, again

    graph, (packed, again) = captured(step)
    for _ in range(3):
        ids.copy_(torch.randint(-1, 256, (512, 8), device="cuda", dtype=torch.int32))
        w.copy_(torch.randn(512, 8, device="cuda"))
        graph.replay()
        ref = reference.pack_topk_ids_weights_ref(ids, w)
        assert_bit_exact(packed, ref)
        assert_bit_exact(again, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_nan_bits_match_torch(dtype):
    from inductor_moe.kernels.triton.topk_pack import nan_bits

    nans = torch.tensor([float("nan"), -float("nan")], device="cuda", dtype=dtype).to(torch.bfloat16)
    assert tuple((nans.view(torch.int16).to(torch.int32) & 0xFFFF).tolist()) == nan_bits("cuda", dtype)


def test_interpreter_env_not_leaked():
    assert os.environ.get("TRITON_INTERPRET") in (None, "0", "")


def test_layout_past_32_bit_offsets_rejected_by_the_kernel_launcher():
    from inductor_moe.kernels.triton.topk_pack import topk_pack

    # a column slice of a very wide buffer: few pairs, but offsets past 2**31 (meta: nothing allocated)
    ids = torch.empty(3000, 2**20, dtype=torch.int32, device="meta")[:, :8]
    w = torch.empty(3000, 8, device="meta")
    out = torch.empty(3000, 8, dtype=torch.int32, device="meta")
    with pytest.raises(RuntimeError, match=r"topk_ids's layout reaches element offset \d+, past 2\*\*31-1"):
        topk_pack(ids, w, indexing.row_strides(ids), indexing.row_strides(w), out)
