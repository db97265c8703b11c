"""The benchmarks' tools: a run a timeout interrupts still emits the rows it measured; runs of one benchmark
merge into one result."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import report  # noqa: E402

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


def _result(command, date, header, rows, device="H100"):
    meta = dict.fromkeys(report._SAME, "x") | {"device": device, "command": command, "date": date}
    return {"metadata": meta, "tables": [{"title": "blocks", "header": header, "rows": rows}]}


def test_merge_runs():
    a = _result("bench --models qwen3", "2026-12-08", ["model", "T", "ours", "ratio"], [["qwen3", "1", "5", "0.5"]])
    b = _result(
        "bench --models mixtral --autotune 16",
        "2026-12-09",
        ["model", "T", "ours", "autotune", "ratio"],
        [["mixtral", "16", "7", "9", "0.7"]],
    )
    merged = report.merge([a, b])
    assert merged["metadata"]["command"] == "bench --models qwen3; bench --models mixtral --autotune 16"
    assert merged["metadata"]["date"] == "2026-12-09"
    assert merged["tables"] == [
        {
            "title": "blocks",
            "header": ["model", "T", "ours", "autotune", "ratio"],
            "rows": [["qwen3", "1", "5", "not run", "0.5"], ["mixtral", "16", "7", "9", "0.7"]],
        }
    ]
    assert report.merge([b, a])["tables"][0]["header"] == ["model", "T", "ours", "autotune", "ratio"]
    with pytest.raises(ValueError, match="device"):
        report.merge([a, _result("bench", "2026-12-09", ["model"], [], device="H200")])
    with pytest.raises(ValueError, match="order"):
        report._union(["a", "b"], ["b", "a"])
