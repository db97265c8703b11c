"""The package's layering and its one-table registrations: imports point one way (indexing below the ops, the
ops below the lowerings and the runner, nothing importing the runner), and the C++ host glue's family ids and
registrations come from kernels/families.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

from inductor_moe.kernels import families, jit

PACKAGE = Path(__file__).resolve().parents[1] / "inductor_moe"

# module (relative to the package, without .py) -> the package modules it may import; a prefix ending in "/"
# covers a sub-package. Anything not listed may import anything below the runner.
LAYERS = {
    "config": set(),
    "reference": set(),
    "indexing": set(),
    "kernels/": {"config", "kernels/"},
    "ops/": {"reference", "indexing", "kernels/", "ops/"},
    "lowerings/": {"config", "reference", "indexing", "ops/", "lowerings/"},
    "inductor_pdl": set(),
    "backend": {"config", "reference", "indexing", "ops/", "lowerings/", "inductor_pdl", "__init__"},
    "moe": {"ops/"},
    "testing": set(),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return "/".join(rel.parts)


def _layer(name: str) -> str | None:
    for layer in LAYERS:
        if name == layer or (layer.endswith("/") and name.startswith(layer)):
            return layer
    return None


def _resolve(parts: list[str]) -> str:
    """A module path's file: a module, a package's __init__, or (an attribute imported from one) its parent's."""
    candidate = "/".join(parts)
    if (PACKAGE / f"{candidate}.py").exists():
        return candidate
    if (PACKAGE / candidate / "__init__.py").exists():
        return f"{candidate}/__init__" if candidate else "__init__"
    return _resolve(parts[:-1])


def _imports(path: Path) -> set[str]:
    """Package modules ``path`` imports, anywhere in it (function-level imports included)."""
    here = _module_name(path).split("/")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - node.level + 1]
            target = base + (node.module.split(".") if node.module else [])
            names = [target] if node.module else [target + [a.name] for a in node.names]
            for t in names:
                found.add(_resolve(t))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for name in [module] if module else [a.name for a in node.names]:
                if name and name.startswith("inductor_moe"):
                    found.add("/".join(name.split(".")[1:]) or "__init__")
    return found


def test_imports_point_one_way():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        layer = _layer(name)
        if layer is None:
            continue
        for imported in _imports(path):
            target = _layer(imported) or imported
            if target != layer and target not in LAYERS[layer]:
                bad.append(f"{name} imports {imported}")
    assert not bad, bad


def test_nothing_in_the_package_imports_the_runner():
    importers = [_module_name(p) for p in PACKAGE.rglob("*.py") if "moe" in _imports(p)]
    assert importers == [], importers


def test_cuda_ops_come_from_the_family_table():
    header = families.header()
    assert re.search(r"INDUCTOR_MOE_FAMILIES\(X\) X\(act_and_mul\) X\(combine\)", header)
    declared = set(re.findall(r"(\w+)_cuda\(", (jit.CSRC / "ops.h").read_text()))
    assert declared == set(families.cuda_ops())
    for family in families.HOST_FAMILIES:
        assert (jit.CSRC / f"{family}.cu").exists() and (jit.CSRC / f"{family}.cpp").exists()
        assert f"Family::{family}" in (jit.CSRC / f"{family}.cpp").read_text()
    for op in families.cuda_ops():  # each has a schema, and a CUDA slot filled (a trampoline until the glue loads)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"inductor_moe::{op}", "CUDA")
    assert "INDUCTOR_MOE_CUDA_OPS(INDUCTOR_MOE_REGISTER)" in (jit.CSRC / "registration.cpp").read_text()
