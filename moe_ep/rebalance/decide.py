"""Deciding a placement together: plan on EP rank 0, broadcast over the EP group, vote over the world.

Every control message is a small int64/float64 tensor made on `ctx.device` by `ctl` (NCCL groups
reject CPU tensors) and read back with `.cpu()`. Whether a collective runs is only ever decided
from values that are already the same on every rank taking part.
"""
from __future__ import annotations

import traceback
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

import eplb

from ..config import EplbConfig
from ..parallel import ParallelContext
from ..placement import make_placement

Planner = Callable[..., tuple]

GO, SKIP, FAILED = 1, 2, 0


class Decider:
    """The planner and the collectives that turn its plan into one agreed placement.

    planner(weight [L, E], num_replicas, num_groups, num_nodes, num_gpus, policy=...,
    previous_phy2log=...) -> (phy2log [L, R], log2phy, logcnt); default `eplb.rebalance_experts`.
    `fault_hook("plan")` runs on EP rank 0 before it decides (tests: raising there fails planning).
    """

    def __init__(self, ctx: ParallelContext, cfg: EplbConfig, num_layers: int, num_experts: int, num_slots: int,
                 planner: Optional[Planner] = None, fault_hook: Optional[Callable[[str], None]] = None):
        self.ctx, self.cfg = ctx, cfg
        self.num_layers, self.num_experts, self.num_slots = num_layers, num_experts, num_slots
        self.planner: Planner = planner or eplb.rebalance_experts
        self.fault_hook = fault_hook
        self._ep_src = 0 if ctx.ep_group is None else dist.get_global_rank(ctx.ep_group, 0)

    @property
    def groups(self):
        return (self.ctx.ep_group, self.ctx.dp_group)

    # ------------------------------------------------------------ control messages
    def ctl(self, values, dtype=torch.int64) -> torch.Tensor:
        """A control message on `ctx.device` (NCCL only takes device tensors): `values` is an int
        (zeros of that length) or a sequence / tensor of numbers. Read it back with `.cpu()`."""
        if isinstance(values, int):
            return torch.zeros(values, dtype=dtype, device=self.ctx.device)
        return torch.as_tensor(values, dtype=dtype).to(self.ctx.device).flatten()

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.MAX, groups=None) -> torch.Tensor:
        for g in (self.groups if groups is None else groups):
            if g is not None:
                dist.all_reduce(t, op=op, group=g)
        return t

    def vote_max(self, flags: list[int]) -> list[int]:
        """Per-rank flags -> their MAX over the world (EP, then DP). Collective."""
        return [int(v) for v in self.all_reduce(self.ctl(flags)).cpu().tolist()]

    def _broadcast_from_ep0(self, t: torch.Tensor) -> torch.Tensor:
        """Broadcast a `ctl` tensor from EP rank 0; returns it on the host."""
        if self.ctx.ep_group is not None:
            dist.broadcast(t, src=self._ep_src, group=self.ctx.ep_group)
        return t.cpu()

    def _broadcast_text(self, text: str) -> str:
        if self.ctx.ep_group is None:
            return text
        box = [text]
        dist.broadcast_object_list(box, src=self._ep_src, group=self.ctx.ep_group)
        return box[0]

    # ------------------------------------------------------------ plan on EP rank 0, broadcast
    def decide_on_ep0(self, size: int, decide: Callable[[], tuple], what: str) -> tuple[int, torch.Tensor, str]:
        """EP rank 0 runs `decide() -> (status, payload tensor of `size` numbers, reason)` (after the
        "plan" fault hook); every rank of the EP group gets the status and payload [size] (int64,
        on the host), and the reason when the status is not GO. A decide() that raises is FAILED,
        with "<what> failed: <error>" as the reason."""
        msg = self.ctl(1 + size)                                # [status, payload...]
        reason = ""
        if self.ctx.ep_rank == 0:
            try:
                if self.fault_hook is not None:
                    self.fault_hook("plan")
                status, payload, reason = decide()
                msg[1:] = payload.flatten().to(msg.device)
            except Exception as err:  # planning failed: keep the old placement
                status, reason = FAILED, f"{what} failed: {type(err).__name__}: {err}"
                traceback.print_exc()
            msg[0] = status
        msg = self._broadcast_from_ep0(msg)
        status = int(msg[0])
        if status != GO:
            reason = self._broadcast_text(reason)
        return status, msg[1:], reason

    def plan(self, load, prev: torch.Tensor) -> torch.Tensor:
        """The planner on `load` [L, E] from placement `prev` [L, R]: validated (shape, ids, every
        expert present; ValueError otherwise) and aligned to `prev`. -> phy2log [L, R] int64 (CPU)."""
        out = self.planner(torch.as_tensor(np.asarray(load), dtype=torch.float64), self.num_slots,
                           self.cfg.num_groups, self.ctx.num_nodes, self.ctx.ep_size,
                           policy=self.cfg.policy, previous_phy2log=prev.clone())
        p = torch.as_tensor(out[0] if isinstance(out, (tuple, list)) else out, dtype=torch.int64).cpu()
        want = (self.num_layers, self.num_slots)
        if tuple(p.shape) != want:
            raise ValueError(f"planner returned phy2log of shape {tuple(p.shape)}, expected {want}")
        for l in range(p.shape[0]):
            make_placement(p[l], self.num_experts, self.ctx.ep_size, f"planned phy2log[{l}]")
        return self._align(prev, p)

    def _align(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Relabel a plan's GPUs and slots so experts already in place stay, without changing any
        GPU's load (`eplb.minimize_movement`, nodes kept whole). `eplb.rebalance_experts` does this
        itself from `previous_phy2log`; other planners' plans are relabelled here."""
        if self.planner is eplb.rebalance_experts:
            return new
        P, N = self.ctx.ep_size, self.ctx.num_nodes
        return eplb.minimize_movement(new, old, P, N if P % N == 0 else 1)

    # ------------------------------------------------------------ the vote over the world
    def agree(self, failed: bool, proposal: torch.Tensor) -> tuple[bool, bool]:
        """One all-reduce MAX over the world (EP then DP) of [failed, p, -p]: -> (some rank failed,
        every rank proposes exactly this placement: max(p) == min(p) == -max(-p) entry by entry)."""
        p = proposal.flatten().to(torch.int64)
        vote = self.all_reduce(self.ctl(torch.cat([torch.tensor([int(failed)]), p, -p]))).cpu()
        n = p.numel()
        return int(vote[0]) == 1, torch.equal(vote[1:1 + n], -vote[1 + n:])


def no_swap_reason(any_failed: bool, same: bool, failed_here: bool, reason: str, elsewhere: str) -> str:
    """Why nothing was swapped, for the record."""
    if not any_failed and not same:
        return "replicas of the data-parallel group proposed different placements"
    if any_failed and not failed_here:
        return reason or elsewhere
    return reason
