"""The inductor_moe backend and pass: found by name after pip install, mode/options as the stock backend,
enable/disable on the stock backend, composition with a pass the user installed, the uuid, the FX graph cache
(a hit in a fresh process still runs our op), and explain."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import inductor_moe as im
from inductor_moe import backend, config

from helpers import compile_rewrite, randn


def gated(x):
    g, u = x.chunk(2, dim=-1)
    return F.silu(g) * u


def run_python(code: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_backend_found_by_name_in_a_fresh_interpreter():
    out = run_python("""
        import sys, torch
        assert "inductor_moe" in torch._dynamo.list_backends()
        f = torch.compile(lambda x: x * 2 + 1, backend="inductor_moe")
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
        assert "inductor_moe.backend" in sys.modules  # loaded through the entry point, not imported by us
        print("ok")
    """)
    assert out.strip() == "ok"


class CountingPass(CustomGraphPass):
    def __init__(self, key="user-pass-v1"):
        self.calls, self.key = 0, key

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return self.key


def test_mode_and_options_as_the_stock_backend():
    x = randn(4, 16)
    out, rep = compile_rewrite(gated, x, backend="inductor_moe", mode="max-autotune-no-cudagraphs")
    assert [r.family for r in rep.rewrites] == ["gated_act"]
    out, rep = compile_rewrite(gated, x, backend="inductor_moe", options={"epilogue_fusion": False})
    assert [r.family for r in rep.rewrites] == ["gated_act"]
    with pytest.raises(Exception, match="Unexpected optimization option"):
        compile_rewrite(gated, x, backend="inductor_moe", options={"no_such_option": 1})


def test_user_pass_in_options_and_in_config_both_run():
    x = randn(4, 16)
    mine = CountingPass()
    out, rep = compile_rewrite(gated, x, backend="inductor_moe", options={"post_grad_custom_post_pass": mine})
    assert mine.calls == 1 and [r.family for r in rep.rewrites] == ["gated_act"]
    mine = CountingPass()
    with inductor_config.patch(post_grad_custom_post_pass=mine):
        out, rep = compile_rewrite(gated, x, backend="inductor_moe")
        assert inductor_config.post_grad_custom_post_pass is mine  # the user's setting is left as it was
    assert mine.calls == 1 and [r.family for r in rep.rewrites] == ["gated_act"]


class PdlProbe(CountingPass):
    """A user pass that records Inductor's PDL setting in force while the graph compiles."""

    def __call__(self, graph):
        super().__call__(graph)
        self.pdl = inductor_config.triton.enable_pdl


@pytest.mark.parametrize(
    "backend_name, options, env, expected",
    [
        ("inductor_moe", {}, None, True),  # our backend turns Inductor's PDL on
        ("inductor_moe", {"triton.enable_pdl": False}, None, False),  # the user's option wins
        ("inductor_moe", {}, "0", False),  # INDUCTOR_MOE_PDL=0 turns off every PDL launch
        ("inductor", {}, None, False),  # the stock backend is left as it is
    ],
)
def test_backend_turns_inductor_pdl_on(backend_name, options, env, expected, monkeypatch):
    if env is not None:
        monkeypatch.setenv("INDUCTOR_MOE_PDL", env)
    probe = PdlProbe(f"pdl-probe-{backend_name}-{options}-{env}")
    torch._dynamo.reset()
    with inductor_config.patch(post_grad_custom_post_pass=probe, force_disable_caches=True):
        f = torch.compile(lambda x: x * 2 + 1, backend=backend_name, options=options)
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
    assert probe.calls == 1 and probe.pdl is expected


def test_pdl_patch_applies_to_this_torch():
    from torch._inductor.codegen.triton import TritonKernel

    from inductor_moe import inductor_pdl

    assert inductor_pdl.missing_hooks() == []
    assert inductor_pdl.install() and inductor_pdl.install()  # idempotent
    assert TritonKernel._handle_pdl_before_access._inductor_moe
    assert inductor_pdl.missing_hooks() == []  # still recognised once replaced


@pytest.mark.parametrize("change", ["missing", "signature"])
def test_pdl_patch_left_off_when_inductor_changed(change, monkeypatch, caplog):
    # another torch whose codegen lacks the hooks (or takes other arguments): the backend compiles with Inductor's
    # PDL off, patches nothing, and says so once in the log
    from torch._inductor.codegen.triton import TritonKernel

    from inductor_moe import inductor_pdl

    if change == "missing":
        monkeypatch.delattr(TritonKernel, "_filter_pdl")
    else:
        monkeypatch.setattr(TritonKernel, "_filter_pdl", lambda self, code, extra: None)
    wait = TritonKernel._handle_pdl_before_access
    monkeypatch.setattr(inductor_pdl, "_warned", False)
    with caplog.at_level("WARNING", logger="inductor_moe.inductor_pdl"):
        probe = PdlProbe(f"pdl-probe-changed-{change}")
        torch._dynamo.reset()
        with inductor_config.patch(post_grad_custom_post_pass=probe, force_disable_caches=True):
            for _ in range(2):
                torch._dynamo.reset()
                f = torch.compile(lambda x: x * 2 + 1, backend="inductor_moe")
                assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
    assert probe.pdl is False and TritonKernel._handle_pdl_before_access is wait
    assert not inductor_pdl.install()
    messages = [r.getMessage() for r in caplog.records if r.name == "inductor_moe.inductor_pdl"]
    assert len(messages) == 1 and "_filter_pdl" in messages[0], messages


@pytest.mark.skipif(torch.__version__ < "2.13", reason="pass lists arrived in torch 2.13")
def test_user_pass_list():
    a, b = CountingPass("a"), CountingPass("b")
    with inductor_config.patch(post_grad_custom_post_pass=[a, b]):
        _, rep = compile_rewrite(gated, randn(4, 16), backend="inductor_moe")
    assert (a.calls, b.calls) == (1, 1) and [r.family for r in rep.rewrites] == ["gated_act"]
    assert backend.MoEPass([a, b]).uuid() != backend.MoEPass([a, CountingPass("c")]).uuid()


def test_enable_and_disable_on_the_stock_backend():
    mine = CountingPass()
    x = randn(4, 16)
    with inductor_config.patch(post_grad_custom_post_pass=mine):
        im.enable()
        try:
            im.enable()  # idempotent: wrapped once
            assert inductor_config.post_grad_custom_post_pass.inner is mine
            _, rep = compile_rewrite(gated, x, backend="inductor")
            assert [r.family for r in rep.rewrites] == ["gated_act"] and mine.calls == 1
        finally:
            im.disable()
        assert inductor_config.post_grad_custom_post_pass is mine
        _, rep = compile_rewrite(gated, x, backend="inductor")
        assert rep.rewrites == [] and mine.calls == 2


def test_uuid_hashes_every_source_the_rewrites_run(monkeypatch):
    # the lowerings, the PDL codegen, and what the replacements call (the ops, the reference, the index helpers)
    from pathlib import Path

    from inductor_moe import indexing, inductor_pdl, lowerings, ops, reference

    hashed = []

    def record(files):
        hashed.extend(files)
        return b"h"

    monkeypatch.setattr(backend.custom_graph_pass, "get_hash_for_files", record)
    backend.MoEPass().uuid()
    op_files = [str(p) for p in Path(ops.__file__).parent.glob("*.py")]
    assert len(op_files) >= 6  # __init__, library and one module a family
    for path in (*lowerings.SOURCES, backend.__file__, inductor_pdl.__file__, *op_files, reference.__file__):
        assert path in hashed, path
    assert indexing.__file__ in hashed


def test_uuid_folds_settings_and_the_user_pass():
    plain = backend.MoEPass().uuid()
    assert plain and plain == backend.MoEPass().uuid()
    with config.override(devices="cpu,cuda"):
        assert backend.MoEPass().uuid() != plain
    with config.override(families="combine"):
        assert backend.MoEPass().uuid() != plain
    assert backend.MoEPass(CountingPass("v1")).uuid() not in (plain, backend.MoEPass(CountingPass("v2")).uuid())
    assert backend.MoEPass(lambda graph: None).uuid() is None  # a plain function: no caching, as Inductor does


def test_fx_graph_cache_hit_in_a_fresh_process_still_runs_the_op(tmp_path):
    code = """
        import torch, torch.nn.functional as F
        from torch._dynamo.utils import counters
        def gated(x):
            g, u = x.chunk(2, dim=-1)
            return F.silu(g) * u
        x = torch.randn(8, 32)
        with torch.profiler.profile() as prof:
            torch.compile(gated, backend="inductor_moe")(x)
        ran_op = any("inductor_moe::act_and_mul" in e.name for e in prof.events())
        print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"], ran_op)
    """
    env = {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "INDUCTOR_MOE_DEVICES": "cpu",
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
    }
    assert run_python(code, env).split() == ["0", "1", "True"]
    assert run_python(code, env).split() == ["1", "0", "True"]  # cache hit: the pass did not run, the op does
    # a setting that changes rewriting changes the uuid: a miss, and the graph compiled without our op
    assert run_python(code, {**env, "INDUCTOR_MOE_FAMILIES": "none"}).split() == ["0", "1", "False"]


def test_explain_names_rewrites_and_rejections():
    def model(x, ids):
        y = gated(x)
        y = y * (ids >= 0).float()[:, None]  # a near miss: the mask is multiplied, not applied with where
        return y

    with config.override(devices="cpu"):
        rep = im.explain(model, randn(4, 16), torch.tensor([0, -1, 1, 2]))
    text = str(rep)
    assert "1 rewrite(s)" in text and "gated_act" in text
    assert "0/1 mask" in text
    assert "act_and_mul" in rep.graphs[-1]
