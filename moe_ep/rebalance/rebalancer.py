"""The rebalancer: the statistics window cadence, the attempts and their records.

Sequence of one rebalance attempt (all ranks of the world call `after_forward` after every
forward pass of the transformer; see docs/eplb_runtime.md):

1. The statistics window is all-reduced over the EP and DP groups when it closes, so every
   rank holds the same load matrix.
2. Deciding (decide.py): rank 0 of each EP group plans from that window, with the current
   placement as `previous_phy2log`; it checks the predicted gain against `min_gain` and
   broadcasts [status, phy2log] over its EP group. Each DP replica's EP group plans on its own
   from identical inputs; the final vote checks that all replicas ended up with the same placement.
3. Moving (move.py): the weights move at once, or layer by layer (`eplb.migration = "async"`),
   and every rank installs the placement only when the vote over the world agreed.
4. Timestep phases (phases.py, `eplb.timestep_aware`): one plan per timestep bucket, switched to
   at a bucket boundary when the predicted saving beats the cost of moving.

Every outcome is a frozen `RebalanceRecord` (record.py); `events` holds the latest of each
attempt, and `on_measured` listeners get the record made when a move's balancedness was measured.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import numpy as np
import torch

from ..config import EplbConfig
from ..parallel import ParallelContext, error_on_any_rank
from ..stats import ExpertLoadStats
from .balancedness import layer_balancedness
from .decide import FAILED, GO, SKIP, Decider, Planner
from .move import MoveOutcome, WeightMover
from .phases import PhaseSwitcher
from .placement_file import read_placement_file
from .record import Balancedness, RebalanceRecord


class Rebalancer:
    """Owns the statistics window cadence and the placement of `layers` (see module doc).

    planner: see `Decider` (default `eplb.rebalance_experts`). Options for tests and benchmarks:
    `force` (rebalance at every interval whatever the predicted gain), `fault_hook(stage)` (called
    at "plan" (EP rank 0 only), "prepare" and "send" (both before the go/no-go vote), "received"
    (after the exchange); raising there is a failure of that stage), `transfer_timeout_s` (wait on
    the P2P exchange), `bandwidth_bytes_per_s` (first guess for the timestep-aware cost model
    before a transfer was measured), `moe_time_fraction` (share of a forward's time spent in MoE
    layers, for the same model).
    """

    def __init__(self, layers: list, ctx: ParallelContext, cfg: EplbConfig, stats: ExpertLoadStats,
                 planner: Optional[Planner] = None, *, force: bool = False,
                 fault_hook: Optional[Callable[[str], None]] = None, transfer_timeout_s: Optional[float] = None,
                 bandwidth_bytes_per_s: float = 1e9, moe_time_fraction: float = 1.0):
        if not layers:
            raise ValueError("Rebalancer needs at least one MoE layer")
        idx = sorted(layer.layer_idx for layer in layers)
        if idx != list(range(len(layers))):
            raise ValueError(f"MoE layers must have layer_idx 0..{len(layers) - 1} (stats rows); got {idx}")
        self.layers = sorted(layers, key=lambda m: m.layer_idx)
        first = self.layers[0]
        self.num_experts, self.num_slots = first.cfg.num_experts, first.num_slots
        if any(m.num_slots != self.num_slots or m.cfg.num_experts != self.num_experts for m in self.layers):
            raise ValueError("all MoE layers must have the same experts and slots")
        if stats.num_layers != len(layers) or stats.num_experts != self.num_experts:
            raise ValueError(f"stats has {stats.num_layers} layers x {stats.num_experts} experts; "
                             f"the model has {len(layers)} x {self.num_experts}")
        self.ctx, self.cfg, self.stats, self.force = ctx, cfg, stats, force
        stats.on_window_closed.append(self._on_window_closed)   # also the last, partial window
        for m in self.layers:
            if m.stats is None:
                m.stats = stats
        self.decider = Decider(ctx, cfg, len(self.layers), self.num_experts, self.num_slots, planner, fault_hook)
        self.phases = PhaseSwitcher(self.layers, ctx, stats, self.decider, moe_time_fraction)
        self.events: list[RebalanceRecord] = []             # the latest record of every attempt, in order
        self.on_measured: list[Callable[[RebalanceRecord], None]] = []
        self._pending_measure: list[tuple[int, int]] = []   # (index in events, clean windows to wait for)
        self._migrating: Optional[int] = None               # index in events of the migration in progress
        self._forwards = 0
        self.mover = WeightMover(self.layers, ctx, cfg, self.decider, fault_hook, transfer_timeout_s,
                                 bandwidth_bytes_per_s)     # collective with migration "async"

    # ------------------------------------------------------------ state
    def current_phy2log(self) -> torch.Tensor:
        """[L, R] int64: the placement in effect."""
        return torch.stack([m.placement.phy2log for m in self.layers])

    @property
    def migration(self):
        """The asynchronous migration in progress (moe_ep.migration.LayerByLayerMigration) or None."""
        return self.mover.migration

    @property
    def phase_plans(self) -> Optional[torch.Tensor]:
        """[B, L, R] the timestep-aware placement of each bucket, once planned."""
        return self.phases.plans

    def _record(self, record: RebalanceRecord, index: Optional[int] = None) -> RebalanceRecord:
        """Keep `record` as its attempt's latest (a new attempt when `index` is None); a move that
        succeeded waits for its measurement on the first window that starts after it."""
        if index is None:
            self.events.append(record)
            index = len(self.events) - 1
        else:
            self.events[index] = record
        if record.ok:
            self._pending_measure.append((index, 1 if self.stats.window_open else 0))
        return record

    # ------------------------------------------------------------ main entry
    def after_forward(self, forward_idx: int, timestep: float = 0.0,
                      next_timestep: Optional[float] = None) -> Optional[RebalanceRecord]:
        """Call on every rank after every forward pass of the transformer (collective).

        Closes the statistics window when it is due (do not call `stats.end_forward`
        yourself), measures balancedness of earlier moves, and every `cfg.interval` forwards
        attempts a rebalance. With `cfg.timestep_aware` it replans per-timestep-bucket placements
        at the interval and switches placement when the bucket of `next_timestep` (default: this
        forward's `timestep`) has a placement whose predicted saving beats the cost of moving
        weights. Returns the record of an attempt made now, or of an asynchronous migration that
        ended now (`ends_migration`: a new record with its outcome), else None.
        """
        self.phases.forward_ended(self.stats.bucket_of(timestep))
        self._forwards += 1
        self.stats.end_forward(self.decider.groups)          # a closing window measures earlier moves
        record = None
        if self.mover.migration is not None:
            record = self._step_migration()
        elif self.cfg.enabled:
            aware = self.cfg.timestep_aware and self.stats.timestep_buckets > 1
            if self._forwards % self.cfg.interval == 0:
                record = self.plan_phases(forward_idx) if aware else self.rebalance_now(forward_idx)
            if aware and self.phases.plans is not None:
                nxt = timestep if next_timestep is None else next_timestep
                record = self._maybe_switch_phase(forward_idx, self.stats.bucket_of(nxt)) or record
        self.phases.next_forward_starts()   # time spent rebalancing is not forward time
        return record

    def _on_window_closed(self) -> None:
        """A window closed: moves waiting for it get a new record with their measured balancedness."""
        if not self._pending_measure:
            return
        load = self.stats.windows[-1].astype(np.float64)
        measured, still = [], []
        for index, skip in self._pending_measure:
            (still if skip > 0 else measured).append((index, skip - 1))
        self._pending_measure = still
        if not measured:
            return
        now = Balancedness.of(layer_balancedness(load, self.current_phy2log(), self.ctx.ep_size))
        for index, _ in measured:
            record = self.events[index] = dataclasses.replace(self.events[index], measured_balancedness=now)
            for listener in self.on_measured:
                listener(record)

    # ------------------------------------------------------------ periodic rebalance
    def rebalance_now(self, forward_idx: int = -1, trigger: str = "interval",
                      load: Optional[np.ndarray] = None) -> Optional[RebalanceRecord]:
        """Plan from `load` (default: the last closed window, or the stats seed) and move.
        Collective over the world. Returns the record, or None when there is no load yet."""
        load = self.stats.last_window_load() if load is None else np.asarray(load, dtype=np.float64)
        if load is None:
            return None
        t0 = time.perf_counter()
        old = self.current_phy2log()
        L, R = old.shape

        def decide():
            new = self.decider.plan(load, old)
            before = layer_balancedness(load, old, self.ctx.ep_size).mean()
            after = layer_balancedness(load, new, self.ctx.ep_size).mean()
            if torch.equal(new, old):
                return SKIP, new, "placement unchanged"
            if self.force or after - before >= self.cfg.min_gain:
                return GO, new, ""
            return SKIP, new, f"predicted gain {after - before:.4f} < min_gain {self.cfg.min_gain}"

        # status is the same on every rank of this EP group; the P2P exchange and its go/no-go
        # vote stay inside the EP group, and every rank of the world meets again in the final vote
        # (a replica that failed or skipped proposes the old placement, so nobody swaps then).
        status, payload, reason = self.decider.decide_on_ep0(L * R, decide, "planning")
        new = payload.view(L, R).clone() if status != FAILED else old
        attempt = dict(forward_idx=int(forward_idx), trigger=trigger,
                       balancedness_before=Balancedness.of(layer_balancedness(load, old, self.ctx.ep_size)),
                       balancedness_after=(Balancedness.of(layer_balancedness(load, new, self.ctx.ep_size))
                                           if status != FAILED else None))
        return self._execute(attempt, old, new if status == GO else old, failed=status == FAILED,
                             reason=reason, status_if_noop="failed" if status == FAILED else "skipped", t0=t0,
                             allow_async=trigger == "interval")

    def _execute(self, attempt: dict, old: torch.Tensor, new: torch.Tensor, failed: bool, reason: str,
                 status_if_noop: str, t0: float, allow_async: bool = False) -> RebalanceRecord:
        """Move weights for old -> new (when they differ), agree, swap or keep; -> the record of
        `attempt` (its RebalanceRecord fields so far) with the outcome. Collective.
        `allow_async`: periodic rebalances may migrate layer by layer (eplb.migration = "async");
        start-up placements and timestep-phase switches are always moved at once."""
        if allow_async and self.cfg.migration == "async":
            return self._start_migration(attempt, old, new, failed, reason, status_if_noop, t0)
        outcome = self.mover.move_now(old, new, failed, reason, status_if_noop, t0)
        return self._record(RebalanceRecord(**attempt, **outcome.record_fields()))

    # ------------------------------------------------------------ asynchronous migration
    def _start_migration(self, attempt: dict, old: torch.Tensor, new: torch.Tensor, failed: bool, reason: str,
                         status_if_noop: str, t0: float) -> RebalanceRecord:
        """Agree on `new` first, then move it in one layer per forward boundary (moe_ep.migration):
        -> the record of its start (status "migrating"), or of an attempt that moved nothing."""
        outcome: Optional[MoveOutcome] = self.mover.start_migration(old, new, failed, reason, status_if_noop, t0)
        if outcome is not None:
            return self._record(RebalanceRecord(**attempt, **outcome.record_fields()))
        start = self._record(RebalanceRecord(**attempt, status="migrating", migration="async"))
        self._migrating = len(self.events) - 1
        # prepare and post the first layer now; a migration that ends there (a failure) was never
        # reported as started: its end record is the attempt
        return self._step_migration(start_reported=False) or start

    def _step_migration(self, start_reported: bool = True) -> Optional[RebalanceRecord]:
        """Move the next layer of the migration in progress; -> a new record of its attempt once
        the migration has ended (committed or failed), else None."""
        outcome = self.mover.step_migration()
        if outcome is None:
            return None
        index, self._migrating = self._migrating, None
        end = dataclasses.replace(self.events[index], ends_migration=start_reported, **outcome.record_fields())
        return self._record(end, index)

    def finish_migration(self) -> None:
        """Complete a migration in progress (collective; call before the run ends)."""
        while self.mover.migration is not None:
            self._step_migration()

    # ------------------------------------------------------------ static placement
    def load_placement_file(self, path: str) -> RebalanceRecord:
        """Install a placement planned offline (`python -m eplb plan`). Collective.

        Every rank reads and validates the file against this run (layers, experts, slots,
        EP size) before any work; if it is bad on any rank, every rank raises ValueError.
        Weights move from their current holders like in a rebalance.
        """
        err, new = None, None
        try:
            new = read_placement_file(path, len(self.layers), self.num_experts, self.num_slots, self.ctx.ep_size)
        except ValueError as e:
            err = str(e)
        err = error_on_any_rank(err, self.ctx)
        if err is not None:
            raise ValueError(err)   # names the file (and the rank, when it failed on another one)
        t0 = time.perf_counter()
        attempt = dict(forward_idx=-1, trigger="placement_file")
        old = self.current_phy2log()
        load = self.stats.last_window_load()
        if load is not None:
            attempt.update(balancedness_before=Balancedness.of(layer_balancedness(load, old, self.ctx.ep_size)),
                           balancedness_after=Balancedness.of(layer_balancedness(load, new, self.ctx.ep_size)))
        return self._execute(attempt, old, new, failed=False, reason="", status_if_noop="skipped", t0=t0)

    # ------------------------------------------------------------ timestep-aware placement
    def plan_phases(self, forward_idx: int = -1) -> Optional[RebalanceRecord]:
        """Plan one placement per timestep bucket (PhaseSwitcher.plan); -> a "phase_plan" record
        when planning failed (no plans installed), else None. Collective."""
        reason = self.phases.plan(self.current_phy2log())
        if reason is None:
            return None
        return self._record(RebalanceRecord(int(forward_idx), "phase_plan", status="failed", reason=reason))

    def _maybe_switch_phase(self, forward_idx: int, bucket: int) -> Optional[RebalanceRecord]:
        """Switch to the placement of `bucket` if the predicted saving over the phase beats the
        cost of moving the weights (decision agreed over the world). Collective."""
        worth = self.phases.worth_switching(bucket, self.mover.bandwidth, self.mover.overhead_s, self.force)
        if worth is None:
            return None
        (old, new, bal_old, bal_new, _, _), saved, cost = worth
        t0 = time.perf_counter()
        attempt = dict(forward_idx=int(forward_idx), trigger=f"phase:{bucket}",
                       balancedness_before=Balancedness.of(bal_old), balancedness_after=Balancedness.of(bal_new),
                       predicted_saving_ms=saved * 1e3, predicted_cost_ms=cost * 1e3)
        return self._execute(attempt, old.clone(), new, failed=False, reason="", status_if_noop="skipped", t0=t0)
