"""The inference job behind `launch/infer.py`: build the model, sample every prompt, write
images, stats.json and summary.json, rebalance experts between forwards when enabled.

Work split: prompts are cut into batches of `sampling.batch_size`; batch j runs on rank
j % world in round j // world. Every rank runs the same number of rounds (a rank with no
batch left runs the forwards with zero rows), so the EP all-to-alls and the statistics
all-reduces always line up.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import CheckpointReader, inspect_checkpoint, load_checkpoint
from ..config import Config, ConfigError
from ..experts import init_expert_weights
from ..images import decode_latents, save_png
from ..parallel import ParallelContext, check_layout, derive_ep_size
from ..rebalance import Rebalancer, layer_balancedness, read_placement_file
from ..stats import ExpertLoadStats, read_stats_file
from ..telemetry import Telemetry
from .dit import MoEDiT
from .sampler import FlowMatchEulerScheduler, MoEDiTPipeline
from .text import PromptEncoder, load_user_encoder


def preflight(cfg: Config, world_size: int) -> None:
    """Every check that needs no process group (raises ConfigError): sizes against the
    world size, the checkpoint header, the user text encoder, eplb files."""
    ep = derive_ep_size(cfg.parallel, world_size)
    check_layout(cfg.model.moe.num_experts, cfg.eplb.num_redundant_experts, ep)
    if cfg.model.checkpoint:
        inspect_checkpoint(cfg.model.checkpoint, cfg.model)
    if cfg.model.text_encoder != "builtin":
        load_user_encoder(cfg.model.text_encoder)
    for name in ("placement_file", "stats_file"):
        path = getattr(cfg.eplb, name)
        if path and not os.path.isfile(path):
            raise ConfigError(f"eplb.{name}", path, "file not found")
    L, E = cfg.model.num_layers // cfg.model.moe_every, cfg.model.moe.num_experts   # MoE layers, experts
    # parse the eplb files here, so a bad one stops the run before any process group or output file
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


def build_model(cfg: Config, ctx: ParallelContext):
    """-> (model, weight_source, reader): seed-initialised or loaded from `model.checkpoint`.
    `weight_source(layer)(expert) -> (w13, w2)` gives any logical expert's weights."""
    model = MoEDiT(cfg.model, ctx, num_redundant=cfg.eplb.num_redundant_experts)
    if cfg.model.checkpoint:
        reader: Optional[CheckpointReader] = load_checkpoint(model, cfg.model.checkpoint)
        return model, reader.layer_source, reader
    model.init_from_seed()
    H, F, seed = cfg.model.hidden_size, cfg.model.moe.expert_hidden_size, cfg.model.seed
    return model, (lambda layer: lambda e: init_expert_weights(seed, layer, e, H, F, model.dtype)), None


def make_rebalancer(cfg: Config, model: MoEDiT, ctx: ParallelContext, stats: ExpertLoadStats):
    """-> (rebalancer or None, a note for summary.json)."""
    if not cfg.eplb.enabled:
        return None, "disabled"
    return (Rebalancer(model.moe_layers(), ctx, cfg.eplb, stats, transfer_timeout_s=ctx.timeout_s),
            "moe_ep.rebalance.Rebalancer")


def install_placement_file(path: str, model: MoEDiT, weight_source) -> None:
    """Install an offline placement without a rebalancer: every rank fills its own slots from
    `weight_source` (no weights move between ranks). Raises ConfigError naming eplb.placement_file."""
    layers = model.moe_layers()
    try:
        phy2log = read_placement_file(path, len(layers), layers[0].cfg.num_experts, layers[0].num_slots,
                                      model.ctx.ep_size)  # [L, R]
    except ValueError as err:
        raise ConfigError("eplb.placement_file", path, str(err)) from None
    for layer in layers:
        layer.set_placement(phy2log[layer.layer_idx], weight_source(layer.layer_idx))


def _all_ranks_ok(ok: bool, ctx: ParallelContext) -> bool:
    """True when `ok` on every rank of the world (one all-reduce; no-op for a world of one)."""
    if ctx.world_size == 1:
        return ok
    flag = torch.tensor([int(ok)], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def apply_eplb_files(cfg: Config, model: MoEDiT, stats: ExpertLoadStats, rebalancer, weight_source) -> None:
    """eplb.stats_file seeds the statistics; eplb.placement_file installs an offline placement
    (through the rebalancer when there is one, else straight from the weight source)."""
    e = cfg.eplb
    if e.stats_file:
        error = None
        try:
            stats.load_seed(e.stats_file)
        except ValueError as err:
            error = err
        # Every rank read the file; all must have succeeded before any of them enters the
        # rebalance below, or the others would wait in its broadcast until the timeout.
        if not _all_ranks_ok(error is None, model.ctx):
            raise ConfigError("eplb.stats_file", e.stats_file,
                              str(error) if error else "could not be read on another rank") from None
        if rebalancer is not None and not e.placement_file:
            # resume: start from a placement planned on the earlier run's load (collective)
            rebalancer.rebalance_now(-1, trigger="stats_file")
    if e.placement_file:
        if rebalancer is None:
            install_placement_file(e.placement_file, model, weight_source)
            return
        try:
            rebalancer.load_placement_file(e.placement_file)
        except ValueError as err:
            raise ConfigError("eplb.placement_file", e.placement_file, str(err)) from None


class RunInterrupted(Exception):
    """Raised in the main thread by launch/infer.py's SIGTERM handler (the DeepSpeed launcher
    sends SIGTERM to every rank when one exits non-zero)."""


class PeerLostError(RuntimeError):
    """A collective failed or timed out (a rank died or hangs), or the launcher stopped this rank."""

    def __init__(self, rank: int, phase: str, detail: str):
        self.rank, self.phase, self.detail = rank, phase, detail
        super().__init__(f"rank {rank} lost contact with its peers during {phase}: {detail}")


TEST_DIE_ENV = "MOE_EP_TEST_DIE_AT_STEP"   # tests: "<forward>:<rank>[:hang]", see _test_die_at
STATS_SAVE_EVERY_S = 10.0                  # rank 0 also rewrites stats.json when a window closes this long after the last write
_PEER_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe", "closed")


def _test_die_at() -> Optional[tuple[int, int, str]]:
    """MOE_EP_TEST_DIE_AT_STEP="<forward>:<rank>[:hang]" (tests only): exit, or hang, there."""
    raw = os.environ.get(TEST_DIE_ENV)
    if not raw:
        return None
    forward, rank, *mode = raw.split(":")
    return int(forward), int(rank), (mode or ["exit"])[0]


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
    written to stats.json and PeerLostError names this rank and the phase (no summary.json)."""
    track = {"phase": "start-up", "stats": None}
    try:
        return _run(cfg, ctx, progress, track)
    except ConfigError:
        raise
    except BaseException as err:
        _save_stats_on_error(track["stats"], cfg.output_dir)
        Telemetry.abort_active()  # rank 0: offline wandb history so far, run finished with exit code 1; never raises
        if _lost_peer(err, ctx):
            detail = "stopped by SIGTERM (the launcher stops every rank when one exits non-zero)" \
                if isinstance(err, RunInterrupted) else \
                f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
            raise PeerLostError(ctx.rank, track["phase"], detail) from err
        raise


def _run(cfg: Config, ctx: ParallelContext, progress: bool, track: dict) -> dict:
    s, out_dir = cfg.sampling, cfg.output_dir
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    model, weight_source, reader = build_model(cfg, ctx)
    L = len(model.moe_layers())
    stats = ExpertLoadStats(L, cfg.model.moe.num_experts, ctx.device, cfg.eplb.window_size,
                            cfg.eplb.timestep_buckets, cfg.model.moe.top_k)
    track["stats"] = stats
    for layer in model.moe_layers():
        layer.stats = stats
    rebalancer, rebalancer_note = make_rebalancer(cfg, model, ctx, stats)
    apply_eplb_files(cfg, model, stats, rebalancer, weight_source)
    telemetry = Telemetry(cfg, ctx, out_dir)
    telemetry.attach(model, stats)  # phase timers on the blocks and MoE layers; window loads for heatmaps
    for ev in (rebalancer.events if rebalancer is not None else []):   # stats_file / placement_file
        telemetry.log_rebalance(ev)
    pipe = MoEDiTPipeline(model, PromptEncoder(cfg.model, model.text_encoder, ctx.device, model.dtype),
                          FlowMatchEulerScheduler(s.shift))
    groups = (ctx.ep_group, ctx.dp_group)

    prompts = list(s.prompts)
    batches = [list(range(i, min(i + s.batch_size, len(prompts)))) for i in range(0, len(prompts), s.batch_size)]
    rounds = math.ceil(len(batches) / ctx.world_size)
    n_tokens = (s.height // cfg.model.vae_scale_factor // cfg.model.patch_size) * \
               (s.width // cfg.model.vae_scale_factor // cfg.model.patch_size)
    rows_per_prompt = n_tokens * (2 if s.guidance_scale > 1.0 else 1)

    from tqdm import tqdm
    bar = tqdm(total=rounds * s.num_inference_steps, desc="sampling", unit="step",
               disable=not (progress and ctx.is_main), dynamic_ncols=True)
    steps: list[dict] = []
    window_balance: list[list[float]] = []
    state = {"forward": 0, "t0": 0.0, "round": 0}
    sync = (lambda: torch.cuda.synchronize(ctx.device)) if ctx.device.type == "cuda" else (lambda: None)

    def round_rows(r: int) -> int:  # token rows through the transformer in round r, all ranks
        return sum(len(batches[j]) for j in range(r * ctx.world_size, min((r + 1) * ctx.world_size, len(batches)))) \
            * rows_per_prompt

    die_at = _test_die_at()
    last_save = [time.perf_counter()]

    def save_stats() -> None:  # rank 0: the statistics so far (complete windows), atomically
        stats.save(os.path.join(out_dir, "stats.json"))
        last_save[0] = time.perf_counter()

    def on_begin(step: int, t: float, info: dict) -> None:
        track["phase"] = f"forward {state['forward']} (round {state['round']}, step {step})"
        if die_at is not None and die_at[:2] == (state["forward"], ctx.rank):
            print(f"{TEST_DIE_ENV}: rank {ctx.rank} {die_at[2]}s before forward {state['forward']}",
                  file=sys.stderr, flush=True)
            if die_at[2] == "hang":
                while True:
                    time.sleep(1)
            os._exit(1)
        stats.begin_forward(t, info["cond_rows"])
        sync()
        state["t0"] = time.perf_counter()

    moe_layers = model.moe_layers()
    snap = {"placements": None, "phy2log": None, "timesteps": None, "timesteps_list": None}

    def stacked(placements: list) -> torch.Tensor:
        """[L, R] phy2log of these Placement objects, stacked again only when one of them is a new
        object (set_placement installs a new Placement; none is changed in place)."""
        prev = snap["placements"]
        if prev is None or not all(a is b for a, b in zip(prev, placements)):
            snap.update(placements=placements, phy2log=torch.stack([p.phy2log for p in placements]))
        return snap["phy2log"]

    def timesteps_list() -> list:
        """pipe.scheduler.timesteps as a list, converted again only when the scheduler set new ones."""
        ts = pipe.scheduler.timesteps
        if ts is not snap["timesteps"]:
            snap.update(timesteps=ts, timesteps_list=ts.tolist())
        return snap["timesteps_list"]

    def on_end(step: int, t: float, info: dict) -> None:
        sync()
        latency = time.perf_counter() - state["t0"]
        windows_before = stats.num_windows
        in_effect = [l.placement for l in moe_layers]   # placement during this forward (stacked if a window closes)
        event = None
        track["phase"] = f"the statistics window / rebalance after forward {state['forward']}"
        if rebalancer is not None:  # it closes the statistics windows itself
            steps_t = timesteps_list()
            next_t = steps_t[step + 1] if step + 1 < len(steps_t) else steps_t[0]
            event = rebalancer.after_forward(state["forward"], t, next_timestep=next_t)
        else:
            stats.end_forward(groups)
        closed = stats.num_windows > windows_before
        rows = round_rows(state["round"])
        rec = {"forward": state["forward"], "round": state["round"], "step": step, "t": t,
               "latency_ms": latency * 1e3, "tokens": rows, "tokens_per_s": rows / latency if latency > 0 else 0.0}
        if closed:
            load = stats.windows[-1].astype(np.float64)                              # [L, E]
            bal = layer_balancedness(load, stacked(in_effect), ctx.ep_size).tolist()   # placement before the rebalance
            window_balance.append(bal)
            rec["balancedness"] = float(np.mean(bal)) if bal else 1.0
            rec.update({f"balancedness/layer{i}": b for i, b in enumerate(bal)})
        if event is not None:
            telemetry.log_rebalance(event)
            rec["rebalanced"] = int(bool(event.get("ok", True)))
        steps.append(rec)
        track["phase"] = f"the telemetry gather after forward {state['forward']}"
        telemetry.log_step(rec)
        if closed and ctx.is_main and time.perf_counter() - last_save[0] >= STATS_SAVE_EVERY_S:
            save_stats()
        state["forward"] += 1
        bar.update(1)

    written: list[tuple[int, str]] = []
    t_start = time.perf_counter()
    for r in range(rounds):
        state["round"] = r
        j = r * ctx.world_size + ctx.rank
        idx = batches[j] if j < len(batches) else []
        latents = pipe([prompts[i] for i in idx], negative_prompt=s.negative_prompt,
                       num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                       height=s.height, width=s.width, seeds=[s.seed + i for i in idx],
                       callback_on_forward_begin=on_begin, callback_on_forward_end=on_end)
        for i, image in zip(idx, decode_latents(latents, cfg.model.vae_scale_factor)):
            path = os.path.join(out_dir, "images", f"{i:03d}.png")
            save_png(image, path)
            written.append((i, path))
        if ctx.is_main:
            save_stats()  # after every round, with its images: what a killed run leaves is complete
    wall = time.perf_counter() - t_start
    bar.close()
    track["phase"] = "the last statistics window"
    if stats.window_open:  # close the last, partial window (collective; same count on every rank)
        stats.close_window(groups)
        window_balance.append(layer_balancedness(stats.windows[-1].astype(np.float64),
                                                 stacked([l.placement for l in moe_layers]), ctx.ep_size).tolist())
    track["phase"] = "the final barrier"
    if ctx.world_size > 1:
        dist.barrier()  # every rank's images are on disk
    track["phase"] = "writing the outputs"

    # per layer: the mean over the closed windows of the balancedness under the placement in effect
    # for each window (not the final placement applied to the whole run's load)
    bal = np.mean(window_balance, axis=0).tolist() if window_balance else []
    lat = [x["latency_ms"] for x in steps]
    fwd_time = sum(lat) / 1e3
    summary = {
        "config": cfg.to_dict(),
        "world_size": ctx.world_size, "ep_size": ctx.ep_size, "dp_size": ctx.dp_size,
        "ranks_per_node": ctx.ranks_per_node, "device": str(ctx.device),
        "num_prompts": len(prompts), "num_forwards": len(steps), "tokens_per_image": n_tokens,
        "images": [{"path": os.path.relpath(os.path.join(out_dir, "images", f"{i:03d}.png"), out_dir),
                    "prompt": prompts[i], "seed": s.seed + i} for i in range(len(prompts))],
        "wall_s": wall,
        "latency_ms": {"mean": float(np.mean(lat)) if lat else 0.0, "p50": float(np.median(lat)) if lat else 0.0,
                       "max": float(np.max(lat)) if lat else 0.0},
        "tokens_per_s": sum(x["tokens"] for x in steps) / fwd_time if fwd_time > 0 else 0.0,
        "steps": steps,
        "balancedness": {"per_layer": bal, "mean": float(np.mean(bal)) if bal else 1.0,
                         "windows": window_balance},
        "placement": [l.placement.phy2log.tolist() for l in model.moe_layers()],
        "eplb": {"enabled": cfg.eplb.enabled, "rebalancer": rebalancer_note},
        "rebalances": [{k: v for k, v in ev.items() if not str(k).startswith("_")}
                       for ev in (rebalancer.events if rebalancer is not None else [])],
        "checkpoint": cfg.model.checkpoint,
    }
    if ctx.is_main:
        stats.save(os.path.join(out_dir, "stats.json"))
        telemetry.log_images([os.path.join(out_dir, x["path"]) for x in summary["images"]],
                             [f"{x['prompt']} (seed {x['seed']})" for x in summary["images"]])
    telemetry.finish(_jsonable(summary))
    del reader
    return summary


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
