"""The examples run on the CPU at small sizes: the demo shows the rewrites fired in both blocks and every
compiled result (and the runner's) stays within bf16 rounding of eager."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script: str) -> str:
    # the CPU configuration (small sizes) on every machine: on a GPU the demo takes model sizes, which is the
    # benchmark's job, not a test's
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True, timeout=900, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_moe_block_demo():
    out = run("moe_block.py")
    loop, grouped = out.split("\n== ")[1:]
    assert re.search(r"^(\d+) rewrite", loop, re.M).group(1) == "9"  # one gated activation per expert, the router
    assert "rewrote  gated_act" in loop and "rewrote  route" in loop
    for family in ("experts", "route", "filter: input: where(dead, 0, x)"):
        assert family in grouped, grouped
    errors = [float(e) for e in re.findall(r"max \|out - eager\| ([0-9.]+)", out)]
    assert len(errors) == 8 and max(errors) < 0.05, out  # bf16 outputs of magnitude ~1-3


def test_eager_example():
    out = run("eager_act_and_mul.py")
    err = float(re.search(r"max \|err\| vs reference ([0-9.e+-]+)", out).group(1))
    assert err == 0.0, out  # on the CPU the op is the reference
    live, rows = map(int, re.search(r"(\d+)/(\d+) rows live", out).groups())
    assert rows == 512 and 0 < live < rows, out  # experts [32, 48) of 128: about 1/8 of the rows
    for claim in ("dead rows zero: True", "live rows equal the unfiltered result: True", "(still NaN): True"):
        assert claim in out, out


def test_blocks_agree_with_the_reference_moe():
    from inductor_moe import reference
    from inductor_moe.testing import GroupedMoE, LoopMoE

    torch.manual_seed(0)
    x, logits = torch.randn(20, 32), torch.randn(20, 8)
    w13, w2 = torch.randn(8, 48, 32) / 6, torch.randn(8, 32, 24) / 5
    ref = reference.moe_ref(x, logits, w13, w2, top_k=2)
    torch.testing.assert_close(LoopMoE(w13, w2, 2)(x, logits), ref, rtol=1e-4, atol=1e-5)
    ref = reference.moe_ref(x, logits, w13[2:6], w2[2:6], top_k=2, expert_range=(2, 6))
    torch.testing.assert_close(GroupedMoE(w13[2:6], w2[2:6], 2, (2, 6))(x, logits), ref, rtol=1e-4, atol=1e-5)
