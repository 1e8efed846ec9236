"""The seam between the runtime and a served model.

The job loop (moe_ep/job.py), the rebalancer and telemetry see a model only through
`ServedModel`: its MoE layers, a weight source per layer, one call that samples a batch,
and two per-forward hooks. A model family (the built-in MoE-DiT in moe_ep/models/moedit/,
diffusers' MoE transformers in moe_ep/models/diffusers/) implements this class; nothing in
the runtime imports a model family directly (moe_ep/models/__init__.py dispatches on
`model.type`).

Per forward, a model calls `hooks.on_forward_begin(step, t, info)` before and
`hooks.on_forward_end(step, t, info)` after its transformer (`step` = denoising step index,
`t` in [0, 1], 1 = pure noise). The job records statistics, timings and rebalances there:
rebalancing happens between forwards, never inside one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, TypedDict

import numpy as np
import torch

# expert id -> (w13 [H, 2F], w2 [F, H]) of that logical expert (moe_ep.layer.ExpertWeightSource)
ExpertWeightSource = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class ForwardInfo(TypedDict, total=False):
    """What a model tells the hooks about one transformer forward.

    rows: MoE input rows of this forward on this rank (every MoE layer sees the same rows);
    cond_rows: rows of the conditional half when the conditional rows come first (legacy form
        of `sample_branch`), None without guidance;
    sample_branch: per sample of the transformer batch, 0 = conditional, 1 = unconditional;
        None without guidance;
    batch: prompts in this batch."""

    rows: int
    cond_rows: Optional[int]
    sample_branch: Optional[list[int]]
    batch: int


class ForwardHooks(Protocol):
    """What `ServedModel.sample` calls around every transformer forward (moe_ep.job.ForwardRecorder)."""

    def on_forward_begin(self, step: int, t: float, info: ForwardInfo) -> None: ...

    def on_forward_end(self, step: int, t: float, info: ForwardInfo) -> None: ...


class NoHooks:
    """Hooks that do nothing (a model used outside the job)."""

    def on_forward_begin(self, step: int, t: float, info: ForwardInfo) -> None:
        pass

    def on_forward_end(self, step: int, t: float, info: ForwardInfo) -> None:
        pass


@dataclass(frozen=True)
class MoEShape:
    """The MoE part of a model, known before any process group starts (`preflight`): what the
    eplb files (stats, placement) and the slot layout are checked against."""

    num_layers: int       # MoE layers L (stats rows)
    num_experts: int      # logical experts E per layer
    top_k: int = 1        # experts per token (token choice), for the statistics file


class ServedModel(ABC):
    """A model served by the job. Built on every rank by `moe_ep.models.build_served_model`.

    Attributes every implementation sets:
      rows_per_prompt      MoE input rows one prompt contributes to one forward (guidance
                           branches counted): token rows through the transformer
      tokens_per_image     image tokens per prompt (rows_per_prompt without the guidance factor)
      num_inference_steps  forwards per batch (the same for every batch, also an empty one)
    """

    rows_per_prompt: int
    tokens_per_image: int
    num_inference_steps: int

    @abstractmethod
    def moe_layers(self) -> list:
        """The MoE layers (moe_ep.layer.MoELayer) in order; `layer_idx` is the index in this list."""

    @abstractmethod
    def weight_source(self, layer_idx: int) -> ExpertWeightSource:
        """expert -> (w13 [H, 2F], w2 [F, H]) of any logical expert of MoE layer `layer_idx`
        (from the seed or from disk): fills slots for a placement file without a rebalancer;
        meant as the rebalancer's disk fallback where no peer holds an expert (not used by
        moe_ep.rebalance today: every expert always has a replica on some rank)."""

    @property
    @abstractmethod
    def timesteps(self) -> list[float]:
        """t in [0, 1] of each forward of a batch, in order (the timestep-aware rebalancer's next t)."""

    @abstractmethod
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], hooks: ForwardHooks) -> list[np.ndarray]:
        """Sample one batch -> one [H, W, 3] uint8 image per prompt. With no prompts it still
        runs `num_inference_steps` forwards (with zero rows) and calls the hooks, so this rank
        takes part in every EP all-to-all and statistics all-reduce."""

    @abstractmethod
    def describe(self) -> dict:
        """JSON-able facts about the model for summary.json (`model` key)."""

    def attention_blocks(self) -> list:
        """Modules with a `timer` attribute that time their "attention" phase (telemetry); none by default."""
        return []

    def phase_timing(self) -> bool:
        """Whether telemetry may put phase timers on the MoE layers and attention blocks: not when
        the forward replays from a CUDA graph (`model.cuda_graph`; a timer's host-side events
        cannot be replayed), where a step record has its latency alone."""
        return True

    def close(self) -> None:
        """Release open files (checkpoint readers) at the end of the job."""

