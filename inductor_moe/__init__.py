"""inductor_moe: fused Mixture-of-Experts kernels for torch.compile.

Eager API (drop-in for SGLang-style call sites): :func:`silu_and_mul`, :func:`gelu_and_mul`,
:func:`gelu_tanh_and_mul` and :func:`act_and_mul`, all with the optional expert filter. The same computations
are the custom ops ``torch.ops.inductor_moe.*``, with :func:`pack_topk_ids_weights`, :func:`moe_combine` and
:func:`expert_sort` (the routed pairs grouped by expert).

Compiler: ``torch.compile(model, backend="inductor_moe")`` rewrites those computations, however a model spells
them, into the ops (:mod:`inductor_moe.backend`); :func:`enable` / :func:`disable` do it for the stock
``inductor`` backend; :func:`explain` says what was rewritten and why something was not. They are imported on
first use: ``import inductor_moe`` stays free of torch._inductor (~1.4 s). The MoE runner,
:mod:`inductor_moe.moe`, is imported on first use too.
"""

from .ops import (
    act_and_mul,
    expert_sort,
    fused_experts,
    gelu_and_mul,
    gelu_tanh_and_mul,
    load_cuda_kernels,
    moe_combine,
    pack_topk_ids_weights,
    route,
    silu_and_mul,
)

__version__ = "0.1.0"

_COMPILER_API = ("enable", "disable", "explain")


def __getattr__(name: str):
    import importlib

    if name in (*_COMPILER_API, "backend"):
        module = importlib.import_module(f"{__name__}.backend")  # also binds inductor_moe.backend
        return module if name == "backend" else getattr(module, name)
    if name == "moe":  # the MoE runner (inductor_moe.moe.moe / route / experts), on top of the ops
        return importlib.import_module(f"{__name__}.moe")
    raise AttributeError(f"module 'inductor_moe' has no attribute {name!r}")


__all__ = [
    "__version__",
    "act_and_mul",
    "disable",
    "enable",
    "expert_sort",
    "explain",
    "fused_experts",
    "gelu_and_mul",
    "gelu_tanh_and_mul",
    "load_cuda_kernels",
    "moe",
    "moe_combine",
    "pack_topk_ids_weights",
    "route",
    "silu_and_mul",
]
