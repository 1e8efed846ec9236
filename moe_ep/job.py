"""The inference job behind `launch/infer.py`: build the served model, sample every prompt,
write images, stats.json and summary.json, rebalance experts between forwards when enabled.

The job knows no model: it sees a `moe_ep.models.base.ServedModel` (MoE layers, a weight
source per layer, `sample(prompts, seeds, hooks)`, per-forward hooks). Its parts:

    preflight(cfg, world_size)   every check that needs no process group: paths, the model
                                 family's own checks, the slot layout, the eplb files
    WorkSplit                    prompts -> batches -> rounds over the dp axis of the layout: batch
                                 j runs on dp rank j % dp in round j // dp (every rank of that dp
                                 rank's cfg x sp group samples it together; one of them writes
                                 its images, `writes_images`); every rank runs the same number of
                                 rounds (a rank with no batch left samples zero prompts), so the
                                 EP all-to-alls and the statistics all-reduces always line up
    ForwardRecorder              the per-forward driver (moe_ep/driver.py: statistics, rebalances,
                                 window balancedness under the placement in effect) plus latency,
                                 tokens/s, telemetry and the test die hook
    StatsWriter                  rank 0's stats.json: after every round and, at most every
                                 STATS_SAVE_EVERY_S, when a window closes
    ImageWriter                  images/<name>.png as each batch finishes, then its record
                                 images/<name>.json (moe_ep/manifest.py)
    resume_plan                  rank 0's look at output_dir: which images of an earlier run are
                                 finished images of this one (kept; a round whose every image is
                                 finished is skipped), broadcast to every rank
    build_summary                summary.json's content
    run(cfg, ctx)                the loop and its error path (PeerLostError, RunInterrupted,
                                 OutputWriteError; closed statistics windows saved on error)
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from eplb.checks import check_topology

from .config import Config, ConfigError
from .cuda_graph import check_cuda_graph_config
from .driver import ForwardDriver
from .images import save_png
from .manifest import ResumePlan, image_settings, plan_resume, stale_image_files, write_manifest, write_record
from .models import build_served_model, preflight_model
from .models.base import ForwardInfo, MoEShape, ServedModel
from .parallel import ParallelContext, check_layout, derive_ep_size, error_on_any_rank, launcher_local_world
from .paths import check_paths
from .prompts import PromptItem, prompt_items
from .rebalance import Rebalancer, read_placement_file
from .stats import ExpertLoadStats, read_stats_file
from .telemetry import Telemetry

TEST_DIE_ENV = "MOE_EP_TEST_DIE_AT_STEP"   # tests: "<forward>:<rank>[:hang]", see _test_die_at
STATS_SAVE_EVERY_S = 10.0                  # rank 0 also rewrites stats.json when a window closes this long after the last write
_PEER_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe", "closed")


# ---------------------------------------------------------------- errors

class RunInterrupted(Exception):
    """Raised in the main thread by launch/infer.py's SIGTERM handler (the DeepSpeed launcher
    sends SIGTERM to every rank when one exits non-zero)."""


class PeerLostError(RuntimeError):
    """A collective failed or timed out (a rank died or hangs), or the launcher stopped this rank."""

    def __init__(self, rank: int, phase: str, detail: str):
        self.rank, self.phase, self.detail = rank, phase, detail
        super().__init__(f"rank {rank} lost contact with its peers during {phase}: {detail}")


class OutputWriteError(Exception):
    """A file under output_dir could not be written while the job ran (disk full, folder made
    read-only, ...). What was written before stays (every writer is atomic)."""

    def __init__(self, rank: int, path: str, err: OSError, phase: str = ""):
        self.rank, self.path, self.err, self.phase = rank, path, err, phase
        super().__init__(f"config field 'output_dir': rank {rank} could not write {path}: "
                         f"{err.strerror or err} (errno {err.errno}); the images and stats.json "
                         f"written before are kept, no summary.json")


EARLIER_OUTPUTS = ("summary.json", "stats.json", "manifest.jsonl")   # metrics.jsonl starts afresh when opened; wandb/ keeps every run
# what launch/report.py writes into output_dir/report/: it describes one run, so it goes with that run
REPORT_FILES = ("report.md", "report.html", "load_heatmap.png", "load_windows.png", "balancedness.png",
                "latency.png", "latency_ranks.png")
IMAGE_NAME = re.compile(r"^\d{3,}\.png$")               # images/000.png ... (save_png's names)


def remove_earlier_outputs(out_dir: str, keep: Optional[str] = None, items: Sequence[PromptItem] = (),
                           kept: Sequence[int] = ()) -> list[str]:
    """A run into a folder that holds an earlier run's outputs replaces them: its summary.json,
    stats.json, manifest.jsonl, images and records that this run does not keep and report
    (launch/report.py's files) are removed when this run starts, so a summary.json again means
    *this* run completed and no image of the earlier run passes for one of this run.
    `keep` (eplb.stats_file) stays when it is that stats.json: a resume in place that fails
    before its first window still has its input; this run's first write replaces it.
    `kept`: indices of `items` whose images are finished images of this run (resume_plan).
    -> the removed paths (relative to out_dir). Rank 0."""
    images = os.path.join(out_dir, "images")

    def is_input(path: str) -> bool:
        return bool(keep) and os.path.exists(keep) and os.path.samefile(path, keep)

    old = [n for n in EARLIER_OUTPUTS if os.path.isfile(os.path.join(out_dir, n)) and not is_input(os.path.join(out_dir, n))]
    old += [os.path.join("images", n) for n in stale_image_files(images, items, kept, IMAGE_NAME.match)]
    old += [os.path.join("report", n) for n in REPORT_FILES if os.path.isfile(os.path.join(out_dir, "report", n))]
    for name in old:
        os.remove(os.path.join(out_dir, name))
    if old:
        print(f"moe-ep: {out_dir} held an earlier run's outputs; removed {len(old)} files "
              f"({', '.join(old[:3])}{', ...' if len(old) > 3 else ''})", file=sys.stderr, flush=True)
    return old


def _write(rank: int, path: str, fn: Callable[[], None]) -> None:
    """Run the writer `fn` of `path`; an OSError becomes OutputWriteError naming the file."""
    try:
        fn()
    except OSError as err:
        raise OutputWriteError(rank, path, err) from err


# ---------------------------------------------------------------- checks before any process group

def check_eplb_files(cfg: Config, shape: MoEShape, ep: int) -> None:
    """Parse eplb.stats_file / eplb.placement_file against the model's MoE shape (ConfigError)."""
    L, E = shape.num_layers, shape.num_experts
    if cfg.eplb.stats_file:
        try:
            read_stats_file(cfg.eplb.stats_file, L, E)
        except ValueError as err:
            raise ConfigError("eplb.stats_file", cfg.eplb.stats_file, str(err)) from None
    if cfg.eplb.placement_file:
        try:
            read_placement_file(cfg.eplb.placement_file, L, E, E + cfg.eplb.num_redundant_experts, ep)
        except ValueError as err:
            raise ConfigError("eplb.placement_file", cfg.eplb.placement_file, str(err)) from None


def preflight(cfg: Config, world_size: int) -> None:
    """Every check that needs no process group (raises ConfigError naming the field), so a bad
    input stops before any process group or output file: sizes against the world size, every
    path (moe_ep/paths.py), the model family's checks (checkpoint header, text encoder, model
    folder), the eplb files' contents."""
    ep = derive_ep_size(cfg.parallel, world_size)
    check_cuda_graph_config(cfg, world_size)   # model.cuda_graph: EP = 1 at this world size, a GPU
    check_gpus_per_node(cfg)
    check_paths(cfg)
    prompt_items(cfg)                        # sampling.prompts_file: every line (moe_ep/prompts.py)
    shape = preflight_model(cfg, world_size)
    if shape is not None:
        check_layout(shape.num_experts, cfg.eplb.num_redundant_experts, ep)
        check_planner_topology(cfg, shape.num_experts, ep, world_size)
        check_eplb_files(cfg, shape, ep)


def check_gpus_per_node(cfg: Config) -> None:
    """More ranks on this node than GPUs it shows: refused here, where rank 0 says so, rather than
    by each rank without a GPU when it picks its device. (One visible GPU is each rank's own: a
    scheduler that isolates the ranks.)"""
    if cfg.parallel.device == "cpu" or not torch.cuda.is_available():
        return
    gpus, ranks = torch.cuda.device_count(), launcher_local_world(0)
    if gpus > 1 and ranks > gpus:
        raise ConfigError("parallel.device", cfg.parallel.device, f"the launcher started {ranks} ranks on this node, "
                                                                  f"which has {gpus} GPUs: start at most {gpus} "
                                                                  f"(deepspeed --num_gpus {gpus})")


# eplb.checks.check_topology names its arguments; the config field each comes from
PLANNER_FIELDS = {"num_gpus": "parallel.ranks_per_node", "num_nodes": "parallel.ranks_per_node",
                  "num_groups": "eplb.num_groups", "num_replicas": "eplb.num_redundant_experts"}


def check_planner_topology(cfg: Config, num_experts: int, ep: int, world_size: int) -> None:
    """The planner's own check (eplb.checks.check_topology) on the slots, groups and nodes this
    run will give it, so that a layout every rebalance would refuse stops the run here."""
    groups = cfg.eplb.num_groups
    if groups > 1 and num_experts % groups:   # the config rule (docs/config.md), whatever the planner uses
        raise ConfigError("eplb.num_groups", groups, f"must divide the model's number of experts ({num_experts})")
    if not cfg.eplb.enabled:
        return
    rpn = max(1, cfg.parallel.ranks_per_node or launcher_local_world(world_size))
    nodes = ParallelContext(ep_size=ep, ranks_per_node=rpn).num_nodes   # what the rebalancer passes
    try:
        check_topology(num_experts, num_experts + cfg.eplb.num_redundant_experts, groups, nodes, ep)
    except ValueError as err:
        name = str(err).split(":", 1)[0]
        field = PLANNER_FIELDS.get(name, "parallel.ranks_per_node")
        value = {"parallel.ranks_per_node": rpn, "eplb.num_groups": groups,
                 "eplb.num_redundant_experts": cfg.eplb.num_redundant_experts}[field]
        raise ConfigError(field, value, f"the planner refuses this layout ({ep} EP ranks on {nodes} node(s) of "
                                        f"{rpn}): {err}") from None


# ---------------------------------------------------------------- the work split

@dataclass(frozen=True)
class WorkSplit:
    """Prompts in batches of `batch_size`; batch j runs on dp rank j % dp_size in round
    j // dp_size. dp_size is the layout's prompt-splitting axis (`ctx.layout.dp`; the world
    without cfg / sequence parallelism): every rank of one dp rank's cfg x sp group samples the
    same batch, so a prompt is one image however many ranks it spans."""

    batches: tuple[tuple[int, ...], ...]     # prompt indices of each batch
    dp_size: int

    @classmethod
    def of(cls, num_prompts: int, batch_size: int, dp_size: int) -> "WorkSplit":
        return cls(tuple(tuple(range(i, min(i + batch_size, num_prompts))) for i in range(0, num_prompts, batch_size)),
                   dp_size)

    @property
    def rounds(self) -> int:
        """Rounds every rank runs (the same on all ranks)."""
        return math.ceil(len(self.batches) / self.dp_size)

    def batch(self, round_idx: int, dp_rank: int) -> list[int]:
        """Prompt indices dp rank `dp_rank` samples in round `round_idx` ([] when it has none left)."""
        j = round_idx * self.dp_size + dp_rank
        return list(self.batches[j]) if j < len(self.batches) else []

    def prompts_in_round(self, round_idx: int) -> int:
        """Prompts sampled in round `round_idx` on all ranks together (each prompt once)."""
        return sum(len(self.batch(round_idx, r)) for r in range(self.dp_size))


def writes_images(layout) -> bool:
    """The one rank of each cfg x sp group that writes the group's images: cfg rank 0, sp rank
    0 (every rank of the group holds the same images)."""
    return layout.index("cfg") == 0 and layout.index("sp") == 0


# ---------------------------------------------------------------- outputs while sampling

class StatsWriter:
    """stats.json of the run so far (complete windows only), written by rank 0 atomically:
    after every round, and when a window closes at least `every_s` after the last write."""

    def __init__(self, stats: ExpertLoadStats, out_dir: str, ctx: ParallelContext,
                 every_s: Optional[float] = None, clock: Callable[[], float] = time.perf_counter):
        self.stats, self.ctx, self.clock = stats, ctx, clock
        self.every_s = STATS_SAVE_EVERY_S if every_s is None else every_s
        self.path = os.path.join(out_dir, "stats.json")
        self.last = clock()

    def save(self) -> None:
        if not self.ctx.is_main:
            return
        _write(self.ctx.rank, self.path, lambda: self.stats.save(self.path))
        self.last = self.clock()

    def window_closed(self) -> None:
        if self.clock() - self.last >= self.every_s:
            self.save()

    def round_done(self) -> None:
        self.save()  # with the round's images: what a killed run leaves is complete


class ImageWriter:
    """output_dir/images/<name>.png (name: NNN = prompt index, or the prompts file's), atomically,
    as each batch finishes; then, once the PNG is on disk, its record images/<name>.json
    (moe_ep/manifest.py). Images in `finished` (kept from an earlier run) are not written."""

    def __init__(self, out_dir: str, rank: int, items: Sequence[PromptItem] = (), settings: Optional[dict] = None,
                 finished: frozenset = frozenset()):
        self.out_dir, self.folder, self.rank = out_dir, os.path.join(out_dir, "images"), rank
        self.items, self.settings, self.finished = items, settings or {}, finished
        self.records: list[dict] = []        # what this rank wrote, for manifest.jsonl

    def write(self, indices: Sequence[int], images: Sequence[np.ndarray]) -> None:
        if len(indices) != len(images):
            raise RuntimeError(f"the model returned {len(images)} images for {len(indices)} prompts")
        for i, image in zip(indices, images):
            if i in self.finished:
                continue                     # a kept image: its file is not touched
            item = self.items[i]
            path = os.path.join(self.folder, item.png)
            _write(self.rank, path, lambda: save_png(image, path))
            # the record only after the PNG: a PNG without its record is not finished
            rec_path = os.path.join(self.folder, f"{item.name}.json")
            _write(self.rank, rec_path, lambda: self.records.append(write_record(self.out_dir, item, self.settings)))


# ---------------------------------------------------------------- per forward

@dataclass
class RunState:
    """What the error path needs to know: the phase for the message, the statistics to save."""

    phase: str = "start-up"
    stats: Optional[ExpertLoadStats] = None
    telemetry: Optional[Telemetry] = None    # to close on the error path (rank 0's wandb run, metrics.jsonl)


def _test_die_at() -> Optional[tuple[int, int, str]]:
    """MOE_EP_TEST_DIE_AT_STEP="<forward>:<rank>[:hang]" (tests only): exit, or hang, there."""
    raw = os.environ.get(TEST_DIE_ENV)
    if not raw:
        return None
    forward, rank, *mode = raw.split(":")
    return int(forward), int(rank), (mode or ["exit"])[0]


class ForwardRecorder(ForwardDriver):
    """The per-forward driver (moe_ep/driver.py) with what the job adds (every rank): the rank's
    test die hook and the error path's phase before a forward, its latency around it, and after
    it one step record: {forward, round, step, t, latency_ms, tokens (rows of the round on all
    ranks), tokens_per_s, and when a window closed balancedness (+ per layer) under the placement
    in effect during that window, rebalanced when an attempt was made}, logged to telemetry
    (collective) with the rebalance record, and stats.json when a window closed."""

    def __init__(self, ctx: ParallelContext, stats: ExpertLoadStats, moe_layers: list,
                 timesteps: Sequence[float] | Callable[[], Sequence[float]], split: WorkSplit, rows_per_prompt: int,
                 rebalancer: Optional[Rebalancer] = None, telemetry: Optional[Telemetry] = None,
                 stats_writer: Optional[StatsWriter] = None, state: Optional[RunState] = None,
                 on_step: Callable[[], None] = lambda: None, die_at: Optional[tuple[int, int, str]] = None):
        super().__init__(ctx, stats, moe_layers, rebalancer, next_timestep=self._next_timestep)
        # a list, or a callable read at every forward (a diffusers pipeline's schedule is known
        # only once it ran)
        self._timesteps = timesteps if callable(timesteps) else (lambda ts=list(timesteps): ts)
        self.split, self.rows_per_prompt = split, rows_per_prompt
        self.telemetry, self.stats_writer = telemetry, stats_writer
        self.state = state if state is not None else RunState()
        self.on_step, self.die_at = on_step, die_at
        self.round = 0
        self.steps: list[dict] = []
        self._t0 = 0.0
        self._sync = (lambda: torch.cuda.synchronize(ctx.device)) if ctx.device.type == "cuda" else (lambda: None)

    def start_round(self, round_idx: int) -> None:
        self.round = round_idx

    def _next_timestep(self, step: int, t: float) -> float:
        """The next forward's t: the next step's, wrapping to the first at the end of a batch."""
        ts = self._timesteps()
        return ts[step + 1] if step + 1 < len(ts) else (ts[0] if ts else t)

    def _maybe_die(self) -> None:
        if self.die_at is not None and self.die_at[:2] == (self.forward, self.ctx.rank):
            print(f"{TEST_DIE_ENV}: rank {self.ctx.rank} {self.die_at[2]}s before forward {self.forward}",
                  file=sys.stderr, flush=True)
            if self.die_at[2] == "hang":
                while True:
                    time.sleep(1)
            os._exit(1)

    def on_forward_begin(self, step: int, t: float, info: ForwardInfo) -> None:
        self.state.phase = f"forward {self.forward} (round {self.round}, step {step})"
        self._maybe_die()
        super().on_forward_begin(step, t, info)
        self._sync()
        self._t0 = time.perf_counter()

    def on_forward_end(self, step: int, t: float, info: ForwardInfo) -> None:
        self._sync()
        latency = time.perf_counter() - self._t0
        self.state.phase = f"the statistics window / rebalance after forward {self.forward}"
        out = self.end_forward(step, t)
        rows = self.split.prompts_in_round(self.round) * self.rows_per_prompt
        rec = {"forward": out.forward, "round": self.round, "step": step, "t": t,
               "latency_ms": latency * 1e3, "tokens": rows, "tokens_per_s": rows / latency if latency > 0 else 0.0}
        bal = out.window_balancedness                     # under the placement before any rebalance now
        if bal is not None:
            rec["balancedness"] = float(np.mean(bal)) if bal else 1.0
            rec.update({f"balancedness/layer{i}": b for i, b in enumerate(bal)})
        if out.record is not None:
            if self.telemetry is not None:
                self.telemetry.log_rebalance(out.record)
            rec["rebalanced"] = int(out.record.ok)
        self.steps.append(rec)
        self.state.phase = f"the telemetry gather after forward {out.forward}"
        if self.telemetry is not None:
            self.telemetry.log_step(rec)
        if bal is not None and self.stats_writer is not None:
            self.stats_writer.window_closed()
        self.on_step()


# ---------------------------------------------------------------- eplb at start-up

def make_rebalancer(cfg: Config, model: ServedModel, ctx: ParallelContext, stats: ExpertLoadStats):
    """-> (rebalancer or None, a note for summary.json)."""
    if not cfg.eplb.enabled:
        return None, "disabled"
    return (Rebalancer(model.moe_layers(), ctx, cfg.eplb, stats, transfer_timeout_s=ctx.timeout_s),
            "moe_ep.rebalance.Rebalancer")


def install_placement_file(path: str, model: ServedModel, ep_size: int) -> None:
    """Install an offline placement without a rebalancer: every rank fills its own slots from
    the model's weight source (no weights move between ranks). Raises ConfigError naming
    eplb.placement_file."""
    layers = model.moe_layers()
    try:
        phy2log = read_placement_file(path, len(layers), layers[0].cfg.num_experts, layers[0].num_slots,
                                      ep_size)  # [L, R]
    except ValueError as err:
        raise ConfigError("eplb.placement_file", path, str(err)) from None
    for layer in layers:
        layer.set_placement(phy2log[layer.layer_idx], model.weight_source(layer.layer_idx))


def apply_eplb_files(cfg: Config, model: ServedModel, ctx: ParallelContext, stats: ExpertLoadStats,
                     rebalancer: Optional[Rebalancer]) -> None:
    """eplb.stats_file seeds the statistics; eplb.placement_file installs an offline placement
    (through the rebalancer when there is one, else straight from the weight source)."""
    e = cfg.eplb
    if e.stats_file:
        error = None
        try:
            stats.load_seed(e.stats_file)
        except ValueError as err:
            error = str(err)
        # Every rank read the file; all must have succeeded before any of them enters the
        # rebalance below, or the others would wait in its broadcast until the timeout.
        error = error_on_any_rank(error, ctx)
        if error is not None:
            raise ConfigError("eplb.stats_file", e.stats_file, error) from None
        if rebalancer is not None and not e.placement_file:
            # resume: start from a placement planned on the earlier run's load (collective)
            rebalancer.rebalance_now(-1, trigger="stats_file")
    if e.placement_file:
        if rebalancer is None:
            install_placement_file(e.placement_file, model, ctx.ep_size)
            return
        try:
            rebalancer.load_placement_file(e.placement_file)
        except ValueError as err:
            raise ConfigError("eplb.placement_file", e.placement_file, str(err)) from None


# ---------------------------------------------------------------- summary.json

def build_summary(cfg: Config, ctx: ParallelContext, model: ServedModel, recorder: ForwardRecorder,
                  rebalancer: Optional[Rebalancer], rebalancer_note: str, wall_s: float,
                  items: Optional[Sequence[PromptItem]] = None, kept: int = 0) -> dict:
    """summary.json's content (docs/model.md lists the keys); telemetry adds phase_ms and telemetry."""
    items = prompt_items(cfg) if items is None else items
    steps = recorder.steps
    # per layer: the mean over the closed windows of the balancedness under the placement in effect
    # for each window (not the final placement applied to the whole run's load)
    wb = recorder.window_balance
    bal = np.mean(wb, axis=0).tolist() if wb else []
    # the first forward is the warm-up (Triton and QuACK kernels compile at their first launch,
    # inductor under model.compile): reported apart, not in the speed figures
    timed = steps[1:] if len(steps) > 1 else steps
    lat = [x["latency_ms"] for x in timed]
    fwd_time = sum(lat) / 1e3
    events = rebalancer.events if rebalancer is not None else []
    return {
        "config": cfg.to_dict(),
        "world_size": ctx.world_size, "ep_size": ctx.ep_size, "dp_size": ctx.dp_size,
        "ranks_per_node": ctx.ranks_per_node, "device": str(ctx.device),
        "layout": {"dp": ctx.layout.dp, "cfg": ctx.layout.cfg, "sp": ctx.layout.sp, "ulysses": ctx.layout.ulysses,
                   "ring": ctx.layout.ring},
        "num_prompts": len(items), "num_forwards": len(steps), "tokens_per_image": model.tokens_per_image,
        "images": [{"path": f"images/{it.png}", "prompt": it.prompt, "seed": it.seed, "name": it.name}
                   for it in items],
        "resume": {"kept": kept, "sampled": len(items) - kept},
        "wall_s": wall_s,
        "latency_ms": {"mean": float(np.mean(lat)) if lat else 0.0, "p50": float(np.median(lat)) if lat else 0.0,
                       "max": float(np.max(lat)) if lat else 0.0},
        "tokens_per_s": sum(x["tokens"] for x in timed) / fwd_time if fwd_time > 0 else 0.0,
        "first_forward_ms": steps[0]["latency_ms"] if steps else 0.0,
        "steps": steps,
        "balancedness": {"per_layer": bal, "mean": float(np.mean(bal)) if bal else 1.0, "windows": wb},
        "placement": [l.placement.phy2log.tolist() for l in model.moe_layers()],
        "eplb": {"enabled": cfg.eplb.enabled, "rebalancer": rebalancer_note},
        "rebalances": [ev.as_dict() for ev in events],
        "checkpoint": cfg.model.checkpoint,
        "model": model.describe(),
    }


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if torch.is_tensor(x):
        return x.tolist()
    return x


# ---------------------------------------------------------------- the run and its error path

def _lost_peer(err: BaseException, ctx: ParallelContext) -> bool:
    if isinstance(err, RunInterrupted):
        return True
    if ctx.world_size <= 1 or not isinstance(err, RuntimeError):
        return False
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return any(w in str(err).lower() for w in _PEER_WORDS)


def _save_stats_on_error(stats: Optional[ExpertLoadStats], out_dir: str) -> None:
    """Every surviving rank writes the closed windows (the same on every rank: they are
    all-reduced over the world) to stats.json; SIGTERM is held off during the write."""
    if stats is None or not stats.num_windows:
        return
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN) if main else None
    try:
        stats.save(os.path.join(out_dir, "stats.json"))
    except Exception as err:  # noqa: BLE001 - report, keep the original error
        print(f"warning: could not write stats.json on the error path: {err}", file=sys.stderr, flush=True)
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


def run(cfg: Config, ctx: ParallelContext, progress: bool = True) -> dict:
    """Sample every prompt; write output_dir/images/*.png, stats.json, summary.json. Collective.

    Images are written as each batch finishes and stats.json after each round, so a failed run
    keeps what it finished. When a collective fails or times out (a rank died or hangs;
    `parallel.timeout_s`) or the launcher stops this rank, the closed statistics windows are
    written to stats.json and PeerLostError names this rank and the phase (no summary.json).
    A file that cannot be written (disk full) raises OutputWriteError the same way."""
    state = RunState()
    try:
        return _run(cfg, ctx, progress, state)
    except BaseException as err:   # also a ConfigError found mid-run: the same saving and closing
        _save_stats_on_error(state.stats, cfg.output_dir)
        if state.telemetry is not None:
            state.telemetry.abort()  # rank 0: offline wandb history so far, run finished with exit code 1; never raises
        if isinstance(err, OutputWriteError):
            err.phase = state.phase
            raise
        if _lost_peer(err, ctx):
            detail = "stopped by SIGTERM (the launcher stops every rank when one exits non-zero)" \
                if isinstance(err, RunInterrupted) else \
                f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
            raise PeerLostError(ctx.rank, state.phase, detail) from err
        raise


def resume_plan(cfg: Config, ctx: ParallelContext, items: Sequence[PromptItem], settings: dict,
                num_layers: int, num_experts: int) -> tuple[ResumePlan, Optional[str]]:
    """Rank 0 reads output_dir's records (moe_ep/manifest.py) and says in one line what it keeps
    and replaces; when it keeps an image and eplb.stats_file is not set, the earlier
    output_dir/stats.json (if this model's) seeds the statistics, as eplb.stats_file would.
    -> (the plan, the stats file to carry over or None), the same on every rank (collective)."""
    out_dir = cfg.output_dir
    decided: list = [None]
    if ctx.is_main:
        plan = plan_resume(out_dir, items, settings)
        carried, note = None, ""
        stats_path = os.path.join(out_dir, "stats.json")
        if plan.finished and not cfg.eplb.stats_file and os.path.isfile(stats_path):
            try:
                read_stats_file(stats_path, num_layers, num_experts)
                carried, note = stats_path, "; statistics carried over from its stats.json"
            except ValueError as err:
                note = f"; its stats.json is not carried over ({str(err)[:120]})"
        line = plan.line(out_dir, len(items))
        if line:
            print(line + note, file=sys.stderr, flush=True)
        decided = [(plan, carried)]
    if ctx.world_size > 1:
        dist.broadcast_object_list(decided, src=0)
    return decided[0]


def gather_to_main(records: list, ctx: ParallelContext) -> list:
    """Every rank's records, on rank 0 (collective; [] elsewhere)."""
    if ctx.world_size == 1:
        return list(records)
    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, records)
    return [r for part in everyone for r in part] if ctx.is_main else []


def _run(cfg: Config, ctx: ParallelContext, progress: bool, state: RunState) -> dict:
    s, out_dir = cfg.sampling, cfg.output_dir
    images_dir = os.path.join(out_dir, "images")
    model = build_served_model(cfg, ctx)
    layers = model.moe_layers()
    stats = ExpertLoadStats(len(layers), layers[0].cfg.num_experts, ctx.device, cfg.eplb.window_size,
                            cfg.eplb.timestep_buckets, layers[0].cfg.top_k)
    state.stats = stats
    for layer in layers:
        layer.stats = stats
    # resume: finished images of an earlier run of this config are kept, its statistics carried over
    items = prompt_items(cfg)
    settings = image_settings(cfg, ctx.world_size, ctx.ep_size, ctx.device.type,
                              {"cfg": ctx.layout.cfg, "ulysses": ctx.layout.ulysses, "ring": ctx.layout.ring})
    plan, carried = resume_plan(cfg, ctx, items, settings, len(layers), layers[0].cfg.num_experts)
    if carried:
        cfg = dataclasses.replace(cfg, eplb=dataclasses.replace(cfg.eplb, stats_file=carried))
    rebalancer, rebalancer_note = make_rebalancer(cfg, model, ctx, stats)
    apply_eplb_files(cfg, model, ctx, stats, rebalancer)
    # the first write under output_dir: a model, checkpoint or eplb file refused above leaves nothing
    _write(ctx.rank, images_dir, lambda: os.makedirs(images_dir, exist_ok=True))
    if ctx.is_main:   # after eplb.stats_file was read by every rank
        _write(ctx.rank, out_dir, lambda: remove_earlier_outputs(out_dir, keep=cfg.eplb.stats_file, items=items,
                                                                 kept=plan.finished))
    telemetry = state.telemetry = Telemetry(cfg, ctx, out_dir)
    telemetry.attach(model, stats)  # phase timers on the attention blocks and MoE layers; window loads for heatmaps
    if rebalancer is not None:
        for ev in rebalancer.events:             # stats_file / placement_file
            telemetry.log_rebalance(ev)
        rebalancer.on_measured.append(telemetry.log_measured)   # rebalance/measured_* in a later step

    prompts = [it.prompt for it in items]
    split = WorkSplit.of(len(prompts), s.batch_size, ctx.layout.dp)   # prompts over the dp axis only
    dp_rank, writer = ctx.layout.coords().dp, writes_images(ctx.layout)
    # a round runs whole or not at all, so every image comes out of the batches an uninterrupted
    # run samples it in (the dense layers see the batch); a round is skipped when every image of
    # it is finished
    todo = [r for r in range(split.rounds)
            if any(i not in plan.finished for k in range(split.dp_size) for i in split.batch(r, k))]
    from tqdm import tqdm
    bar = tqdm(total=len(todo) * model.num_inference_steps, desc="sampling", unit="step",
               disable=not (progress and ctx.is_main), dynamic_ncols=True)
    stats_writer = StatsWriter(stats, out_dir, ctx)
    recorder = ForwardRecorder(ctx, stats, layers, lambda: model.timesteps, split, model.rows_per_prompt,
                               rebalancer, telemetry, stats_writer, state, on_step=lambda: bar.update(1),
                               die_at=_test_die_at())
    images = ImageWriter(out_dir, ctx.rank, items, settings, plan.finished)

    t_start = time.perf_counter()
    for r in todo:
        recorder.start_round(r)
        idx = split.batch(r, dp_rank)
        out = model.sample([prompts[i] for i in idx], [items[i].seed for i in idx], recorder)
        if writer:
            images.write(idx, out)
        state.phase = f"writing the statistics after round {r}"
        stats_writer.round_done()
    wall = time.perf_counter() - t_start
    bar.close()
    state.phase = "the migration in progress"
    recorder.finish_migration()   # collective: every rank has the same migration in flight
    state.phase = "the last statistics window"
    recorder.close_last_window()
    state.phase = "the final barrier"
    if ctx.world_size > 1:
        dist.barrier()  # every rank's images are on disk
    state.phase = "writing the outputs"

    summary = build_summary(cfg, ctx, model, recorder, rebalancer, rebalancer_note, wall, items, len(plan.finished))
    stats_writer.save()
    records = gather_to_main(images.records, ctx)    # collective
    if ctx.is_main:   # before summary.json, which marks the run complete
        manifest_path = os.path.join(out_dir, "manifest.jsonl")
        _write(ctx.rank, manifest_path, lambda: write_manifest(out_dir, list(plan.records.values()) + records))
    if ctx.is_main:
        telemetry.log_images([os.path.join(out_dir, x["path"]) for x in summary["images"]],
                             [f"{x['prompt']} (seed {x['seed']})" for x in summary["images"]])
    summary_path = os.path.join(out_dir, "summary.json")
    try:
        telemetry.finish(_jsonable(summary))
    except OSError as err:
        telemetry.abort()   # finish() already let go of the active run: close wandb here
        raise OutputWriteError(ctx.rank, summary_path, err) from err
    model.close()
    return summary
