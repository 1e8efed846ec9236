"""Paper model of MoE-layer time at scale: ``python -m eplb simulate`` (docs/simulator.md).

Given expert loads ``[L, E]`` (a stats file, docs/formats.md, or a synthetic Zipf trace), predicts the
per-layer, per-step time of an MoE layer on ``P`` GPUs over ``N`` nodes for a placement: expert
compute (the slowest GPU), dispatch and combine all-to-alls (the slowest GPU's NVLink and network
traffic), optional compute/comm overlap, and the amortised cost of moving expert weights when
rebalancing. Compares no rebalancing (contiguous placement, ``R = E``) with the ``greedy`` and
``default`` planners (``R = E + redundant``).

Pure numpy/torch on the CPU; never imports ``moe_ep``. Every constant is documented, with its
source, in docs/simulator.md.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .metrics import balancedness, gpu_load
from .rebalance import rebalance_experts

MB = 1 << 20


@dataclass(frozen=True)
class Hardware:
    """Rates of the machine (defaults: docs/anchors.md, 2 x H200, NV18, bf16; network: an assumption)."""

    # torch._grouped_mm SwiGLU experts (hidden 4096, expert hidden 3072): (tokens per expert, FLOP/s)
    gemm_anchors: tuple = ((128, 370e12), (1024, 579e12))
    # NCCL all_to_all_single per rank on NVLink: (message bytes, bytes/s)
    nvlink_anchors: tuple = ((1 * MB, 16e9), (16 * MB, 111e9), (64 * MB, 215e9), (256 * MB, 269e9))
    p2p_bw: float = 225e9  # one expert (75 MB) sent GPU to GPU on NVLink
    net_bw: float = 50e9  # per-GPU network bandwidth (400 Gb/s NIC), each direction; assumption
    net_latency: float = 25e-6  # per inter-node all-to-all; assumption
    overlap: float = 0.0  # fraction of min(compute, comm) hidden by chunked overlap


@dataclass(frozen=True)
class Model:
    """Sizes of one MoE layer and of the work per step (defaults: the HunyuanImage-like anchor shape)."""

    hidden: int = 4096
    expert_hidden: int = 3072
    top_k: int = 8
    tokens_per_gpu: int = 8192  # tokens each GPU holds per forward (weak scaling)
    bytes_per_elem: int = 2  # bf16 activations and weights

    @property
    def flops_per_copy(self) -> float:
        """SwiGLU expert: gate+up (2 x hidden x expert_hidden) and down (1 x) GEMMs, 2 FLOPs per MAC."""
        return 2.0 * 3 * self.hidden * self.expert_hidden

    @property
    def copy_bytes(self) -> int:
        """One token copy on the wire (dispatch: the input row; combine: the output row)."""
        return self.hidden * self.bytes_per_elem

    @property
    def expert_bytes(self) -> int:
        """One expert's weights (w13: hidden x 2*expert_hidden, w2: expert_hidden x hidden)."""
        return 3 * self.hidden * self.expert_hidden * self.bytes_per_elem


# ---------------------------------------------------------------------------------------------
# rates


def _loglinear(x, anchors) -> np.ndarray:
    """Interpolate ``y`` linearly in ``log(x)`` between anchors ``((x, y), ...)``; clamp outside."""
    xs = np.log([a[0] for a in anchors])
    ys = np.array([a[1] for a in anchors], dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    return np.interp(np.log(np.maximum(x, 1e-300)), xs, ys)


def gemm_rate(tokens_per_expert, hw: Hardware = Hardware()) -> np.ndarray:
    """Grouped-GEMM FLOP/s at ``tokens_per_expert`` (log-space interpolation, clamped)."""
    return _loglinear(tokens_per_expert, hw.gemm_anchors)


def nvlink_time(nbytes, hw: Hardware = Hardware()) -> np.ndarray:
    """Seconds for one GPU's intra-node all-to-all traffic of ``nbytes`` (0 -> 0).

    Bandwidth interpolated in log(message size) between the anchors, 269 GB/s above 256 MB; below
    the smallest anchor the time of the smallest anchor (1 MB at 16 GB/s = 62.5 us) is a latency floor.
    """
    b = np.asarray(nbytes, dtype=np.float64)
    small = hw.nvlink_anchors[0][0]
    t = np.maximum(b, small) / _loglinear(np.maximum(b, small), hw.nvlink_anchors)
    return np.where(b > 0, t, 0.0)


def net_time(nbytes, hw: Hardware = Hardware()) -> np.ndarray:
    """Seconds for one GPU's inter-node traffic: latency + bytes / per-GPU network bandwidth (0 -> 0)."""
    b = np.asarray(nbytes, dtype=np.float64)
    return np.where(b > 0, hw.net_latency + b / hw.net_bw, 0.0)


# ---------------------------------------------------------------------------------------------
# traces


def step_load(load, model: Model, num_gpus: int) -> np.ndarray:
    """Scale loads ``[L, E]`` to one step's token copies: each layer sums to ``tokens_per_gpu x P x k``
    (all-zero layers stay zero). Only the trace's proportions matter."""
    w = np.asarray(load, dtype=np.float64)
    tot = w.sum(1, keepdims=True)
    return np.divide(w, tot, out=np.zeros_like(w), where=tot > 0) * (model.tokens_per_gpu * num_gpus * model.top_k)


def topk_inclusion(skew: float, num_experts: int, top_k: int, samples: int = 1 << 17, seed: int = 0) -> np.ndarray:
    """``[E]`` probability that a token picks the expert of Zipf rank ``r`` (``p_r ~ r^-skew``) among
    its top ``k`` when the k experts are drawn without replacement proportionally to ``p``
    (Plackett-Luce, i.e. top-k of ``log p + Gumbel`` logits). Sums to ``k``; at most 1 each.
    Monte Carlo over ``samples`` tokens (exact ``k / E`` for skew 0)."""
    return _topk_inclusion(float(skew), num_experts, top_k, samples, seed).copy()


@functools.lru_cache(maxsize=64)   # the simulator asks for the same few (skew, E, k) many times
def _topk_inclusion(skew: float, num_experts: int, top_k: int, samples: int, seed: int) -> np.ndarray:
    if skew == 0:
        return np.full(num_experts, top_k / num_experts)
    g = torch.Generator().manual_seed(seed)
    logp = -skew * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float64))
    counts = torch.zeros(num_experts, dtype=torch.float64)
    chunk = max(1, (1 << 22) // num_experts)
    done = 0
    while done < samples:
        m = min(chunk, samples - done)
        u = torch.rand(m, num_experts, generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        idx = (logp - torch.log(-torch.log(u))).topk(top_k, dim=1).indices  # [m, k]
        counts += torch.bincount(idx.flatten(), minlength=num_experts).to(torch.float64)
        done += m
    return (counts / samples).numpy()


def zipf_trace(skew: float, num_layers: int, num_experts: int, top_k: int = 8, num_windows: int = 3,
               tokens_per_window: int = 8192 * 64, seed: int = 0, samples: int = 1 << 17) -> list[np.ndarray]:
    """Synthetic windows ``[[L, E], ...]``: Zipf(``skew``) popularity over a random expert order per layer
    (the same order in every window), each token choosing ``top_k`` distinct experts (Plackett-Luce);
    a window's load of expert ``e`` is Binomial(``tokens_per_window``, inclusion probability of ``e``);
    ``samples``: Monte Carlo tokens for the inclusion probabilities (:func:`topk_inclusion`)."""
    rng = np.random.default_rng(seed)
    pi = topk_inclusion(skew, num_experts, top_k, samples=samples, seed=seed)  # [E] by rank
    prob = np.empty((num_layers, num_experts))  # [L, E]
    for layer in range(num_layers):
        prob[layer, rng.permutation(num_experts)] = pi
    return [rng.binomial(tokens_per_window, prob).astype(np.float64) for _ in range(num_windows)]


def parse_synthetic(spec: str) -> float:
    """``"zipf:1.2"`` -> 1.2 (``"uniform"`` -> 0)."""
    if spec == "uniform":
        return 0.0
    kind, _, val = spec.partition(":")
    try:
        skew = float(val)
    except ValueError:
        skew = -1.0
    if kind != "zipf" or not math.isfinite(skew) or skew < 0:
        raise ValueError(f"synthetic: expected 'zipf:S' with S >= 0 or 'uniform', got {spec!r}")
    return skew


# ---------------------------------------------------------------------------------------------
# the model


def contiguous(num_layers: int, num_experts: int) -> np.ndarray:
    """No rebalancing: ``R = E``, expert ``e`` in slot ``e`` (GPU ``e // (E/P)``). ``[L, E]``."""
    return np.tile(np.arange(num_experts), (num_layers, 1))


def layer_times(load_step, phy2log, num_gpus: int, num_nodes: int, model: Model = Model(),
                hw: Hardware = Hardware()) -> dict:
    """Per-layer time of one step for a placement. ``load_step [L, E]`` token copies this step,
    ``phy2log [L, R]``. Returns arrays ``[L]`` (seconds): ``compute``, ``dispatch``, ``combine``,
    ``comm``, ``total``; and ``[L, P]``: ``gpu_copies``, ``gpu_compute`` (s), ``intra_bytes``, ``inter_bytes``
    (the larger of each GPU's send and receive bytes per all-to-all).

    Compute: GPU ``g`` computes ``n_g = sum over its slots of load[e] / replicas[e]`` copies at the
    grouped-GEMM rate for its mean tokens per slot; the layer waits for the slowest GPU.
    Traffic: tokens start evenly over GPUs and each expert's copies are spread evenly over its
    replicas, so source ``s`` sends ``n_d / P`` copies to every GPU ``d`` (its own share stays):
    GPU ``d`` receives ``n_d (ppn-1)/P`` copies from its node and ``n_d (P-ppn)/P`` from other nodes;
    GPU ``s`` sends ``(node_s - n_s)/P`` within its node and ``(total - node_s)/P`` off it. A GPU's
    all-to-all time is ``max(nvlink_time(max(send, recv) intra), net_time(max(send, recv) inter))``
    (the two kinds of link run concurrently); an all-to-all waits for the slowest GPU. Combine sends
    the same rows back (send and receive swap), so it costs what dispatch costs.
    """
    P, N = num_gpus, num_nodes
    if P % N:
        raise ValueError(f"num_nodes: {N} does not divide num_gpus {P}")
    ppn = P // N
    p2l = np.asarray(phy2log, dtype=np.int64)
    L, R = p2l.shape
    if R % P:
        raise ValueError(f"num_replicas: {R} is not divisible by num_gpus {P}")
    n = gpu_load(torch.as_tensor(np.asarray(load_step, dtype=np.float64)), torch.as_tensor(p2l), P).numpy()  # [L, P]
    per_slot = n / (R // P)
    compute_g = n * model.flops_per_copy / gemm_rate(per_slot, hw)  # [L, P]
    compute = compute_g.max(1)
    node = n.reshape(L, N, ppn).sum(2)  # [L, N]
    node_of = np.repeat(node, ppn, axis=1)  # [L, P]
    total = n.sum(1, keepdims=True)  # [L, 1]
    recv_intra, recv_inter = n * (ppn - 1) / P, n * (P - ppn) / P
    send_intra, send_inter = (node_of - n) / P, (total - node_of) / P
    intra_b = np.maximum(send_intra, recv_intra) * model.copy_bytes  # [L, P]
    inter_b = np.maximum(send_inter, recv_inter) * model.copy_bytes
    a2a = np.maximum(nvlink_time(intra_b, hw), net_time(inter_b, hw)).max(1)  # [L]
    dispatch = combine = a2a
    comm = dispatch + combine
    hi, lo = np.maximum(compute, comm), np.minimum(compute, comm)
    return dict(compute=compute, dispatch=dispatch, combine=combine, comm=comm,
                total=hi + lo * (1.0 - hw.overlap), gpu_copies=n, gpu_compute=compute_g, intra_bytes=intra_b, inter_bytes=inter_b)


def rebalance_cost(old_phy2log, new_phy2log, num_gpus: int, num_nodes: int, model: Model = Model(),
                   hw: Hardware = Hardware()) -> dict:
    """Seconds to move expert weights from one placement to the next, all layers together.

    A GPU must receive every expert it holds in ``new`` but not in ``old`` (a second copy of an expert
    it already holds is a local copy, free); from a GPU of its node if one held it in ``old``
    (``p2p_bw``), else over the network (``net_bw``). A GPU's receives run one after another; the
    move ends with the slowest GPU. ``old``/``new`` ``[L, R_old]``/``[L, R_new]`` (R may differ).
    Returns ``seconds``, ``moved`` (expert copies received), ``inter`` (of which over the network).
    """
    P, N = num_gpus, num_nodes
    ppn = P // N
    old, new = np.asarray(old_phy2log, np.int64), np.asarray(new_phy2log, np.int64)
    L = old.shape[0]
    E = int(max(old.max(), new.max())) + 1

    def held(p2l):  # [L, P, E] bool
        out = np.zeros((L, P, E), dtype=bool)
        k = p2l.shape[1] // P
        out[np.arange(L)[:, None, None], np.arange(P)[None, :, None], p2l.reshape(L, P, k)] = True
        return out

    h_old, h_new = held(old), held(new)
    need = h_new & ~h_old  # [L, P, E]
    on_node = np.repeat(h_old.reshape(L, N, ppn, E).any(2), ppn, axis=1)  # [L, P, E]
    intra = (need & on_node).sum((0, 2))  # [P]
    inter = (need & ~on_node).sum((0, 2))
    t = (intra * model.expert_bytes / hw.p2p_bw + inter * model.expert_bytes / hw.net_bw).max()
    return dict(seconds=float(t), moved=int(need.sum()), inter=int(inter.sum()))


@dataclass
class Config:
    """One simulation: topology and planner settings."""

    num_gpus: int
    num_nodes: int = 1
    redundant_per_gpu: int = 1
    num_groups: int = 1
    interval: int = 8  # forward passes between rebalances (moe-ep's eplb.interval default)
    policies: tuple = ("none", "greedy", "default")
    model: Model = field(default_factory=Model)
    hw: Hardware = field(default_factory=Hardware)


def simulate(windows, cfg: Config) -> dict:
    """Predict per-layer step time for each policy.

    ``windows``: a list of loads ``[L, E]`` in time order (one entry: plan and evaluate on it, an
    oracle; several: the plan made from window ``i`` runs on window ``i+1``, and the moves between
    consecutive plans, made with minimal movement, are the steady-state rebalance cost; the first
    plan's moves from the contiguous placement are reported as ``initial_move_s``).

    Returns ``{policy: dict(ms, compute_ms, comm_ms, rebalance_ms, balancedness, moved, initial_move_s)}``
    where ``ms`` etc. are means over layers and evaluated windows, per layer per step, in milliseconds.
    """
    wins = [np.asarray(w, dtype=np.float64) for w in windows]
    L, E = wins[0].shape
    P, N = cfg.num_gpus, cfg.num_nodes
    if E % P:
        raise ValueError(f"num_gpus: {E} experts are not divisible over {P} GPUs (needed for the no-rebalancing placement)")
    if P % N or P // N > 8:
        raise ValueError(f"num_nodes: {P} GPUs on {N} nodes (GPUs per node must divide P and be <= 8)")
    pairs = [(0, 0)] if len(wins) == 1 else [(i, i + 1) for i in range(len(wins) - 1)]
    R = E + cfg.redundant_per_gpu * P
    base = contiguous(L, E)
    out = {}
    for policy in cfg.policies:
        plans = []
        if policy == "none":
            plans = [base] * len(wins)
        else:
            prev = None
            for i in range(len(pairs)):
                p2l, _, _ = rebalance_experts(wins[pairs[i][0]], R, cfg.num_groups, N, P, policy=policy,
                                              previous_phy2log=prev)
                prev = p2l
                plans.append(p2l.numpy())
        ms, comp, comm, bal, moved = [], [], [], [], []
        for i, (src, dst) in enumerate(pairs):
            ev = step_load(wins[dst], cfg.model, P)
            t = layer_times(ev, plans[i], P, N, cfg.model, cfg.hw)
            ms.append(t["total"].mean() * 1e3)
            comp.append(t["compute"].mean() * 1e3)
            comm.append(t["comm"].mean() * 1e3)
            bal.append(balancedness(t["gpu_copies"]))
        initial = 0.0
        reb_ms = 0.0
        if policy != "none":
            first = rebalance_cost(base, plans[0], P, N, cfg.model, cfg.hw)
            initial = first["seconds"]
            if len(plans) > 1:
                costs = [rebalance_cost(plans[i - 1], plans[i], P, N, cfg.model, cfg.hw) for i in range(1, len(plans))]
                per_move = float(np.mean([c["seconds"] for c in costs]))
                moved = [c["moved"] for c in costs]
            else:
                per_move, moved = initial, [first["moved"]]
            reb_ms = per_move / cfg.interval / L * 1e3
        out[policy] = dict(ms=float(np.mean(ms)) + reb_ms, compute_ms=float(np.mean(comp)), comm_ms=float(np.mean(comm)),
                           rebalance_ms=reb_ms, balancedness=float(np.mean(bal)),
                           moved=float(np.mean(moved)) if moved else 0.0, initial_move_s=initial)
    return out


# ---------------------------------------------------------------------------------------------
# check against measurements and the CLI


MEASURED_1GPU = dict(total=11.06, expert_compute=8.36, router=0.31, dispatch=0.43, combine=1.81, combine_later=0.8)
MEASURED_DS_EP2 = 16.4


def check_rows(model: Model = Model(), hw: Hardware = Hardware(), seed: int = 0) -> list[dict]:
    """The anchor layer (64 experts, top-8, 8192 tokens per GPU, random gate) on 1 and 2 GPUs of one node."""
    E = 64
    load = zipf_trace(0.0, 1, E, model.top_k, 1, model.tokens_per_gpu, seed)[0]  # random gate: uniform + noise
    rows = []
    for P in (1, 2):
        t = layer_times(step_load(load, model, P), contiguous(1, E), P, 1, model, hw)
        rows.append(dict(gpus=P, ms=float(t["total"][0] * 1e3), compute_ms=float(t["compute"][0] * 1e3),
                         dispatch_ms=float(t["dispatch"][0] * 1e3), combine_ms=float(t["combine"][0] * 1e3),
                         max_over_mean=float(load.max() / load.mean())))
    return rows


def topologies(gpus=(8, 16, 32, 64), nodes=(1, 2, 4, 8)) -> list[tuple[int, int]]:
    """Valid (GPUs, nodes): nodes divide GPUs, at most 8 GPUs per node."""
    return [(p, n) for p in gpus for n in nodes if p % n == 0 and p // n <= 8]


def format_table(rows: list[dict]) -> str:
    head = ("| GPUs | nodes | none ms | none bal | greedy ms | greedy bal | default ms | default bal "
            "| default vs none | default: compute / a2a / rebalance ms |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        a, g, d = r["none"], r["greedy"], r["default"]
        lines.append(f"| {r['gpus']} | {r['nodes']} | {a['ms']:.2f} | {a['balancedness']:.3f} | {g['ms']:.2f} | "
                     f"{g['balancedness']:.3f} | {d['ms']:.2f} | {d['balancedness']:.3f} | {a['ms'] / d['ms']:.2f}x | "
                     f"{d['compute_ms']:.2f} / {d['comm_ms']:.2f} / {d['rebalance_ms']:.3f} |")
    return "\n".join(lines)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``simulate`` on the eplb CLI's subparsers."""
    s = sub.add_parser("simulate", help="predict MoE-layer time at scale, with and without rebalancing")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--stats", help="expert-load stats file (docs/formats.md); uses 'windows' when present")
    src.add_argument("--synthetic", default=None, help="synthetic trace 'zipf:S' (default zipf:1.2) or 'uniform'")
    s.add_argument("--layers", type=int, default=58, help="layers of the synthetic trace")
    s.add_argument("--experts", type=int, default=256, help="experts of the synthetic trace (e.g. 64 or 256)")
    s.add_argument("--windows", type=int, default=3, help="synthetic windows (plan on one, run on the next)")
    s.add_argument("--trace-tokens", type=int, default=8192 * 64, help="tokens per synthetic window")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--gpus", default="8,16,32,64", help="comma-separated GPU counts")
    s.add_argument("--nodes", default="1,2,4,8", help="comma-separated node counts (<= 8 GPUs per node)")
    s.add_argument("--redundant-per-gpu", type=int, default=1, help="redundant slots per GPU: R = E + this x P")
    s.add_argument("--groups", type=int, default=1, help="expert groups for the planner (1: global policy)")
    s.add_argument("--interval", type=int, default=8, help="forward passes between rebalances")
    s.add_argument("--tokens-per-gpu", type=int, default=8192)
    s.add_argument("--hidden", type=int, default=4096)
    s.add_argument("--expert-hidden", type=int, default=3072)
    s.add_argument("--top-k", type=int, default=None, help="default: the stats file's top_k, else 8")
    s.add_argument("--net-gbps", type=float, default=50.0, help="per-GPU network bandwidth, GB/s each way")
    s.add_argument("--net-latency-us", type=float, default=25.0, help="per inter-node all-to-all")
    s.add_argument("--overlap", type=float, default=0.0, help="fraction of min(compute, comm) hidden, 0..1")
    s.add_argument("--check", action="store_true", help="also print the 1-GPU / 2-GPU check against measurements")
    return s


def _check_top_k(value, num_experts: int, name: str) -> int:
    """top-k of the simulated layer: an integer in [1, num_experts]. Raises ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_experts:
        raise ValueError(f"{name} = {value!r}: must be an integer between 1 and {num_experts} (the experts)")
    return value


def run_cli(args) -> int:
    from .io import load_stats

    if not 0.0 <= args.overlap <= 1.0:
        raise ValueError(f"overlap: expected 0..1, got {args.overlap}")
    if args.net_gbps <= 0:
        raise ValueError(f"net-gbps: must be positive, got {args.net_gbps}")
    for name in ("layers", "experts", "windows", "trace_tokens", "interval", "tokens_per_gpu", "hidden", "expert_hidden"):
        if getattr(args, name) <= 0:
            raise ValueError(f"{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if args.redundant_per_gpu < 0:
        raise ValueError(f"redundant-per-gpu: must be >= 0, got {args.redundant_per_gpu}")
    try:
        gpus = tuple(int(x) for x in args.gpus.split(","))
        nodes = tuple(int(x) for x in args.nodes.split(","))
    except ValueError:
        raise ValueError("gpus/nodes: expected comma-separated integers") from None
    if min(gpus + nodes) <= 0:
        raise ValueError("gpus/nodes: must be positive")
    top_k = args.top_k
    if args.stats:
        st = load_stats(args.stats)
        wins = [w["load"] for w in st.get("windows", [])] or [st["load"]]
        top_k = _check_top_k(st.get("top_k", 8) if top_k is None else top_k, wins[0].shape[1],
                             "--top-k" if args.top_k is not None else f"{args.stats}: top_k")
        source = f"stats file {args.stats} ({len(wins)} window(s))"
    else:
        skew = parse_synthetic(args.synthetic or "zipf:1.2")
        top_k = _check_top_k(8 if top_k is None else top_k, args.experts, "--top-k")
        wins = zipf_trace(skew, args.layers, args.experts, top_k, args.windows, args.trace_tokens, args.seed)
        source = f"synthetic zipf:{skew} ({args.windows} window(s) of {args.trace_tokens} tokens, seed {args.seed})"
    model = Model(hidden=args.hidden, expert_hidden=args.expert_hidden, top_k=top_k, tokens_per_gpu=args.tokens_per_gpu)
    hw = Hardware(net_bw=args.net_gbps * 1e9, net_latency=args.net_latency_us * 1e-6, overlap=args.overlap)
    L, E = wins[0].shape
    mm = float(np.mean([(w.max(1) / np.maximum(w.mean(1), 1e-300)).mean() for w in wins]))
    print(f"# {datetime.date.today().isoformat()}: {source}; {L} layers x {E} experts, top-{top_k}, "
          f"max/mean expert load {mm:.2f} (mean over layers); {model.tokens_per_gpu} tokens/GPU, hidden {model.hidden}, "
          f"expert hidden {model.expert_hidden}; R = E + {args.redundant_per_gpu} x P; groups {args.groups}; "
          f"net {args.net_gbps} GB/s + {args.net_latency_us} us; overlap {args.overlap}; rebalance every {args.interval} passes")
    rows = []
    for P, N in topologies(gpus, nodes):
        if E % P:
            print(f"# skip {P} GPUs: {E} experts not divisible")
            continue
        res = simulate(wins, Config(P, N, args.redundant_per_gpu, args.groups, args.interval, model=model, hw=hw))
        rows.append(dict(gpus=P, nodes=N, **res))
    if rows:
        print(format_table(rows))
    if args.check:
        ck = check_rows(model, hw, args.seed)
        m = MEASURED_1GPU
        print(f"\ncheck, 1 GPU: predicted {ck[0]['ms']:.2f} ms (expert compute {ck[0]['compute_ms']:.2f}, all-to-all 0) "
              f"vs measured {m['total']} ms (expert compute {m['expert_compute']}, router {m['router']}, "
              f"dispatch {m['dispatch']}, combine {m['combine']}); error {(ck[0]['ms'] / m['total'] - 1) * 100:+.1f}%")
        print(f"check, 2 GPUs 1 node: predicted moe-ep {ck[1]['ms']:.2f} ms (compute {ck[1]['compute_ms']:.2f}, "
              f"dispatch {ck[1]['dispatch_ms']:.2f}, combine {ck[1]['combine_ms']:.2f}); measured DeepSpeed-MoE EP=2: "
              f"{MEASURED_DS_EP2} ms (moe-ep EP=2 not measured)")
    return 0
