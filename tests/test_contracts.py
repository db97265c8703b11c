"""Every op's contract, generated from tests/contracts.py: one test per (op, case, device). Bad input raises a
clear error naming the op and the argument; opcheck passes; a compiled function around the op compiles once
across batch sizes; the 32-bit limits are checked without allocating; on the GPU, a captured call replays
(PDL on and off) to what an eager call computes, and device-side argument errors trap with their message."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from contracts import BY_NAME, CONTRACTS, trap_script

from helpers import assert_compiles_once, captured


def _cases(table: str, with_device: bool = True, devices=("cpu", "cuda")):
    """(op, case name[, device]) for every entry of one table of every contract (names made on the CPU)."""
    params = []
    for contract in CONTRACTS:
        builder = getattr(contract, table)
        for name in builder("cpu") if with_device else builder():
            if not with_device:
                params.append(pytest.param(contract.name, name, id=f"{contract.name}-{name}"))
                continue
            for device in devices:
                marks = [pytest.mark.cuda] if device == "cuda" else []
                params.append(
                    pytest.param(contract.name, name, device, marks=marks, id=f"{contract.name}-{name}-{device}")
                )
    return params


@pytest.mark.parametrize("op,case,device", _cases("bad_inputs"))
def test_bad_input_is_a_clear_error(op, case, device):
    entry = BY_NAME[op].bad_inputs(device)[case]
    with pytest.raises(entry.error, match=rf"inductor_moe\.\w+: .*{entry.match}"):
        entry.call()
        pytest.fail(f"no error for bad input: {case}")


@pytest.mark.parametrize("op,case", _cases("limits", with_device=False))
def test_32_bit_limits(op, case):
    # meta tensors reach the fake function without allocating: the limits are checked without a GPU
    entry = BY_NAME[op].limits()[case]
    if entry.match is None:
        assert entry.expect(entry.call())
    else:
        with pytest.raises(entry.error, match=entry.match):
            entry.call()


@pytest.mark.parametrize("op,case,device", _cases("samples"))
def test_opcheck(op, case, device):
    overload, args = BY_NAME[op].samples(device)[case]
    torch.library.opcheck(overload, args)


@pytest.mark.parametrize("op,case,device", _cases("compiles"))
def test_compiles_once_across_batch_sizes(op, case, device):
    entry = BY_NAME[op].compiles(device)[case]
    assert_compiles_once(entry.fn, entry.make_args, entry.batches, entry.check, unbacked=entry.unbacked)


def _refreshed(args):
    """New random values in every float tensor of ``args``, in place (the captured graph reads them)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a.copy_(torch.randn_like(a, dtype=torch.float32).to(a.dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("pdl", ["0", "1"])
@pytest.mark.parametrize("op,case,device", _cases("samples", devices=("cuda",)))
def test_cuda_graph_replay(op, case, device, pdl, monkeypatch):
    monkeypatch.setenv("INDUCTOR_MOE_PDL", pdl)
    overload, args = BY_NAME[op].samples("cuda")[case]
    mutated = [a for a, arg in zip(args, overload._schema.arguments) if arg.alias_info and arg.alias_info.is_write]

    def step():
        result = overload(*args)
        return tuple(result) if isinstance(result, (tuple, list)) else (result,) if result is not None else ()

    graph, outputs = captured(step)
    for _ in range(2):
        _refreshed(args)
        for m in mutated:
            m.fill_(float("nan"))
        graph.replay()
        got = [o.clone() for o in (*outputs, *mutated)]
        for m in mutated:
            m.fill_(float("nan"))
        want = [*step(), *mutated]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.parametrize("op,case", [(c.name, name) for c in CONTRACTS for name in c.traps])
def test_device_side_error_traps_with_its_message(op, case):
    # a trap poisons the CUDA context: each case runs in a child process
    trap = BY_NAME[op].traps[case]
    result = subprocess.run([sys.executable, "-c", trap_script(trap)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert trap.message in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    if trap.absent is not None:
        assert trap.absent not in result.stdout


def test_every_op_has_a_contract():
    ops = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("inductor_moe::")}
    covered = {
        overload._schema.name.removeprefix("inductor_moe::")
        for contract in CONTRACTS
        for overload, _ in contract.samples("cpu").values()
    }
    assert ops == covered, ops ^ covered
    assert all(re.fullmatch(r"\w+", c.name) for c in CONTRACTS)
