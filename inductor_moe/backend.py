"""The ``inductor_moe`` dynamo backend: stock Inductor with our post-grad pass.

``torch.compile(model, backend="inductor_moe")`` finds :func:`inductor_moe_backend` through the
``torch_dynamo_backends`` entry point (no import needed; passing the function itself works too); ``mode=`` and
``options=`` mean what they mean for ``backend="inductor"``. The one Inductor setting it changes: the generated
Triton kernels launch with programmatic dependent launch on sm90+ (``triton.enable_pdl``, with every kernel
waiting before its first access: :mod:`inductor_moe.inductor_pdl` says why and checks that this torch's
codegen is the one it patches), unless ``options`` or ``INDUCTOR_MOE_PDL=0`` say otherwise.
:func:`enable` / :func:`disable` add the pass to the stock ``inductor`` backend instead. :func:`explain`
compiles a function and says what was rewritten and what was not, and why.

The pass (:class:`MoEPass`) is Inductor's ``post_grad_custom_post_pass``. It never replaces a pass the user
installed: it wraps it (a single pass on torch 2.11, a list on 2.13+) and runs it first, and its uuid folds in
theirs, so the FX graph cache keys on both (a pass without a uuid turns the cache off, as it does alone).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch._inductor import custom_graph_pass

from . import config, inductor_pdl, lowerings
from .lowerings import report

# torch 2.13+ tells inference-aware passes whether the graph is an inference graph; 2.11 has no such passes.
_INFERENCE_AWARE = getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", None)


class MoEPass(_INFERENCE_AWARE or custom_graph_pass.CustomGraphPass):
    """The inductor_moe lowerings as a post-grad pass, after ``inner`` (the pass or passes already installed)."""

    def __init__(self, inner: Any = None, pdl_waits: bool = False):
        super().__init__()
        self.inner = inner
        # set by the backend, whose compiles make every Inductor kernel wait before its first access
        # (inductor_pdl.py): part of the uuid, so the FX graph cache never hands a graph compiled without
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


def sources() -> tuple[str, ...]:
    """Every file whose code decides what the pass rewrites or what its replacements compute: the lowerings,
    this module, the PDL codegen, and what the lowerings import (the ops, the reference, the index helpers)."""
    from . import indexing, ops, reference

    op_files = sorted(str(p) for p in Path(ops.__file__).parent.glob("*.py"))
    return (*lowerings.SOURCES, __file__, inductor_pdl.__file__, *op_files, reference.__file__, indexing.__file__)


def _source_hash() -> bytes:
    return custom_graph_pass.get_hash_for_files(sources())


def _version() -> str:
    from . import __version__

    return __version__


def _with_our_pass(current: Any, pdl_waits: bool = False) -> MoEPass:
    if isinstance(current, MoEPass):
        return current if current.pdl_waits == pdl_waits else MoEPass(current.inner, pdl_waits)
    return MoEPass(current, pdl_waits)


def _compile_inner_with_pdl_waits(*args, **kwargs):
    """Inductor's compile_fx_inner (forward and backward graphs alike) with the PDL codegen of
    :mod:`inductor_moe.inductor_pdl`."""
    from torch._inductor.compile_fx import compile_fx_inner

    with inductor_pdl.compiling():
        return compile_fx_inner(*args, **kwargs)


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
    pdl_waits = config.inductor_pdl() and inductor_pdl.install()  # False: this torch's codegen is not patched
    patches.setdefault("triton.enable_pdl", pdl_waits)
    patches["post_grad_custom_post_pass"] = _with_our_pass(user_pass, pdl_waits=pdl_waits)
    inner = {"inner_compile": _compile_inner_with_pdl_waits} if pdl_waits else {}
    return compile_fx(gm, example_inputs, config_patches=patches, **inner)


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
