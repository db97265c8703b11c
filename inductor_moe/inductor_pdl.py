"""Inductor's own Triton kernels with programmatic dependent launch, made safe for a chain of launches.

Inductor's PDL (``triton.enable_pdl``) places a kernel's ``gdc_wait`` before its first read of what the kernel
just before it wrote, and triggers the next launch after its last load; a kernel that touches nothing the
previous one wrote (a fill, say) never waits at all. Under ``backend="inductor_moe"`` two things change:

- Every Inductor kernel waits before its first global access. A PDL kernel that never waits lets the next one
  start when it exits, while the kernel before it may still be writing; Inductor's kernels read buffers older
  than their predecessor's, so the chain A (writes a flag at the end of 50 us), B (PDL, no wait), C (PDL, reads
  the flag without waiting) read it stale 200 times in 200 on an H100. With every kernel waiting, each
  kernel's completion implies its predecessor's and the chain is safe (ours wait first too).
- No early trigger: the next kernel launches when this one exits, which is most of PDL's gain (an empty
  Triton kernel in a CUDA graph, H100: 1.29 us plain, 0.82 with PDL and no trigger), while the early trigger
  slowed large batches (Qwen3-like block, 1/8 of the experts local, T=4096, H100: 474.5 us with it, 452.0
  without).

Both are made by replacing two private methods of Inductor's ``TritonKernel``, for the compiles of this
backend only (:func:`compiling`). :func:`available` checks that those methods exist with the signatures and
the behaviour this relies on; where they do not (another torch version), :func:`install` changes nothing, the
backend compiles with Inductor's PDL off, and the log says so once.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading

log = logging.getLogger("inductor_moe.inductor_pdl")

_state = threading.local()
_warned = False

# what the replacements need of Inductor: (attribute of TritonKernel, its parameters after self)
_HOOKS = {
    "_handle_pdl_before_access": ["wait_buffer", "dependencies", "consider_reads"],
    "_filter_pdl": ["code"],
}


def missing_hooks() -> list[str]:
    """What this module needs of Inductor and does not find, in words (empty when the patch applies)."""
    try:
        from torch._inductor.codegen.triton import TritonKernel
        from torch._inductor.utils import IndentedBuffer
    except ImportError as e:
        return [f"torch._inductor.codegen.triton: {e}"]
    problems = []
    for name, params in _HOOKS.items():
        method = getattr(TritonKernel, name, None)
        if getattr(method, "_inductor_moe", False):
            method = method._original
        if not callable(method):
            problems.append(f"TritonKernel.{name} is missing")
            continue
        have = list(inspect.signature(method).parameters)[1:]
        if have != params:
            problems.append(f"TritonKernel.{name} takes {have}, not {params}")
    if not isinstance(getattr(TritonKernel, "GDC_LAUNCH", None), str):
        problems.append("TritonKernel.GDC_LAUNCH is missing")
    wait = getattr(TritonKernel, "_handle_pdl_before_access", None)
    wait = getattr(wait, "_original", wait)
    try:
        if callable(wait) and "previous_node" not in inspect.getsource(wait):
            problems.append("TritonKernel._handle_pdl_before_access no longer reads scheduler.previous_node")
    except (OSError, TypeError):
        problems.append("the source of TritonKernel._handle_pdl_before_access cannot be read")
    if not isinstance(getattr(IndentedBuffer(), "_lines", None), list):
        problems.append("IndentedBuffer._lines is missing")
    return problems


def available() -> bool:
    """Whether the patch applies to the installed Inductor; logs why not, once per process."""
    global _warned
    problems = missing_hooks()
    if problems and not _warned:
        _warned = True
        log.warning(
            "inductor_moe: Inductor's PDL stays off under backend='inductor_moe': this torch's Triton codegen "
            "is not the one the PDL patch was written for (%s)",
            "; ".join(problems),
        )
    return not problems


def install() -> bool:
    """Replace the two hooks (once per process); they act only inside :func:`compiling`. False, and nothing
    replaced, when :func:`available` says the hooks are not as expected."""
    if not available():
        return False
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.virtualized import V

    original_wait = TritonKernel._handle_pdl_before_access
    if getattr(original_wait, "_inductor_moe", False):
        return True
    original_filter = TritonKernel._filter_pdl

    def handle_pdl_before_access(self, wait_buffer, *dependencies, consider_reads=False):
        scheduler = V.graph.scheduler
        if not getattr(_state, "active", False) or scheduler is None:
            return original_wait(self, wait_buffer, *dependencies, consider_reads=consider_reads)
        previous, scheduler.previous_node = scheduler.previous_node, None  # "no known predecessor": wait
        try:
            return original_wait(self, wait_buffer, *dependencies, consider_reads=consider_reads)
        finally:
            scheduler.previous_node = previous

    def filter_pdl(self, code):
        original_filter(self, code)
        if getattr(_state, "active", False):
            code._lines = [line for line in code._lines if not (isinstance(line, str) and self.GDC_LAUNCH in line)]

    for replacement, original in ((handle_pdl_before_access, original_wait), (filter_pdl, original_filter)):
        replacement._inductor_moe = True
        replacement._original = original
    TritonKernel._handle_pdl_before_access = handle_pdl_before_access
    TritonKernel._filter_pdl = filter_pdl
    return True


@contextlib.contextmanager
def compiling():
    """Inductor compiles inside this block get the waits and lose the early trigger (after :func:`install`)."""
    saved = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = saved
