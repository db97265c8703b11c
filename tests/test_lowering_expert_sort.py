"""Narrowed sort keys (lowerings/expert_sort.py): a stable argsort of a key provably in a small range sorts the key
cast to the narrowest dtype holding it, with the same indices bit for bit, ties included; every other sort is
left as it is, with the reason recorded where it was a candidate."""

from __future__ import annotations

import pytest
import torch

from inductor_moe import config, indexing

from helpers import compile_rewrite, families


def expert_key(ids, lo, num_local):
    # the grouped block's key: the local expert, or num_local for other ranks' experts
    local = ids - lo
    return torch.where((local >= 0) & (local < num_local), local, num_local).view(-1)


def sort_dtype(report) -> str | None:
    """The key dtype of the one narrowed sort, from the rewrite's record ("uint8[24]" -> "uint8"), else None."""
    shapes = [r.shape for r in report.rewrites if r.family == "expert_sort"]
    assert len(shapes) <= 1, report
    return shapes[0].split("[")[0] if shapes else None


def random_ids(tokens=37, k=4, experts=40, dtype=torch.int64):
    # many pairs share a key: the stable order among ties is what the narrowed sort must keep
    return torch.randint(0, experts, (tokens, k), dtype=dtype)


@pytest.mark.parametrize(
    ("num_local", "narrowed"),
    [(8, "uint8"), (255, "uint8"), (256, "int16"), (32767, "int16"), (32768, "int32")],
)
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_grouped_key_is_narrowed(num_local, narrowed, ids_dtype):
    torch.manual_seed(num_local)
    ids = random_ids(experts=2 * num_local + 8, dtype=ids_dtype)

    def fn(ids):
        return torch.argsort(expert_key(ids, 3, num_local), stable=True)

    out, report = compile_rewrite(fn, ids)
    want = narrowed if not (ids_dtype == torch.int32 and narrowed == "int32") else None  # int32 is no narrower
    assert sort_dtype(report) == want, report
    assert families(report) == (["expert_sort"] if want else []), report
    assert torch.equal(out, fn(ids))


def test_negative_sentinel_needs_a_signed_key():
    # where(in range, local, -1): values [-1, 7], which uint8 cannot hold
    ids = random_ids(experts=16)

    def fn(ids):
        local = ids - 4
        return torch.argsort(torch.where((local >= 0) & (local < 8), local, -1), dim=-1, stable=True)

    out, report = compile_rewrite(fn, ids.view(-1))
    assert sort_dtype(report) == "int16", report
    assert torch.equal(out, fn(ids.view(-1)))


def test_dead_first_spelling_and_descending():
    # where(dead, E, local): the complement of the dead set; descending order is kept by the cast too
    ids = random_ids(experts=24)

    def fn(ids):
        local = ids - 8
        dead = (local < 0) | (local >= 8)
        return torch.sort(torch.where(dead, 8, local).view(-1), stable=True, descending=True).indices

    out, report = compile_rewrite(fn, ids)
    assert sort_dtype(report) == "uint8", report
    assert torch.equal(out, fn(ids))


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unstable", None),  # ties may come out in another order: not a candidate
        ("values used", "the sorted values are used"),
        ("unbounded", "need its own dtype"),  # local >= 0 alone leaves the top open
        ("another tensor's mask", "not a predicate over the values it keeps"),
        ("no constant branch", "no integer constant branch"),
    ],
)
def test_sorts_left_alone(case, reason):
    ids, other = random_ids(experts=16), random_ids(experts=16)

    def fn(ids, other):
        local = ids - 4
        in_range = (local >= 0) & (local < 8)
        if case == "unstable":
            return torch.argsort(torch.where(in_range, local, 8).view(-1))
        if case == "values used":
            return torch.sort(torch.where(in_range, local, 8).view(-1), stable=True)
        if case == "unbounded":
            return torch.argsort(torch.where(local >= 0, local, 8).view(-1), stable=True)
        if case == "another tensor's mask":
            return torch.argsort(torch.where((other >= 0) & (other < 8), local, 8).view(-1), stable=True)
        return torch.argsort(torch.where(in_range, local, other).view(-1), stable=True)

    out, report = compile_rewrite(fn, ids, other)
    assert sort_dtype(report) is None, report
    rejected = [r.reason for r in report.rejected if r.family == "expert_sort"]
    if reason is None:
        assert rejected == [], report
    else:
        assert len(rejected) == 1 and reason in rejected[0], report
    expected = fn(ids, other)
    if case == "unstable":  # the same multiset of indices per key; their order among ties is the sort's own
        key = torch.where((ids - 4 >= 0) & (ids - 4 < 8), ids - 4, 8).view(-1)
        assert torch.equal(key[out], key[expected])
    else:
        for a, b in zip(
            out if isinstance(out, tuple) else [out], expected if isinstance(expected, tuple) else [expected]
        ):
            assert torch.equal(a, b)


def test_family_switch():
    ids = random_ids()
    with config.override(families="gated_act,topk_pack,combine"):
        _, report = compile_rewrite(lambda ids: torch.argsort(expert_key(ids, 0, 8), stable=True), ids)
    assert families(report) == [], report


@pytest.mark.parametrize(
    ("top", "dtype"), [(1, torch.uint8), (255, torch.uint8), (256, torch.int16), (40000, torch.int32)]
)
def test_runner_narrows_its_keys_alike(top, dtype):
    key = torch.randint(0, top + 1, (4097,))
    narrow = indexing.narrow_keys(key, top)
    assert narrow.dtype == dtype and torch.equal(narrow.long(), key)
    assert torch.equal(torch.argsort(narrow, stable=True), torch.argsort(key, stable=True))
    assert indexing.narrow_keys(key.int(), 40000).dtype == torch.int32  # never widened, never the same width again


@pytest.mark.parametrize(("experts", "narrowed"), [(8, "uint8"), (256, "uint8"), (300, "int16")])
@pytest.mark.parametrize("as_int32", [False, True], ids=["int64", "to(int32)"])
def test_topk_ids_are_narrowed(experts, narrowed, as_int32):
    # torchtitan's grouping: the routed expert ids themselves, in [0, E) for a top-k over E experts
    torch.manual_seed(experts)
    logits = torch.randn(37, experts)
    logits[:, : experts // 2] = 0.5  # ties among the logits, and so many equal ids to keep in order

    def fn(logits):
        ids = torch.topk(logits, 4, dim=-1).indices
        ids = ids.to(torch.int32) if as_int32 else ids
        return torch.argsort(ids.view(-1), stable=True)

    out, report = compile_rewrite(fn, logits)
    assert sort_dtype(report) == narrowed, report
    assert torch.equal(out, fn(logits))


@pytest.mark.parametrize("spelling", ["max", "argmax", "cat of max and argmax", "cat with a -1 column"])
def test_argmax_ids_are_bounded(spelling):
    # PhiMoE's router picks each of its two experts by a max over E; the ids side by side are in [0, E) unless a
    # column comes from elsewhere (a -1 there is no bound: the key stays int64)
    logits = torch.randn(37, 40)

    def fn(logits):
        best = logits.max(dim=-1, keepdim=True).indices
        second = logits.argmax(dim=-1, keepdim=True)
        ids = {
            "max": best,
            "argmax": second,
            "cat of max and argmax": torch.cat([best, second], dim=-1),
            "cat with a -1 column": torch.cat([best, torch.full_like(best, -1)], dim=-1),
        }[spelling]
        return torch.argsort(ids.view(-1), stable=True)

    out, report = compile_rewrite(fn, logits)
    assert sort_dtype(report) == (None if spelling == "cat with a -1 column" else "uint8"), report
    assert torch.equal(out, fn(logits))


def test_a_cast_that_could_wrap_is_not_a_bound():
    # ids of 300 experts through int8 and back: values wrap around, so [0, 300) bounds nothing
    logits = torch.randn(16, 300)

    def fn(logits):
        return torch.argsort(torch.topk(logits, 2).indices.to(torch.int8).to(torch.int64).view(-1), stable=True)

    out, report = compile_rewrite(fn, logits)
    assert sort_dtype(report) is None, report
    assert any("could wrap" in r.reason for r in report.rejected), report
    assert torch.equal(out, fn(logits))


def test_symbolic_batch_is_narrowed_once():
    # dynamic tokens: the key's bound comes from the experts (a parameter's size), not the batch; a new batch
    # size reuses the compiled graph
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor_moe")

    def fn(ids):
        return torch.argsort(expert_key(ids, 4, 8), stable=True)  # a closed-over int would be symbolic here

    from inductor_moe import backend

    torch._dynamo.reset()
    with config.override(devices="cpu,cuda"), backend.reporting() as report:
        compiled = torch.compile(fn, backend=counter, dynamic=True)
        for tokens in (5, 37, 64):
            ids = random_ids(tokens=tokens, experts=20)
            assert torch.equal(compiled(ids), fn(ids))
    assert counter.frame_count == 1
    assert sort_dtype(report) == "uint8", report
    assert "s" in [r.shape for r in report.rewrites][0], report  # the symbolic number of pairs
