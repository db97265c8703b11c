"""inductor_moe: fused Mixture-of-Experts kernels for torch.compile.

Eager API (drop-in for SGLang-style call sites): :func:`silu_and_mul`, :func:`gelu_and_mul`,
:func:`gelu_tanh_and_mul` and :func:`act_and_mul`, all with the optional expert filter. The same computations
are the custom ops ``torch.ops.inductor_moe.*``, with :func:`pack_topk_ids_weights` and :func:`moe_combine`.
"""

from .ops import (
    act_and_mul,
    gelu_and_mul,
    gelu_tanh_and_mul,
    load_cuda_kernels,
    moe_combine,
    pack_topk_ids_weights,
    silu_and_mul,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "act_and_mul",
    "gelu_and_mul",
    "gelu_tanh_and_mul",
    "load_cuda_kernels",
    "moe_combine",
    "pack_topk_ids_weights",
    "silu_and_mul",
]
