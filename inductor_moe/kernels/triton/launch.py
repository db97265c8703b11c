"""What every Triton launch of this package decides the same way: the device it runs on and whether it uses PDL.

The kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors (CI): no device context, no PDL there.
"""

from __future__ import annotations

import contextlib

import torch

from ... import config


def on(device: torch.device):
    """The launch's device context: the tensors' CUDA device (the current one may be another); none for the
    interpreter's CPU tensors."""
    return contextlib.nullcontext() if device.type == "cpu" else torch.cuda.device(device)


def pdl(device: torch.device) -> bool:
    """Whether a launch on ``device`` is a programmatic dependent launch: CUDA sm90+, unless
    ``config.pdl_enabled()`` says no. The kernel then waits (``gdc_wait``) before its first global read."""
    return device.type == "cuda" and config.pdl_enabled() and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_options(use_pdl: bool) -> dict:
    """The launch keyword that makes it a dependent launch."""
    return {"launch_pdl": True} if use_pdl else {}
