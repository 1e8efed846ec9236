"""Run telemetry: per-step records (metrics.jsonl), wandb (offline by default, rank 0 only),
summary.json, and the plots shared with `launch/report.py`.

The runner calls one object at fixed points (docs/dashboards.md lists every key):

    telemetry = Telemetry(cfg, ctx, out_dir)     # every rank; rank 0 opens metrics.jsonl and wandb
    telemetry.attach(model, stats)               # one PhaseTimer on every MoE layer and attention block
    ... per forward, on every rank:  telemetry.log_rebalance(event)  (when there was an attempt)
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
from typing import Optional, Sequence

import numpy as np

from .atomic import write_json_atomic
from .config import Config
from .parallel import ParallelContext

PHASES = ("attention", "router", "dispatch", "experts", "combine")   # timed by PhaseTimer
ALL_PHASES = PHASES + ("other",)                                   # other = step latency - timed phases
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
        self._pending_events: list[dict] = []     # rebalance attempts to merge into the next record
        self._awaiting_measure: list[dict] = []   # successful moves whose measured balancedness is not in yet
        self._logged_events: dict[int, dict] = {}  # id -> every event logged so far
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
        object with `moe_layers()` and optionally `blocks`."""
        from .timing import PhaseTimer

        self.timer = PhaseTimer(self.ctx.device)
        blocks = model.attention_blocks() if hasattr(model, "attention_blocks") else getattr(model, "blocks", [])
        for block in blocks:
            block.timer = self.timer
        self.shown_phases = tuple(p for p in ALL_PHASES if blocks or p != "attention")
        for layer in model.moe_layers():
            layer.timer = self.timer
        self.stats = stats

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
        """rebalance/* keys: the attempts logged since the last record, and the measured
        balancedness of earlier successful ones that became known since."""
        out = {}
        for ev in self._pending_events:
            out.update(_rebalance_fields(ev))
            if id(ev) in self._logged_events:     # an asynchronous migration's end: its start was the attempt
                out["rebalance/attempt"] = 0
            self._logged_events[id(ev)] = ev      # held, so an id is never reused for another event
        self._pending_events.clear()
        still = []
        for ev in self._awaiting_measure:
            m = ev.get("measured_balancedness")
            if m is None:
                still.append(ev)
                continue
            before = (ev.get("balancedness_before") or {}).get("mean")
            out["rebalance/measured_balancedness"] = float(m["mean"])
            out["rebalance/measured_forward"] = int(ev.get("forward_idx", -1))
            if before is not None:
                out["rebalance/measured_gain"] = float(m["mean"]) - float(before)
        self._awaiting_measure = still
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

    def log_rebalance(self, event: dict) -> None:
        """A rebalance attempt (any rank may call it; rank 0 keeps it): merged into the next
        step record as rebalance/* keys; its measured balancedness follows once known."""
        if not self.ctx.is_main or not event:
            return
        self._pending_events.append(event)
        if event.get("ok") and event.get("measured_balancedness") is None:
            self._awaiting_measure.append(event)

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
        self.run.log({k: wandb.Image(_fig_to_array(f)) for k, f in figs.items() if f is not None},
                     step=self._last_step)


def _rebalance_fields(ev: dict) -> dict:
    before = (ev.get("balancedness_before") or {}).get("mean")
    after = (ev.get("balancedness_after") or {}).get("mean")
    out = {"rebalance/attempt": 1, "rebalance/ok": int(bool(ev.get("ok"))),
           "rebalance/status": str(ev.get("status")), "rebalance/trigger": str(ev.get("trigger")),
           "rebalance/experts_moved": int(ev.get("experts_moved") or 0),
           "rebalance/remote_moves": int(ev.get("remote_moves") or 0),
           "rebalance/bytes_moved": int(ev.get("bytes_moved") or 0),
           "rebalance/time_ms": float(ev.get("time_ms") or 0.0)}
    if before is not None:
        out["rebalance/predicted_balancedness_before"] = float(before)
    if after is not None:
        out["rebalance/predicted_balancedness_after"] = float(after)
    if before is not None and after is not None:
        out["rebalance/predicted_gain"] = float(after) - float(before)
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


# ---------------------------------------------------------------- plots (matplotlib, Agg)
# Used by `finish` (logged to wandb) and by launch/report.py (written as PNG files).

PHASE_COLORS = {"attention": "#4C72B0", "router": "#DD8452", "dispatch": "#55A868", "experts": "#C44E52",
                "combine": "#8172B3", "other": "#B0B0B0"}


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _fig_to_array(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig, path: str) -> None:
    """PNG, atomically (moe_ep.atomic: temp file in the same folder, fsync, os.replace)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from .atomic import atomic_write

    with atomic_write(path, "wb") as f:
        FigureCanvasAgg(fig).print_png(f)


def _ticks(n: int, max_labels: int = 32) -> list[int]:
    step = max(1, math.ceil(n / max_labels))
    return list(range(0, n, step))


def plot_load_heatmap(load: np.ndarray, title: str):
    """load [L, E] -> heatmap of each expert's share of its layer's tokens (1/E = even)."""
    load = np.asarray(load, dtype=np.float64)
    L, E = load.shape
    share = load / np.maximum(load.sum(1, keepdims=True), 1.0)
    fig = _figure(min(14.0, 3.0 + 0.42 * E), min(12.0, 1.9 + 0.42 * L))
    ax = fig.add_subplot()
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_xticks(_ticks(E))
    ax.set_yticks(_ticks(L))
    ax.set_xlabel("logical expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    if L * E <= 256:
        top = share.max() if share.size else 0.0
        for l in range(L):
            for e in range(E):
                ax.text(e, l, f"{share[l, e]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if share[l, e] > 0.6 * top else "white")
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    cb.set_label(f"share of layer's tokens\n(even: 1/{E} = {1 / E:.3f})")
    return fig


def plot_layer_windows(windows: np.ndarray, max_layers: int = 12, first_window: int = 0, max_windows: int = 48):
    """windows [W, L, E] -> one heatmap per layer (rows = windows in time order), at most
    `max_layers` layers (evenly spaced) so a 60-layer model stays readable, and the last
    `max_windows` windows; rows are labelled with run-wide window numbers (`first_window` is
    the number of windows[0], stats.json's `first_window`)."""
    windows = np.asarray(windows, dtype=np.float64)
    if windows.shape[0] > max_windows:
        first_window += windows.shape[0] - max_windows
        windows = windows[-max_windows:]
    W, L, E = windows.shape
    layers = list(range(L)) if L <= max_layers else sorted({round(i * (L - 1) / (max_layers - 1))
                                                           for i in range(max_layers)})
    cols = min(3, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = _figure(min(16.0, 1.5 + cols * (1.4 + 0.3 * E)), 1.0 + rows * (0.9 + 0.22 * W))
    share = windows / np.maximum(windows.sum(2, keepdims=True), 1.0)                 # [W, L, E]
    vmax = float(share[:, layers].max()) if share.size else 1.0
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= len(layers):
            ax.set_visible(False)
            continue
        l = layers[k]
        im = ax.imshow(share[:, l], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {l}", fontsize=9)
        ax.set_xticks(_ticks(E, 16))
        ax.set_yticks(_ticks(W, 12))
        ax.set_yticklabels([str(first_window + t) for t in _ticks(W, 12)])
        ax.tick_params(labelsize=7)
        if k % cols == 0:
            ax.set_ylabel("window", fontsize=8)
        if k // cols == rows - 1 or k + cols >= len(layers):
            ax.set_xlabel("expert", fontsize=8)
    extra = "" if len(layers) == L else f" ({len(layers)} of {L} layers shown)"
    fig.suptitle(f"Expert load per window (windows {first_window}-{first_window + W - 1}), per layer{extra}",
                 fontsize=11)
    if im is not None:
        cb = fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02)
        cb.set_label("share of layer's tokens", fontsize=8)
    return fig


def plot_balancedness(records: Sequence[dict], rebalances: Sequence[dict]):
    """Balancedness (mean over layers, and per layer) at each window close, with rebalance
    attempts as vertical lines (solid green: moved; dotted grey: skipped or failed)."""
    pts = [r for r in records if "balancedness" in r]
    fig = _figure(8.0, 4.0)
    ax = fig.add_subplot()
    if pts:
        x = [r["forward"] for r in pts]
        layer_keys = sorted({k for r in pts for k in r if k.startswith("balancedness/layer")},
                            key=lambda k: int(k.rsplit("layer", 1)[1]))
        for k in layer_keys[:16]:
            ax.plot(x, [r.get(k, np.nan) for r in pts], lw=0.9, alpha=0.45, marker=".", ms=3,
                    label=k.split("/")[1])
        ax.plot(x, [r["balancedness"] for r in pts], color="black", lw=2.2, marker="o", ms=5, label="mean")
    moved = skipped = False
    for ev in rebalances:
        f = ev.get("forward_idx", -1)
        if f is None or f < 0:
            continue
        if ev.get("ok"):
            ax.axvline(f + 0.5, color="tab:green", lw=1.5, label=None if moved else "rebalance (moved)")
            moved = True
        else:
            ax.axvline(f + 0.5, color="grey", lw=1.0, ls=":", label=None if skipped else "rebalance skipped/failed")
            skipped = True
    ax.set_ylim(min(0.5, min([r["balancedness"] for r in pts], default=1.0) - 0.05), 1.02)
    last = max([r.get("forward", 0) for r in records] + [ev.get("forward_idx") or 0 for ev in rebalances] + [0])
    ax.set_xlim(-0.5, last + 1.0)
    ax.set_xlabel("forward pass (window closes after it)")
    ax.set_ylabel("balancedness (mean / max GPU load)")
    ax.set_title("Balancedness per statistics window")
    ax.grid(alpha=0.3)
    if pts or moved or skipped:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return fig


def plot_latency(records: Sequence[dict]):
    """Stacked bars per forward: mean over ranks of attention, router, dispatch, experts,
    combine and other (rest of the step); line: slowest rank's step latency."""
    recs = [r for r in records if "forward" in r]
    fig = _figure(8.0, 4.0)
    ax = fig.add_subplot()
    if not recs:
        ax.text(0.5, 0.5, "no step records", ha="center", va="center", transform=ax.transAxes)
        return fig
    x = np.array([r["forward"] for r in recs])
    bottom = np.zeros(len(recs))
    has_phases = any(k.startswith("phase_ms/") for r in recs for k in r)
    if has_phases:
        for p in (p for p in ALL_PHASES if any(f"phase_ms/{p}" in r for r in recs)):   # the timed ones
            v = np.array([r[f"phase_ms/{p}"] for r in recs])
            ax.bar(x, v, bottom=bottom, color=PHASE_COLORS[p], label=p, width=0.8)
            bottom += v
    else:
        ax.bar(x, [r.get("latency_ms", 0.0) for r in recs], color=PHASE_COLORS["other"], label="step (no phases)")
    ranks = sorted({int(k[4:].split("/")[0]) for r in recs for k in r if k.startswith("rank") and k.endswith("/latency_ms")})
    if ranks:
        slow = [max(r.get(f"rank{k}/latency_ms", 0.0) for k in ranks) for r in recs]
        ax.plot(x, slow, color="black", marker="_", ms=14, lw=0, label="slowest rank")
    ax.set_xlabel("forward pass")
    ax.set_ylabel("milliseconds")
    ax.set_title("Latency per forward, by phase (mean over ranks)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    if len(x) <= 40:
        ax.set_xticks(x[::max(1, len(x) // 20)])
    return fig


def plot_rank_phases(per_rank: Sequence[dict]):
    """per_rank [{phase: ms}] (summary.json phase_ms.per_rank_mean_per_forward) -> stacked bar per rank."""
    fig = _figure(max(4.5, 2.5 + 0.5 * len(per_rank)), 3.6)
    ax = fig.add_subplot()
    bottom = np.zeros(len(per_rank))
    x = np.arange(len(per_rank))
    for p in (p for p in ALL_PHASES if any(p in row for row in per_rank)):   # the timed ones
        v = np.array([row[p] for row in per_rank])
        ax.bar(x, v, bottom=bottom, color=PHASE_COLORS[p], label=p, width=0.6)
        bottom += v
    ax.set_xticks(x, [f"rank {i}" for i in x])
    ax.set_ylabel("ms per forward")
    ax.set_title("Mean time per forward, by rank")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig
