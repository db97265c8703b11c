"""Lowering of the top-k packing: the reference expression, per ids and weights dtype, either way round the
``|``, as a ``+``, through a uint16 view or with the named bitwise ops, is rewritten and stays bit-exact
(negative weights, +-0, subnormals, inf, NaN); without ``& 0xFFFF`` it is a recorded near miss and computes
what it computed."""

from __future__ import annotations

import expecttest
import pytest
import torch

from inductor_moe import reference

from helpers import compile_rewrite, families


def pack_weights_first(ids, w):
    return (w.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF) | (ids.to(torch.int32) << 16)


def pack_added(ids, w):
    return (ids.to(torch.int32) << 16) + (w.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF)


def pack_unsigned(ids, w):
    return (ids.to(torch.int32) << 16) | w.to(torch.bfloat16).view(torch.uint16).to(torch.int32)


def pack_named_ops(ids, w):
    bits = torch.bitwise_and(w.to(torch.bfloat16).view(torch.int16).to(torch.int32), 0xFFFF)
    return torch.bitwise_or(torch.bitwise_left_shift(ids.to(torch.int32), 16), bits)


def pack_unmasked(ids, w):
    return (ids.to(torch.int32) << 16) | w.to(torch.bfloat16).view(torch.int16).to(torch.int32)


def edge_weights(dtype, n):
    special = torch.tensor([-1.5, -0.0, 0.0, 1e-40, -1e-40, float("inf"), -float("inf"), float("nan"), 1 + 2**-8])
    w = torch.cat([special, torch.randn(n - special.numel())])
    return w.to(dtype)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "spelling", [reference.pack_topk_ids_weights_ref, pack_weights_first, pack_added, pack_unsigned, pack_named_ops]
)
def test_rewritten_bit_exact(spelling, ids_dtype, w_dtype):
    ids = torch.randint(-1, 300, (5, 8), dtype=ids_dtype)
    w = edge_weights(w_dtype, 40).view(5, 8)
    out, report = compile_rewrite(spelling, ids, w)
    assert families(report) == ["topk_pack"], report
    assert torch.equal(out, spelling(ids, w))


def test_without_the_mask_is_a_near_miss():
    ids, w = torch.randint(0, 8, (4, 2)), -torch.rand(4, 2)  # negative weights: the spellings differ
    out, report = compile_rewrite(pack_unmasked, ids, w)
    assert families(report) == [] and "0xFFFF" in report.rejected[0].reason
    assert torch.equal(out, pack_unmasked(ids, w))
    assert not torch.equal(out, reference.pack_topk_ids_weights_ref(ids, w))


def test_broadcast_is_not_rewritten():
    ids, w = torch.randint(0, 8, (4, 1)), torch.rand(4, 8)
    out, report = compile_rewrite(reference.pack_topk_ids_weights_ref, ids, w)
    assert families(report) == [] and "one shape" in report.rejected[0].reason
    assert torch.equal(out, reference.pack_topk_ids_weights_ref(ids, w))


class TestSnapshots(expecttest.TestCase):
    def test_int64_ids_fp32_weights(self):
        _, report = compile_rewrite(
            reference.pack_topk_ids_weights_ref, torch.zeros(3, 8, dtype=torch.int64), torch.rand(3, 8)
        )
        self.assertExpectedInline(
            report.graphs[-1],
            """\
v0 = inductor_moe.pack_topk_ids_weights(in0, in1)
return [v0]""",
        )


def test_symbolic_tokens():
    from torch._dynamo.testing import CompileCounterWithBackend

    from inductor_moe import backend, config

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor_moe")
    compiled = torch.compile(reference.pack_topk_ids_weights_ref, backend=counter, fullgraph=True)
    with config.override(devices="cpu"), backend.reporting() as report:
        for tokens in (3, 17, 64, 2):
            ids, w = torch.randint(-1, 300, (tokens, 8)), edge_weights(torch.float32, tokens * 8).view(tokens, 8)
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(w, 0)
            assert torch.equal(compiled(ids, w), reference.pack_topk_ids_weights_ref(ids, w))
    assert counter.frame_count == 1
    assert families(report) == ["topk_pack"]
