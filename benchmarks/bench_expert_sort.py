"""Grouping rows by expert: the stable sort of the expert keys, and the inverse of its permutation.

    python benchmarks/bench_expert_sort.py

µs per call inside a CUDA graph (benchmarks/timing.py), the columns of a row timed in rotated order (median of
three rounds, timing.interleaved_us). Keys as a grouped-GEMM block makes them (inductor_moe/testing.py): n = T*K
pairs, each the local expert of its routed id or E for other ranks' experts.
- The sort: eager ``argsort(key, stable=True)`` with the key in each integer dtype (the indices are the same),
  and ``argsort(where(in range, local, E), stable=True)`` compiled with inductor and with inductor_moe (whose
  expert_sort lowering narrows the key, lowerings/expert_sort.py).
- The inverse: ``argsort(perm)`` of a permutation against ``indexing.inverse_permutation(perm)``, eager, and the latter
  compiled (what the combine's lowering puts in a compiled block).
- The whole grouping from routed ids (order, offs, src_rows: what the runner needs), as the chain of ATen ops the
  op takes past one program (eager and compiled with inductor), as the one-program Triton kernel (up to 8192
  pairs, past the op's limit to show where it stops paying), and as the ``expert_sort`` op.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import inductor_moe as im  # noqa: E402
from inductor_moe import indexing, ops  # noqa: E402
from inductor_moe.kernels.triton import expert_sort as kernel  # noqa: E402

import timing  # noqa: E402

# (T, K, experts of the model, local experts): Mixtral-like and Qwen3-like routing, 1/8 of the experts local
POINTS = [
    (1, 2, 8, 1),
    (16, 8, 128, 16),
    (256, 8, 128, 16),
    (512, 8, 128, 16),
    (1024, 8, 128, 16),
    (4096, 8, 128, 16),
    (4096, 8, 128, 128),
]
_KERNEL_PAIRS = 8192  # the one-program kernel timed up to here


def expert_key(ids: torch.Tensor, num_local: int) -> torch.Tensor:
    return torch.where((ids >= 0) & (ids < num_local), ids, num_local).view(-1)


def sort_by_expert(ids: torch.Tensor, num_local: int) -> torch.Tensor:
    return torch.argsort(expert_key(ids, num_local), stable=True)


def graph_us(fn) -> float:
    return timing.graph_us([fn])


def main():
    timing.cli()
    timing.header()
    sort_rows, inverse_rows, grouping_rows = [], [], []
    for tokens, k, experts, num_local in POINTS:
        gen = torch.Generator(device="cuda").manual_seed(tokens * 1000 + num_local)
        ids = torch.randint(0, experts, (tokens, k), device="cuda", generator=gen)
        key = expert_key(ids, num_local)
        order = torch.argsort(key, stable=True)
        calls = {
            str(d).removeprefix("torch."): (lambda kk=key.to(d): torch.argsort(kk, stable=True))
            for d in (torch.int64, torch.int32, torch.int16, torch.uint8)
        }
        torch._dynamo.reset()  # each point compiles its own graphs, num_local a constant in them
        for backend in ("inductor", "inductor_moe"):
            fn = torch.compile(sort_by_expert, backend=backend, dynamic=False)
            with im.backend.reporting() as report:  # compiles here
                assert torch.equal(fn(ids, num_local), order)
            assert [r.family for r in report.rewrites] == (["expert_sort"] if backend == "inductor_moe" else []), (
                tokens,
                backend,
                report,
            )
            calls[backend] = lambda fn=fn: fn(ids, num_local)
        for d in (torch.int32, torch.int16, torch.uint8):
            assert torch.equal(torch.argsort(key.to(d), stable=True), order)
        t = timing.interleaved_us(calls, graph_us)
        point = [tokens * k, f"{num_local} of {experts}"]
        sort_rows.append(point + [f"{t[name]:.2f}" for name in calls])

        compiled_inverse = torch.compile(indexing.inverse_permutation, dynamic=False)
        assert torch.equal(indexing.inverse_permutation(order), torch.argsort(order))
        assert torch.equal(compiled_inverse(order), torch.argsort(order))
        inv = {
            "argsort": lambda: torch.argsort(order),
            "inverse_permutation": lambda: indexing.inverse_permutation(order),
            "inverse_permutation, compiled": lambda: compiled_inverse(order),
        }
        t = timing.interleaved_us(inv, graph_us)
        inverse_rows.append([tokens * k] + [f"{t[name]:.2f}" for name in inv])

        want = ops.expert_sort_aten(ids, 0, num_local)
        compiled_chain = torch.compile(ops.expert_sort_aten, dynamic=False)
        grouping = {
            "ATen chain": lambda: ops.expert_sort_aten(ids, 0, num_local),
            "ATen chain, inductor": lambda: compiled_chain(ids, 0, num_local),
            "expert_sort": lambda: im.expert_sort(ids, (0, num_local)),
        }
        if tokens * k <= _KERNEL_PAIRS:
            outs = [torch.empty_like(want[0]), torch.empty_like(want[1]), torch.empty_like(want[2])]
            grouping["one program"] = lambda: kernel.expert_sort(
                ids, indexing.row_strides(ids), 0, num_local, outs[0], outs[1], outs[2]
            )
            grouping["one program"]()
            assert all(torch.equal(a, b) for a, b in zip(outs, want))
        for fn in (grouping["ATen chain, inductor"], grouping["expert_sort"]):
            assert all(torch.equal(a, b) for a, b in zip(fn(), want))
        t = timing.interleaved_us(grouping, graph_us)
        grouping_rows.append(
            point
            + [
                f"{t[name]:.2f}" if name in t else "-"
                for name in ("ATen chain", "ATen chain, inductor", "one program", "expert_sort")
            ]
        )
    timing.table(
        "Stable argsort of the expert keys, µs per call in a CUDA graph (eager by key dtype; compiled from int64)",
        ["pairs", "local experts", "eager int64", "int32", "int16", "uint8", "inductor", "inductor_moe"],
        sort_rows,
    )
    timing.table(
        "The inverse of the sort's permutation, µs per call in a CUDA graph",
        ["pairs", "argsort(perm)", "indexing.inverse_permutation", "compiled"],
        inverse_rows,
    )
    timing.table(
        f"The grouping from routed ids (order, offs, src_rows), µs per call in a CUDA graph; the op runs one program "
        f"up to {kernel.MAX_PAIRS} pairs",
        ["pairs", "local experts", "ATen chain", "ATen chain, inductor", "one program", "expert_sort"],
        grouping_rows,
    )


if __name__ == "__main__":
    main()
