"""The inference job behind `launch/infer.py`: build the model, sample every prompt, write
images, stats.json and summary.json, rebalance experts between forwards when enabled.

Work split: prompts are cut into batches of `sampling.batch_size`; batch j runs on rank
j % world in round j // world. Every rank runs the same number of rounds (a rank with no
batch left runs the forwards with zero rows), so the EP all-to-alls and the statistics
all-reduces always line up.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import CheckpointReader, inspect_checkpoint, load_checkpoint
from ..config import Config, ConfigError
from ..experts import init_expert_weights
from ..images import decode_latents, save_png, write_json_atomic
from ..parallel import ParallelContext, check_layout, derive_ep_size
from ..stats import ExpertLoadStats
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


def balancedness(load: np.ndarray, phy2log, ep_size: int) -> float:
    """mean / max GPU load; GPU load = sum over its slots of load[expert] / replicas[expert]."""
    phy2log = np.asarray(phy2log, dtype=np.int64)
    cnt = np.bincount(phy2log, minlength=load.shape[0])
    gpu = (load[phy2log] / cnt[phy2log]).reshape(ep_size, -1).sum(1)
    return float(gpu.mean() / gpu.max()) if gpu.max() > 0 else 1.0


def layer_balancedness(load: Optional[np.ndarray], model: MoEDiT) -> list[float]:
    if load is None:
        return []
    return [balancedness(load[l.layer_idx], l.placement.phy2log.numpy(), model.ctx.ep_size)
            for l in model.moe_layers()]


def make_rebalancer(cfg: Config, model: MoEDiT, ctx: ParallelContext, stats: ExpertLoadStats):
    """-> (rebalancer or None, a note for summary.json)."""
    if not cfg.eplb.enabled:
        return None, "disabled"
    try:
        from ..rebalance import Rebalancer
    except ImportError as err:
        if ctx.is_main:
            warnings.warn(f"eplb.enabled but moe_ep.rebalance is not available ({err}); running without rebalancing")
        return None, f"unavailable: {err}"
    return Rebalancer(model.moe_layers(), ctx, cfg.eplb, stats), "moe_ep.rebalance.Rebalancer"


def apply_eplb_files(cfg: Config, model: MoEDiT, stats: ExpertLoadStats, rebalancer, weight_source) -> None:
    """eplb.stats_file seeds the statistics; eplb.placement_file installs an offline placement
    (through the rebalancer when there is one, else straight from the weight source)."""
    e, L = cfg.eplb, len(model.moe_layers())
    if e.stats_file:
        if hasattr(stats, "load_seed"):
            try:
                stats.load_seed(e.stats_file)
            except ValueError as err:
                raise ConfigError("eplb.stats_file", e.stats_file, str(err)) from None
        else:
            with open(e.stats_file) as f:
                load = np.asarray(json.load(f).get("load"), dtype=np.float64)
            if load.shape != (L, cfg.model.moe.num_experts):
                raise ConfigError("eplb.stats_file", e.stats_file,
                                  f"'load' must be [{L}][{cfg.model.moe.num_experts}], got {list(load.shape)}")
            stats.seed_load = load
    if e.placement_file:
        if rebalancer is not None and hasattr(rebalancer, "load_placement_file"):
            try:
                rebalancer.load_placement_file(e.placement_file)
            except ValueError as err:
                raise ConfigError("eplb.placement_file", e.placement_file, str(err)) from None
            return
        with open(e.placement_file) as f:
            rows = json.load(f).get("phy2log")
        if not isinstance(rows, list) or len(rows) != L:
            raise ConfigError("eplb.placement_file", e.placement_file, f"needs 'phy2log' with {L} rows (MoE layers)")
        for layer, row in zip(model.moe_layers(), rows):
            layer.set_placement(row, weight_source(layer.layer_idx))


def run(cfg: Config, ctx: ParallelContext, progress: bool = True) -> dict:
    """Sample every prompt; write output_dir/images/*.png, stats.json, summary.json. Collective."""
    s, out_dir = cfg.sampling, cfg.output_dir
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    model, weight_source, reader = build_model(cfg, ctx)
    L = len(model.moe_layers())
    stats = ExpertLoadStats(L, cfg.model.moe.num_experts, ctx.device, cfg.eplb.window_size,
                            cfg.eplb.timestep_buckets, cfg.model.moe.top_k)
    for layer in model.moe_layers():
        layer.stats = stats
    rebalancer, rebalancer_note = make_rebalancer(cfg, model, ctx, stats)
    apply_eplb_files(cfg, model, stats, rebalancer, weight_source)
    telemetry = Telemetry(cfg, ctx, out_dir)
    telemetry.attach(model, stats)  # phase timers on the blocks and MoE layers; window loads for heatmaps
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

    def on_begin(step: int, t: float, info: dict) -> None:
        stats.begin_forward(t, info["cond_rows"])
        sync()
        state["t0"] = time.perf_counter()

    def on_end(step: int, t: float, info: dict) -> None:
        sync()
        latency = time.perf_counter() - state["t0"]
        windows_before = len(stats.windows)
        placements = [l.placement.phy2log.numpy() for l in model.moe_layers()]  # in effect for this window
        event = None
        if rebalancer is not None:  # it closes the statistics windows itself
            steps_t = pipe.scheduler.timesteps.tolist()
            next_t = steps_t[step + 1] if step + 1 < len(steps_t) else steps_t[0]
            event = rebalancer.after_forward(state["forward"], t, next_timestep=next_t)
        else:
            stats.end_forward(groups)
        closed = len(stats.windows) > windows_before
        rows = round_rows(state["round"])
        rec = {"forward": state["forward"], "round": state["round"], "step": step, "t": t,
               "latency_ms": latency * 1e3, "tokens": rows, "tokens_per_s": rows / latency if latency > 0 else 0.0}
        if closed:
            load = stats.windows[-1].sum(axis=(0, 1)).astype(np.float64)            # [L, E]
            bal = [balancedness(load[l], p, ctx.ep_size) for l, p in enumerate(placements)]
            window_balance.append(bal)
            rec["balancedness"] = float(np.mean(bal)) if bal else 1.0
            rec.update({f"balancedness/layer{i}": b for i, b in enumerate(bal)})
        if event is not None:
            telemetry.log_rebalance(event)
            rec["rebalanced"] = int(bool(event.get("ok", True)))
        steps.append(rec)
        telemetry.log_step(rec)
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
    wall = time.perf_counter() - t_start
    bar.close()
    if getattr(stats, "window_open", stats._forwards_in_window > 0):  # close the last, partial window (collective; same count on every rank)
        stats.close_window(groups)
    if ctx.world_size > 1:
        dist.barrier()  # every rank's images are on disk

    total = stats.total().sum(axis=(0, 1)).astype(np.float64)          # [L, E]
    bal = layer_balancedness(total, model)
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
                       for ev in (getattr(rebalancer, "events", None) or [])],
        "checkpoint": cfg.model.checkpoint,
    }
    if ctx.is_main:
        write_json_atomic(stats.to_json(), os.path.join(out_dir, "stats.json"))
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
