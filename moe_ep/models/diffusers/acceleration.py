"""Speed options for a whole diffusers MoE transformer served by moe-ep (one GPU, EP = 1).

Each option is small and opt-in; `accelerate(model, ...)` applies the chosen ones and returns a
callable used in place of the transformer (attributes read through to it):

  remove_host_syncs(model)    exact. Per-family fixes for the host syncs of diffusers' own forward
                              that are not in its MoE blocks: HiDream's `patchify` makes
                              `img_sizes` a CUDA tensor (one host-to-device copy) that `unpatchify`
                              slices by (a device-to-host read per sample); here square latents get
                              python-int sizes. NucleusMoE's rotary table is copied to the device on
                              every forward; here its output is cached per (image shapes, text length).
                              A forward with no host sync is what CUDA-graph capture needs.
  compile_blocks(model)       regional `torch.compile` of the repeated transformer blocks (the
                              model's `_repeated_blocks`, else `_no_split_modules`); the MoE layers
                              inside stay eager (`MoELayer.forward` is `torch.compiler.disable`d), so
                              inductor fuses the norms, modulation, rotary and residual arithmetic
                              around them. Not bit-exact: inductor rounds once per fused kernel.
  attention="cudnn"|...       the scaled-dot-product-attention kernel (torch's `sdpa_kernel`) for
                              every forward; None leaves torch's own choice. Not bit-exact.
  cuda_graph=True             `CudaGraphTransformer`: the forward captured once per input signature
                              and replayed (moe_ep/cuda_graph.py; needs EP = 1, phase timers off,
                              no host sync: use with remove_host_syncs; statistics are kept).

  compile_transformer(model)  remove_host_syncs + compile_blocks, in place: the chosen setting
                              (`expert_parallel(pipe, compile=True)`, config `model.compile`).

docs/benchmarks.md ("Whole transformer on one GPU") says which of these paid on an H100.
"""
from __future__ import annotations

from collections import OrderedDict

import contextlib
from typing import Callable, Optional

import torch
import torch.nn as nn

ATTENTION_BACKENDS = ("flash", "cudnn", "efficient", "math")


# ---------------------------------------------------------------- host syncs

def _hidream_patchify(model: nn.Module) -> Callable:
    """HiDream's `patchify` for square latents without a CUDA `img_sizes` tensor: the same
    hidden states [B, h*w, p*p*C], masks None, img_ids [B, h*w, 3]; img_sizes as [(h, w)] * B
    python ints (unpatchify then slices without reading the device). Non-square: diffusers' own."""
    original = model.patchify

    def patchify(hidden_states: torch.Tensor):
        B, C, H, W = hidden_states.shape
        if H != W:
            return original(hidden_states)
        p = model.config.patch_size
        h, w = H // p, W // p
        dev = hidden_states.device
        img_ids = torch.zeros(h, w, 3, device=dev)                                  # float32, as diffusers
        img_ids[..., 1] = img_ids[..., 1] + torch.arange(h, device=dev)[:, None]
        img_ids[..., 2] = img_ids[..., 2] + torch.arange(w, device=dev)[None, :]
        img_ids = img_ids.reshape(h * w, -1).unsqueeze(0).repeat(B, 1, 1)           # [B, h*w, 3]
        x = hidden_states.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)
        return x, None, [(h, w)] * B, img_ids

    return patchify


ROPE_CACHE_ENTRIES = 8     # a job meets a few image sizes and batch sizes; a long mixed one stays bounded


def _cached_rope(rope: nn.Module) -> Callable:
    """NucleusMoE's rotary embedding, computed once per (image shapes, text length, device); the
    ROPE_CACHE_ENTRIES most recently used are kept."""
    original, cache = rope.forward, OrderedDict()

    def forward(video_fhw, device=None, max_txt_seq_len=None):
        key = (repr(video_fhw), str(device), repr(max_txt_seq_len))   # an int text length (no mask)
        if key in cache:
            cache.move_to_end(key)
        else:
            cache[key] = original(video_fhw, device=device, max_txt_seq_len=max_txt_seq_len)
            if len(cache) > ROPE_CACHE_ENTRIES:
                cache.popitem(last=False)
        return cache[key]

    forward.cache = cache                     # for tests
    return forward


def remove_host_syncs(model: nn.Module) -> list[str]:
    """Apply the exact host-sync fixes known for the model's family, in place (instance
    attributes; the class is untouched). -> what was changed (empty: nothing known, or applied
    already). Every route calls it (expert_parallel, the served model): on one H100 it took
    NucleusMoE-Image's eager forward from 91.7 to 82.8 ms (docs/benchmarks.md 1g)."""
    done = []
    name = type(model).__name__
    if name == "HiDreamImageTransformer2DModel" and "patchify" not in vars(model):
        model.patchify = _hidream_patchify(model)
        done.append("patchify: python-int img_sizes for square latents")
    if name == "NucleusMoEImageTransformer2DModel" and "forward" not in vars(model.pos_embed):
        model.pos_embed.forward = _cached_rope(model.pos_embed)
        done.append("pos_embed: cached per (image shapes, text length)")
    return done


# ---------------------------------------------------------------- regional compile

def block_classes(model: nn.Module) -> list[str]:
    """Class names of the model's repeated transformer blocks."""
    return list(getattr(model, "_repeated_blocks", None) or getattr(model, "_no_split_modules", None) or [])


def compile_blocks(model: nn.Module, classes: Optional[list[str]] = None, **compile_kwargs) -> list[str]:
    """`torch.compile` every module whose class is in `classes` (default: block_classes(model)),
    in place (nn.Module.compile). The blocks of one class share their compiled code. MoE layers
    inside run eagerly between the compiled pieces. -> the compiled modules' paths."""
    classes = classes or block_classes(model)
    paths = [path for path, mod in model.named_modules() if type(mod).__name__ in classes]
    if not paths:
        raise ValueError(f"{type(model).__name__} has no module of class {classes} to compile")
    for path in paths:
        model.get_submodule(path).compile(**compile_kwargs)
    return paths


def uncompile_blocks(model: nn.Module, paths: list[str]) -> None:
    """Undo compile_blocks: the modules at `paths` run eagerly again."""
    for path in paths:
        model.get_submodule(path)._compiled_call_impl = None


def compile_transformer(model: nn.Module, **compile_kwargs) -> list[str]:
    """The setting docs/benchmarks.md 1g chose for one GPU, in place: remove_host_syncs (exact),
    then compile_blocks. What `expert_parallel(..., compile=True)` and the config's `model.compile`
    (model.type "diffusers") apply. The model is still called as diffusers' own module (a pipeline
    keeps calling `pipe.transformer`); the first forward compiles. -> the compiled modules' paths."""
    remove_host_syncs(model)
    return compile_blocks(model, **compile_kwargs)


# ---------------------------------------------------------------- attention kernel

def attention_context(backend: Optional[str]):
    """A context in which F.scaled_dot_product_attention uses `backend` (None: torch's choice)."""
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if backend not in kinds:
        raise ValueError(f"attention backend {backend!r}: must be one of {ATTENTION_BACKENDS} or None")
    return sdpa_kernel([kinds[backend]])


# ---------------------------------------------------------------- CUDA graph

def _moe_layers(model: nn.Module) -> list:
    from ...layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


class CudaGraphTransformer:
    """Callable like the transformer; one CUDA graph per input signature, statistics state and
    placement (moe_ep/cuda_graph.py, `GraphedForward`). Each call runs `model(...)` with the
    graph put in as its forward for the call, so the module's hooks (expert_parallel's statistics
    and rebalancer) run eagerly around the replay. Needs EP = 1, sp = cfg = 1, a CUDA device and
    phase timers off; expert-load statistics are kept."""

    def __init__(self, model: nn.Module, warmup: int = 2, context: Optional[Callable] = None, backend=None):
        from ...cuda_graph import GraphedForward

        if "forward" in vars(model):
            raise ValueError(f"{type(model).__name__}.forward was replaced already (a CUDA graph installed by "
                             "expert_parallel(cuda_graph=True), or cfg / sequence parallel)")
        self.model = model
        self.graph = GraphedForward(model.forward, _moe_layers(model), warmup=warmup, context=context,
                                    backend=backend)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.model.forward = self.graph
        try:
            return self.model(*args, **kwargs)
        finally:
            del self.model.forward


# ---------------------------------------------------------------- all together

class AcceleratedTransformer:
    """The transformer called under the chosen attention kernel (and through a CUDA graph if one
    is given); attributes read through to the transformer."""

    def __init__(self, model: nn.Module, attention: Optional[str] = None, cuda_graph: bool = False):
        attention_context(attention)   # fail early on a wrong name
        self.model, self.attention = model, attention
        self.graph = (CudaGraphTransformer(model, context=lambda: attention_context(attention))
                      if cuda_graph else None)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        if self.graph is not None:
            return self.graph(*args, **kwargs)
        with attention_context(self.attention):
            return self.model(*args, **kwargs)


def accelerate(model: nn.Module, *, compile: bool = False, cuda_graph: bool = False,
               attention: Optional[str] = None, host_syncs: bool = True, **compile_kwargs) -> AcceleratedTransformer:
    """Apply the chosen options to a (wrapped) diffusers transformer in place and return the
    callable to use instead of it. host_syncs: apply remove_host_syncs (exact; needed by cuda_graph).
    Compilation happens on the first call, under the chosen attention kernel."""
    if cuda_graph and not host_syncs:
        raise ValueError("cuda_graph needs host_syncs=True: a forward that reads the device cannot be captured")
    if host_syncs:
        remove_host_syncs(model)
    if compile:
        compile_blocks(model, **compile_kwargs)
    return AcceleratedTransformer(model, attention=attention, cuda_graph=cuda_graph)
