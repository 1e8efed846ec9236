"""diffusers' MoE diffusion transformers (HiDream-I1, NucleusMoE-Image), served expert-parallel.

Public functions (what the job, the pipeline API and tests call):

  preflight(cfg, world_size) -> MoEShape
      Checks `model.path` before any process group: the folder layout, config.json, that every
      key and shape of the safetensors files matches the model the config builds (headers only,
      the model on the meta device), and that experts + redundant slots split over the EP size.
      Raises ConfigError("model.path", path, "<file>: key '<key>' ...") on one line.

  load_transformer(path, ctx, num_redundant=0, dtype=None, score_dtype=None, placements=None)
      -> LoadedTransformer(model, wrappers, sources, info, report)
      The diffusers transformer on this rank, its MoE blocks replaced by EPMoEBlock wrappers whose
      MoELayer holds only this rank's slots; only those experts are read from disk. `model` is
      called exactly like diffusers' own module. `sources[i]` reads any expert of MoE layer i
      from disk; `report` counts expert bytes read and peak memory.

  wrap_transformer(model, ctx, num_redundant=0, ...) -> (wrappers, sources)
      The same for a diffusers transformer already in memory (a user's pipeline), one block at a
      time (peak: the model plus one layer's new slots; packed stacks adopted at EP = 1).

  build_served_model(cfg, ctx) -> DiffusersServedModel
      `load_transformer` from a Config (model.path, model.dtype, eplb.num_redundant_experts,
      eplb.placement_file is the job's business), behind moe_ep.models.base.ServedModel.

The model family itself is data: spec.MoEBlockSpec, with HIDREAM (hidream.py) and NUCLEUS
(nucleus.py) shipped. docs/diffusers.md describes it all.
"""
from __future__ import annotations

from .hidream import HIDREAM
from .loader import (DiskExpertSource, FolderInfo, LoadedTransformer, LoadReport, check_folder, inspect_folder,
                     load_transformer)
from .nucleus import NUCLEUS
from .served import DiffusersServedModel, build_served_model, preflight
from .spec import Attr, CallSignature, ExpertLayout, MoEBlockSpec, moe_config, spec_for, spec_registry
from .wrap import EPMoEBlock, ModuleExpertSource, find_blocks, wrap_transformer

__all__ = [
    "HIDREAM", "NUCLEUS", "Attr", "CallSignature", "ExpertLayout", "MoEBlockSpec", "moe_config", "spec_for",
    "spec_registry", "EPMoEBlock", "ModuleExpertSource", "find_blocks", "wrap_transformer", "DiskExpertSource",
    "FolderInfo", "LoadedTransformer", "LoadReport", "check_folder", "inspect_folder", "load_transformer",
    "DiffusersServedModel", "build_served_model", "preflight",
]
