"""Where each logical expert lives: physical slots, replicas, and which replica a token uses.

A layer's placement is `phy2log [R]` (logical expert held by each physical slot; rank g
holds slots `g*R/ep ... (g+1)*R/ep - 1`); `log2phy [E, max_replicas]` (-1 padded) and
`logcnt [E]` are derived from it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError


@dataclass(frozen=True)
class Placement:
    phy2log: torch.Tensor   # [R] int64
    log2phy: torch.Tensor   # [E, max_replicas] int64, -1 padded
    logcnt: torch.Tensor    # [E] int64

    @property
    def num_slots(self) -> int:
        return self.phy2log.numel()

    @property
    def num_experts(self) -> int:
        return self.logcnt.numel()


def make_placement(phy2log, num_experts: int, ep_size: int, name: str = "placement") -> Placement:
    """Validate a slot -> expert map and derive log2phy / logcnt. Raises ConfigError."""
    phy2log = torch.as_tensor(phy2log, dtype=torch.int64).flatten().cpu().clone()  # never a view of the caller's
    R = phy2log.numel()
    if R < num_experts or R % ep_size:
        raise ConfigError(name, R, f"slot count must be >= experts ({num_experts}) and divisible by "
                                   f"the EP size ({ep_size})")
    if R and (int(phy2log.min()) < 0 or int(phy2log.max()) >= num_experts):
        raise ConfigError(name, phy2log.tolist(), f"expert ids must be in [0, {num_experts})")
    logcnt = torch.bincount(phy2log, minlength=num_experts)                   # [E]
    if int(logcnt.min()) < 1:
        missing = torch.nonzero(logcnt == 0).flatten().tolist()
        raise ConfigError(name, phy2log.tolist(), f"every expert needs a slot; missing {missing}")
    max_rep = int(logcnt.max())
    order = torch.argsort(phy2log, stable=True)                                # slots grouped by expert
    starts = torch.cumsum(logcnt, 0) - logcnt                                  # [E]
    rep_idx = torch.arange(R) - starts[phy2log[order]]                         # replica number of each
    log2phy = torch.full((num_experts, max_rep), -1, dtype=torch.int64)        # [E, max_rep]
    log2phy[phy2log[order], rep_idx] = order
    return Placement(phy2log, log2phy, logcnt)


def contiguous_placement(num_experts: int, num_redundant: int, ep_size: int) -> Placement:
    """Expert e in slot e; redundant slots (if any) replicate experts 0, 1, ... in turn."""
    R = num_experts + num_redundant
    return make_placement(torch.arange(R) % num_experts, num_experts, ep_size)


def replica_choices(placement: Placement, ep_rank: int, ep_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots rank `ep_rank` may send each expert's tokens to.

    Returns (choices [E, max_replicas] int64, nchoices [E] int64): the replicas on this
    rank when it has any (no traffic at all), otherwise every replica (spread evenly).
    """
    per_rank = placement.num_slots // ep_size
    log2phy = placement.log2phy
    valid = log2phy >= 0                                                       # [E, max_rep]
    local = valid & (log2phy // per_rank == ep_rank)
    has_local = local.any(1, keepdim=True)                                     # [E, 1]
    use = torch.where(has_local, local, valid)
    # Move the usable slots to the front of each row, keeping their order.
    key = (~use).to(torch.int64) * (log2phy.shape[1] + 1) + torch.arange(log2phy.shape[1])
    perm = torch.argsort(key, dim=1)
    choices = torch.where(torch.gather(use, 1, perm), torch.gather(log2phy, 1, perm), -1)
    return choices, use.sum(1)


def count_per_bin(ids: torch.Tensor, num_bins: int) -> torch.Tensor:
    """bincount without a host sync (CUDA bincount reads the max back): ids [N] -> [num_bins] int64."""
    out = torch.zeros(num_bins, dtype=torch.int64, device=ids.device)
    return out.scatter_add_(0, ids, torch.ones_like(ids))


def assign_slots(expert_ids: torch.Tensor, choices: torch.Tensor, nchoices: torch.Tensor,
                 spread_offset: int, has_replicas: bool) -> torch.Tensor:
    """Pick a physical slot for every token copy.

    expert_ids [N] logical ids -> slots [N]. Copies of an expert with several candidate
    replicas go round-robin over them (by their order among that expert's copies), so
    each replica gets the same number of copies up to one.
    """
    if not has_replicas:
        return choices[expert_ids, 0]
    N = expert_ids.numel()
    order = torch.argsort(expert_ids, stable=True)                             # [N]
    sorted_ids = expert_ids[order]
    counts = count_per_bin(expert_ids, choices.shape[0])                       # [E]
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(order)
    pos[order] = torch.arange(N, device=expert_ids.device) - starts[sorted_ids]  # rank within expert
    rep = (pos + spread_offset) % nchoices[expert_ids]
    return choices[expert_ids, rep]
