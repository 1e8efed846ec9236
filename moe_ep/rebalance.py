"""Online expert-parallel load balancing: stats window -> plan -> transfer -> atomic swap.

Sequence of one rebalance attempt (all ranks of the world call `after_forward` after
every forward pass of the transformer; see docs/eplb_runtime.md):

1. The statistics window is all-reduced over the EP and DP groups when it closes, so
   every rank holds the same load matrix.
2. Rank 0 of each EP group plans with the planner (`eplb.rebalance_experts`) from that
   window, with the current placement as `previous_phy2log`; it checks the predicted
   gain against `min_gain` and broadcasts [status, phy2log] over its EP group. Each DP
   replica's EP group plans on its own from identical inputs; the final agreement step
   checks that all replicas ended up with the same placement.
3. Every rank computes the same transfer plan (`transfer.plan_transfers`), takes its
   local copies and send buffers from the OLD weights, and votes go/no-go (EP
   all-reduce) before any P2P message is posted.
4. `batch_isend_irecv` moves the weights into staging buffers. A failure on one rank
   inside the exchange is fatal (its peers wait until the timeout); see the docs.
5. Agreement: one all-reduce MAX (EP, then DP) of [failed, phy2log, -phy2log]: only when
   no rank failed and max == min of every entry (every rank proposes exactly the same
   placement) does every rank copy staging into the live weights and call
   `layer.set_placement`. Otherwise the old placement stays.

Every control message is a small int64/float64 tensor made on `ctx.device` by `_ctl`
(NCCL groups reject CPU tensors) and read back with `.cpu()`. Whether a collective runs
is only ever decided from values that are already the same on every rank taking part.
"""
from __future__ import annotations

import time
import traceback
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

import eplb

from .config import EplbConfig
from .parallel import ParallelContext, error_on_any_rank, new_ep_group
from .placement import make_placement
from .stats import ExpertLoadStats
from .migration import LayerByLayerMigration
from .transfer import Transfer, plan_transfers, summarize

Planner = Callable[..., tuple]

GO, SKIP, FAILED = 1, 2, 0


# ------------------------------------------------------------ metrics and placement files (eplb)

def layer_balancedness(load, phy2log, ep_size: int) -> np.ndarray:
    """load [L, E], phy2log [L, R] -> [L] mean / max GPU load per layer (`eplb.plan_balancedness`).

    Each layer is divided by its largest load first (the ratio does not change), so loads near
    the float64 limit, which a stats file may hold, give a number instead of inf / inf = NaN."""
    load = np.asarray(load, dtype=np.float64)
    top = load.max(axis=1, keepdims=True) if load.size else np.ones((load.shape[0], 1))
    return eplb.plan_balancedness(load / np.where(top > 0, top, 1.0), phy2log, ep_size, per_layer=True).numpy()


def _summary(bal: np.ndarray) -> dict:
    return {"mean": float(np.mean(bal)), "min": float(np.min(bal))}


def read_placement_file(path: str, num_layers: int, num_experts: int, num_slots: int,
                        ep_size: int) -> torch.Tensor:
    """Read a `python -m eplb plan` placement file (`eplb.load_placement`) checked against this run.

    Returns phy2log [L, R] int64; raises ValueError naming the file and the field.
    """
    expect = {"num_layers": num_layers, "num_experts": num_experts, "num_replicas": num_slots, "num_gpus": ep_size}
    try:
        return torch.from_numpy(eplb.load_placement(path, expect=expect))
    except ValueError as err:
        raise ValueError(f"placement file {path}: {err}") from None


# ------------------------------------------------------------ the rebalancer

class Rebalancer:
    """Owns the statistics window cadence and the placement of `layers` (see module doc).

    planner(weight [L, E], num_replicas, num_groups, num_nodes, num_gpus, policy=...,
    previous_phy2log=...) -> (phy2log [L, R], log2phy, logcnt); default `eplb.rebalance_experts`.

    Options for tests and benchmarks: `force` (rebalance at every interval whatever the
    predicted gain), `fault_hook(stage)` (called at "plan" (EP rank 0 only), "prepare" and
    "send" (both before the go/no-go vote), "received" (after the exchange); raising there
    is a failure of that stage), `transfer_timeout_s` (wait on the P2P exchange), `bandwidth_bytes_per_s` (first guess for the timestep-aware cost
    model before a transfer was measured), `moe_time_fraction` (share of a forward's time
    spent in MoE layers, for the same model).
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
        self.ctx, self.cfg, self.stats = ctx, cfg, stats
        stats.on_window_closed.append(self._on_window_closed)   # also the last, partial window
        for m in self.layers:
            if m.stats is None:
                m.stats = stats
        self._planner: Planner = planner or eplb.rebalance_experts
        self.force, self.fault_hook = force, fault_hook
        self.transfer_timeout_s = transfer_timeout_s
        self.bandwidth = float(bandwidth_bytes_per_s)       # bytes/s per rank, updated by measurements
        self.overhead_s = 0.0                               # fixed cost of a switch, measured
        self.moe_time_fraction = moe_time_fraction
        self.events: list[dict] = []
        self._pending_measure: list[dict] = []              # events waiting for the next clean window
        self._forwards = 0
        self._attempts = 0
        self._ep_src = 0 if ctx.ep_group is None else dist.get_global_rank(ctx.ep_group, 0)
        # timestep-aware state
        self.phase_plans: Optional[torch.Tensor] = None    # [B, L, R]
        self._last_after = None
        self._fwd_time = None                               # EMA of seconds per forward
        self._run_bucket, self._run_len = None, 0
        self._run_lengths: dict[int, list[int]] = {}
        # per bucket: what _maybe_switch_phase derives from (phase plans, placement, loads), reused
        # while none of the three changed (see _phase_terms)
        self._phase_cache: dict[int, tuple] = {}
        # asynchronous migration (cfg.migration == "async"): the one in progress, its event, and
        # the process group its exchange runs on (its own NCCL communicator: no queueing behind
        # the forward's all-to-alls)
        self.migration: Optional[LayerByLayerMigration] = None
        self._migration_event: Optional[dict] = None
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

    # ------------------------------------------------------------ small helpers
    @property
    def groups(self):
        return (self.ctx.ep_group, self.ctx.dp_group)

    def current_phy2log(self) -> torch.Tensor:
        """[L, R] int64: the placement in effect."""
        return torch.stack([m.placement.phy2log for m in self.layers])

    def _align(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Relabel a plan's GPUs and slots so experts already in place stay, without changing any
        GPU's load (`eplb.minimize_movement`, nodes kept whole). `eplb.rebalance_experts` does this
        itself from `previous_phy2log`; other planners' plans are relabelled here."""
        if self._planner is eplb.rebalance_experts:
            return new
        P, N = self.ctx.ep_size, self.ctx.num_nodes
        return eplb.minimize_movement(new, old, P, N if P % N == 0 else 1)

    def _ctl(self, values, dtype=torch.int64) -> torch.Tensor:
        """A control message on `ctx.device` (NCCL only takes device tensors): `values` is an int
        (zeros of that length) or a sequence / tensor of numbers. Read it back with `.cpu()`."""
        if isinstance(values, int):
            return torch.zeros(values, dtype=dtype, device=self.ctx.device)
        return torch.as_tensor(values, dtype=dtype).to(self.ctx.device).flatten()

    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.MAX, groups=None) -> torch.Tensor:
        for g in (self.groups if groups is None else groups):
            if g is not None:
                dist.all_reduce(t, op=op, group=g)
        return t

    def _all_ok(self, ok: bool) -> bool:
        """True when `ok` on every rank of the world (MIN over EP, then DP). Collective."""
        return bool(self._all_reduce(self._ctl([int(ok)]), dist.ReduceOp.MIN).cpu()[0])

    def _broadcast_from_ep0(self, t: torch.Tensor) -> torch.Tensor:
        """Broadcast a `_ctl` tensor from EP rank 0; returns it on the host."""
        if self.ctx.ep_group is not None:
            dist.broadcast(t, src=self._ep_src, group=self.ctx.ep_group)
        return t.cpu()

    def _decide_on_ep0(self, size: int, decide: Callable[[], tuple], what: str) -> tuple[int, torch.Tensor, str]:
        """EP rank 0 runs `decide() -> (status, payload tensor of `size` numbers, reason)` (after the
        "plan" fault hook); every rank of the EP group gets the status and payload [size] (int64,
        on the host), and the reason when the status is not GO. A decide() that raises is FAILED,
        with "<what> failed: <error>" as the reason."""
        msg = self._ctl(1 + size)                               # [status, payload...]
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

    def _broadcast_text(self, text: str) -> str:
        if self.ctx.ep_group is None:
            return text
        box = [text]
        dist.broadcast_object_list(box, src=self._ep_src, group=self.ctx.ep_group)
        return box[0]

    def _new_event(self, forward_idx: int, trigger: str) -> dict:
        return {"forward_idx": int(forward_idx), "trigger": trigger, "status": None, "ok": False,
                "reason": "", "experts_moved": 0, "remote_moves": 0, "local_copies": 0, "bytes_moved": 0,
                "time_ms": 0.0, "balancedness_before": None, "balancedness_after": None,
                "measured_balancedness": None}

    def _plan(self, load, prev: torch.Tensor) -> torch.Tensor:
        """The planner on `load` [L, E] from placement `prev` [L, R]: validated (shape, ids, every
        expert present; ValueError otherwise) and aligned to `prev`. -> phy2log [L, R] int64 (CPU)."""
        out = self._planner(torch.as_tensor(np.asarray(load), dtype=torch.float64), self.num_slots,
                            self.cfg.num_groups, self.ctx.num_nodes, self.ctx.ep_size,
                            policy=self.cfg.policy, previous_phy2log=prev.clone())
        p = torch.as_tensor(out[0] if isinstance(out, (tuple, list)) else out, dtype=torch.int64).cpu()
        want = (len(self.layers), self.num_slots)
        if tuple(p.shape) != want:
            raise ValueError(f"planner returned phy2log of shape {tuple(p.shape)}, expected {want}")
        for l in range(p.shape[0]):
            make_placement(p[l], self.num_experts, self.ctx.ep_size, f"planned phy2log[{l}]")
        return self._align(prev, p)

    # ------------------------------------------------------------ main entry
    def after_forward(self, forward_idx: int, timestep: float = 0.0,
                      next_timestep: Optional[float] = None) -> Optional[dict]:
        """Call on every rank after every forward pass of the transformer (collective).

        Closes the statistics window when it is due (do not call `stats.end_forward`
        yourself), fills in measured balancedness of earlier events, and every
        `cfg.interval` forwards attempts a rebalance. With `cfg.timestep_aware` it
        replans per-timestep-bucket placements at the interval and switches placement
        when the bucket of `next_timestep` (default: this forward's `timestep`) has a
        placement whose predicted saving beats the cost of moving weights.
        Returns the event dict of an attempt made now, or of an asynchronous migration that
        finished now (the same dict its start returned, now with its outcome), else None.
        """
        now = time.perf_counter()
        if self._last_after is not None:
            dt = now - self._last_after
            self._fwd_time = dt if self._fwd_time is None else 0.8 * self._fwd_time + 0.2 * dt
        self._track_bucket_runs(self.stats.bucket_of(timestep))
        self._forwards += 1
        self.stats.end_forward(self.groups)          # a closing window measures earlier moves
        event = None
        if self.migration is not None:
            event = self._step_migration()
        elif self.cfg.enabled:
            aware = self.cfg.timestep_aware and self.stats.timestep_buckets > 1
            if self._forwards % self.cfg.interval == 0:
                event = self.plan_phases(forward_idx) if aware else self.rebalance_now(forward_idx)
            if aware and self.phase_plans is not None:
                nxt = timestep if next_timestep is None else next_timestep
                ev = self._maybe_switch_phase(forward_idx, self.stats.bucket_of(nxt))
                event = ev or event
        self._last_after = time.perf_counter()   # time spent rebalancing is not forward time
        return event

    def _on_window_closed(self) -> None:
        load = self.stats.windows[-1].astype(np.float64)
        still = []
        for ev in self._pending_measure:
            if ev.pop("_skip_windows", 0) > 0:
                still.append(ev)
                continue
            ev["measured_balancedness"] = _summary(layer_balancedness(load, self.current_phy2log(),
                                                                      self.ctx.ep_size))
        self._pending_measure = still

    # ------------------------------------------------------------ periodic rebalance
    def rebalance_now(self, forward_idx: int = -1, trigger: str = "interval",
                      load: Optional[np.ndarray] = None) -> Optional[dict]:
        """Plan from `load` (default: the last closed window, or the stats seed) and move.
        Collective over the world. Returns the event, or None when there is no load yet."""
        load = self.stats.last_window_load() if load is None else np.asarray(load, dtype=np.float64)
        if load is None:
            return None
        t0 = time.perf_counter()
        ev = self._new_event(forward_idx, trigger)
        old = self.current_phy2log()
        L, R = old.shape

        def decide():
            new = self._plan(load, old)
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
        status, payload, reason = self._decide_on_ep0(L * R, decide, "planning")
        new = payload.view(L, R).clone() if status != FAILED else old
        ev["balancedness_before"] = _summary(layer_balancedness(load, old, self.ctx.ep_size))
        if status != FAILED:
            ev["balancedness_after"] = _summary(layer_balancedness(load, new, self.ctx.ep_size))
        return self._execute(ev, old, new if status == GO else old, failed=status == FAILED,
                             reason=reason, status_if_noop="failed" if status == FAILED else "skipped", t0=t0,
                             allow_async=trigger == "interval")

    # ------------------------------------------------------------ agreement
    def _agree(self, failed: bool, proposal: torch.Tensor) -> tuple[bool, bool]:
        """One all-reduce MAX over the world (EP then DP) of [failed, p, -p]: -> (some rank failed,
        every rank proposes exactly this placement: max(p) == min(p) == -max(-p) entry by entry)."""
        p = proposal.flatten().to(torch.int64)
        vote = self._all_reduce(self._ctl(torch.cat([torch.tensor([int(failed)]), p, -p]))).cpu()
        n = p.numel()
        return int(vote[0]) == 1, torch.equal(vote[1:1 + n], -vote[1 + n:])

    @staticmethod
    def _no_swap_reason(any_failed: bool, same: bool, failed_here: bool, reason: str, elsewhere: str) -> str:
        """Why nothing was swapped, for the event."""
        if not any_failed and not same:
            return "replicas of the data-parallel group proposed different placements"
        if any_failed and not failed_here:
            return reason or elsewhere
        return reason

    # ------------------------------------------------------------ asynchronous migration
    def _vote_max(self, flags: list[int]) -> list[int]:
        return [int(v) for v in self._all_reduce(self._ctl(flags)).cpu().tolist()]

    def _start_migration(self, ev: dict, old: torch.Tensor, new: torch.Tensor, failed: bool, reason: str,
                         status_if_noop: str, t0: float) -> dict:
        """Agree on `new` first (the same vote as the synchronous path), then move it in one
        layer per forward boundary (moe_ep.migration). Collective."""
        self._attempts += 1
        moving = not failed and not torch.equal(new, old)
        any_failed, same = self._agree(failed, new if moving else old)
        if moving and not any_failed and same:
            moves = plan_transfers(old, new, self.ctx.ep_size)
            self.migration = LayerByLayerMigration(
                self.layers, moves, new, self.ctx.ep_rank, self.ctx.ep_size,
                self._migration_group if self._migration_group is not None else self.ctx.ep_group,
                self._vote_max, tag=1 + self._attempts % 30000, timeout_s=self.transfer_timeout_s,
                fault_hook=self.fault_hook)
            ev.update(status="migrating", ok=False, migration="async", _t0=t0)
            self._migration_event = ev
            self.events.append(ev)
            self._step_migration()          # prepare and post the first layer now
            return ev
        ev["reason"] = self._no_swap_reason(any_failed, same, failed, reason, "failed on another data-parallel replica")
        ev["status"] = "failed" if (any_failed or not same) else status_if_noop
        ev["time_ms"] = (time.perf_counter() - t0) * 1e3
        self.events.append(ev)
        return ev

    def _step_migration(self) -> Optional[dict]:
        """Move the next layer of the migration in progress; -> its event once the migration has
        ended (committed or failed), else None."""
        mig, ev = self.migration, self._migration_event
        if not mig.step():
            return None
        st = mig.stats
        stall = mig.stall_s
        ev.update(layers_moved=len(mig.committed), stall_ms_per_forward=float(np.mean(stall)) * 1e3,
                  stall_ms_max=float(np.max(stall)) * 1e3, forwards=len(stall),
                  peak_staging_bytes=mig.peak_staging_bytes)
        t0 = ev.pop("_t0")
        ev["time_ms"] = (time.perf_counter() - t0) * 1e3
        if mig.failed_reason:
            ev["status"], ev["reason"] = "failed", mig.failed_reason
            ev["attempted"] = {"experts_moved": st.experts_moved, "bytes_moved": st.bytes_moved}
            if mig.committed:
                ev["reason"] += f" (layers {mig.committed} were moved and keep the new placement)"
        else:
            ev.update(status="ok", ok=True, reason="", experts_moved=st.experts_moved,
                      remote_moves=st.remote_moves, local_copies=st.local_copies, bytes_moved=st.bytes_moved)
            ev["_skip_windows"] = 1 if self.stats.window_open else 0
            self._pending_measure.append(ev)
        self.migration, self._migration_event = None, None
        return ev

    def finish_migration(self) -> None:
        """Complete a migration in progress (collective; call before the run ends)."""
        while self.migration is not None:
            self._step_migration()

    # ------------------------------------------------------------ transfer + agreement
    def _execute(self, ev: dict, old: torch.Tensor, new: torch.Tensor, failed: bool, reason: str,
                 status_if_noop: str, t0: float, allow_async: bool = False) -> dict:
        """Move weights for old -> new (when they differ), agree, swap or keep. Collective.
        `allow_async`: periodic rebalances may migrate layer by layer (eplb.migration = "async");
        start-up placements and timestep-phase switches are always moved at once."""
        if allow_async and self.cfg.migration == "async":
            return self._start_migration(ev, old, new, failed, reason, status_if_noop, t0)
        self._attempts += 1
        moving = not failed and not torch.equal(new, old)
        transfer, st, t_p2p = None, None, 0.0
        if moving:
            moves = plan_transfers(old, new, self.ctx.ep_size)
            st = summarize(moves, self.layers, self.ctx.ep_size)
            transfer = Transfer(self.layers, moves, self.ctx.ep_rank, self.ctx.ep_group,
                                tag=1 + self._attempts % 30000, timeout_s=self.transfer_timeout_s,
                                fault_hook=self.fault_hook)
            ok = 1
            try:
                transfer.prepare()
            except Exception as err:
                ok, reason = 0, f"prepare failed on EP rank {self.ctx.ep_rank}: {type(err).__name__}: {err}"
            # go/no-go before any message is posted: a peer that cannot send must not leave
            # the others waiting on a receive.
            flag = self._all_reduce(self._ctl([ok]), dist.ReduceOp.MIN, groups=(self.ctx.ep_group,)).cpu()
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
        any_failed, same = self._agree(failed, new if moving else old)
        if moving and not any_failed and same:
            transfer.commit(new)
            ev["status"], ev["ok"] = "ok", True
            ev["_skip_windows"] = 1 if self.stats.window_open else 0
            self._pending_measure.append(ev)
            ev["transfer_ms"] = t_p2p * 1e3     # the point-to-point exchange alone (GPU: synchronised)
            if st.max_rank_bytes and t_p2p > 0:
                self.bandwidth = 0.5 * self.bandwidth + 0.5 * st.max_rank_bytes / t_p2p
        else:
            if transfer is not None:
                transfer.clear()
            reason = self._no_swap_reason(any_failed, same, failed, reason, "failed on another rank" if moving else
                                          "failed on another data-parallel replica")
            ev["status"] = "failed" if (any_failed or not same) else status_if_noop
        ev["reason"] = reason
        if st is not None and ev["ok"]:
            ev.update(experts_moved=st.experts_moved, remote_moves=st.remote_moves,
                      local_copies=st.local_copies, bytes_moved=st.bytes_moved)
        elif st is not None:
            ev["attempted"] = {"experts_moved": st.experts_moved, "bytes_moved": st.bytes_moved}
        ev["time_ms"] = (time.perf_counter() - t0) * 1e3
        if st is not None and ev["ok"]:
            self.overhead_s = max(0.0, ev["time_ms"] / 1e3 - st.max_rank_bytes / max(self.bandwidth, 1.0))
        self.events.append(ev)
        return ev

    # ------------------------------------------------------------ static placement
    def load_placement_file(self, path: str) -> dict:
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
        ev = self._new_event(-1, "placement_file")
        old = self.current_phy2log()
        load = self.stats.last_window_load()
        if load is not None:
            ev["balancedness_before"] = _summary(layer_balancedness(load, old, self.ctx.ep_size))
            ev["balancedness_after"] = _summary(layer_balancedness(load, new, self.ctx.ep_size))
        return self._execute(ev, old, new, failed=False, reason="", status_if_noop="skipped", t0=t0)

    # ------------------------------------------------------------ timestep-aware placement
    def _track_bucket_runs(self, bucket: int) -> None:
        if bucket == self._run_bucket:
            self._run_len += 1
            return
        if self._run_bucket is not None:
            self._run_lengths.setdefault(self._run_bucket, []).append(self._run_len)
        self._run_bucket, self._run_len = bucket, 1

    def forwards_per_phase(self, bucket: int) -> float:
        """Mean number of consecutive forwards spent in `bucket` (observed)."""
        runs = self._run_lengths.get(bucket, [])[-8:]
        if not runs:
            return float(max(self._run_len if bucket == self._run_bucket else 1, 1))
        return float(np.mean(runs))

    def plan_phases(self, forward_idx: int = -1) -> Optional[dict]:
        """EP rank 0 plans one placement per timestep bucket from the bucketed load and
        broadcasts them; nothing moves here (switches happen at bucket boundaries)."""
        bl = self.stats.bucket_load()                          # [B, L, E]
        if bl is None:
            return None
        B = bl.shape[0]
        old = self.current_phy2log()
        L, R = old.shape

        def decide():
            plans, prev = [None] * B, old
            total = bl.sum(0)
            for b in reversed(range(B)):                       # sampling runs from t=1 down to t=0
                plans[b] = prev = self._plan(bl[b] if bl[b].sum() > 0 else total, prev)
            return GO, torch.stack(plans), ""

        status, plans, reason = self._decide_on_ep0(B * L * R, decide, "phase planning")
        ok_here = status == GO
        # Installed phase plans decide, at every forward, whether this rank enters the collectives
        # of _maybe_switch_phase, so every rank of the world must install exactly the same plans or
        # none: one all-reduce MAX of [failed, plans, -plans] over EP and DP.
        any_failed, same = self._agree(not ok_here, plans)
        if any_failed or not same:
            if not reason:
                reason = "phase planning failed on another data-parallel replica" if any_failed else \
                    "replicas of the data-parallel group planned different phase placements"
            ev = self._new_event(forward_idx, "phase_plan")
            ev.update(status="failed", reason=reason)
            self.events.append(ev)
            return ev
        self.phase_plans = plans.view(B, L, R).clone()
        return None

    def _phase_terms(self, bucket: int) -> Optional[tuple]:
        """What `_maybe_switch_phase` derives for `bucket` from the phase plans, the placement in
        effect and the bucketed load: None when the bucket's plan is the current placement, else
        (old [L, R], new [L, R], bal_old [L], bal_new [L], ratio, max_rank_bytes). Cached per bucket
        and recomputed only when the phase plans (object), any layer's placement (object) or the
        loads (`stats.version`) changed, so a forward with nothing new costs O(L), not O(L * R)."""
        plans = self.phase_plans
        placements = [m.placement for m in self.layers]
        hit = self._phase_cache.get(bucket)
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
        self._phase_cache[bucket] = ((plans, placements, self.stats.version), terms)
        return terms

    def _maybe_switch_phase(self, forward_idx: int, bucket: int) -> Optional[dict]:
        """Switch to the placement of `bucket` if the predicted saving over the phase
        beats the cost of moving the weights (decision agreed over the world).

        Whether the decision collective runs depends only on the phase plans and the placement,
        the same on every rank; the load-derived terms come from `_phase_terms` (cached)."""
        terms = self._phase_terms(bucket)
        if terms is None:
            return None
        old, new, bal_old, bal_new, ratio, max_rank_bytes = terms
        t_moe = (self._fwd_time or 0.0) * self.moe_time_fraction
        saved = max(0.0, t_moe * (1.0 - ratio)) * self.forwards_per_phase(bucket)
        cost = self.overhead_s + max_rank_bytes / max(self.bandwidth, 1.0)
        # the slowest rank's view decides, the same on every rank
        d = self._all_reduce(self._ctl([saved, cost], torch.float64)).cpu()
        saved, cost = float(d[0]), float(d[1])
        if not (self.force or saved > cost):
            return None
        t0 = time.perf_counter()
        ev = self._new_event(forward_idx, f"phase:{bucket}")
        ev.update(predicted_saving_ms=saved * 1e3, predicted_cost_ms=cost * 1e3,
                  balancedness_before=_summary(bal_old), balancedness_after=_summary(bal_new))
        return self._execute(ev, old.clone(), new, failed=False, reason="", status_if_noop="skipped", t0=t0)
