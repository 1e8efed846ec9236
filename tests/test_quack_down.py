"""The optional QuACK down GEMM: when it is chosen, and the fingerprint shim it needs.

QuACK's kernels need a Hopper GPU (launch/gpu_check.py checks them there against float64 and
launch/gpu_quack_probe.py against the Triton kernels, bit for bit). Here: the selection never
picks QuACK where it cannot run, and the shim keys what quack-kernels 0.6.5's fingerprint
refuses under nvidia-cutlass-dsl 4.8.1 while leaving every other key as it was.
"""
from __future__ import annotations

import contextvars
import sys
import types

import pytest
import torch

from moe_ep.experts import DenseMLP, GroupedExperts, default_backend, quack_down_supported
from moe_ep.kernels import quack_down


def test_quack_is_never_chosen_without_a_hopper_gpu():
    cpu = torch.device("cpu")
    assert not quack_down.supported(cpu, torch.bfloat16, 3072, 4096)
    assert not quack_down_supported(cpu, torch.bfloat16, 4096, 3072)
    assert default_backend(cpu, torch.bfloat16, 4096, 3072) in ("grouped_mm", "loop")
    assert GroupedExperts(4, 16, 8, dtype=torch.bfloat16).backend != "triton+quack"


def test_dense_mlp_runs_its_reference_path_on_cpu_with_quack_down_on():
    mlp = DenseMLP(16, 8)
    mlp.w13.data.normal_()
    mlp.w2.data.normal_()
    assert mlp.quack_down
    x = torch.randn(5, 16)
    gate, up = (x @ mlp.w13).chunk(2, dim=-1)
    torch.testing.assert_close(mlp(x), (torch.nn.functional.silu(gate) * up) @ mlp.w2)


@pytest.fixture
def fake_identity(monkeypatch):
    """A stand-in for quack.gemm_runtime.identity: a strict keyer that recurses through its
    module-global name (as quack's does) and refuses what it does not know."""
    mod = types.ModuleType("quack.gemm_runtime.identity")

    def semantic_value_key(value, seen):
        if value is None or isinstance(value, (int, str)):
            return value
        if isinstance(value, tuple):
            return ("tuple", tuple(mod.semantic_value_key(v, seen) for v in value))
        raise TypeError(f"no fail-closed semantic key for {value!r}")
    mod.semantic_value_key = semantic_value_key
    pkg = types.ModuleType("quack.gemm_runtime")
    pkg.identity = mod
    root = types.ModuleType("quack")
    root.gemm_runtime = pkg
    monkeypatch.setitem(sys.modules, "quack", root)
    monkeypatch.setitem(sys.modules, "quack.gemm_runtime", pkg)
    monkeypatch.setitem(sys.modules, "quack.gemm_runtime.identity", mod)
    return mod


def test_shim_keys_context_vars_and_refused_values_by_type(fake_identity):
    var = contextvars.ContextVar("_LOC_TRANSFORMS", default=())
    with pytest.raises(TypeError):
        fake_identity.semantic_value_key(var, set())
    quack_down._allow_unkeyed_dsl_globals()
    key = fake_identity.semantic_value_key
    assert key(var, set()) == ("contextvar", "_LOC_TRANSFORMS")
    assert key(str.count, set()) == ("opaque", "builtins", "method_descriptor")
    # what the strict keyer knew keeps its key, also inside containers (the recursion is shimmed)
    assert key(("a", 3, None), set()) == ("tuple", ("a", 3, None))
    assert key(("a", var), set()) == ("tuple", ("a", ("contextvar", "_LOC_TRANSFORMS")))


def test_shim_applies_once(fake_identity):
    quack_down._allow_unkeyed_dsl_globals()
    first = fake_identity.semantic_value_key
    quack_down._allow_unkeyed_dsl_globals()
    assert fake_identity.semantic_value_key is first


def test_a_quack_that_does_not_build_is_not_used(monkeypatch):
    def broken():
        raise ImportError("nvidia-cutlass-dsl does not fit this quack-kernels")
    monkeypatch.setattr(quack_down, "_kernels", broken)
    quack_down.builds.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="does not build"):
            assert not quack_down.builds()
    finally:
        quack_down.builds.cache_clear()
