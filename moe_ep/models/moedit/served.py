"""The built-in MoE-DiT (this folder: dit, text, sampler, graphs, checkpoint) behind the served-model interface.

Built on every rank from `model.seed` or from a moe-ep checkpoint (`model.checkpoint`, each
rank reading only its experts); sampled by MoEDiTPipeline (diffusers' flow-matching Euler
scheduler, classifier-free guidance with conditional rows first), decoded by the fixed
stand-in decoder of moe_ep/images.py.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from ...config import Config, ConfigError
from ...cuda_graph import check_cuda_graph
from ...experts import init_expert_weights
from ...images import decode_latents
from ...parallel import ParallelContext, check_layout, derive_ep_size, launcher_local_world, resolve_layout
from ...parallel_layout import ParallelLayout
from ...sequence_parallel import check_heads, check_tokens
from ..base import ExpertWeightSource, ForwardHooks, MoEShape, ServedModel
from .checkpoint import CheckpointReader, inspect_checkpoint, load_checkpoint


def moe_shape(cfg: Config) -> MoEShape:
    """MoE layers and experts of the built-in model: block i is MoE when (i + 1) % moe_every == 0."""
    m = cfg.model
    return MoEShape(m.num_layers // m.moe_every, m.moe.num_experts, m.moe.top_k)


def preflight(cfg: Config, world_size: int) -> MoEShape:
    """Checks that need no process group (raise ConfigError): the slot layout against the EP
    size, the checkpoint header against the model config, the user text encoder's import."""
    from .text import load_user_encoder

    ep = derive_ep_size(cfg.parallel, world_size)
    check_image_parallel(cfg, resolve_layout(cfg.parallel, world_size))
    check_layout(cfg.model.moe.num_experts, cfg.eplb.num_redundant_experts, ep)
    check_expert_memory(cfg, ep, memory_per_rank(cfg, world_size))
    if cfg.model.checkpoint:
        inspect_checkpoint(cfg.model.checkpoint, cfg.model)
    if cfg.model.text_encoder != "builtin":
        load_user_encoder(cfg.model.text_encoder)
    return moe_shape(cfg)


def check_image_parallel(cfg: Config, layout: ParallelLayout) -> None:
    """One image over cfg x sp ranks (image_split.py): the guidance branches must split over the
    cfg ranks, the attention heads over the Ulysses ranks, the image tokens over the sp ranks;
    expert-choice routing picks tokens per whole sample, so it is refused under sp (ConfigError
    naming the key)."""
    from .sampler import check_branches

    check_branches(layout.cfg, cfg.sampling.guidance_scale > 1.0)
    if layout.cfg * layout.sp > 1 and cfg.model.compile:
        raise ConfigError("model.compile", True, f"not with cfg or sequence parallelism yet (cfg_parallel_size "
                                                 f"{layout.cfg}, sequence_parallel_size {layout.sp}): untested")
    if layout.sp == 1:
        return
    m, s = cfg.model, cfg.sampling
    check_heads(m.num_heads, layout)
    check_tokens((s.height // m.vae_scale_factor // m.patch_size) * (s.width // m.vae_scale_factor // m.patch_size),
                 layout)
    if m.moe.routing == "expert_choice":
        raise ConfigError("model.moe.routing", m.moe.routing,
                          f"expert choice picks each expert's tokens from a whole sample; under sequence "
                          f"parallelism (parallel.sequence_parallel_size {layout.sp}) a rank holds 1/{layout.sp} of "
                          f"it: use token_choice, or sequence_parallel_size 1")


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def slots_per_rank(cfg: Config, ep: int) -> int:
    return (cfg.model.moe.num_experts + cfg.eplb.num_redundant_experts) // ep


def expert_slot_bytes(cfg: Config, ep: int) -> int:
    """Bytes of one rank's expert slots: slots per rank x MoE layers x (w13 [H, 2F] + w2 [F, H]).
    A lower bound on what the rank holds (the dense weights and activations come on top)."""
    m = cfg.model
    return slots_per_rank(cfg, ep) * moe_shape(cfg).num_layers * 3 * m.hidden_size * m.moe.expert_hidden_size \
        * DTYPE_BYTES[m.dtype]


def memory_per_rank(cfg: Config, world_size: int) -> Optional[tuple[int, str]]:
    """(bytes one rank may use, where) -- a GPU's memory, or this node's RAM shared by its ranks;
    None when it cannot be told."""
    import torch

    if cfg.parallel.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "one GPU's memory"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    # ranks on this node: the config, else the launcher; unknown (a launcher that says neither) -> no check
    ranks = cfg.parallel.ranks_per_node or launcher_local_world(0) or (1 if world_size == 1 else 0)
    if ranks <= 0:
        return None
    return ram // ranks, f"this node's RAM over its {ranks} rank(s)"


def check_expert_memory(cfg: Config, ep: int, available: Optional[tuple[int, str]]) -> None:
    """Refuses a model whose expert slots alone cannot fit in a rank's memory (a clear error
    before the process group instead of an out-of-memory kill while the model is built)."""
    if available is None:
        return
    need, (have, where) = expert_slot_bytes(cfg, ep), available
    if need > have:
        gib = 2 ** 30
        raise ConfigError("model.moe.expert_hidden_size", cfg.model.moe.expert_hidden_size,
                          f"one rank's expert slots alone need {need / gib:.1f} GiB ({moe_shape(cfg).num_layers} "
                          f"MoE layers x {slots_per_rank(cfg, ep)} slots "
                          f"x 3 x hidden {cfg.model.hidden_size} x {cfg.model.moe.expert_hidden_size}, "
                          f"{cfg.model.dtype}) and {where} is {have / gib:.1f} GiB: run more EP ranks, "
                          f"a smaller model, or bfloat16")


class MoEDiTModel(ServedModel):
    """MoEDiT + PromptEncoder + MoEDiTPipeline + decode_latents, as a ServedModel."""

    def __init__(self, cfg: Config, transformer, weight_source, reader: Optional[CheckpointReader] = None):
        from .sampler import FlowMatchEulerScheduler, MoEDiTPipeline, set_flux_timesteps
        from .text import PromptEncoder

        self.cfg, self.transformer, self.reader = cfg, transformer, reader
        self._weight_source = weight_source
        m, s = cfg.model, cfg.sampling
        encoder = PromptEncoder(m, transformer.text_encoder, transformer.ctx.device, transformer.dtype)
        self.pipe = MoEDiTPipeline(transformer, encoder, FlowMatchEulerScheduler(s.shift))
        self.tokens_per_image = (s.height // m.vae_scale_factor // m.patch_size) * \
                                (s.width // m.vae_scale_factor // m.patch_size)
        self.rows_per_prompt = self.tokens_per_image * (2 if s.guidance_scale > 1.0 else 1)
        self.num_inference_steps = s.num_inference_steps
        # the t of each forward, from a scheduler of its own (the same numbers the pipeline sets)
        self._timesteps = set_flux_timesteps(FlowMatchEulerScheduler(s.shift), s.num_inference_steps)

    @classmethod
    def build(cls, cfg: Config, ctx: ParallelContext) -> "MoEDiTModel":
        """Seed-initialised, or loaded from `model.checkpoint` (header already checked by preflight)."""
        from .dit import MoEDiT

        if cfg.model.cuda_graph:
            check_cuda_graph(ctx, "model.cuda_graph")
        model = MoEDiT(cfg.model, ctx, num_redundant=cfg.eplb.num_redundant_experts)
        if cfg.model.compile:
            model.compile()      # nn.Module.compile: traced at the first forward; MoE layers stay eager
        if cfg.model.checkpoint:
            reader = load_checkpoint(model, cfg.model.checkpoint)
            served = cls(cfg, model, reader.layer_source, reader)
        else:
            model.init_from_seed()
            H, F, seed = cfg.model.hidden_size, cfg.model.moe.expert_hidden_size, cfg.model.seed
            served = cls(cfg, model, lambda layer: lambda e: init_expert_weights(seed, layer, e, H, F, model.dtype))
        if cfg.model.cuda_graph:   # the pipeline calls the graph; its forward hooks stay around each call
            from .graphs import CudaGraphForward
            served.pipe.transformer = CudaGraphForward(model)
        return served

    # ------------------------------------------------------------ ServedModel
    def moe_layers(self) -> list:
        return self.transformer.moe_layers()

    def weight_source(self, layer_idx: int) -> ExpertWeightSource:
        return self._weight_source(layer_idx)

    @property
    def timesteps(self) -> list[float]:
        return self._timesteps

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], hooks: ForwardHooks) -> list[np.ndarray]:
        s = self.cfg.sampling
        latents = self.pipe(list(prompts), negative_prompt=s.negative_prompt,
                            num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                            height=s.height, width=s.width, seeds=list(seeds),
                            callback_on_forward_begin=hooks.on_forward_begin,
                            callback_on_forward_end=hooks.on_forward_end)           # [B, C, h, w]
        return list(decode_latents(latents, self.cfg.model.vae_scale_factor))       # B x [H, W, 3] uint8

    def attention_blocks(self) -> list:
        # compiled, the attention is fused with its neighbours: no phase boundary to time it by
        return [] if self.cfg.model.compile or self.cfg.model.cuda_graph else list(self.transformer.blocks)

    def phase_timing(self) -> bool:
        return not self.cfg.model.cuda_graph

    def describe(self) -> dict:
        m = self.cfg.model
        layers = self.moe_layers()
        return {"type": "moe_dit", "checkpoint": m.checkpoint, "dtype": m.dtype,
                "num_blocks": m.num_layers, "num_moe_layers": len(layers), "num_experts": m.moe.num_experts,
                "top_k": m.moe.top_k, "hidden_size": m.hidden_size,
                "expert_hidden_size": m.moe.expert_hidden_size, "text_encoder": m.text_encoder,
                "scheduler": "diffusers.FlowMatchEulerDiscreteScheduler", "shift": self.cfg.sampling.shift}

    def close(self) -> None:
        self.reader = None
