"""Run telemetry: per-step records (metrics.jsonl), wandb (offline by default, rank 0 only) and
summary.json; the matplotlib plots it logs at the end are moe_ep/plots.py's.

The runner calls one object at fixed points (docs/dashboards.md lists every key):

    telemetry = Telemetry(cfg, ctx, out_dir)     # every rank; rank 0 opens metrics.jsonl and wandb
    telemetry.attach(model, stats)               # one PhaseTimer on every MoE layer and attention block
    ... per forward, on every rank:  telemetry.log_rebalance(record)  (when there was an attempt)
                                     telemetry.log_measured(record)   (rebalancer.on_measured, rank 0)
                                     telemetry.log_step(record)      (collective: one all_gather)
    telemetry.log_images(paths, captions)        # rank 0
    telemetry.finish(summary)                    # every rank; rank 0 writes summary.json
    telemetry.abort()                            # error path (run()'s except): rank 0 closes the
                                                 # wandb run with exit code 1; never raises

Cost per forward: the phase timers (wall clock on CPU, CUDA events read once per step),
one all_gather of a [6] float64 tensor over the world, and on rank 0 one json line; the
`wandb.log` calls happen on a writer thread in online mode; in offline mode they are deferred
and written in chunks of `DEFER_LIMIT` items (a short stall once per DEFER_LIMIT forwards) and
at the end. The per-window load heatmap is drawn with numpy (no matplotlib while sampling),
for at most ~64 windows of a run (`window_has_media`); the matplotlib plots are drawn once,
in `finish`, after sampling.
"""
from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
import warnings
from typing import Optional

import numpy as np

from .atomic import write_json_atomic
from .config import Config
from .parallel import ParallelContext
from .plots import fig_to_array, plot_balancedness, plot_latency, plot_load_heatmap
from .timing import ALL_PHASES, PHASES

METRICS_FILE = "metrics.jsonl"
HEATMAP_CELL_PX = 12                                               # inline heatmap: pixels per cell
MEDIA_WINDOWS_ALL = 16      # windows 0..15 all get load/heatmap + load/table ...
MEDIA_PER_OCTAVE = 4        # ... then 4 evenly spaced windows in each [2^j, 2^(j+1)): <= 64 up to 65,536 windows
ABORT_BUDGET_S = 20.0       # abort(): at most this long writing deferred wandb items


def window_has_media(window: int) -> bool:
    """Whether window `window` gets the load/heatmap and load/table media: every window below
    MEDIA_WINDOWS_ALL, then the multiples of 2^j / MEDIA_PER_OCTAVE in [2^j, 2^(j+1))
    (16, 20, 24, 28, 32, 40, ..., 56, 64, 80, ...). Scalars are logged for every window."""
    if window < MEDIA_WINDOWS_ALL:
        return True
    stride = max(1, (1 << (window.bit_length() - 1)) // MEDIA_PER_OCTAVE)
    return window % stride == 0


def close_wandb_run(run, exit_code: Optional[int] = None) -> None:
    """Finish `run` and wait until its records are on disk. run.finish() hands the last records
    to wandb's service process, which writes them after finish() returns: an offline run file read
    right after it held only its header once in about 12 aborts, and a launcher that kills the
    job after a failure would lose them. wandb.teardown() waits for the service (a later
    wandb.init in this process starts a new one)."""
    import wandb

    run.finish(exit_code=exit_code)
    if wandb.run is None:     # not while another run is open in this process (a user's): it would end too
        wandb.teardown(exit_code)


class Telemetry:
    DEFER_LIMIT = 256   # offline: deferred wandb items written (synchronously, in log_step) once this many

    def __init__(self, cfg: Config, ctx: ParallelContext, out_dir: str):
        self.cfg, self.ctx, self.out_dir = cfg, ctx, out_dir
        self.run = None
        self.timer = None
        self.stats = None
        self.t0 = time.perf_counter()
        self._metrics = None
        self._last_step = -1
        self._rebalances: list = []               # RebalanceRecords of attempts, for the next record
        self._measured: list = []                 # RebalanceRecords of moves measured since the last record
        self._phase_sum = np.zeros(len(ALL_PHASES))  # mean over ranks, summed over forwards
        # the phases a record gives: "attention" only where blocks time it (not under
        # model.compile, where it is fused with its neighbours, nor in diffusers models);
        # untimed time counts in "other"
        self.shown_phases: tuple[str, ...] = ALL_PHASES
        self._phase_rank_sum: Optional[np.ndarray] = None  # [world, phases + latency]
        self._forwards = 0
        self._cmap = None
        self._queue: Optional[queue.Queue] = None     # wandb work for the writer thread
        self._writer: Optional[threading.Thread] = None
        self._deferred: list[tuple] = []               # offline: wandb items logged in finish()
        self._log_s = 0.0                              # rank 0: seconds spent in log_step (sampling thread)
        self._flush_s = 0.0                            # rank 0: of which writing deferred chunks to wandb
        self._flushes = 0
        try:
            if ctx.is_main:
                try:
                    self._open(cfg, out_dir)
                except BaseException:
                    self.abort()   # close what _open got to (metrics.jsonl, the wandb run)
                    raise
        finally:
            # rank 0 may spend seconds in wandb.init: start sampling together, so the first
            # forward's timings do not include the other ranks waiting in its all-to-all.
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()
        self.t0 = time.perf_counter()

    def _open(self, cfg: Config, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        try:
            self._metrics = open(os.path.join(out_dir, METRICS_FILE), "w", buffering=1)  # a run starts it afresh
        except OSError as err:  # telemetry never stops a run
            warnings.warn(f"{METRICS_FILE} not written: {err}")
            self._metrics = None
        t = cfg.telemetry
        if t.wandb and t.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            try:
                import wandb

                self.run = wandb.init(mode=t.wandb_mode, dir=out_dir, project=t.project, name=t.run_name,
                                      tags=list(t.tags) or None, config=cfg.to_dict(),
                                      # a run of its own even where one is open in this process (a user's
                                      # script, another job): "return_previous" would log into that one
                                      reinit="create_new",
                                      settings=wandb.Settings(console="off", x_disable_stats=True))
            except Exception as err:  # telemetry never stops a run
                warnings.warn(f"wandb disabled: {err}")
                self.run = None
        if self.run is not None:
            self._heatmap_array(np.zeros((1, 1)))     # import the colour map now, not while sampling
            if t.wandb_mode == "online":
                # Live dashboards: a writer thread calls wandb while sampling goes on.
                self._queue = queue.Queue()
                self._writer = threading.Thread(target=self._write_loop, name="moe-ep-wandb", daemon=True)
                self._writer.start()
            # Offline: the run is uploaded later anyway, so its wandb history is written after
            # sampling, in the same order and with the same steps. Logging while sampling cost
            # 17% of a quickstart step on 2 CPU cores (wandb's Python side and its service
            # process compete with the ranks; docs/dashboards.md).

    def _submit(self, item: tuple) -> None:
        if self._queue is not None:
            self._queue.put(item)
        else:
            self._deferred.append(item)

    def _log_item(self, item: tuple) -> None:
        """("step", record, window load or None, step) or ("images", paths, captions, step)."""
        import wandb

        try:
            if item[0] == "step":
                _, rec, window_load, step = item
                media = self._window_media(window_load, rec["window"]) if window_load is not None else {}
                self.run.log({**rec, **media}, step=step)
            else:
                _, paths, captions, step = item
                self.run.log({"images": [wandb.Image(p, caption=c) for p, c in zip(paths, captions)]}, step=step)
        except Exception as err:  # telemetry never stops a run
            warnings.warn(f"wandb.log failed: {err}")

    def _write_loop(self) -> None:
        """The writer thread (online mode): builds wandb media and calls run.log, so the
        sampling thread only enqueues (wandb.log costs ~2 ms a call)."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._log_item(item)

    def _drain(self) -> None:
        """Everything submitted so far is in wandb when this returns."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
            self._queue = None
        self._flush_deferred()

    def _flush_deferred(self, deadline: Optional[float] = None) -> int:
        """Log the deferred items in order (until `deadline`, time.monotonic()); -> items dropped."""
        items, self._deferred = self._deferred, []
        for i, item in enumerate(items):
            if deadline is not None and time.monotonic() > deadline:
                return len(items) - i
            self._log_item(item)
        return 0

    # ------------------------------------------------------------ hooks
    def attach(self, model, stats=None) -> None:
        """Put one PhaseTimer on every MoE layer (router, dispatch, experts, combine) and on the
        blocks that time "attention"; keep `stats` for the per-window load heatmap. `model` is a
        served model (moe_ep.models.base.ServedModel: `moe_layers()`, `attention_blocks()`) or any
        object with `moe_layers()` and optionally `blocks`. A model whose `phase_timing()` is False
        (its forward replays from a CUDA graph) gets no timers: its records show latency alone."""
        from .timing import PhaseTimer

        self.stats = stats
        if hasattr(model, "phase_timing") and not model.phase_timing():   # a CUDA-graph forward: latency only
            self.timer, self.shown_phases = None, ("other",)
            return
        self.timer = PhaseTimer(self.ctx.device)
        blocks = model.attention_blocks() if hasattr(model, "attention_blocks") else getattr(model, "blocks", [])
        for block in blocks:
            block.timer = self.timer
        self.shown_phases = tuple(p for p in ALL_PHASES if blocks or p != "attention")
        for layer in model.moe_layers():
            layer.timer = self.timer

    def _gather_phases(self, latency_ms: float) -> np.ndarray:
        """-> [world, len(PHASES) + 1]: every rank's phase milliseconds of this forward and its
        step latency. Collective (one all_gather over the world) when the world is > 1."""
        phases = {}
        if self.timer is not None:
            phases = self.timer.collect()
            self.timer.reset()
        row = [phases.get(p, 0.0) for p in PHASES] + [float(latency_ms)]
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dev = self.ctx.device if self.ctx.device.type == "cuda" else torch.device("cpu")
            mine = torch.tensor(row, dtype=torch.float64, device=dev)                  # [P+1]
            parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, mine)
            return torch.stack(parts).cpu().numpy()                                    # [world, P+1]
        return np.asarray([row], dtype=np.float64)

    def log_step(self, data: dict) -> None:
        """One forward's record (every rank calls it: it gathers the phase timings). Rank 0
        adds phases, rebalance and window data, appends it to metrics.jsonl and logs to wandb."""
        per_rank = self._gather_phases(data.get("latency_ms", 0.0))                  # [world, P+1]
        if not self.ctx.is_main:
            return
        t_in = time.perf_counter()
        rec = {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None}
        rec["time_s"] = time.perf_counter() - self.t0
        rec.update(self._phase_fields(per_rank))
        rec.update(self._rebalance_step_fields())
        window_load = self._window_fields(rec, data)
        self._write_metrics(rec)
        step = int(rec.get("forward", self._last_step + 1))
        self._last_step = max(self._last_step, step)
        if self.run is not None:
            self._submit(("step", rec, window_load, step))
        t_flush = time.perf_counter()
        self._log_s += t_flush - t_in
        if self._queue is None and len(self._deferred) >= self.DEFER_LIMIT:
            self._flush_deferred()     # bounded memory: a stall of ~2 ms per item, once per DEFER_LIMIT forwards
            self._flush_s += time.perf_counter() - t_flush
            self._flushes += 1

    def _phase_fields(self, per_rank: np.ndarray) -> dict:
        """per_rank [world, P+1] (phase ms, then latency) -> the phase_ms/* and rank{r}/* keys of
        this forward; adds it to the run's phase totals."""
        out = {}
        timed = per_rank[:, :len(PHASES)]
        other = np.maximum(per_rank[:, -1] - timed.sum(1), 0.0)                      # [world]
        full = np.concatenate([timed, other[:, None]], axis=1)                       # [world, 6]
        shown = [(i, p) for i, p in enumerate(ALL_PHASES) if p in self.shown_phases]
        for i, p in shown:
            out[f"phase_ms/{p}"] = float(full[:, i].mean())
            out[f"phase_ms_max/{p}"] = float(full[:, i].max())
        for r in range(per_rank.shape[0]):
            out[f"rank{r}/latency_ms"] = float(per_rank[r, -1])
            for i, p in shown:
                out[f"rank{r}/phase_ms/{p}"] = float(full[r, i])
        self._phase_sum += full.mean(0)
        self._phase_rank_sum = full if self._phase_rank_sum is None else self._phase_rank_sum + full
        self._forwards += 1
        return out

    def _rebalance_step_fields(self) -> dict:
        """rebalance/* keys: the records of attempts logged since the last step record, and the
        measured balancedness of earlier successful moves that became known since."""
        out = {}
        for record in self._rebalances:
            out.update(_rebalance_fields(record))
        for record in self._measured:
            out.update(_measured_fields(record))
        self._rebalances.clear()
        self._measured.clear()
        return out

    def _window_fields(self, rec: dict, data: dict) -> Optional[np.ndarray]:
        """When a statistics window closed at this forward: its number into `rec`; -> its load
        [L, E] when wandb logs this window's media, else None."""
        if "balancedness" not in data or self.stats is None or not self.stats.windows:
            return None
        rec["window"] = self.stats.num_windows - 1
        if self.run is not None and window_has_media(rec["window"]):
            return self.stats.windows[-1].copy()                                       # [L, E] (a new array)
        return None

    def _write_metrics(self, rec: dict) -> None:
        """One line of metrics.jsonl; a failed write (e.g. disk full) stops the file, not the run."""
        if self._metrics is None:
            return
        try:
            self._metrics.write(json.dumps(rec) + "\n")
            self._metrics.flush()
        except OSError as err:
            warnings.warn(f"{METRICS_FILE}: write failed ({err}); no more records are written to it")
            try:
                self._metrics.close()
            except OSError:
                pass
            self._metrics = None

    def log_rebalance(self, record) -> None:
        """A rebalance attempt's record (moe_ep.rebalance.RebalanceRecord; any rank may call it,
        rank 0 keeps it), or an asynchronous migration's end record: merged into the next step
        record as rebalance/* keys."""
        if self.ctx.is_main and record is not None:
            self._rebalances.append(record)

    def log_measured(self, record) -> None:
        """The record of a successful move whose balancedness was just measured (the rebalancer's
        `on_measured`): rebalance/measured_* keys in the next step record."""
        if self.ctx.is_main:
            self._measured.append(record)

    def log_images(self, paths: list[str], captions: list[str]) -> None:
        if self.run is not None and self.cfg.telemetry.log_images and paths:
            self._last_step += 1
            self._submit(("images", list(paths), list(captions), self._last_step))

    def finish(self, summary: dict) -> Optional[str]:
        """Write summary.json (rank 0, atomically; adds `phase_ms` and `telemetry`), log the
        plots and summary numbers to wandb and close the run; returns the path."""
        if not self.ctx.is_main:
            return None
        self._drain()
        if self._forwards:
            def shown(row):
                return {p: float(v) for p, v in zip(ALL_PHASES, row) if p in self.shown_phases}
            summary["phase_ms"] = {
                "mean_per_forward": shown(self._phase_sum / self._forwards),
                "per_rank_mean_per_forward": [shown(row) for row in self._phase_rank_sum / self._forwards]}
        summary["telemetry"] = {
            "metrics_file": METRICS_FILE,
            "wandb_run_dir": os.path.relpath(os.path.dirname(self.run.dir), self.out_dir) if self.run else None,
            "wandb_mode": self.cfg.telemetry.wandb_mode if self.run else None,
            "rank0_log_step_ms_per_forward": 1e3 * self._log_s / max(self._forwards, 1),
            "rank0_deferred_flushes": self._flushes,
            "rank0_deferred_flush_s": self._flush_s}
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        path = os.path.join(self.out_dir, "summary.json")
        write_json_atomic(path, summary)
        if self.run is not None:
            try:
                self._log_final_plots(summary)
                self.run.summary.update(summary_scalars(summary))
            except Exception as err:
                warnings.warn(f"wandb final plots/summary failed: {err}")
            close_wandb_run(self.run)
            self.run = None
        return path

    def abort(self, budget_s: float = ABORT_BUDGET_S) -> None:
        """The error path (rank 0; other ranks return): write the deferred wandb items in order
        for at most `budget_s` seconds, close metrics.jsonl and finish the wandb run with exit
        code 1, so an offline run keeps its history up to the failure. No summary.json, no
        final plots, no collectives. Never raises."""
        if not self.ctx.is_main:
            return
        try:
            deadline = time.monotonic() + budget_s
            if self._writer is not None:            # online: let the writer thread finish its queue
                self._queue.put(None)
                self._writer.join(timeout=max(0.0, deadline - time.monotonic()))
                if self._writer.is_alive():
                    warnings.warn("telemetry abort: the wandb writer thread did not finish in time")
                self._writer, self._queue = None, None
            dropped = self._flush_deferred(deadline)
            if dropped:
                warnings.warn(f"telemetry abort: {dropped} deferred wandb items not written "
                              f"(time budget {budget_s:.0f} s)")
        except BaseException as err:  # noqa: BLE001 - the run's own error is what matters
            warnings.warn(f"telemetry abort: {type(err).__name__}: {err}")
        self._deferred = []
        if self._metrics is not None:
            try:
                self._metrics.close()
            except BaseException:  # noqa: BLE001
                pass
            self._metrics = None
        if self.run is not None:
            run, self.run = self.run, None
            try:
                close_wandb_run(run, exit_code=1)
            except BaseException as err:  # noqa: BLE001
                warnings.warn(f"telemetry abort: wandb finish failed: {type(err).__name__}: {err}")

    # ------------------------------------------------------------ wandb media
    def _window_media(self, load: np.ndarray, window: int) -> dict:
        """Per-window load (layers x experts) as a wandb.Table and a numpy-drawn heatmap."""
        import wandb

        load = np.asarray(load, dtype=np.float64)                                    # [L, E]
        share = load / np.maximum(load.sum(1, keepdims=True), 1.0)
        E = load.shape[1]
        table = wandb.Table(columns=["layer"] + [f"e{e}" for e in range(E)],
                            data=[[l] + [int(v) for v in row] for l, row in enumerate(load)])
        img = self._heatmap_array(share)
        cap = (f"window {window}: rows = MoE layers 0..{load.shape[0] - 1}, columns = experts 0..{E - 1}; "
               f"colour = share of the layer's tokens (dark 0 .. bright {share.max():.3f})")
        return {"load/table": table, "load/heatmap": wandb.Image(img, caption=cap)}

    def _heatmap_array(self, share: np.ndarray) -> np.ndarray:
        """[L, E] in [0, 1] -> RGB uint8 image, HEATMAP_CELL_PX pixels per cell (viridis)."""
        if self._cmap is None:
            try:
                from matplotlib import colormaps

                self._cmap = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
            except Exception:  # no matplotlib: grey ramp
                self._cmap = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
        top = share.max()
        idx = np.clip((share / top if top > 0 else share) * 255, 0, 255).astype(np.int64)
        rgb = self._cmap[idx]                                                        # [L, E, 3]
        return np.repeat(np.repeat(rgb, HEATMAP_CELL_PX, 0), HEATMAP_CELL_PX, 1)

    def _log_final_plots(self, summary: dict) -> None:
        import wandb

        records = read_metrics(os.path.join(self.out_dir, METRICS_FILE))
        figs = {}
        if self.stats is not None and self.stats.windows:
            total = self.stats.total().sum(axis=(0, 1)).astype(np.float64)
            figs["plots/load_heatmap"] = plot_load_heatmap(total, "Expert load over the run")
        figs["plots/balancedness"] = plot_balancedness(records, summary.get("rebalances", []))
        figs["plots/latency_breakdown"] = plot_latency(records)
        self._last_step += 1
        self.run.log({k: wandb.Image(fig_to_array(f)) for k, f in figs.items() if f is not None},
                     step=self._last_step)


def _rebalance_fields(record) -> dict:
    """rebalance/* keys of an attempt's record (an asynchronous migration's end: attempt 0, its
    start counted it, so the column sums to the attempts)."""
    before, after = record.balancedness_before, record.balancedness_after
    out = {"rebalance/attempt": 0 if record.ends_migration else 1, "rebalance/ok": int(record.ok),
           "rebalance/status": str(record.status), "rebalance/trigger": str(record.trigger),
           "rebalance/experts_moved": int(record.experts_moved),
           "rebalance/remote_moves": int(record.remote_moves),
           "rebalance/bytes_moved": int(record.bytes_moved),
           "rebalance/time_ms": float(record.time_ms)}
    if before is not None:
        out["rebalance/predicted_balancedness_before"] = before.mean
    if after is not None:
        out["rebalance/predicted_balancedness_after"] = after.mean
    if before is not None and after is not None:
        out["rebalance/predicted_gain"] = after.mean - before.mean
    return out


def _measured_fields(record) -> dict:
    """rebalance/measured_* keys of a move's record that carries its measured balancedness."""
    m, before = record.measured_balancedness, record.balancedness_before
    out = {"rebalance/measured_balancedness": m.mean, "rebalance/measured_forward": int(record.forward_idx)}
    if before is not None:
        out["rebalance/measured_gain"] = m.mean - before.mean
    return out


def summary_scalars(summary: dict, prefix: str = "") -> dict:
    """Numbers of a nested summary dict flattened to 'a/b' keys (lists and strings left out)."""
    out = {}
    for k, v in summary.items():
        if k in ("config", "steps", "images", "placement", "rebalances"):
            continue
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            out[key] = int(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = v
        elif isinstance(v, dict):
            out.update(summary_scalars(v, key + "/"))
    if not prefix:
        out["num_rebalances"] = sum(1 for e in summary.get("rebalances", []) if e.get("ok"))
    return out


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl -> list of records (a torn last line, from a killed run, is skipped)."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
