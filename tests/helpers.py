"""Shared by the op tests: devices, dtypes, tolerances, inputs and poisoning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Kernel and reference both compute in fp32 and round once; they differ only by the few fp32 ulps of
# expf/erff/tanhf, which can move a half-precision result across one rounding boundary: at most one ulp of
# the output dtype (bf16 2**-7 relative, fp16 2**-10). In fp32 those ulps show directly, amplified where
# 1 + tanh(.) cancels for negative inputs (seen: 1.04e-6 absolute on a 3.4e-3 result, 1 of 4.2M elements).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
}


def id_in_range(expert_id: int, lo: int, hi: int) -> bool:
    """The expert filter for one id, phrased independently of reference.live_ids_ref: [lo, hi), or everything
    outside [hi, lo) when the range wraps around (lo > hi)."""
    return lo <= expert_id < hi if lo <= hi else not hi <= expert_id < lo


# Ranges of the filter tests: plain, empty, and wrapped ((c + 1, c) kills exactly c; (0, -2**63) keeps id >= 0).
FILTER_RANGES = [(0, 8), (3, 3), (0, -1), (-1, -2), (5, 3), (0, -(2**63)), (-(2**63), 2**63 - 1)]


def extreme_ids(dtype, device):
    """Ids at the edges of ``dtype`` and around the filter ranges above."""
    info = torch.iinfo(dtype)
    values = [info.min, info.min + 1, -2, -1, 0, 1, 2, 3, 4, 5, 7, 8, info.max - 1, info.max]
    return torch.tensor(values, dtype=dtype, device=device)


def randn(*shape, dtype=torch.float32, device="cpu"):
    # Scale 3: the activations' tails (x << 0, erf/tanh saturation) are exercised, not just the middle.
    return (torch.randn(*shape, device=device) * 3).to(dtype)


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def poison_allocator(shape, dtype, device):
    """Leave a NaN-filled block of exactly this size in the CUDA caching allocator, so an output the op
    allocates next most likely reuses it and any element the kernel fails to write shows up as NaN."""
    if device == "cuda":
        del_me = torch.full(shape, float("nan"), dtype=dtype, device=device)
        del del_me


def routed_ids(shape, lo, hi, dtype, device, seed=0):
    """Ids around [lo, hi) (about half of them live), with the edge ids of ``dtype`` mixed in: -1, 0, lo - 1,
    lo, hi - 1, hi and the dtype's extremes (which an int32 subtraction of lo could wrap)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(hi - lo, 1)
    ids = torch.randint(max(lo - width, -1), hi + width, shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    edges = torch.tensor([-1, 0, lo - 1, lo, hi - 1, hi, info.min, info.max], dtype=dtype)
    flat = ids.view(-1)
    flat[: min(flat.numel(), edges.numel())] = edges[: flat.numel()]
    return ids.to(device)


def assert_bit_exact(out, ref):
    assert out.dtype == torch.int32 and out.shape == ref.shape and out.is_contiguous()
    mismatch = (out != ref).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} mismatches, first at {mismatch[:4].tolist()}"


def combine_case(tokens, k, h, dtype, w_dtype, ids_dtype, rows_dtype, device, dead=0.5):
    """Expert outputs whose unread rows are NaN (a kernel that reads one fails), ids with ~``dead`` of the pairs
    outside [0, 8), and, with rows_dtype, src_rows that gather rows from a shuffled, larger expert_out."""
    ids = None
    if ids_dtype is not None:
        ids = torch.randint(0, 8, (tokens, k), device=device)
        ids = torch.where(torch.rand(tokens, k, device=device) < dead, -1, ids).to(ids_dtype)
    live = torch.ones(tokens, k, dtype=torch.bool, device=device) if ids is None else ids >= 0
    if rows_dtype is None:
        src_rows = None
        expert_out = randn(tokens * k, h, device=device)
        rows = torch.arange(tokens * k, device=device).view(tokens, k)
    else:
        total = tokens * k + 5
        src_rows = torch.randperm(total, device=device)[: tokens * k].view(tokens, k)
        # a dead pair's row may be anything, even an invalid index: it must never be read
        src_rows = torch.where(live, src_rows, -7).to(rows_dtype)
        expert_out = randn(total, h, device=device)
        rows = src_rows.long()
    read = torch.zeros(expert_out.shape[0], dtype=torch.bool, device=device)
    read[rows[live]] = True
    expert_out[~read] = float("nan")  # every row no live pair names
    w = torch.rand(tokens, k, device=device).to(w_dtype)
    return expert_out.to(dtype), w, ids, src_rows


def interpreter_results(module: str, function: str, timeout: int = 900) -> dict[str, str]:
    """``module.function()`` (a tests/ module's function returning {case: "ok" or what failed}) run in a child
    process with TRITON_INTERPRET=1 set before triton is first imported, which is the only way Triton's
    interpreter also runs the standard library's @triton.jit functions (tl.sort, tl.cumsum); this process's
    kernels stay compiled (on the GPU machine the same workers run the CUDA tests)."""
    tests = str(Path(__file__).parent)
    code = f"import json, {module} as t; print(json.dumps(t.{function}()))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([tests, *sys.path])}
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def captured(step):
    """``step()`` run once (JIT compiles and allocations stay outside the capture), then captured in a CUDA
    graph: (the graph, what the captured call returned)."""
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def assert_matches_reference(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), "unwritten (poisoned) or NaN elements in the output"
    torch.testing.assert_close(out, ref, **TOL[out.dtype])
    if out.dtype != torch.float32 and out.numel() >= 1000:
        # One-ulp differences must stay rare: a systematic bias (truncation instead of round-to-nearest-even,
        # a wrong constant) would flip a large fraction of elements.
        assert (out != ref).float().mean().item() < 0.01


def assert_compiles_once(fn, make_args, batches, check, unbacked=False, backend="inductor", dims=(0,)):
    """Compile ``fn`` with ``backend`` (fullgraph) and call it at every size in ``batches``, the ``dims`` of every
    argument from ``make_args(t)`` marked dynamic: backed with sizes 0/1 not specialised
    (backed_size_oblivious), or unbacked (no guards on them at all). ``check(compiled, eager)`` must hold at
    every size, and the function must have compiled exactly once."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.fx.experimental import _config as fx_config

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    mark = torch._dynamo.decorators.mark_unbacked if unbacked else torch._dynamo.mark_dynamic
    with fx_config.patch(backed_size_oblivious=not unbacked):
        for t in batches:
            args = make_args(t)
            for a in args:
                for dim in dims:
                    mark(a, dim)
            check(compiled(*args), fn(*args))
    assert counter.frame_count == 1


def compile_rewrite(fn, *args, **compile_kwargs):
    """Compile ``fn`` (by default with the inductor_moe backend, fullgraph), CPU graphs rewritten too, and run it
    on ``args``; returns the result and the lowerings' report (rewrites, rejections, the graph after the pass).
    Dynamo reset and caches off (backend.reporting), so the pass runs every time."""
    from inductor_moe import backend, config

    torch._dynamo.reset()
    with config.override(devices="cpu,cuda"), backend.reporting() as collected:
        out = torch.compile(fn, **{"backend": "inductor_moe", "fullgraph": True, **compile_kwargs})(*args)
    return out, collected


class OnlineSoftmax:
    """Inductor's post-grad rewrite of a softmax's max and sum into one ``prepare_softmax_online`` (its own
    pattern and replacement), which Inductor applies only where its Triton backend runs (CUDA): a CPU compile
    under :meth:`patched` sees the graph a CUDA one does. ``applied`` counts the softmaxes it rewrote."""

    def __init__(self):
        from torch._inductor.fx_passes import post_grad
        from torch._inductor.pattern_matcher import PatternMatcherPass, fwd_only, register_replacement

        self.patterns = PatternMatcherPass()
        register_replacement(
            post_grad.prepare_softmax_pattern,
            post_grad.prepare_softmax_replacement,
            [torch.empty(4, 8)],
            scalar_workaround=dict(dim=-1),
            trace_fn=fwd_only,
            pass_dicts=self.patterns,
        )
        self.applied = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.applied += self.patterns.apply(graph)

    def uuid(self) -> str:
        return "tests.helpers.OnlineSoftmax"

    def patched(self):
        """Inductor's config with this as the post-grad pre-pass (before inductor_moe's post pass)."""
        return torch._inductor.config.patch(post_grad_custom_pre_pass=self)


def families(report) -> list[str]:
    """The families rewritten, in order (one entry per rewrite)."""
    return [r.family for r in report.rewrites]
