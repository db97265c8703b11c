"""Every inductor_moe setting, in one place.

Environment variables are read when a setting is used, never at import, so a test or a launcher can change
them at any time. The C++ host glue (kernels/csrc/launcher.cpp) reads INDUCTOR_MOE_PDL itself, per launch, with
the same meaning as :func:`pdl_enabled`.

| variable                  | default                  | meaning                                                  |
|---------------------------|--------------------------|----------------------------------------------------------|
| INDUCTOR_MOE_CACHE_DIR    | ~/.cache/inductor_moe    | compiled kernels and host glue, keyed by source/options  |
| INDUCTOR_MOE_PDL          | 1                        | programmatic dependent launch on sm90+ (0 turns it off)  |
| INDUCTOR_MOE_CXX          | $CXX, else g++           | C++ compiler for the host glue                           |
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cache_dir() -> Path:
    """Root of the on-disk JIT cache."""
    root = os.environ.get("INDUCTOR_MOE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "inductor_moe"


def pdl_enabled() -> bool:
    """Whether kernels launch with programmatic dependent launch (only ever on sm90+)."""
    return os.environ.get("INDUCTOR_MOE_PDL", "1") != "0"


def cxx() -> str:
    """The C++ compiler that builds the host glue; a clear error if there is none."""
    name = os.environ.get("INDUCTOR_MOE_CXX") or os.environ.get("CXX") or "g++"
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"inductor_moe builds its CUDA host glue with a C++ compiler, and {name!r} was not found; "
            "install g++ or point INDUCTOR_MOE_CXX at a C++20 compiler"
        )
    return path
