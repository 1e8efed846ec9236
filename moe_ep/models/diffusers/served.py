"""The diffusers family behind moe_ep.models.base.ServedModel: `preflight` and `build_served_model`.

What is here: the transformer, loaded expert-parallel (loader.load_transformer), its MoE layers
and a disk weight source per layer. What is not here yet: sampling a batch (text encoders,
scheduler, VAE: the pipeline API, issue 11 item 4), so `sample` and `timesteps` raise
NotImplementedError until that lands on top of `DiffusersServedModel.loaded`.
"""
from __future__ import annotations

from typing import Sequence

from ...config import ConfigError
from ...parallel import ParallelContext, derive_ep_size
from ..base import MoEShape, ServedModel
from .loader import DTYPES, LoadedTransformer, check_folder, load_transformer


def preflight(cfg, world_size: int) -> MoEShape:
    """Check model.path against the model before any process group (config and headers only).

    -> MoEShape(MoE layers, experts, top_k). Raises ConfigError naming the field: model.path
    (with the file and key), or the slot layout (eplb.num_redundant_experts / model.moe.num_experts).
    """
    ep = derive_ep_size(cfg.parallel, world_size)
    _, layers, experts, top_k = check_folder(cfg.model.path, cfg.eplb.num_redundant_experts, ep)
    return MoEShape(num_layers=layers, num_experts=experts, top_k=top_k)


class DiffusersServedModel(ServedModel):
    """A diffusers MoE transformer served on this rank. `loaded.model` is the diffusers module
    (call it as diffusers does); `loaded.report` is what this rank read and held."""

    rows_per_prompt = None
    tokens_per_image = None
    num_inference_steps = None

    def __init__(self, cfg, loaded: LoadedTransformer):
        self.cfg, self.loaded = cfg, loaded

    @classmethod
    def build(cls, cfg, ctx: ParallelContext) -> "DiffusersServedModel":
        if cfg.model.dtype not in DTYPES:
            raise ConfigError("model.dtype", cfg.model.dtype, "must be one of " + ", ".join(DTYPES))
        loaded = load_transformer(cfg.model.path, ctx, num_redundant=cfg.eplb.num_redundant_experts,
                                  dtype=DTYPES[cfg.model.dtype])
        return cls(cfg, loaded)

    def moe_layers(self) -> list:
        return self.loaded.moe_layers

    def weight_source(self, layer_idx: int):
        return self.loaded.sources[layer_idx]

    @property
    def timesteps(self) -> list[float]:
        raise NotImplementedError("diffusers model: the sampling loop (pipeline API) is not wired yet")

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], hooks) -> list:
        raise NotImplementedError("diffusers model: the sampling loop (pipeline API) is not wired yet")

    def describe(self) -> dict:
        info, layers = self.loaded.info, self.loaded.moe_layers
        return {"type": "diffusers", "class": info.model_class, "spec": info.spec.name, "path": info.path,
                "moe_layers": len(layers), "num_experts": layers[0].cfg.num_experts,
                "routing": layers[0].cfg.routing, "load": self.loaded.report.as_dict()}


def build_served_model(cfg, ctx: ParallelContext) -> DiffusersServedModel:
    """This rank's served diffusers model: model.path read with only this rank's experts."""
    return DiffusersServedModel.build(cfg, ctx)
