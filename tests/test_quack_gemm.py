"""The optional QuACK GEMMs: when it is chosen, and the fingerprint shim it needs.

QuACK's kernels need a Hopper GPU (benchmarks/gpu_check.py checks them there against float64; the
QuACK probe of docs/benchmarks.md 1d checked them against the Triton kernels, bit for bit). Here: the
selection never picks QuACK where it cannot run, and the shim keys what quack-kernels 0.6.5's fingerprint
refuses under nvidia-cutlass-dsl 4.8.1 while leaving every other key as it was.
"""
from __future__ import annotations

import contextvars
import sys
import types

import pytest
import torch

from moe_ep.experts import GroupedExperts, default_backend, quack_supported
from moe_ep.kernels import quack_gemm


def test_quack_is_never_chosen_without_a_hopper_gpu():
    cpu = torch.device("cpu")
    assert not quack_gemm.supported(cpu, torch.bfloat16, 4096, 3072)
    assert not quack_supported(cpu, torch.bfloat16, 4096, 3072)
    assert default_backend(cpu, torch.bfloat16, 4096, 3072) in ("grouped_mm", "loop")
    assert GroupedExperts(4, 16, 8, dtype=torch.bfloat16).backend not in ("quack", "triton+quack")


@pytest.mark.parametrize("capability, dtype, hidden, installed, builds, expected", [
    ((9, 0), torch.bfloat16, 4096, True, True, True),
    ((9, 0), torch.float16, 4096, True, True, True),
    ((8, 0), torch.bfloat16, 4096, True, True, False),    # Ampere: the SM90 kernel does not run
    ((10, 0), torch.bfloat16, 4096, True, True, False),   # Blackwell: not measured
    ((9, 0), torch.float32, 4096, True, True, False),
    ((9, 0), torch.bfloat16, 4100, True, True, False),    # rows not 16-byte aligned for TMA
    ((9, 0), torch.bfloat16, 4096, False, True, False),   # quack-kernels not installed
    ((9, 0), torch.bfloat16, 4096, True, False, False),   # installed but does not build
])
def test_supported_needs_hopper_bf16_aligned_rows_and_a_quack_that_builds(
        monkeypatch, capability, dtype, hidden, installed, builds, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(quack_gemm, "installed", lambda: installed)
    monkeypatch.setattr(quack_gemm, "builds", lambda: builds)
    quack_gemm.supported.cache_clear()
    try:
        assert quack_gemm.supported(torch.device("cuda", 0), dtype, hidden, 3072) is expected
    finally:
        quack_gemm.supported.cache_clear()


def test_gemms_pass_row_offsets_scales_and_interleaved_weights_to_quack(monkeypatch):
    """gate_up_gemm and down_gemm on CPU tensors with recording stand-ins for QuACK's kernels:
    the int32 row offsets of the slots, SwiGLU without the pre-activation, the routed weights as
    fp32 (ones without them), the output buffer, and no launch for zero rows."""
    calls = []

    def fake_gemm_act(x, w13, *, activation, cu_seqlens_m, store_preact, tuned, config):
        calls.append({"op": "gate_up", "cu": cu_seqlens_m, "act": activation, "preact": store_preact,
                      "config": config, "w13": w13})
        return None, x.new_zeros(x.shape[0], w13.shape[2] // 2)

    def fake_scaled(h, w2, c, *, out, store_d, tuned, config, cu_seqlens_m, mColVecBroadcast):
        calls.append({"op": "down", "cu": cu_seqlens_m, "scale": mColVecBroadcast, "config": config,
                      "store_d": store_d})
        out["mAuxOut"].copy_(torch.zeros_like(out["mAuxOut"]))
    monkeypatch.setattr(quack_gemm, "_kernels", lambda: (fake_gemm_act, "gate_cfg", fake_scaled, "down_cfg"))
    h, w2 = torch.randn(6, 4), torch.randn(3, 4, 5)
    cu = quack_gemm.cu_seqlens(torch.tensor([2, 0, 4]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 2, 6]
    y = quack_gemm.down_gemm(h, w2, cu, torch.tensor([0.5] * 6, dtype=torch.float64))
    assert y.shape == (6, 5) and calls[0]["cu"] is cu
    assert calls[0]["config"] == "down_cfg" and not calls[0]["store_d"]
    assert calls[0]["scale"].dtype == torch.float32 and calls[0]["scale"].tolist() == [0.5] * 6
    quack_gemm.down_gemm(h, w2, cu)
    assert calls[1]["scale"].tolist() == [1.0] * 6
    assert quack_gemm.gate_up_gemm(torch.randn(6, 5), torch.randn(3, 5, 8), cu).shape == (6, 4)
    assert calls[2]["act"] == "swiglu" and not calls[2]["preact"] and calls[2]["config"] == "gate_cfg"
    empty = quack_gemm.cu_seqlens(torch.zeros(3, dtype=torch.int64))
    assert quack_gemm.down_gemm(h[:0], w2, empty).shape == (0, 5)
    assert quack_gemm.gate_up_gemm(h[:0, :5], torch.randn(3, 5, 8), empty).shape == (0, 4)
    assert len(calls) == 3                                     # no launch for zero rows

    # the "quack" expert path hands QuACK the rows copied in slot order and w13 as stored (interleaved)
    experts = GroupedExperts(3, 5, 4)
    experts.backend = "quack"
    x, row_index = torch.randn(9, 5), torch.tensor([8, 1, 1, 0, 3, 2])
    experts(x, torch.tensor([2, 0, 4]), row_index=row_index)
    assert calls[3]["w13"].data_ptr() == experts.w13.data_ptr() and calls[3]["cu"].tolist() == [0, 2, 2, 6]


_LOC = contextvars.ContextVar("_LOC_TRANSFORMS", default=())     # the kind of global quack refuses


def _cutlass_helper():
    """Stands for a cutlass-dsl function: it reads runtime state the fingerprint cannot key."""
    return _LOC.get()


def _user_epilogue():
    """Stands for an epilogue of anyone's: it reads the same state directly."""
    return _LOC.get()


def _quack_epilogue():
    """Stands for one of quack's epilogues: it calls into cutlass."""
    return _cutlass_helper()


_cutlass_helper.__module__ = "cutlass.base_dsl.pyir_state"


@pytest.fixture
def fake_identity(monkeypatch):
    """A stand-in for quack.gemm_runtime.identity: functions are keyed by name plus the keys of
    the globals they read (through the module-global names, as quack's keyer recurses), and any
    other value it does not know is refused (fail-closed)."""
    import inspect
    mod = types.ModuleType("quack.gemm_runtime.identity")

    def semantic_value_key(value, seen):
        if value is None or isinstance(value, (int, str)):
            return value
        if inspect.isfunction(value):
            return mod.function_semantic_key(value, seen)
        raise TypeError(f"no fail-closed semantic key for {value!r}")

    def function_semantic_key(fn, seen=None):
        seen = set() if seen is None else seen
        refs = inspect.getclosurevars(fn).globals
        deps = tuple((n, mod.semantic_value_key(v, seen)) for n, v in sorted(refs.items()))
        return ("function", fn.__qualname__, deps)
    mod.semantic_value_key, mod.function_semantic_key = semantic_value_key, function_semantic_key
    pkg = types.ModuleType("quack.gemm_runtime")
    pkg.identity = mod
    root = types.ModuleType("quack")
    root.gemm_runtime = pkg
    monkeypatch.setitem(sys.modules, "quack", root)
    monkeypatch.setitem(sys.modules, "quack.gemm_runtime", pkg)
    monkeypatch.setitem(sys.modules, "quack.gemm_runtime.identity", mod)
    return mod


def test_shim_keys_cutlass_functions_by_name_and_keeps_the_rest_fail_closed(fake_identity):
    with pytest.raises(TypeError):                  # what quack 0.6.5 does on cutlass-dsl 4.8.1
        fake_identity.function_semantic_key(_quack_epilogue)
    quack_gemm._allow_unkeyed_dsl_globals()
    key = fake_identity.function_semantic_key(_quack_epilogue)
    assert key[:2] == ("function", "_quack_epilogue")
    ((name, dep),) = key[2]
    assert name == "_cutlass_helper"
    assert dep[:3] == ("cutlass_fn", "cutlass.base_dsl.pyir_state", "_cutlass_helper")
    with pytest.raises(TypeError):                  # the same state read outside cutlass: still refused
        fake_identity.function_semantic_key(_user_epilogue)
    # functions outside cutlass are keyed as before
    assert fake_identity.function_semantic_key(_plain_function) == ("function", "_plain_function", ())


def _plain_function():
    return None


def test_shim_applies_once(fake_identity):
    quack_gemm._allow_unkeyed_dsl_globals()
    first = fake_identity.function_semantic_key
    quack_gemm._allow_unkeyed_dsl_globals()
    assert fake_identity.function_semantic_key is first


def test_a_quack_that_does_not_build_is_not_used(monkeypatch):
    def broken():
        raise ImportError("nvidia-cutlass-dsl does not fit this quack-kernels")
    monkeypatch.setattr(quack_gemm, "_kernels", broken)
    quack_gemm.builds.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="does not build"):
            assert not quack_gemm.builds()
    finally:
        quack_gemm.builds.cache_clear()
