"""Every inductor_moe setting, in one place.

Environment variables are read when a setting is used, never at import, so a test or a launcher can change
them at any time; :func:`override` sets them for a block of Python code instead (all but INDUCTOR_MOE_PDL,
which the C++ host glue, kernels/csrc/launcher.cpp, reads itself per launch, with the meaning of
:func:`pdl_enabled`).

| variable                  | default                    | meaning                                                |
|---------------------------|----------------------------|--------------------------------------------------------|
| INDUCTOR_MOE_CACHE_DIR    | ~/.cache/inductor_moe      | compiled kernels and host glue, keyed by source/options|
| INDUCTOR_MOE_PDL          | 1                          | programmatic dependent launch on sm90+ for our kernels |
|                           |                            | and, under backend="inductor_moe", Inductor's (0: off) |
| INDUCTOR_MOE_CXX          | $CXX, else g++             | C++ compiler for the host glue                         |
| INDUCTOR_MOE_FAMILIES     | gated_act,topk_pack,       | which lowerings rewrite graphs ("" or "none": none)    |
|                           | combine,expert_sort,       |                                                        |
|                           | experts,route              |                                                        |
| INDUCTOR_MOE_DEVICES      | cuda                       | device types whose graphs are rewritten (cpu,cuda: both)|

The two rewriting settings are part of the pass's uuid (backend.py), so changing them never reuses a cached
graph compiled under the other value.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

FAMILIES = ("gated_act", "topk_pack", "combine", "expert_sort", "experts", "route")

_overrides: dict[str, str] = {}


def _get(name: str, default: str) -> str:
    if name in _overrides:
        return _overrides[name]
    return os.environ.get(name, default)


@contextlib.contextmanager
def override(**settings: object):
    """Set settings for a block, by the name of their variable without the prefix, e.g.
    ``override(devices="cpu,cuda", families="gated_act")``; takes precedence over the environment."""
    saved = dict(_overrides)
    for key, value in settings.items():
        name = f"INDUCTOR_MOE_{key.upper()}"
        _overrides[name] = ",".join(value) if isinstance(value, (tuple, list, set, frozenset)) else str(value)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def cache_dir() -> Path:
    """Root of the on-disk JIT cache."""
    root = _get("INDUCTOR_MOE_CACHE_DIR", "")
    return Path(root) if root else Path.home() / ".cache" / "inductor_moe"


def pdl_enabled() -> bool:
    """Whether kernels launch with programmatic dependent launch (only ever on sm90+). Read from the
    environment only (not :func:`override`): the C++ launcher reads the same variable."""
    return os.environ.get("INDUCTOR_MOE_PDL", "1") != "0"


def inductor_pdl() -> bool:
    """Whether ``backend="inductor_moe"`` compiles Inductor's own Triton kernels with programmatic dependent
    launch (Inductor's ``triton.enable_pdl``, which only acts on CUDA devices of sm90+).

    Why it is on: at small batch a MoE block is a chain of ~20 launches of a microsecond each, and PDL lets each
    start while the one before drains (H100: Inductor's packing kernel 1.12-1.47 us without, 0.81-1.06 with);
    stock Inductor leaves it off. Under this backend every Inductor kernel waits before its first global access
    and none triggers its dependents early (inductor_pdl.py says why); ours wait first too.
    """
    return pdl_enabled()


def cxx() -> str:
    """The C++ compiler that builds the host glue; a clear error if there is none."""
    name = _get("INDUCTOR_MOE_CXX", "") or os.environ.get("CXX") or "g++"
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"inductor_moe builds its CUDA host glue with a C++ compiler, and {name!r} was not found; "
            "install g++ or point INDUCTOR_MOE_CXX at a C++20 compiler"
        )
    return path


def _names(raw: str, known: tuple[str, ...] | None, what: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in raw.split(",") if n.strip() and n.strip() != "none")
    unknown = names - set(known) if known is not None else ()
    if unknown:
        raise ValueError(f"INDUCTOR_MOE_{what.upper()}: unknown {what} {sorted(unknown)}; known: {list(known)}")
    return names


def families() -> frozenset[str]:
    """The lowering families that rewrite graphs."""
    return _names(_get("INDUCTOR_MOE_FAMILIES", ",".join(FAMILIES)), FAMILIES, "families")


def devices() -> frozenset[str]:
    """Device types (``cuda``, ``cpu``, ...) whose graphs are rewritten. CPU graphs are off by default: there
    the ops run the reference, which is no faster than Inductor's code; tests and snapshots turn them on."""
    return _names(_get("INDUCTOR_MOE_DEVICES", "cuda"), None, "devices")


def rewrite_settings() -> str:
    """The settings that change what the lowerings rewrite, for the pass's uuid."""
    return f"families={sorted(families())};devices={sorted(devices())}"
