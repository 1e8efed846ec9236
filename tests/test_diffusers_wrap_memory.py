"""wrap_transformer fits: wrapping a diffusers transformer in memory holds at most the model plus one
MoE layer's new slots (each block is wrapped, replaced and freed before the next), and at EP = 1 a
packed expert stack (NucleusMoE) becomes the slots without a copy.

Two measures, on CPU, with models whose experts are many times one layer's (so keeping the old
blocks alive, a second copy of every expert, would show): the exact bytes of live tensor storage
at the moment each block is replaced (old block still alive, new slots filled: the per-block
high), counted from weak references to every tensor the model had plus every tensor reachable
from it; and the growth of the process's peak resident set (VmHWM, reset before wrapping).
"""
from __future__ import annotations

import ctypes
import gc
import re
import weakref

import pytest
import torch

from moe_ep.models.diffusers import wrap as wrap_mod
from moe_ep.models.diffusers.loader import _reset_rss_hwm
from moe_ep.models.diffusers.tiny import hidream_config, init_random, nucleus_config
from moe_ep.parallel import ParallelContext


def built_fast(cls, cfg: dict, seed: int) -> torch.nn.Module:
    """cls(cfg) with init_random's weights, skipping torch's own (slow) initialisation: built on
    the meta device, then given CPU storage (neither model makes tensors in __init__ that the
    random init would miss, except NucleusMoE's rotary tables, which are re-made)."""
    with torch.device("meta"):
        model = cls.from_config(cfg)
    model.to_empty(device="cpu")
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ == "NucleusMoEEmbedRope":
            from moe_ep.models.diffusers.nucleus import _rebuild_rope
            wrap_mod.replace_module(model, name, _rebuild_rope(mod))
    return init_random(model, seed).eval()


def big_hidream() -> torch.nn.Module:
    """hidden 256, 4 experts of hidden 768 (9 MiB of experts per MoE layer), 4 MoE layers."""
    from diffusers import HiDreamImageTransformer2DModel

    return built_fast(HiDreamImageTransformer2DModel, hidream_config(dual=1, single=3, heads=4, head_dim=64), 0)


def big_nucleus() -> torch.nn.Module:
    """hidden 64, 16 packed experts of hidden 2048 (24 MiB per MoE layer), 3 MoE layers + 1 dense."""
    from diffusers import NucleusMoEImageTransformer2DModel

    cfg = nucleus_config(layers=4, experts=16)
    cfg["moe_intermediate_dim"] = 2048
    return built_fast(NucleusMoEImageTransformer2DModel, cfg, 1)


def storages(tensors) -> dict[int, int]:
    """data_ptr -> nbytes of the distinct storages behind `tensors`."""
    out = {}
    for t in tensors:
        if t is not None and t.numel():
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() for t in list(m._parameters.values()) + list(m._buffers.values())
            if t is not None]


class LiveBytes:
    """Live tensor-storage bytes of a model being wrapped: every tensor it had at the start (weak
    references: freed ones drop out) and every tensor reachable from it now."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.original = [weakref.ref(t) for t in model_tensors(model)]
        self.start = self.now()
        self.peak = self.start

    def now(self) -> int:
        alive = [r() for r in self.original]
        return sum({**storages(alive), **storages(model_tensors(self.model))}.values())

    def sample(self) -> None:
        self.peak = max(self.peak, self.now())


def slot_bytes(wrappers) -> list[int]:
    return [w.moe.experts.w13.untyped_storage().nbytes() + w.moe.experts.w2.untyped_storage().nbytes()
            for w in wrappers]


def rss_hwm() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024


def reset_rss_hwm() -> bool:
    """Give freed heap pages back to the OS (else new tensors reuse them unseen) and restart the peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return _reset_rss_hwm()                                   # the loader's own peak reset


def wrap_measured(model, monkeypatch, **kw):
    """wrap_transformer(model) -> (wrappers, live-bytes meter, peak RSS growth or None)."""
    meter = LiveBytes(model)
    real = wrap_mod.replace_module

    def replace_and_measure(model_, path, new):
        meter.sample()                  # the old block is alive and the new layer filled: this block's high
        real(model_, path, new)
        meter.sample()

    monkeypatch.setattr(wrap_mod, "replace_module", replace_and_measure)
    gc.collect()
    rss_ok = reset_rss_hwm()
    rss0 = rss_hwm()
    wrappers, _ = wrap_mod.wrap_transformer(model, ParallelContext(), **kw)
    rss = rss_hwm() - rss0 if rss_ok else None
    return wrappers, meter, rss


MiB = 1 << 20


@pytest.mark.parametrize("build,redundant", [(big_hidream, 0), (big_nucleus, 4)], ids=["hidream", "nucleus-redundant"])
def test_wrapping_holds_the_model_plus_one_layer(build, redundant, monkeypatch):
    """Copying paths (HiDream's per-expert Linears; NucleusMoE with redundant slots): the live tensor
    bytes never exceed the model plus one layer's new slots, where keeping the old blocks would
    add every layer's."""
    model = build()
    wrap_mod.wrap_transformer(build(), ParallelContext(), num_redundant=redundant)   # warm-up (lazy allocations)
    wrappers, meter, rss = wrap_measured(model, monkeypatch, num_redundant=redundant)
    layer = max(slot_bytes(wrappers))
    everything = sum(slot_bytes(wrappers))
    assert everything >= 3 * layer                                   # a second copy of all would show
    gate_bytes = sum(w.moe.router.gate.weight.numel() * w.moe.router.gate.weight.element_size() for w in wrappers)
    # at the end the blocks' experts are gone: beyond the start, the slots' share over them (redundant ones)
    E = wrappers[0].moe.cfg.num_experts
    end = meter.now() - meter.start
    assert end <= everything * redundant // (E + redundant) + gate_bytes, end
    # the high: the model (before or after, whichever is larger) plus one layer's new slots
    growth = meter.peak - meter.start
    print(f"\nlive growth {growth / MiB:.1f} MiB (end {end / MiB:.1f}), one layer's slots {layer / MiB:.1f}, "
          f"all {everything / MiB:.1f}, RSS growth {None if rss is None else round(rss / MiB, 1)} MiB")
    assert growth <= max(0, end) + layer + gate_bytes, (growth, end, layer)
    if rss is not None:   # the OS's view: allocator slack on top, far below a second copy of every expert
        assert rss <= max(0, end) + layer + 0.5 * (everything - layer), (rss, layer, everything)


def test_ep1_adopts_packed_experts_without_a_copy(monkeypatch):
    """NucleusMoE at EP = 1: each layer's slots are diffusers' own gate_up_proj / down_proj storage
    (no copy), so wrapping grows the live bytes by at most one layer's transient zero slots and
    ends where it started (plus the gates' copies)."""
    model = big_nucleus()
    stacks = [(m.experts.gate_up_proj.data_ptr(), m.experts.down_proj.data_ptr())
              for m in model.modules() if type(m).__name__ == "NucleusMoELayer"]
    wrap_mod.wrap_transformer(big_nucleus(), ParallelContext())      # warm-up
    wrappers, meter, _ = wrap_measured(model, monkeypatch)
    assert [(w.moe.experts.w13.data_ptr(), w.moe.experts.w2.data_ptr()) for w in wrappers] == stacks
    layer = max(slot_bytes(wrappers))
    gate_bytes = sum(w.moe.router.gate.weight.numel() * w.moe.router.gate.weight.element_size() for w in wrappers)
    assert meter.peak - meter.start <= layer + gate_bytes
    assert meter.now() - meter.start <= gate_bytes
