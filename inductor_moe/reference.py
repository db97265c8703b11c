"""Plain-PyTorch reference of every inductor_moe op.

This module is the spec: the CPU implementations of the ops call it, the tests compare the kernels against
it, and the lowerings trace their patterns from it. Keep it plain and obviously right.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")

EXPERT_LO = 0
EXPERT_HI = 2**31 - 1  # with EXPERT_LO, makes -1 (SGLang's marker) the only dead id


def activation_ref(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}")


def live_rows_ref(
    expert_ids: torch.Tensor, rows: int, expert_step: int = 1, expert_lo: int = EXPERT_LO, expert_hi: int = EXPERT_HI
) -> torch.Tensor:
    """The expert filter: row r is live iff expert_lo <= expert_ids[r // expert_step] < expert_hi. Bool [rows]."""
    ids = expert_ids.reshape(-1)[torch.arange(rows, device=expert_ids.device) // expert_step]
    return (ids >= expert_lo) & (ids < expert_hi)


def act_and_mul_ref(
    input: torch.Tensor,
    activation: str,
    expert_ids: torch.Tensor | None = None,
    expert_step: int = 1,
    expert_lo: int = EXPERT_LO,
    expert_hi: int = EXPERT_HI,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(input[..., :d]) * input[..., d:]`` computed in fp32 and rounded once to input's dtype (what
    Inductor's fused code and the kernels compute). Without ``out``, dead rows are zero; with ``out``, live
    rows are written into it and dead rows are left as they were."""
    d = input.shape[-1] // 2
    acc = torch.promote_types(input.dtype, torch.float32)
    y = (activation_ref(input[..., :d].to(acc), activation) * input[..., d:].to(acc)).to(input.dtype)
    if expert_ids is None:
        live = None
    else:
        live = live_rows_ref(expert_ids, math.prod(y.shape[:-1]), expert_step, expert_lo, expert_hi)
        live = live.reshape(y.shape[:-1])
    if out is None:
        return y if live is None else torch.where(live.unsqueeze(-1), y, torch.zeros_like(y))
    if live is None:
        out.copy_(y)
    else:
        out[live] = y[live]
    return out
