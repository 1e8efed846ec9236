"""Rectified-flow (flow-matching) Euler sampling with classifier-free guidance, stepped by
diffusers' `FlowMatchEulerDiscreteScheduler`.

Convention (SD3 / FLUX): x_t = (1 - t) * x_0 + t * noise, t = 1 is pure noise, the model
predicts the velocity v = noise - x_0, and Euler steps go from t = 1 to t = 0:
x_{t'} = x_t + (t' - t) * v. `shift` warps the schedule toward the noisy end
(t -> shift*t / (1 + (shift - 1)*t)).

moe-ep's t in [0, 1] is diffusers' sigma (diffusers' `timesteps` are sigma * 1000). The
schedule is FLUX's: `set_timesteps(sigmas=linspace(1, 1/N, N))`, shifted by the scheduler's
`shift`, then a terminal 0 -- the N forwards see t = shift(1 - i/N), i = 0..N-1. (diffusers'
default `set_timesteps(N)` would end at sigma_min = 1/1000 instead, a different schedule.)

With guidance (`guidance_scale > 1`, as in diffusers) the conditional and unconditional
halves run in one batch, conditional rows FIRST: v = v_u + g * (v_c - v_u).
Initial noise for prompt i is drawn on the CPU from `torch.Generator(seed_i)`, so an image
depends only on its prompt and seed -- not on the batch it was in or the EP size.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

from ...config import ConfigError
from .dit import MoEDiT
from .text import PromptEncoder

# hook(step_index, timestep in [0, 1], info) called before / after every transformer forward;
# info (moe_ep.models.base.ForwardInfo), of the MoE input rows this rank routes (under cfg / sp
# parallelism its guidance chunk and token shard, moedit/image_split.py): {"batch": prompts in
# the batch, "rows": MoE input rows, "cond_rows": rows of the conditional samples (conditional
# rows first; None without guidance), "sample_branch": per local transformer-batch sample 0 =
# conditional, 1 = unconditional (None without guidance)}
ForwardHook = Callable[[int, float, dict], None]


def FlowMatchEulerScheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler MoEDiTPipeline steps with: diffusers' FlowMatchEulerDiscreteScheduler(shift)."""
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def set_flux_timesteps(scheduler: FlowMatchEulerDiscreteScheduler, num_inference_steps: int) -> list[float]:
    """Set FLUX's schedule (sigmas linspace(1, 1/N, N), shifted) and begin at step 0.
    -> the t in [0, 1] each of the N forwards sees (the scheduler's sigmas without the final 0)."""
    n = num_inference_steps
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n).tolist())
    scheduler.set_begin_index(0)                 # step() then needs no look-up of the timestep
    return scheduler.sigmas[:-1].tolist()        # [N]


def check_branches(cfg_parallel_size: int, guidance: bool) -> None:
    """cfg parallelism gives each of 2 ranks one guidance branch: it needs guidance and 2 ranks."""
    if cfg_parallel_size == 1:
        return
    if cfg_parallel_size != 2:
        raise ConfigError("parallel.cfg_parallel_size", cfg_parallel_size,
                          "must be 1 or 2: classifier-free guidance has two branches (conditional, unconditional)")
    if not guidance:
        raise ConfigError("parallel.cfg_parallel_size", cfg_parallel_size,
                          "needs classifier-free guidance (sampling.guidance_scale > 1): without it there is one "
                          "branch to run; use 1")


class MoEDiTPipeline:
    """prompts -> latents, named like a diffusers pipeline."""

    def __init__(self, transformer: MoEDiT, prompt_encoder: PromptEncoder,
                 scheduler: Optional[FlowMatchEulerDiscreteScheduler] = None):
        self.transformer, self.prompt_encoder = transformer, prompt_encoder
        self.scheduler = scheduler if scheduler is not None else FlowMatchEulerScheduler()
        self.device = transformer.ctx.device
        self.timesteps: list[float] = []   # t in [0, 1] of each forward of the last call

    def encode_prompt(self, prompt: Sequence[str], negative_prompt: str, do_cfg: bool):
        """-> (emb [B or 2B, T, D], mask [B or 2B, T]); conditional rows first."""
        texts = list(prompt) + ([negative_prompt] * len(prompt) if do_cfg else [])
        return self.prompt_encoder(texts)

    def prepare_latents(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """[B, C, h, w] float32 on the device; noise of prompt i from torch.Generator(seeds[i]) on the CPU."""
        cfg = self.transformer.cfg
        h, w = height // cfg.vae_scale_factor, width // cfg.vae_scale_factor
        noise = [torch.randn(cfg.in_channels, h, w, generator=torch.Generator().manual_seed(s)) for s in seeds]
        out = torch.stack(noise) if noise else torch.zeros(0, cfg.in_channels, h, w)
        return out.to(self.device)

    @torch.no_grad()
    def __call__(self, prompt: Sequence[str], negative_prompt: str = "", num_inference_steps: int = 8,
                 guidance_scale: float = 4.0, height: int = 32, width: int = 32,
                 seeds: Optional[Sequence[int]] = None,
                 callback_on_forward_begin: Optional[ForwardHook] = None,
                 callback_on_forward_end: Optional[ForwardHook] = None) -> torch.Tensor:
        """Sample latents [B, C, h, w] (float32, on the device). An empty `prompt` list runs the
        same forwards with no rows (so this rank still takes part in the EP all-to-alls)."""
        B = len(prompt)
        seeds = list(range(B)) if seeds is None else list(seeds)
        do_cfg = guidance_scale > 1.0
        check_branches(self.transformer.ctx.layout.cfg, do_cfg)
        text, text_mask = self.encode_prompt(prompt, negative_prompt, do_cfg)
        latents = self.prepare_latents(seeds, height, width)                     # [B, C, h, w]
        p = self.transformer.cfg.patch_size
        n_tokens = (latents.shape[2] // p) * (latents.shape[3] // p)
        # the rows THIS rank routes: under cfg / sp parallelism its branch chunk and token shard
        info = self.transformer.split.forward_info(B, n_tokens, do_cfg)
        ts = set_flux_timesteps(self.scheduler, num_inference_steps)            # [N] t in [0, 1]
        self.timesteps = ts   # moe-ep's t of each forward (scheduler.timesteps are diffusers' 1000 t)
        for i, t in enumerate(ts):
            model_in = torch.cat([latents, latents]) if do_cfg else latents     # [2B or B, C, h, w]
            t_vec = torch.full((model_in.shape[0],), t, device=self.device)      # [2B or B]
            if callback_on_forward_begin is not None:
                callback_on_forward_begin(i, t, info)
            v = self.transformer(model_in, t_vec, text, text_mask).float()
            if callback_on_forward_end is not None:
                callback_on_forward_end(i, t, info)
            if do_cfg:
                v_cond, v_uncond = v.chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            # Euler: latents + (sigma_{i+1} - sigma_i) * v, in float32
            latents = self.scheduler.step(v, self.scheduler.timesteps[i], latents, return_dict=False)[0]
        return latents
