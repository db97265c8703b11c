"""The mask analyzer of the lowerings (lowerings/expert_mask.py), on its own: random predicates of ==, !=, <,
<=, >, >=, &, |, ^, ~ over one id tensor. Whenever it answers a filter, that filter keeps exactly the rows the
predicate keeps, for ids at both ends of int32/int64 and around every constant; when it declines, the live ids
are indeed not one (wrapping) range on those values, or the mask never kills a row."""

from __future__ import annotations

import operator
import random

import pytest
import torch
from torch._inductor.pattern_matcher import fwd_only

from inductor_moe import reference
from inductor_moe.lowerings import expert_mask

from helpers import extreme_ids

CONSTANTS = [-2, -1, 0, 3, 7, 8]
COMPARE = [operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge]


def random_predicate(rng: random.Random, depth: int):
    """A function of ids and its text."""
    if depth == 0 or rng.random() < 0.3:
        op, c = rng.choice(COMPARE), rng.choice(CONSTANTS)
        return (lambda ids: op(ids, c)), f"(ids {op.__name__} {c})"
    kind = rng.choice(["and", "or", "xor", "not"])
    a, ta = random_predicate(rng, depth - 1)
    if kind == "not":
        return (lambda ids: ~a(ids)), f"~{ta}"
    b, tb = random_predicate(rng, depth - 1)
    fn = {"and": operator.and_, "or": operator.or_, "xor": operator.xor}[kind]
    return (lambda ids: fn(a(ids), b(ids))), f"({ta} {kind} {tb})"


def analyse(pred, ids_dtype, live_when_true):
    gm = fwd_only(lambda ids: pred(ids), [torch.zeros(6, dtype=ids_dtype)])
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    mask = out[0] if isinstance(out, (list, tuple)) else out
    return expert_mask.expert_filter(mask, [6], live_when_true)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("live_when_true", [False, True])
def test_random_predicates(ids_dtype, live_when_true):
    rng = random.Random(f"{ids_dtype}{live_when_true}")
    values = torch.cat([extreme_ids(ids_dtype, "cpu"), torch.arange(-4, 12, dtype=ids_dtype)])
    folded = declined = 0
    for _ in range(150):
        pred, text = random_predicate(rng, depth=2)
        found = analyse(pred, ids_dtype, live_when_true)
        keeps = pred(values) if live_when_true else ~pred(values)
        if isinstance(found, expert_mask.ExpertFilter):
            folded += 1
            assert found.step == 1
            assert torch.equal(reference.live_ids_ref(values, found.lo, found.hi), keeps), (text, found)
        else:
            declined += 1
            assert "not one range" in found or "never kills" in found, (text, found)
            if "never kills" in found:
                assert keeps.all(), text
            else:  # at least two separate runs of live ids, on the sorted values, with dead ones between
                sorted_keeps = keeps[torch.argsort(values)].int().tolist()
                runs = sum(1 for i, v in enumerate(sorted_keeps) if v and (i == 0 or not sorted_keeps[i - 1]))
                wraps = sorted_keeps[0] and sorted_keeps[-1]
                assert runs - wraps >= 2, (text, found)
    assert folded > 50 and declined > 5  # both branches were exercised
