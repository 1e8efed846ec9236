"""Moving the weights of an agreed placement: at once (synchronous), or one layer per forward
boundary (asynchronous, moe_ep/migration.py). Both end in the world's vote (`Decider.agree`);
only a placement every rank proposes, with no rank failed, is installed.

The synchronous path: every rank computes the same transfer plan (`transfer.plan_transfers`),
takes its local copies and send buffers from the OLD weights, and votes go/no-go (EP all-reduce)
before any P2P message is posted; `batch_isend_irecv` moves the weights into staging buffers (a
failure on one rank inside the exchange is fatal: its peers wait until the timeout, see
docs/eplb_runtime.md); then the vote, and every rank copies staging into the live weights and
calls `layer.set_placement`, or keeps the old placement.

The mover also measures what moving costs (bandwidth, fixed overhead), for the timestep-aware
cost model (phases.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import EplbConfig
from ..migration import LayerByLayerMigration
from ..parallel import ParallelContext, new_ep_group
from ..transfer import Transfer, TransferStats, plan_transfers, summarize
from .decide import Decider, no_swap_reason


@dataclass(frozen=True)
class MoveOutcome:
    """What a move (or an ended migration) did: the rebalance record's outcome fields."""

    status: str                             # "ok", "failed" or the caller's status when nothing moved
    reason: str
    size: Optional[TransferStats]           # the moves planned (None: nothing was to move)
    time_ms: float                          # from the caller's t0 (planning included) to now
    transfer_ms: Optional[float] = None     # a synchronous move that succeeded: the P2P exchange alone
    migration: Optional[dict] = None        # an ended migration's figures (layers_moved, forwards, ...)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def record_fields(self) -> dict:
        """Keyword fields of a RebalanceRecord (record.py) for this outcome."""
        from .record import Attempted

        out = dict(status=self.status, ok=self.ok, reason=self.reason, time_ms=self.time_ms)
        if self.size is not None and self.ok:
            out.update(experts_moved=self.size.experts_moved, remote_moves=self.size.remote_moves,
                       local_copies=self.size.local_copies, bytes_moved=self.size.bytes_moved)
        elif self.size is not None:
            out["attempted"] = Attempted(self.size.experts_moved, self.size.bytes_moved)
        if self.transfer_ms is not None:
            out["transfer_ms"] = self.transfer_ms
        out.update(self.migration or {})
        return out


class WeightMover:
    """Moves `layers`' experts from one placement to another (see the module doc).

    `fault_hook(stage)` is called at "prepare" and "send" (both before the go/no-go vote) and
    "received" (after the exchange); `transfer_timeout_s` bounds the wait on the P2P exchange;
    `bandwidth_bytes_per_s` is the first guess of the cost model until a move was measured.
    """

    def __init__(self, layers: list, ctx: ParallelContext, cfg: EplbConfig, decider: Decider,
                 fault_hook: Optional[Callable[[str], None]] = None, transfer_timeout_s: Optional[float] = None,
                 bandwidth_bytes_per_s: float = 1e9):
        self.layers, self.ctx, self.decider = layers, ctx, decider
        self.fault_hook, self.transfer_timeout_s = fault_hook, transfer_timeout_s
        self.bandwidth = float(bandwidth_bytes_per_s)       # bytes/s per rank, updated by measurements
        self.overhead_s = 0.0                               # fixed cost of a switch, measured
        self._attempts = 0                                  # a fresh P2P tag per move
        # asynchronous migration (cfg.migration == "async"): the one in progress, when it started,
        # and the process group its exchange runs on (its own NCCL communicator: no queueing behind
        # the forward's all-to-alls)
        self.migration: Optional[LayerByLayerMigration] = None
        self._migration_t0 = 0.0
        self._migration_group = self._make_migration_group() if cfg.migration == "async" else None

    def _make_migration_group(self):
        """A second group over this rank's EP ranks (collective: every rank makes every group)."""
        mine = new_ep_group(self.ctx)
        if mine is None:
            return None
        # NCCL connects a group at its first call, and a first batch_isend_irecv needs every member:
        # warm it up now, so a layer whose moves involve only some ranks cannot hang the others
        dist.all_reduce(torch.zeros(1, device=self.ctx.device), group=mine)
        return mine

    def _tag(self) -> int:
        self._attempts += 1
        return 1 + self._attempts % 30000

    # ------------------------------------------------------------ at once
    def move_now(self, old: torch.Tensor, new: torch.Tensor, failed: bool, reason: str,
                 status_if_noop: str, t0: float) -> MoveOutcome:
        """Move weights for old -> new (when they differ), agree, swap or keep. Collective."""
        tag = self._tag()
        moving = not failed and not torch.equal(new, old)
        transfer, st, t_p2p = None, None, 0.0
        if moving:
            moves = plan_transfers(old, new, self.ctx.ep_size)
            st = summarize(moves, self.layers, self.ctx.ep_size)
            transfer = Transfer(self.layers, moves, self.ctx.ep_rank, self.ctx.ep_group, tag=tag,
                                timeout_s=self.transfer_timeout_s, fault_hook=self.fault_hook)
            ok = 1
            try:
                transfer.prepare()
            except Exception as err:
                ok, reason = 0, f"prepare failed on EP rank {self.ctx.ep_rank}: {type(err).__name__}: {err}"
            # go/no-go before any message is posted: a peer that cannot send must not leave
            # the others waiting on a receive.
            flag = self.decider.all_reduce(self.decider.ctl([ok]), dist.ReduceOp.MIN,
                                           groups=(self.ctx.ep_group,)).cpu()
            if int(flag[0]) == 1:
                # from here a one-sided failure inside the exchange leaves peers waiting on their
                # receives until transfer_timeout_s: fatal for the job (docs/eplb_runtime.md)
                try:
                    tp = time.perf_counter()
                    transfer.run()
                    if self.ctx.device.type == "cuda":   # NCCL waits are stream-ordered: time the data
                        torch.cuda.synchronize(self.ctx.device)
                    t_p2p = time.perf_counter() - tp
                except Exception as err:
                    ok, reason = 0, f"transfer failed on EP rank {self.ctx.ep_rank}: {type(err).__name__}: {err}"
            else:
                ok = 0
                reason = reason or "prepare failed on another EP rank"
            failed = not ok
        any_failed, same = self.decider.agree(failed, new if moving else old)
        if moving and not any_failed and same:
            transfer.commit(new)
            if st.max_rank_bytes and t_p2p > 0:
                self.bandwidth = 0.5 * self.bandwidth + 0.5 * st.max_rank_bytes / t_p2p
            time_ms = (time.perf_counter() - t0) * 1e3
            self.overhead_s = max(0.0, time_ms / 1e3 - st.max_rank_bytes / max(self.bandwidth, 1.0))
            # transfer_ms: the point-to-point exchange alone (GPU: synchronised)
            return MoveOutcome("ok", "", st, time_ms, transfer_ms=t_p2p * 1e3)
        if transfer is not None:
            transfer.clear()
        reason = no_swap_reason(any_failed, same, failed, reason,
                                "failed on another rank" if moving else "failed on another data-parallel replica")
        status = "failed" if (any_failed or not same) else status_if_noop
        return MoveOutcome(status, reason, st, (time.perf_counter() - t0) * 1e3)

    # ------------------------------------------------------------ layer by layer
    def start_migration(self, old: torch.Tensor, new: torch.Tensor, failed: bool, reason: str,
                        status_if_noop: str, t0: float) -> Optional[MoveOutcome]:
        """Agree on `new` first (the same vote as `move_now`), then start moving it one layer per
        forward boundary (`step_migration`). -> None when the migration started, else the
        outcome of an attempt that moves nothing. Collective."""
        tag = self._tag()
        moving = not failed and not torch.equal(new, old)
        any_failed, same = self.decider.agree(failed, new if moving else old)
        if moving and not any_failed and same:
            moves = plan_transfers(old, new, self.ctx.ep_size)
            group = self._migration_group if self._migration_group is not None else self.ctx.ep_group
            self.migration = LayerByLayerMigration(
                self.layers, moves, new, self.ctx.ep_rank, self.ctx.ep_size, group, self.decider.vote_max,
                tag=tag, timeout_s=self.transfer_timeout_s, fault_hook=self.fault_hook)
            self._migration_t0 = t0
            return None
        reason = no_swap_reason(any_failed, same, failed, reason, "failed on another data-parallel replica")
        status = "failed" if (any_failed or not same) else status_if_noop
        return MoveOutcome(status, reason, None, (time.perf_counter() - t0) * 1e3)

    def step_migration(self) -> Optional[MoveOutcome]:
        """Move the next layer of the migration in progress (collective); -> its outcome once it
        has ended (committed or failed), else None."""
        mig = self.migration
        if not mig.step():
            return None
        self.migration = None
        figures = dict(layers_moved=len(mig.committed), stall_ms_per_forward=float(np.mean(mig.stall_s)) * 1e3,
                       stall_ms_max=float(np.max(mig.stall_s)) * 1e3, forwards=len(mig.stall_s),
                       peak_staging_bytes=mig.peak_staging_bytes)
        time_ms = (time.perf_counter() - self._migration_t0) * 1e3
        if not mig.failed_reason:
            return MoveOutcome("ok", "", mig.stats, time_ms, migration=figures)
        reason = mig.failed_reason
        if mig.committed:
            reason += f" (layers {mig.committed} were moved and keep the new placement)"
        return MoveOutcome("failed", reason, mig.stats, time_ms, migration=figures)
