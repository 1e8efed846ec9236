"""MoELayer = router + placement + dispatch + grouped experts (+ shared experts)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from .config import ConfigError, MoEConfig
from .dispatch import combine, dispatch
from .experts import DenseMLP, GroupedExperts
from .parallel import ParallelContext, check_layout
from .router import Router
from .placement import Placement, assign_slots, contiguous_placement, make_placement, replica_choices
from .stats import ExpertLoadStats
from .timing import PhaseTimer, maybe_phase

# expert id -> (w13 [H, 2F], w2 [F, H]) of that logical expert
ExpertWeightSource = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class MoELayer(nn.Module):
    """An expert-parallel, dropless MoE feed-forward.

    Every rank of the EP group holds `R / ep_size` physical slots (R = experts + redundant)
    of stacked expert weights; the placement says which logical expert each slot holds.
    """

    def __init__(self, hidden_size: int, cfg: MoEConfig, ctx: ParallelContext, num_redundant: int = 0,
                 layer_idx: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if cfg.top_k > cfg.num_experts:
            raise ConfigError("model.moe.top_k", cfg.top_k, f"must be <= model.moe.num_experts ({cfg.num_experts})")
        check_layout(cfg.num_experts, num_redundant, ctx.ep_size)
        self.cfg, self.ctx, self.layer_idx = cfg, ctx, layer_idx
        self.num_slots = cfg.num_experts + num_redundant
        self.slots_per_rank = self.num_slots // ctx.ep_size
        dev = ctx.device
        self.router = Router(hidden_size, cfg).to(device=dev, dtype=dtype)
        self.experts = GroupedExperts(self.slots_per_rank, hidden_size, cfg.expert_hidden_size, dtype, dev)
        self.shared = (DenseMLP(hidden_size, cfg.num_shared_experts * cfg.expert_hidden_size, dtype, dev)
                       if cfg.num_shared_experts else None)
        self.stats: Optional[ExpertLoadStats] = None
        self.timer: Optional[PhaseTimer] = None
        self.placement: Placement = contiguous_placement(cfg.num_experts, num_redundant, ctx.ep_size)
        self._install_routing(self.placement)

    # ------------------------------------------------------------ placement
    @property
    def local_experts(self) -> list[int]:
        """Logical expert held by each of this rank's slots."""
        start = self.ctx.ep_rank * self.slots_per_rank
        return self.placement.phy2log[start:start + self.slots_per_rank].tolist()

    def _install_routing(self, placement: Placement) -> None:
        choices, nchoices = replica_choices(placement, self.ctx.ep_rank, self.ctx.ep_size)
        self._choices = choices.to(self.ctx.device)        # [E, max_rep]
        self._nchoices = nchoices.to(self.ctx.device)      # [E]
        self._has_replicas = bool((nchoices > 1).any())

    def set_placement(self, phy2log, weights: Optional[ExpertWeightSource] = None) -> None:
        """Install a placement; with `weights`, fill this rank's slots from it.

        Without `weights` the caller must already have put the right weights in the slots
        (the rebalancer does, after moving them between ranks).
        """
        placement = make_placement(phy2log, self.cfg.num_experts, self.ctx.ep_size, "placement")
        if placement.num_slots != self.num_slots:
            raise ConfigError("placement", placement.num_slots, f"layer has {self.num_slots} slots")
        self.placement = placement
        self._install_routing(placement)
        if weights is not None:
            self.load_expert_weights(weights)

    def load_expert_weights(self, weights: ExpertWeightSource) -> None:
        """Copy each local slot's logical-expert weights in."""
        for slot, expert in enumerate(self.local_experts):
            w13, w2 = weights(expert)
            self.experts.w13[slot].copy_(w13)
            self.experts.w2[slot].copy_(w2)

    # ------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                           # [T, H]
        with maybe_phase(self.timer, "router"):
            weights, ids = self.router(x)                                      # [T, k] each
            if self.stats is not None:
                self.stats.record(self.layer_idx, ids)
            slots = assign_slots(ids.reshape(-1), self._choices, self._nchoices,
                                 self.ctx.ep_rank, self._has_replicas)         # [T*k]
        with maybe_phase(self.timer, "dispatch"):
            rows, plan = dispatch(x, slots, self.cfg.top_k, self.ctx.ep_size, self.slots_per_rank,
                                  self.ctx.ep_group)                           # [M, H]
        with maybe_phase(self.timer, "experts"):
            y = self.experts(rows, plan.local_counts)                          # [M, H]
        with maybe_phase(self.timer, "combine"):
            out = combine(y, weights, plan, self.ctx.ep_group)                 # [T, H]
            if self.shared is not None:
                out = out + self.shared(x)
        return out.view(shape)
