"""The README's two examples run as written (on the CPU here: "cuda" becomes the test's device), compute what
they say, and the compiled one is rewritten; BENCHMARKS.md is what benchmarks/report.py makes of the results."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inductor_moe import config, reference

from helpers import DEVICES

ROOT = Path(__file__).resolve().parents[1]


def _example(heading: str, device: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10, "the README promises ten-line examples"
    return code.replace('device="cuda"', f'device="{device}"')


@pytest.mark.parametrize("device", DEVICES)
def test_eager_example(device):
    scope = {}
    exec(_example("Eager", device), scope)
    ids, w, y, h = scope["ids"], scope["w"], scope["y"], scope["h"]
    live = (ids >= 16) & (ids < 32)
    assert scope["out"].shape == (64, 2048)
    torch.testing.assert_close(scope["out"], reference.moe_combine_ref(y, w, ids, 16, 32), rtol=1e-2, atol=1e-2)
    a = scope["a"].view(64, 8, -1)
    assert not a[~live].any()  # other ranks' rows: zero
    torch.testing.assert_close(a[live], reference.act_and_mul_ref(h, "silu").view(64, 8, -1)[live])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_example(device):
    from inductor_moe import backend

    scope = {}
    torch._dynamo.reset()
    with config.override(devices="cpu,cuda"), backend.reporting() as report:
        exec(_example("Compiled", device), scope)
    assert sorted(r.family for r in report.rewrites) == ["combine", "gated_act"]
    h, w = torch.randn(64 * 8, 2 * 768, device=device), torch.rand(64, 8, device=device)
    torch.testing.assert_close(scope["compiled"](h, w), scope["moe_tail"](h, w), rtol=1e-5, atol=1e-4)


def test_benchmarks_md_is_the_current_results():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"])
    assert result.returncode == 0, "BENCHMARKS.md differs from benchmarks/results: run python3 benchmarks/report.py"
