"""The ``inductor_moe`` custom ops, one module per family: each holds its schema, argument checks, fake
function, CPU implementation (the plain-PyTorch reference), CUDA wiring, autograd where the op has a gradient,
and its public eager function. :mod:`.library` holds what they share.

Layering, per family: kernel (``kernels/``) -> custom op with fake (here) -> public function (here, re-exported
by the package).
"""

from . import library
from .act_and_mul import act_and_mul, gelu_and_mul, gelu_tanh_and_mul, silu_and_mul
from .combine import moe_combine
from .expert_sort import expert_sort, expert_sort_aten
from .fused_experts import fused_experts
from .library import load_cuda_kernels
from .route import route
from .topk_pack import pack_topk_ids_weights

library.register_host_glue_trampolines()

__all__ = [
    "act_and_mul",
    "expert_sort",
    "expert_sort_aten",
    "fused_experts",
    "gelu_and_mul",
    "gelu_tanh_and_mul",
    "load_cuda_kernels",
    "moe_combine",
    "pack_topk_ids_weights",
    "route",
    "silu_and_mul",
]
