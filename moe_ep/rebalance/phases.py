"""Timestep-aware placement (`eplb.timestep_aware`): one planned placement per timestep bucket,
and at each forward boundary the decision whether switching to the next forward's bucket pays.

saving = forward time x moe_time_fraction x (1 - bal_now / bal_phase) x forwards in the phase;
cost = measured overhead + max bytes per rank / measured bandwidth (docs/eplb_runtime.md).
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from ..parallel import ParallelContext
from ..stats import ExpertLoadStats
from ..transfer import plan_transfers, summarize
from .balancedness import layer_balancedness
from .decide import GO, Decider


class PhaseSwitcher:
    """The phase plans, the forward-time and phase-length estimates, and the switch decision."""

    def __init__(self, layers: list, ctx: ParallelContext, stats: ExpertLoadStats, decider: Decider,
                 moe_time_fraction: float = 1.0):
        self.layers, self.ctx, self.stats, self.decider = layers, ctx, stats, decider
        self.moe_time_fraction = moe_time_fraction
        self.plans: Optional[torch.Tensor] = None           # [B, L, R]
        self._last_after = None
        self._fwd_time = None                               # EMA of seconds per forward
        self._run_bucket, self._run_len = None, 0
        self._run_lengths: dict[int, list[int]] = {}
        # per bucket: what `switch_terms` derives from (phase plans, placement, loads), reused
        # while none of the three changed
        self.cache: dict[int, tuple] = {}

    # ------------------------------------------------------------ what a phase is worth
    def forward_ended(self, bucket: int) -> None:
        """At every forward boundary, before any rebalancing: the forward's time and its bucket."""
        now = time.perf_counter()
        if self._last_after is not None:
            dt = now - self._last_after
            self._fwd_time = dt if self._fwd_time is None else 0.8 * self._fwd_time + 0.2 * dt
        if bucket == self._run_bucket:
            self._run_len += 1
            return
        if self._run_bucket is not None:
            self._run_lengths.setdefault(self._run_bucket, []).append(self._run_len)
        self._run_bucket, self._run_len = bucket, 1

    def next_forward_starts(self) -> None:
        """After rebalancing: time spent there is not forward time."""
        self._last_after = time.perf_counter()

    def forwards_per_phase(self, bucket: int) -> float:
        """Mean number of consecutive forwards spent in `bucket` (observed)."""
        runs = self._run_lengths.get(bucket, [])[-8:]
        if not runs:
            return float(max(self._run_len if bucket == self._run_bucket else 1, 1))
        return float(np.mean(runs))

    # ------------------------------------------------------------ planning
    def plan(self, current: torch.Tensor) -> Optional[str]:
        """EP rank 0 plans one placement per timestep bucket from the bucketed load, starting from
        `current` [L, R], and broadcasts them; nothing moves here (switches happen at bucket
        boundaries). -> the reason when planning failed anywhere (no plans installed), else None.
        Collective."""
        bl = self.stats.bucket_load()                          # [B, L, E]
        if bl is None:
            return None
        B = bl.shape[0]
        L, R = current.shape

        def decide():
            plans, prev = [None] * B, current
            total = bl.sum(0)
            for b in reversed(range(B)):                       # sampling runs from t=1 down to t=0
                plans[b] = prev = self.decider.plan(bl[b] if bl[b].sum() > 0 else total, prev)
            return GO, torch.stack(plans), ""

        status, plans, reason = self.decider.decide_on_ep0(B * L * R, decide, "phase planning")
        # Installed phase plans decide, at every forward, whether this rank enters the collectives
        # of the switch decision, so every rank of the world must install exactly the same plans or
        # none: one all-reduce MAX of [failed, plans, -plans] over EP and DP.
        any_failed, same = self.decider.agree(status != GO, plans)
        if any_failed or not same:
            return reason or ("phase planning failed on another data-parallel replica" if any_failed else
                              "replicas of the data-parallel group planned different phase placements")
        self.plans = plans.view(B, L, R).clone()
        return None

    # ------------------------------------------------------------ switching
    def switch_terms(self, bucket: int) -> Optional[tuple]:
        """What the switch decision derives for `bucket` from the phase plans, the placement in
        effect and the bucketed load: None when the bucket's plan is the current placement, else
        (old [L, R], new [L, R], bal_old [L], bal_new [L], ratio, max_rank_bytes). Cached per bucket
        and recomputed only when the phase plans (object), any layer's placement (object) or the
        loads (`stats.version`) changed, so a forward with nothing new costs O(L), not O(L * R)."""
        plans = self.plans
        placements = [m.placement for m in self.layers]
        hit = self.cache.get(bucket)
        if hit is not None:
            (c_plans, c_placements, c_version), terms = hit
            if c_plans is plans and c_version == self.stats.version and \
                    all(a is b for a, b in zip(c_placements, placements)):
                return terms
        new = plans[bucket]
        old = torch.stack([p.phy2log for p in placements])
        if torch.equal(new, old):
            terms = None
        else:
            load = self.stats.bucket_load()[bucket]
            bal_old = layer_balancedness(load, old, self.ctx.ep_size)
            bal_new = layer_balancedness(load, new, self.ctx.ep_size)
            # MoE time per forward ~ max GPU load ~ 1 / balancedness (mean load fixed)
            ratio = float(np.mean(bal_old / np.maximum(bal_new, 1e-12)))
            moves = plan_transfers(old, new, self.ctx.ep_size)
            st = summarize(moves, self.layers, self.ctx.ep_size)
            terms = (old, new, bal_old, bal_new, ratio, st.max_rank_bytes)
        self.cache[bucket] = ((plans, placements, self.stats.version), terms)
        return terms

    def worth_switching(self, bucket: int, bandwidth: float, overhead_s: float,
                        force: bool = False) -> Optional[tuple[tuple, float, float]]:
        """Whether switching to `bucket`'s placement now pays: the predicted saving over the phase
        beats the cost of moving the weights (`force`: always), decided from the slowest rank's
        view. -> (switch_terms, saving s, cost s) when it pays, else None.

        Whether the decision collective runs depends only on the phase plans and the placement,
        the same on every rank; the load-derived terms come from `switch_terms` (cached)."""
        terms = self.switch_terms(bucket)
        if terms is None:
            return None
        max_rank_bytes = terms[5]
        t_moe = (self._fwd_time or 0.0) * self.moe_time_fraction
        saved = max(0.0, t_moe * (1.0 - terms[4])) * self.forwards_per_phase(bucket)
        cost = overhead_s + max_rank_bytes / max(bandwidth, 1.0)
        # the slowest rank's view decides, the same on every rank
        d = self.decider.all_reduce(self.decider.ctl([saved, cost], torch.float64)).cpu()
        saved, cost = float(d[0]), float(d[1])
        if not (force or saved > cost):
            return None
        return terms, saved, cost
