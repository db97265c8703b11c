"""The benchmarks' table helper: a run a timeout interrupts still emits the rows it measured."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import timing  # noqa: E402


def test_emitted_table(monkeypatch):
    monkeypatch.setattr(timing, "_tables", [])
    rows = []
    with timing.emitted("done", ["a", "b"], rows):
        rows.append([1, 2])
    with pytest.raises(KeyboardInterrupt), timing.emitted("cut", ["a"], rows := []):
        rows.append([3])
        raise KeyboardInterrupt
    assert timing._tables == [
        {"title": "done", "header": ["a", "b"], "rows": [["1", "2"]]},
        {"title": "cut (interrupted: the rows measured before)", "header": ["a"], "rows": [["3"]]},
    ]
