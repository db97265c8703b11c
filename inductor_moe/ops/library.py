"""What every op family shares: the ``inductor_moe`` library its schemas are defined in, the argument checks'
error format, the dtypes the kernels take, the expert range of the public API, and the first-call trampolines
of the ops whose CUDA kernels the C++ host glue registers.

Argument checks run in the fake and CPU implementations; csrc/<family>.cpp makes the same checks with the
same messages for CUDA (calling back into Python would cost the ~45 us a C++ op saves). Comparisons that
involve sizes use ``guard_or_false``, so a symbolic batch is never specialised by a check.
"""

from __future__ import annotations

import threading

import torch

from .. import reference
from ..kernels import families, jit

lib = torch.library.Library("inductor_moe", "DEF")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
DTYPE_NAMES = "float16, bfloat16 or float32"


def define(schema: str) -> None:
    lib.define(schema, tags=(torch.Tag.pt2_compliant_tag,))


def with_defaults(op: str, args: tuple) -> tuple:
    """``args`` of a call of ``inductor_moe::<op>`` completed with the schema's defaults: the dispatcher leaves
    trailing arguments that equal their default out when it calls a Python kernel."""
    schema = getattr(torch.ops.inductor_moe, op).default._schema
    return (*args, *(a.default_value for a in schema.arguments[len(args) :]))


def check(cond, msg: str, op: str) -> None:
    """An error that names the op: ``inductor_moe.<op>: <msg>``."""
    torch._check(cond, lambda: f"inductor_moe.{op}: {msg}")


def check_activation(activation: str, op: str) -> None:
    check(
        activation in reference.ACTIVATIONS,
        f"activation must be one of 'silu', 'gelu', 'gelu_tanh', got '{activation}'",
        op,
    )


def expert_bounds(expert_range: tuple[int, int] | None) -> tuple[int, int]:
    """The public ``expert_range`` as the ops' (expert_lo, expert_hi); the default makes -1 the dead marker."""
    return (reference.EXPERT_LO, reference.EXPERT_HI) if expert_range is None else expert_range


# CUDA kernels of the host glue: registered from C++ when the glue loads. Until then a trampoline holds each
# CUDA slot; the first CUDA call builds (or loads from the disk cache) the glue, removes the trampolines and
# re-dispatches, so every later call goes straight to C++. Importing the package therefore never compiles.
_trampolines = torch.library.Library("inductor_moe", "IMPL")
_trampoline_lock = threading.Lock()


def load_cuda_kernels() -> None:
    """Build/load the CUDA host glue now instead of at the first CUDA call (e.g. before CUDA-graph capture)."""
    with _trampoline_lock:
        jit.load_host_library(before_register=_trampolines._destroy)


def _make_trampoline(name: str):
    def trampoline(*args):
        load_cuda_kernels()
        return getattr(torch.ops.inductor_moe, name).default(*args)

    return trampoline


def register_host_glue_trampolines() -> None:
    """One trampoline per op of kernels/families.py; called once every family's schema is defined."""
    for name in families.cuda_ops():
        _trampolines.impl(name, _make_trampoline(name), "CUDA")
