"""Routing traces of the trained demo model and what EPLB does with them (docs/eplb_runtime.md).

    python -m moe_ep.demo.routing --out docs/demo          # record, analyse, plot, write the fixture

`record_trace` samples prompts in process at EP = 1 and counts, for every forward (one per
sampling step), MoE layer, guidance branch and expert, the routed copies -- a joint
[steps, 2, L, E] tensor, finer than stats.json's marginals (`timestep_buckets`, `branches`).
Routing is recomputed from each MoELayer's input with the router rule (TrainMoE.route, which
tests/test_demo.py holds equal to the runtime's). `to_stats` writes it in the stats format
(docs/formats.md; `windows` = one per step in time order, plus the extra key `step_branch`), so
`python -m eplb simulate/plan --stats` read it. `placement_study` compares, on a trace recorded
with other seeds than the plans were made from: no EPLB, one placement for all timesteps, and one
placement per timestep phase (net of the weight moves at every phase switch), with the
balancedness metric and eplb/simulate.py's cost model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def record_trace(cfg, prompts: list[str], seed: int, batch_size: int = 16) -> dict:
    """Sample `prompts` (prompt i with seed `seed + i`) with cfg at EP = 1 -> {"counts":
    [S, 2, L, E] int64 copies per step, branch (0 cond, 1 uncond), layer, expert; "timesteps": [S]}."""
    from ..models.moedit.checkpoint import load_checkpoint
    from ..models.moedit.dit import MoEDiT
    from ..models.moedit.sampler import FlowMatchEulerScheduler, MoEDiTPipeline
    from ..models.moedit.text import PromptEncoder
    from ..parallel import ParallelContext
    from .train_moe import TrainMoE

    ctx = ParallelContext()
    model = MoEDiT(cfg.model, ctx)
    load_checkpoint(model, cfg.model.checkpoint)
    s, moe = cfg.sampling, cfg.model.moe
    layers = model.moe_layers()
    routers = [TrainMoE(layer) for layer in layers]        # the routing rule only, over the same weights
    counts = np.zeros((s.num_inference_steps, 2, len(layers), moe.num_experts), np.int64)
    state = {"step": 0, "cond_rows": None}
    timesteps: list[float] = [0.0] * s.num_inference_steps   # t in [0, 1] the forwards saw (the hook's t)

    def pre_hook(layer_idx):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])                       # [rows, H], cond rows first
            _, ids, _ = routers[layer_idx].route(x)                          # [rows, k]
            n_cond = state["cond_rows"] if state["cond_rows"] is not None else x.shape[0]
            for branch, part in enumerate((ids[:n_cond], ids[n_cond:])):
                counts[state["step"], branch, layer_idx] += np.bincount(part.reshape(-1).numpy(),
                                                                        minlength=moe.num_experts)
        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(i)) for i, layer in enumerate(layers)]

    def on_begin(step, t, info):
        state["step"], state["cond_rows"] = step, info.get("cond_rows")
        timesteps[step] = float(t)

    pipe = MoEDiTPipeline(model, PromptEncoder(cfg.model, model.text_encoder, ctx.device, model.dtype),
                          FlowMatchEulerScheduler(s.shift))
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            pipe(chunk, negative_prompt=s.negative_prompt, num_inference_steps=s.num_inference_steps,
                 guidance_scale=s.guidance_scale, height=s.height, width=s.width,
                 seeds=[seed + i + j for j in range(len(chunk))], callback_on_forward_begin=on_begin)
    finally:
        for h in handles:
            h.remove()
    return {"counts": counts, "timesteps": timesteps}


def to_stats(trace: dict, top_k: int) -> dict:
    """A trace -> the stats format (docs/formats.md): load, windows (one per step, time order),
    timestep_buckets (one per step, t_min = t_max = the step's t), branches, and `step_branch`
    [S][2][L][E] (extra key, ignored by readers)."""
    c = np.asarray(trace["counts"])                                          # [S, 2, L, E]
    S, _, L, E = c.shape
    per_step = c.sum(1)                                                      # [S, L, E]
    return {"format": "moe-ep.expert-load", "version": 1, "num_layers": L, "num_experts": E, "top_k": top_k,
            "load": per_step.sum(0).tolist(), "windows": [{"load": w.tolist()} for w in per_step],
            "timestep_buckets": [{"t_min": t, "t_max": t, "load": per_step[i].tolist()}
                                 for i, t in enumerate(trace["timesteps"])],
            "branches": {"cond": c[:, 0].sum(0).tolist(), "uncond": c[:, 1].sum(0).tolist()},
            "step_branch": c.tolist(), "timesteps": trace["timesteps"]}


def _tv(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total-variation distance between load distributions along the last axis."""
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    return 0.5 * np.abs(p - q).sum(-1)


def skew_summary(counts: np.ndarray) -> dict:
    """counts [S, 2, L, E] -> per layer: max/mean of the run's load, of each step's load (mean
    over steps), TV distance of each step's distribution from the run's (mean and max over steps),
    TV between the first and the last step, TV between the cond and uncond branches."""
    c = np.asarray(counts, np.float64)
    run = c.sum((0, 1))                                                      # [L, E]
    step = c.sum(1)                                                          # [S, L, E]
    mm = lambda x: x.max(-1) / x.mean(-1)                                    # noqa: E731
    tv_steps = _tv(step, run[None])                                          # [S, L]
    return {"max_over_mean": mm(run).tolist(), "max_over_mean_per_step": mm(step).tolist(),
            "tv_step_vs_run_mean": tv_steps.mean(0).tolist(), "tv_step_vs_run_max": tv_steps.max(0).tolist(),
            "tv_first_vs_last": _tv(step[0], step[-1]).tolist(),
            "tv_cond_vs_uncond": _tv(c[:, 0].sum(0), c[:, 1].sum(0)).tolist()}


def phases(num_steps: int, num_phases: int) -> list[list[int]]:
    """Split steps 0..S-1 into `num_phases` consecutive groups (as equal as possible)."""
    return [list(a) for a in np.array_split(np.arange(num_steps), num_phases)]


def placement_study(plan_counts: np.ndarray, eval_counts: np.ndarray, gpus=(8, 16, 32, 64),
                    num_phases=(4, None), redundant_per_gpu: int = 1) -> list[dict]:
    """Plans made from `plan_counts`, judged on `eval_counts` (both [S, 2, L, E], other seeds).

    Per GPU count P (8 per node, R = E + redundant x P for the planned placements): balancedness
    (mean over steps and layers of mean/max GPU load) and the simulator's per-layer step time (ms,
    eplb/simulate.py defaults: hidden 4096, expert hidden 3072, 8192 tokens per GPU, top-k of the
    trace's proportions) of: none (contiguous, R = E); one placement (planned on the whole trace);
    timestep-aware with n phases (one plan per phase, chained for minimal movement; every image
    batch switches n times, wrapping back to phase 0, and the moves are charged per step); n = None:
    one phase per step."""
    from eplb.metrics import balancedness
    from eplb.rebalance import rebalance_experts
    from eplb.simulate import Model, contiguous, layer_times, rebalance_cost, step_load

    plan_step = np.asarray(plan_counts, np.float64).sum(1)                   # [S, L, E]
    eval_step = np.asarray(eval_counts, np.float64).sum(1)
    S, L, E = eval_step.shape
    model = Model()
    rows = []
    for P in gpus:
        if E % P:
            continue
        N = max(1, P // 8)
        R = E + redundant_per_gpu * P

        def judge(plan_of_step):
            bal, ms = [], []
            for s in range(S):
                t = layer_times(step_load(eval_step[s], model, P), plan_of_step(s), P, N, model)
                bal.append(balancedness(t["gpu_copies"]))
                ms.append(t["total"].mean() * 1e3)
            return float(np.mean(bal)), float(np.mean(ms))

        base = contiguous(L, E)
        b, ms = judge(lambda s: base)
        rows.append(dict(P=P, N=N, policy="none", balancedness=b, ms=ms, move_ms=0.0, net_ms=ms))
        one = rebalance_experts(plan_step.sum(0), R, 1, N, P)[0].numpy()
        b, ms = judge(lambda s: one)
        first = rebalance_cost(base, one, P, N, model)["seconds"]
        rows.append(dict(P=P, N=N, policy="one placement", balancedness=b, ms=ms, move_ms=0.0, net_ms=ms,
                         initial_move_s=first))
        for n in (S if n is None else n for n in num_phases):
            groups = phases(S, n)
            plans, prev = [], one
            for g in groups:
                prev = rebalance_experts(plan_step[g].sum(0), R, 1, N, P, previous_phy2log=prev)[0].numpy()
                plans.append(prev)
            phase_of = {s: i for i, g in enumerate(groups) for s in g}
            b, ms = judge(lambda s: plans[phase_of[s]])
            moves = [rebalance_cost(plans[i], plans[(i + 1) % n], P, N, model) for i in range(n)]
            move_ms = sum(m["seconds"] for m in moves) / S / L * 1e3        # per layer per step
            rows.append(dict(P=P, N=N, policy=f"timestep-aware, {n} phases", balancedness=b, ms=ms,
                             move_ms=move_ms, net_ms=ms + move_ms,
                             moved_per_switch=float(np.mean([m["moved"] for m in moves]))))
    return rows


def plot(counts: np.ndarray, timesteps: list[float], path: str) -> None:
    """Two panels: per-layer max/mean expert load at each step (cond + uncond), and the expert
    load share of each layer's hottest experts over the steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.asarray(counts, np.float64)
    step = c.sum(1)                                                          # [S, L, E]
    S, L, E = step.shape
    fig, axes = plt.subplots(1, 1 + L, figsize=(4 + 3.2 * L, 3.4))
    mm = step.max(-1) / step.mean(-1)                                        # [S, L]
    for l in range(L):
        axes[0].plot(timesteps, mm[:, l], marker="o", label=f"layer {l}")
    axes[0].set_xlabel("timestep t (1 = noise)")
    axes[0].set_xlim(1.02, 0.0)
    axes[0].set_ylabel("max / mean expert load")
    axes[0].legend(fontsize=7)
    axes[0].set_title("skew per step")
    for l in range(L):
        share = step[:, l] / step[:, l].sum(-1, keepdims=True)               # [S, E]
        order = np.argsort(-share.sum(0))
        im = axes[1 + l].imshow(share[:, order].T * E, aspect="auto", cmap="magma", vmin=0,
                                extent=[0, S, E, 0])
        axes[1 + l].set_title(f"layer {l}: load / mean")
        axes[1 + l].set_xlabel("sampling step")
        if l == 0:
            axes[1].set_ylabel("expert (by total load)")
    fig.colorbar(im, ax=axes[1:].tolist(), shrink=0.8)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    from .. import config as config_mod
    from ..atomic import write_json_atomic
    from .adherence import eval_prompts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/quickstart.json")
    p.add_argument("--out", default="docs/demo")
    p.add_argument("--fixture", default="tests/data/shapes_demo_trace.json")
    p.add_argument("--prompts", type=int, default=64)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_mod.load(args.config)
    os.makedirs(args.out, exist_ok=True)
    prompts = eval_prompts(args.prompts)
    evald = record_trace(cfg, prompts, seed=cfg.sampling.seed)
    plan = record_trace(cfg, prompts, seed=cfg.sampling.seed + 10_000)     # other noise: plans are not judged on their own data
    stats = to_stats(evald, cfg.model.moe.top_k)
    os.makedirs(os.path.dirname(args.fixture), exist_ok=True)
    write_json_atomic(args.fixture, stats, indent=None)
    write_json_atomic(os.path.join(args.out, "plan_trace.json"), to_stats(plan, cfg.model.moe.top_k), indent=None)
    plot(evald["counts"], evald["timesteps"], os.path.join(args.out, "routing_skew.png"))
    result = {"skew": skew_summary(evald["counts"]), "study": placement_study(plan["counts"], evald["counts"]),
              "timesteps": evald["timesteps"]}
    write_json_atomic(os.path.join(args.out, "routing_study.json"), result)
    print(json.dumps(result["skew"], indent=1))
    for r in result["study"]:
        print(f"P={r['P']:3d} N={r['N']} {r['policy']:26s} bal {r['balancedness']:.3f}  layer {r['ms']:.3f} ms  "
              f"moves {r['move_ms']:.3f} ms  net {r['net_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
