"""The timing helper every benchmark uses: µs per call inside a CUDA graph, and the device's copy bandwidth
measured in the same run (the floor of a memory-bound kernel is its bytes over that); the tables a benchmark
prints, and with ``--out FILE`` the same tables as JSON with the run's metadata (:func:`cli`)."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

# A graph replay costs ~5.5 us of its own before its first kernel runs (H100: 1x2048 silu 1.24 us
# a call with 32 launches a graph, 1.08 with 256, 1.06 with 1024; an empty Triton kernel 1.15 / 0.98 / 0.97).
# So a graph holds enough launches to run at least this long, and that overhead stays under 1% of a call.
_MIN_GRAPH_US = 500.0
_MAX_CALLS = 1024


def graph_us(fns: list[Callable[[], object]], calls: int | None = None, repeats: int = 15) -> float:
    """Median µs per call of the launches captured in one CUDA graph, cycling through ``fns``.

    ``calls`` fixes the number of launches; by default it is at least 32 and grows (up to 1024) until a replay
    takes ~0.5 ms, so the replay's own launch cost is amortised away from small kernels.
    Pass several callables over different buffers when one set fits in L2 (see :func:`buffer_sets`): a
    benchmark that rereads one small buffer measures the cache, not the memory a model streams through.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:  # JIT compiles, autotuning and allocations stay outside the graph
            fn()
    torch.cuda.synchronize()
    n = max(calls or 32, len(fns))
    if calls is None:
        n = min(_MAX_CALLS, max(n, math.ceil(_MIN_GRAPH_US / max(_replay_us(fns, n, 3), 1e-3))))
    return _replay_us(fns, n, repeats)


def _replay_us(fns: list[Callable[[], object]], calls: int, repeats: int) -> float:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    del graph
    return statistics.median(times)


def events_us(fn: Callable[[], object], calls: int = 20, repeats: int = 5) -> float:
    """Median µs per call of ``calls`` back-to-back calls timed with CUDA events, host launch cost included:
    for what a CUDA graph cannot capture (host syncs, data-dependent shapes) or need not (long calls)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    return statistics.median(times)


def interleaved_us(
    calls: dict[str, Callable[[], object]], timer: Callable[[Callable[[], object]], float], rounds: int = 3
) -> dict[str, float]:
    """Median µs of each of ``calls`` under ``timer`` over ``rounds`` rounds, each round timing every call once
    in an order rotated by one. For columns of one table row that are compared with each other: a latency-bound
    launch timed later in a process can run slower than the same launch timed first (H200: silu
    1x2048 0.91 us as a process's first shape, 1.09 us after the others), so a fixed order favours whichever
    column comes first."""
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timer(calls[name]))
    return {name: statistics.median(v) for name, v in times.items()}


def buffer_sets(bytes_per_call: int, max_sets: int = 8) -> int:
    """How many distinct input sets keep the working set at twice the L2 cache (at most ``max_sets``).
    BENCH_BUFFER_SETS=1 times one set instead: L2-resident where it fits, the way a benchmark that reruns one
    input measures (to compare with numbers taken so)."""
    import os

    if os.environ.get("BENCH_BUFFER_SETS"):
        return int(os.environ["BENCH_BUFFER_SETS"])
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(1, min(max_sets, math.ceil(2 * l2 / max(bytes_per_call, 1))))


def copy_bandwidth_gbs(nbytes: int = 1 << 30, memcpy: bool = False) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written: through the SMs, the rate a
    memory-bound kernel can reach, timed with an elementwise kernel (torch.neg, 16-byte accesses); or, with
    ``memcpy``, of ``copy_``, which a CUDA graph runs as a memcpy on the copy engines, slower than the SMs (H200,
    2766 GB/s against 4257; our activation streamed 4213 GB/s in that run)."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    copy = (lambda: dst.copy_(src)) if memcpy else (lambda: torch.neg(src, out=dst))
    us = graph_us([copy], calls=8)
    return 2 * nbytes / (us * 1e-6) / 1e9


def report_copy_bandwidth() -> float:
    """Print both copy rates; return the one through the SMs (what "% of copy" divides by)."""
    gbs = copy_bandwidth_gbs()
    print(f"device-to-device copy: {gbs:.0f} GB/s through the SMs, {copy_bandwidth_gbs(memcpy=True):.0f} as a memcpy")
    return gbs


def device_name() -> str:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{props.name} ({props.multi_processor_count} SMs, sm_{props.major}{props.minor})"


METHOD = (
    "µs per call: the median of 15 replays of a CUDA graph holding at least 32 calls and ~0.5 ms of work "
    "(graph_us); inputs rotated over enough buffer sets to cover twice the L2 (buffer_sets), so weights and "
    "activations come from HBM; the columns of a row timed in rotated order, median of 3 rounds (interleaved_us)"
)

_tables: list[dict] = []


def table(title: str, header: list[str], rows: list[list]) -> None:
    """Print a markdown table (what BENCHMARKS.md quotes); kept for ``--out``."""
    _tables.append({"title": title, "header": list(header), "rows": [[str(c) for c in r] for r in rows]})
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    sys.stdout.flush()


@contextlib.contextmanager
def emitted(title: str, header: list[str], rows: list[list]):
    """:func:`table` of ``rows`` when the block ends, also when a timeout's SIGINT interrupts it (the title then
    says so): a run cut short keeps the rows it measured, in its output and in its ``--out`` file."""
    try:
        yield
    except KeyboardInterrupt:
        table(f"{title} (interrupted: the rows measured before)", header, rows)
        raise
    table(title, header, rows)


def _driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout
        return out.strip().splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


def _without_out(argv: list[str]) -> list[str]:
    """The arguments that decide what runs: ``--out FILE`` left out."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--out="):
            skip = False
            continue
        if arg == "--out":
            skip = True
            continue
        kept.append(arg)
    return kept


def metadata(method: str = METHOD) -> dict:
    """What a table needs to be read later: command, device, versions, method, date."""
    import triton

    return {
        "command": "python3 " + " ".join([Path(sys.argv[0]).as_posix(), *_without_out(sys.argv[1:])]),
        "device": device_name(),
        "driver": _driver(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "method": method,
        "date": time.strftime("%Y-%m-%d"),
    }


def cli(parser: argparse.ArgumentParser | None = None, method: str = METHOD) -> argparse.Namespace:
    """Parse the benchmark's arguments plus ``--out FILE``: at exit, every table the run printed is written
    there as JSON ({"metadata": ..., "tables": [{title, header, rows}]}); a partial run writes what it has."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, help="also write the tables and the run's metadata here as JSON")
    args = parser.parse_args()
    if args.out is not None:
        meta = metadata(method)

        def write():
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"metadata": meta, "tables": _tables}, indent=1, ensure_ascii=False))

        atexit.register(write)
    return args


def header(extra: str = "") -> None:
    print(f"device: {device_name()}, torch {torch.__version__}, date {time.strftime('%Y-%m-%d')} {extra}".rstrip())
