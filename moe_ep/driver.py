"""The per-forward driver: what runs on every rank around every transformer forward.

Before a forward: the statistics get its timestep bucket and guidance branches. After it: the
statistics window closes when due and the rebalancer runs (`Rebalancer.after_forward`, or
`stats.end_forward` without one; collective), and a window that closed is scored under the
placement in effect while it was counted (not the one a rebalance installs right after). At the
end: a migration in flight is completed and the last, partial window closed and scored.

One driver serves every caller: the job's `ForwardRecorder` (moe_ep/job.py) adds latency,
tokens/s, telemetry and stats.json to it; `expert_parallel(pipe)`'s `ExpertParallel`
(moe_ep/models/diffusers/pipeline.py) adds the hooks on a diffusers transformer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .models.base import ForwardInfo
from .parallel import ParallelContext
from .rebalance import RebalanceRecord, layer_balancedness
from .stats import ExpertLoadStats

NextTimestep = Callable[[int, float], Optional[float]]   # (step, t) -> the next forward's t (None: t)


@dataclass(frozen=True)
class ForwardOutcome:
    """What happened after one forward."""

    forward: int                                   # its index (0, 1, ... over the run)
    record: Optional[RebalanceRecord]              # a rebalance attempt made now, or a migration's end
    window_balancedness: Optional[list[float]]     # [L] when a statistics window closed after it


class ForwardDriver:
    """The statistics / rebalance / balancedness hooks of every forward (see the module doc).

    layers: the MoE layers (stats rows, in layer_idx order); rebalancer: a
    moe_ep.rebalance.Rebalancer or None; next_timestep(step, t): the t the timestep-aware
    rebalancer prepares for (default: this forward's)."""

    def __init__(self, ctx: ParallelContext, stats: ExpertLoadStats, layers: list, rebalancer=None,
                 next_timestep: Optional[NextTimestep] = None):
        self.ctx, self.stats, self.layers, self.rebalancer = ctx, stats, layers, rebalancer
        self.next_timestep = next_timestep
        self.groups = (ctx.ep_group, ctx.dp_group)
        self.forward = 0                                 # forwards ended so far
        self.window_balance: list[list[float]] = []      # [windows][L] balancedness per closed window
        self._snap_placements: Optional[list] = None
        self._snap_phy2log: Optional[torch.Tensor] = None

    # ------------------------------------------------------------ ForwardHooks
    def on_forward_begin(self, step: int, t: float, info: ForwardInfo) -> None:
        self.stats.begin_forward(t, cond_rows=info.get("cond_rows"), sample_branch=info.get("sample_branch"))

    def on_forward_end(self, step: int, t: float, info: ForwardInfo) -> None:
        self.end_forward(step, t)

    # ------------------------------------------------------------ the work
    def end_forward(self, step: int, t: float) -> ForwardOutcome:
        """Close the window / rebalance (collective) and score a window that closed."""
        in_effect = [l.placement for l in self.layers]   # placement during this forward
        windows_before = self.stats.num_windows
        record = None
        if self.rebalancer is not None:                  # it closes the statistics windows itself
            nxt = self.next_timestep(step, t) if self.next_timestep is not None else None
            record = self.rebalancer.after_forward(self.forward, t, next_timestep=nxt)
        else:
            self.stats.end_forward(self.groups)
        bal = self._score_window(in_effect) if self.stats.num_windows > windows_before else None
        outcome = ForwardOutcome(self.forward, record, bal)
        self.forward += 1
        return outcome

    def finish_migration(self) -> None:
        """Complete a migration in progress (collective: every rank has the same one in flight)."""
        if self.rebalancer is not None and self.rebalancer.migration is not None:
            self.rebalancer.finish_migration()

    def close_last_window(self) -> None:
        """Close the last, partial window and score it (collective; the same forward count on
        every rank). The stats listeners (the rebalancer) measure a move waiting on it."""
        if self.stats.window_open:
            self.stats.close_window(self.groups)
            self._score_window([l.placement for l in self.layers])

    def finish(self) -> None:
        """The end of sampling: `finish_migration`, then `close_last_window` (collective)."""
        self.finish_migration()
        self.close_last_window()

    def rebalance_records(self) -> list[dict]:
        """Every attempt's latest record as summary.json holds it."""
        return [r.as_dict() for r in (self.rebalancer.events if self.rebalancer is not None else [])]

    # ------------------------------------------------------------ balancedness
    def _score_window(self, placements: list) -> list[float]:
        """[L] balancedness of the last closed window under `placements` (the ones in effect
        during it); kept in `window_balance`."""
        load = self.stats.windows[-1].astype(np.float64)                         # [L, E]
        bal = layer_balancedness(load, self._stacked(placements), self.ctx.ep_size).tolist()
        self.window_balance.append(bal)
        return bal

    def _stacked(self, placements: list) -> torch.Tensor:
        """[L, R] phy2log of these Placement objects, stacked again only when one of them is a new
        object (set_placement installs a new Placement; none is changed in place)."""
        prev = self._snap_placements
        if prev is None or not all(a is b for a, b in zip(prev, placements)):
            self._snap_placements, self._snap_phy2log = placements, torch.stack([p.phy2log for p in placements])
        return self._snap_phy2log
