"""The diffusers family behind moe_ep.models.base.ServedModel: `preflight` and `build_served_model`.

The transformer, loaded expert-parallel (loader.load_transformer), its MoE layers, a disk weight
source per layer, and sampling a batch through a diffusers pipeline around it (sampling.py).
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

from ...config import ConfigError
from ...parallel import ParallelContext, derive_ep_size, resolve_layout
from ...sequence_parallel import check_heads
from ..base import MoEShape, ServedModel
from ...cuda_graph import check_cuda_graph, install_cuda_graph
from .acceleration import compile_transformer, remove_host_syncs
from .context_parallel import family_plan, install_context_parallel
from .loader import DTYPES, LoadedTransformer, check_folder, load_transformer
from .pipeline import CONVENTIONS
from .sampling import PipelineSampler, check_pipeline_source, load_pipeline


def preflight(cfg, world_size: int) -> MoEShape:
    """Check model.path against the model before any process group (config and headers only).

    -> MoEShape(MoE layers, experts, top_k). Raises ConfigError naming the field: model.path
    (with the file and key), or the slot layout (eplb.num_redundant_experts / model.moe.num_experts).
    """
    ep = derive_ep_size(cfg.parallel, world_size)
    info, layers, experts, top_k = check_folder(cfg.model.path, cfg.eplb.num_redundant_experts, ep)
    layout = resolve_layout(cfg.parallel, world_size)
    if layout.sp > 1 or layout.cfg > 1:   # sequence / cfg parallel: the family must have it, heads split
        family_plan(info.spec.name, layout)
        check_heads(attention_heads(info), layout)
    check_pipeline_source(cfg)
    return MoEShape(num_layers=layers, num_experts=experts, top_k=top_k)


def attention_heads(info) -> int:
    """The model's attention heads: config.json's num_attention_heads, else the model class's
    __init__ default (what diffusers builds when the key is left out). Raises ConfigError."""
    if "num_attention_heads" in info.config:
        return int(info.config["num_attention_heads"])
    import diffusers

    param = inspect.signature(getattr(diffusers, info.model_class).__init__).parameters.get("num_attention_heads")
    if param is None or param.default is inspect.Parameter.empty:
        raise ConfigError("model.path", info.path, f"{info.config_file}: no num_attention_heads, and {info.model_class} "
                                                   "has no default for it; sequence parallel splits the heads")
    return int(param.default)


class DiffusersServedModel(ServedModel):
    """A diffusers MoE transformer served on this rank. `loaded.model` is the diffusers module
    (call it as diffusers does); `loaded.report` is what this rank read and held."""

    def __init__(self, cfg, loaded: LoadedTransformer, sampler: Optional[PipelineSampler] = None):
        self.cfg, self.loaded, self.sampler = cfg, loaded, sampler
        s, p = cfg.sampling, int(getattr(loaded.model.config, "patch_size", 1) or 1)
        vae = int(getattr(getattr(sampler, "pipeline", None), "vae_scale_factor", 8) or 8) if sampler else 8
        # image tokens per prompt (an estimate: a family's pipeline may resize the request)
        self.tokens_per_image = max(1, (s.height // vae // p) * (s.width // vae // p))
        # both guidance branches in one forward (HiDream), or one forward per branch (NucleusMoE)
        batched = CONVENTIONS[loaded.info.spec.name].guidance == "batched_negative_first"
        self.rows_per_prompt = self.tokens_per_image * (2 if s.guidance_scale > 1.0 and batched else 1)
        self.num_inference_steps = s.num_inference_steps

    @classmethod
    def build(cls, cfg, ctx: ParallelContext) -> "DiffusersServedModel":
        if cfg.model.dtype not in DTYPES:
            raise ConfigError("model.dtype", cfg.model.dtype, "must be one of " + ", ".join(DTYPES))
        loaded = load_transformer(cfg.model.path, ctx, num_redundant=cfg.eplb.num_redundant_experts,
                                  dtype=DTYPES[cfg.model.dtype],   # scores as the model computes them (spec)
                                  batch_invariant=cfg.model.moe.batch_invariant)
        # exact, on every route (acceleration.remove_host_syncs says what it pays)
        remove_host_syncs(loaded.model)
        if cfg.model.compile:      # the non-MoE blocks compiled (docs/benchmarks.md 1g)
            compile_transformer(loaded.model)
        pipeline = load_pipeline(cfg, loaded.model, DTYPES[cfg.model.dtype])
        sampler = PipelineSampler(cfg, pipeline, loaded.model, loaded.moe_layers, loaded.info.spec.name)
        # one image over the sp x cfg ranks (they all get the same prompts and seeds): context_parallel.py
        cp = install_context_parallel(loaded.model, ctx, loaded.moe_layers, CONVENTIONS[loaded.info.spec.name].guidance,
                                      loaded.info.spec.name, sampler.watch._guided, sampler.watch.loop_step)
        if cp is not None:
            sampler.watch.on_new_call.append(cp.reset)     # a sampling call never pairs with an earlier one's
        if cfg.model.cuda_graph:   # the forward replayed from a CUDA graph; the watch's hooks stay around it
            check_cuda_graph(ctx, "model.cuda_graph")
            install_cuda_graph(loaded.model, loaded.moe_layers)
        return cls(cfg, loaded, sampler)

    def moe_layers(self) -> list:
        return self.loaded.moe_layers

    def weight_source(self, layer_idx: int):
        return self.loaded.sources[layer_idx]

    @property
    def timesteps(self) -> list[float]:
        return self.sampler.timesteps()

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], hooks) -> list:
        return self.sampler.sample(prompts, seeds, hooks)

    def phase_timing(self) -> bool:
        return not self.cfg.model.cuda_graph

    def describe(self) -> dict:
        info, layers = self.loaded.info, self.loaded.moe_layers
        return {"type": "diffusers", "class": info.model_class, "spec": info.spec.name, "path": info.path,
                "moe_layers": len(layers), "num_experts": layers[0].cfg.num_experts,
                "routing": layers[0].cfg.routing, "load": self.loaded.report.as_dict()}


def build_served_model(cfg, ctx: ParallelContext) -> DiffusersServedModel:
    """This rank's served diffusers model: model.path read with only this rank's experts."""
    return DiffusersServedModel.build(cfg, ctx)
