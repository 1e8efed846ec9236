"""Sampling a batch with a diffusers pipeline around the expert-parallel transformer (the job's
`ServedModel.sample` for `model.type = "diffusers"`).

The pipeline comes from `model.text_encoder`:
  "builtin"          the pipeline folder's own components (model_index.json: text encoders,
                     tokenizers, scheduler, VAE), read with `DiffusionPipeline.from_pretrained`
                     and given our transformer;
  "module:function"  function(transformer) -> a pipeline (anything called like a diffusers
                     pipeline: prompt=, negative_prompt=, height=, width=, num_inference_steps=,
                     guidance_scale=, generator=, output_type="np"), e.g. one that turns prompts
                     into prompt embeddings itself (the tests do).

Per prompt i the pipeline gets `torch.Generator().manual_seed(seed_i)`, so an image depends on
its prompt and seed only. A rank with no prompt left runs a stand-in prompt with every MoE layer
idle (no rows in the exchange, nothing counted) and drops the image, so its all-to-alls line up.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from ...config import ConfigError
from ...images import to_uint8
from ...paths import import_function
from ..base import ForwardHooks
from .pipeline import CONVENTIONS, TransformerWatch


def check_pipeline_source(cfg) -> Any:
    """What load_pipeline will build the pipeline from, checked before any process group (the
    preflight): the user's 'module:function' (imported), else the folder's model_index.json.
    -> the user's function, or None for the folder's own pipeline. Raises ConfigError."""
    spec = cfg.model.text_encoder
    if spec != "builtin":
        return import_function("model.text_encoder", spec)
    folder = cfg.model.path
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ConfigError("model.path", folder, "has no model_index.json: sampling needs a pipeline folder "
                                                "(text encoders, scheduler, VAE), or set model.text_encoder to "
                                                "'module:function' that builds the pipeline around the transformer")
    check_pipeline_components(folder)
    return None


def check_pipeline_components(folder: str) -> None:
    """The folder holds every component its pipeline class needs besides the transformer (which
    moe-ep passes in): each is a subfolder, or null in model_index.json. A partial download fails
    here, in one line, instead of in DiffusionPipeline.from_pretrained after every expert was
    read. Raises ConfigError."""
    import json

    import diffusers

    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError("model.path", folder, f"model_index.json cannot be read: {err}") from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ConfigError("model.path", folder, f"model_index.json names the pipeline class {name!r}, which "
                                                f"diffusers {diffusers.__version__} does not have")
    needed, _ = cls._get_signature_keys(cls)                   # the pipeline's __init__ components
    optional = set(getattr(cls, "_optional_components", []) or [])
    missing = [k for k in sorted(set(needed) - optional - {"transformer"})
               if not (isinstance(index.get(k), list) and index[k][:1] == [None])
               and not os.path.isdir(os.path.join(folder, k))]
    if missing:
        raise ConfigError("model.path", folder, f"lacks the {name} components {', '.join(missing)} (a subfolder "
                                                "each); sampling through the folder's own pipeline needs them, or "
                                                "set model.text_encoder to 'module:function' that builds the "
                                                "pipeline around the transformer")


def load_pipeline(cfg, transformer: torch.nn.Module, dtype: torch.dtype) -> Any:
    """The pipeline that samples with `transformer` (see the module doc). Raises ConfigError."""
    build = check_pipeline_source(cfg)
    if build is not None:
        return build(transformer)
    folder = cfg.model.path
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, transformer=transformer, torch_dtype=dtype)
    return pipe.to(next(transformer.parameters()).device)


class PipelineSampler:
    """prompts, seeds -> uint8 images [H, W, 3], calling the job's hooks around every forward."""

    def __init__(self, cfg, pipeline: Any, transformer: torch.nn.Module, moe_layers: list, family: str):
        self.cfg, self.pipeline, self.layers = cfg, pipeline, moe_layers
        self.hooks: ForwardHooks | None = None
        self.watch = TransformerWatch(transformer, CONVENTIONS[family], self, pipeline)
        self.seen_timesteps: list[float] = []
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)

    # the watch calls these; they forward to the job's hooks for the current batch
    def on_forward_begin(self, step, t, info):
        if len(self.seen_timesteps) <= step:
            self.seen_timesteps.append(t)
        if self._idle:
            info = dict(info, rows=0, sample_branch=None)
        self.hooks.on_forward_begin(step, t, info)

    def on_forward_end(self, step, t, info):
        self.hooks.on_forward_end(step, t, info)

    def timesteps(self) -> list[float]:
        s = self.cfg.sampling
        return self.seen_timesteps or np.linspace(1.0, 0.0, s.num_inference_steps, endpoint=False).tolist()

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], hooks: ForwardHooks) -> list[np.ndarray]:
        s = self.cfg.sampling
        self.hooks, self._idle = hooks, not prompts
        for layer in self.layers:
            layer.idle = self._idle
        self.watch.new_call()
        try:
            out = self.pipeline(prompt=list(prompts) or [s.negative_prompt or "a"], negative_prompt=s.negative_prompt
                                if prompts else None, height=s.height, width=s.width,
                                num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                generator=[torch.Generator().manual_seed(x) for x in (seeds or [0])],
                                output_type="np")
        finally:
            for layer in self.layers:
                layer.idle = False
        if not prompts:
            return []
        images = out.images if hasattr(out, "images") else out[0]
        return [to_uint8(im) for im in images]
