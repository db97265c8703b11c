"""The ``inductor_moe`` dynamo backend: stock Inductor with our post-grad pass.

``torch.compile(model, backend="inductor_moe")`` finds :func:`inductor_moe_backend` through the
``torch_dynamo_backends`` entry point (no import needed; passing the function itself works too); ``mode=`` and
``options=`` mean what they mean for ``backend="inductor"``. The one Inductor setting it changes: the generated
Triton kernels launch with programmatic dependent launch on sm90+ (``triton.enable_pdl``; see
:func:`config.inductor_pdl` for why that is safe and what it is worth), unless ``options`` or
``INDUCTOR_MOE_PDL=0`` say otherwise.
:func:`enable` / :func:`disable` add the pass to the stock ``inductor`` backend instead. :func:`explain`
compiles a function and says what was rewritten and what was not, and why.

The pass (:class:`MoEPass`) is Inductor's ``post_grad_custom_post_pass``. It never replaces a pass the user
installed: it wraps it (a single pass on torch 2.11, a list on 2.13+) and runs it first, and its uuid folds in
theirs, so the FX graph cache keys on both (a pass without a uuid turns the cache off, as it does alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from typing import Any, Callable

import torch
from torch._inductor import custom_graph_pass

from . import config, lowerings
from .lowerings import report

# torch 2.13+ tells inference-aware passes whether the graph is an inference graph; 2.11 has no such passes.
_INFERENCE_AWARE = getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", None)


class MoEPass(_INFERENCE_AWARE or custom_graph_pass.CustomGraphPass):
    """The inductor_moe lowerings as a post-grad pass, after ``inner`` (the pass or passes already installed)."""

    def __init__(self, inner: Any = None, pdl_waits: bool = False):
        super().__init__()
        self.inner = inner
        # set by the backend, whose compiles make every Inductor kernel wait before its first access (see
        # _install_pdl_codegen): part of the uuid, so the FX graph cache never hands a graph compiled without
        # those waits to the backend
        self.pdl_waits = pdl_waits
        if inner is None:
            self._inner_passes = ()
        elif isinstance(inner, (list, tuple)):
            self._inner_passes = tuple(inner)
        else:
            self._inner_passes = (inner,)

    def __call__(self, graph: torch.fx.Graph, is_inference: bool | None = None) -> None:
        for p in self._inner_passes:
            if _INFERENCE_AWARE is not None and isinstance(p, _INFERENCE_AWARE):
                p(graph, is_inference=bool(is_inference))
            else:
                p(graph)
        lowerings.apply(graph)

    def uuid(self) -> str | None:
        inner = []
        for p in self._inner_passes:
            u = p.uuid() if isinstance(p, custom_graph_pass.CustomGraphPass) else None
            if u is None:
                return None  # an inner pass that cannot be keyed: no caching, as Inductor does for it alone
            inner.append(u)
        h = hashlib.sha256()
        h.update(_source_hash())
        h.update(f"{_version()};{config.rewrite_settings()};{inner!r};pdl_waits={self.pdl_waits}".encode())
        return h.hexdigest()


def _source_hash() -> bytes:
    from . import moe, ops, reference

    # moe.py too: the rewrites call its inverse_permutation and narrow_key_dtype
    files = (*lowerings.SOURCES, __file__, ops.__file__, reference.__file__, moe.__file__)
    return custom_graph_pass.get_hash_for_files(tuple(files))


def _version() -> str:
    from . import __version__

    return __version__


def _with_our_pass(current: Any, pdl_waits: bool = False) -> MoEPass:
    if isinstance(current, MoEPass):
        return current if current.pdl_waits == pdl_waits else MoEPass(current.inner, pdl_waits)
    return MoEPass(current, pdl_waits)


# Inductor's PDL (triton.enable_pdl) places a kernel's gdc_wait before its first read of what the kernel just
# before it wrote, and triggers the next launch after its last load; a kernel that touches nothing the previous
# one wrote (a fill, say) never waits at all. Two changes under this backend, both measured on H100 (2026-11-23):
# - Every Inductor kernel waits before its first global access. A PDL kernel that never waits lets the next one
#   start when it exits, while the kernel before it may still be writing: in a scratch experiment, A writes a
#   flag at the end of 50 us, B (PDL) never waits, and C (PDL) reads the flag without waiting, as Inductor's
#   kernels read buffers older than their predecessor's: stale 200 times in 200. With every kernel waiting,
#   each kernel's completion implies its predecessor's and the chain is safe (ours already wait first).
# - No early trigger: the next kernel launches when this one exits, which is most of PDL's gain (an empty Triton
#   kernel in a CUDA graph: 1.29 us without PDL, 0.82 with PDL and no trigger). The early trigger cost large
#   batches: Qwen3-like block, 1/8 of the experts local, T=4096: 474.5 us with it, 452.0 without, 449.5 with
#   no PDL (stock inductor: 678 -> 796 us when its PDL is on); at T=1 both give 43.6-43.8 against 44.8.
_pdl_state = threading.local()


def _install_pdl_codegen() -> None:
    """Patch Inductor's Triton codegen as above, for compiles inside :func:`_compile_inner_with_pdl_waits`
    only; other compiles in the process (stock Inductor with its PDL on, say) are left as they are."""
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.virtualized import V

    original_wait = TritonKernel._handle_pdl_before_access
    if getattr(original_wait, "_inductor_moe", False):
        return
    original_filter = TritonKernel._filter_pdl

    def handle_pdl_before_access(self, wait_buffer, *dependencies, consider_reads=False):
        scheduler = V.graph.scheduler
        if not getattr(_pdl_state, "active", False) or scheduler is None:
            return original_wait(self, wait_buffer, *dependencies, consider_reads=consider_reads)
        previous, scheduler.previous_node = scheduler.previous_node, None  # "no known predecessor": wait
        try:
            return original_wait(self, wait_buffer, *dependencies, consider_reads=consider_reads)
        finally:
            scheduler.previous_node = previous

    def filter_pdl(self, code):
        original_filter(self, code)
        if getattr(_pdl_state, "active", False):
            code._lines = [line for line in code._lines if not (isinstance(line, str) and self.GDC_LAUNCH in line)]

    handle_pdl_before_access._inductor_moe = True
    TritonKernel._handle_pdl_before_access = handle_pdl_before_access
    TritonKernel._filter_pdl = filter_pdl


def _compile_inner_with_pdl_waits(*args, **kwargs):
    """Inductor's compile_fx_inner (forward and backward graphs alike) with the PDL codegen above."""
    from torch._inductor.compile_fx import compile_fx_inner

    _install_pdl_codegen()
    saved = getattr(_pdl_state, "active", False)
    _pdl_state.active = True
    try:
        return compile_fx_inner(*args, **kwargs)
    finally:
        _pdl_state.active = saved


def inductor_moe_backend(
    gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None
):
    """The ``inductor_moe`` backend: compile_fx with our pass added to the post-grad passes (forward and
    backward compiles both see it through ``config_patches``)."""
    from torch import _TorchCompileInductorWrapper
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    options = dict(options or {})
    user_pass = options.pop("post_grad_custom_post_pass", inductor_config.post_grad_custom_post_pass)
    patches = dict(_TorchCompileInductorWrapper(mode, options, dynamic=None).config)
    patches.setdefault("triton.enable_pdl", config.inductor_pdl())
    patches["post_grad_custom_post_pass"] = _with_our_pass(user_pass, pdl_waits=True)
    return compile_fx(gm, example_inputs, inner_compile=_compile_inner_with_pdl_waits, config_patches=patches)


def enable() -> None:
    """Add the lowerings to the stock ``inductor`` backend (torch.compile's default), until :func:`disable`."""
    from torch._inductor import config as inductor_config

    inductor_config.post_grad_custom_post_pass = _with_our_pass(inductor_config.post_grad_custom_post_pass)


def disable() -> None:
    """Undo :func:`enable`: the pass that was installed before it is back."""
    from torch._inductor import config as inductor_config

    current = inductor_config.post_grad_custom_post_pass
    if isinstance(current, MoEPass):
        inductor_config.post_grad_custom_post_pass = current.inner


@contextlib.contextmanager
def reporting():
    """Collect what the lowerings do inside the block (a :class:`report.Report`), with the FX graph and
    AOTAutograd caches off so that the pass runs even for a graph compiled before."""
    import torch._functorch.config as functorch_config
    from torch._inductor import config as inductor_config

    with (
        report.collect() as collected,
        inductor_config.patch(fx_graph_cache=False),
        functorch_config.patch(enable_autograd_cache=False),
    ):
        yield collected


def explain(fn: Callable, *args, **kwargs) -> report.Report:
    """Compile ``fn`` with the inductor_moe backend, call it once on ``args``, and return what the lowerings
    rewrote and which candidates they rejected, with reasons (``print`` it).

    Like ``torch._dynamo.explain`` it resets torch.compile's caches first (see :func:`reporting`).
    """
    torch._dynamo.reset()
    with reporting() as collected:
        torch.compile(fn, backend=inductor_moe_backend)(*args, **kwargs)
    return collected
