"""Paper model of ONE denoising forward of an MoE DiT on 1-64 GPUs, per parallel layout:
``python -m eplb simulate-layouts`` (docs/simulator.md, "One image on many GPUs").

Layouts (ranks ordered tp fastest, then ulysses, ring, cfg; 8 GPUs per node):
- ``moe-ep``: sequence parallel (Ulysses ``u`` x ring ``r``) x CFG parallel, experts sharded over the
  first ``ep`` consecutive ranks (all-to-all dispatch/combine of routed copies, dropless), with or
  without EPLB; ``ep = 1`` is the next layout.
- ``replicated``: the same SP x CFG, every rank holds every expert and runs them on its own tokens.
- ``vllm-omni``: tensor parallel ``tp`` over attention and dense GEMMs x SP x CFG, experts over all
  ranks, dispatch = all-gather of every token, combine = reduce-scatter (+ TP all-reduce), no EPLB.

Compute comes from FLOPs at the rates of /work/shared/ANCHORS.md (docs/anchors.md), with a weight-read
floor per GEMM; communication from bytes at the NCCL all-to-all rate for the message size
(:mod:`eplb.simulate`'s tables and imbalance model). Every constant is in :class:`Rates` and in the
docs. Pure numpy/torch on the CPU; never imports ``moe_ep``.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .metrics import gpu_load
from .rebalance import rebalance_experts
from .simulate import Hardware, Model, gemm_rate, layer_times, net_time, nvlink_time, parse_synthetic, step_load, zipf_trace

GiB = 1 << 30
BYTES = 2  # bf16 weights and activations
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---------------------------------------------------------------------------------------------
# the model's shape


@dataclass(frozen=True)
class Gemm:
    """One weight GEMM of a block: ``rows`` token rows per sample times ``[fan_in, fan_out]``."""

    rows: int
    fan_in: int
    fan_out: int
    seq_split: bool = True  # False: the rows are the same on every SP rank (the prompt's cross-attention K/V)


@dataclass(frozen=True)
class Attn:
    """One attention of a block, per sample: ``q_rows`` queries against ``kv_rows`` keys.

    ``seq_parallel``: keys are the sharded sequence itself (self/joint attention: Ulysses all-to-alls
    and ring K/V passes); False: keys are replicated on every rank (cross-attention to the prompt)."""

    q_rows: int
    kv_rows: int
    seq_parallel: bool = True


@dataclass(frozen=True)
class BlockKind:
    """``count`` identical transformer blocks."""

    name: str
    count: int
    rows: int                    # residual-stream rows per sample (elementwise work)
    gemms: tuple = ()            # Gemm, outside the MoE
    attns: tuple = ()            # Attn
    tp_reduces: tuple = ()       # rows per sample of each TP all-reduce outside the MoE (attention out, dense FFN)
    moe_rows: int = 0            # rows per sample through the MoE feed-forward (0: none)
    extra_params: int = 0        # weights not in per-token GEMMs (adaLN on the timestep embedding), replicated


@dataclass(frozen=True)
class DiT:
    """An MoE diffusion transformer at one resolution. ``batch`` = 2: conditional + unconditional (CFG)."""

    name: str
    hidden: int
    heads: int
    blocks: tuple
    experts: int
    top_k: int
    expert_hidden: int
    shared_hidden: int           # shared expert's SwiGLU width (0: none)
    image_tokens: int
    text_tokens: int
    batch: int = 2
    other_params: int = 0        # embedders, caption projections, final layer: replicated, no FLOPs counted

    @property
    def moe_layers(self) -> int:
        return sum(b.count for b in self.blocks if b.moe_rows)

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_hidden  # SwiGLU w1, w3, w2

    def dense_params(self) -> int:
        """Every weight except the routed experts (shared expert and gate included)."""
        per = lambda b: (sum(g.fan_in * g.fan_out for g in b.gemms) + b.extra_params
                         + (3 * self.hidden * self.shared_hidden + self.hidden * self.experts if b.moe_rows else 0))
        return sum(b.count * per(b) for b in self.blocks) + self.other_params

    def params(self) -> int:
        return self.dense_params() + self.moe_layers * self.experts * self.expert_params


def swiglu_width(dim: int, mult: int = 4, multiple_of: int = 256) -> int:
    """diffusers' FeedForwardSwiGLU inner width: int(2 * mult * dim / 3) rounded up to ``multiple_of``."""
    h = int(2 * mult * dim / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def hidream(size: int = 1024) -> DiT:
    """HiDream-I1 (diffusers 0.42 ``HiDreamImageTransformer2DModel``, docs/anchors.md): hidden 2560 = 20
    heads x 128; 16 dual-stream blocks (image and text streams with their own q/k/v/out, joint attention
    over image + text, MoE on image rows, dense SwiGLU on text rows) and 32 single-stream blocks (image +
    text as one sequence through attention and MoE). MoE: 4 experts, top-2, expert width 6912, one
    shared expert of width 3584. Text: 128 T5 + 2 x 128 Llama rows per block. VAE /8, patch 2."""
    H = 2560
    img = (size // 16) ** 2
    txt = 384
    S = img + txt
    F = swiglu_width(H)              # 6912
    Fs = swiglu_width(H, mult=2)     # 3584: diffusers' shared expert is FeedForwardSwiGLU(H, 4H // 2)
    dual = BlockKind("dual", 16, rows=S,
                     gemms=(Gemm(img, H, 3 * H), Gemm(img, H, H), Gemm(txt, H, 3 * H), Gemm(txt, H, H),
                            Gemm(txt, H, 2 * F), Gemm(txt, F, H)),
                     attns=(Attn(S, S),), tp_reduces=(S, txt), moe_rows=img, extra_params=12 * H * H)
    single = BlockKind("single", 32, rows=S, gemms=(Gemm(S, H, 3 * H), Gemm(S, H, H)),
                       attns=(Attn(S, S),), tp_reduces=(S,), moe_rows=S, extra_params=6 * H * H)
    # caption projections (T5 + 48 Llama layers, 4096 -> 2560) and embedders: ~0.52 B, so the total is 17.1 B
    return DiT("hidream", H, 20, (dual, single), experts=4, top_k=2, expert_hidden=F, shared_hidden=Fs,
               image_tokens=img, text_tokens=txt, other_params=49 * 4096 * H + 2 * 256 * H + 4 * H * H)


def from_config(path, size: int = 1024) -> DiT:
    """An moe-ep config file (configs/*.json, docs/config.md; ``moe_ep.models.moedit.dit``): blocks of self-attention
    over image rows, cross-attention to ``max_prompt_tokens`` prompt rows, and an MoE feed-forward every
    ``moe_every``-th block (dense SwiGLU ``dense_hidden_size`` otherwise); shared experts of width
    ``num_shared_experts x expert_hidden_size``."""
    try:
        m = json.loads(Path(path).read_text())["model"]
        H, L, heads = int(m["hidden_size"]), int(m["num_layers"]), int(m["num_heads"])
        moe = m["moe"]
        E, k, F = int(moe["num_experts"]), int(moe["top_k"]), int(moe["expert_hidden_size"])
        Fs = int(moe.get("num_shared_experts", 0)) * F
        every = int(m.get("moe_every", 1))
        Fd = int(m.get("dense_hidden_size", 4 * H))
        patch, vae, txt = int(m.get("patch_size", 2)), int(m.get("vae_scale_factor", 8)), int(m.get("max_prompt_tokens", 77))
        text_dim, chans = int(m.get("text_dim", H)), int(m.get("in_channels", 16))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--model {path}: not a readable moe-ep config ({type(exc).__name__}: {exc})") from None
    img = (size // (vae * patch)) ** 2
    attn = (Gemm(img, H, H), Gemm(img, H, 2 * H), Gemm(img, H, H),          # self: q, kv, proj
            Gemm(img, H, H), Gemm(txt, H, 2 * H, seq_split=False), Gemm(img, H, H))  # cross: q, kv (prompt), proj
    n_moe = L // every
    kinds = [BlockKind("moe", n_moe, rows=img, gemms=attn, attns=(Attn(img, img), Attn(img, txt, False)),
                       tp_reduces=(img, img), moe_rows=img, extra_params=6 * H * H)]
    if L - n_moe:
        kinds.append(BlockKind("dense", L - n_moe, rows=img, gemms=attn + (Gemm(img, H, 2 * Fd), Gemm(img, Fd, H)),
                               attns=(Attn(img, img), Attn(img, txt, False)), tp_reduces=(img, img, img),
                               extra_params=6 * H * H))
    other = 2 * text_dim * H + H * H + 2 * patch * patch * chans * H
    return DiT(Path(path).stem, H, heads, tuple(kinds), experts=E, top_k=k, expert_hidden=F, shared_hidden=Fs,
               image_tokens=img, text_tokens=txt, other_params=other)


def load_model(name: str, size: int) -> DiT:
    """``hidream``, ``hunyuan_like`` (configs/hunyuan_like.json) or a path to an moe-ep config."""
    if size <= 0 or size % 16:
        raise ValueError(f"--size: must be a positive multiple of 16 (VAE /8 x patch 2), got {size}")
    if name == "hidream":
        return hidream(size)
    path = REPO_CONFIGS / f"{name}.json" if name == "hunyuan_like" else Path(name)
    if not path.is_file():
        raise ValueError(f"--model {name}: expected 'hidream', 'hunyuan_like' or a path to an moe-ep config .json")
    return from_config(path, size)


# ---------------------------------------------------------------------------------------------
# rates


@dataclass(frozen=True)
class Rates(Hardware):
    """:class:`eplb.simulate.Hardware` (grouped-GEMM and NCCL anchors, network assumption) plus the rates a
    whole forward needs. Defaults: docs/anchors.md where measured; the rest are assumptions (docs)."""

    dense_flops: float = 781e12     # dense GEMM 8192^3 (anchor)
    attn_flops: float = 400e12      # SDPA flash attention, bf16, head dim 128: assumption (FA2-class on H100)
    hbm_bw: float = 3.0e12          # effective HBM bandwidth: assumption (~90% of H100 SXM's 3.35 TB/s)
    gpus_per_node: int = 8
    elementwise_passes: int = 16    # activation reads+writes per block (norms, modulate, RoPE, gates, residuals): assumption
    routing_passes: int = 4         # passes over the routed copies (permute, un-permute, weighted sum): assumption
    shared_overlap: bool = True     # the shared expert runs on a side stream (moe_ep/layer.py) and hides that much comm
    ring_overlap: bool = True       # ring K/V passes overlap the attention of the block in hand
    dedup_tokens: bool = True       # moe-ep sends one row per (token, destination rank) (moe_ep/token_exchange.py)
    overlap_own_rows: bool = True   # ... and computes its own rows while the dispatch is in flight


def _t(x) -> float:
    return float(np.asarray(x))


def gemm_time(rows: float, fan_in: int, fan_out: int, rates: Rates, flops_rate: float | None = None) -> float:
    """One GEMM: ``max(2 rows fan_in fan_out / rate, weight bytes / HBM)`` (the weight-read floor)."""
    if rows <= 0:
        return 0.0
    return max(2.0 * rows * fan_in * fan_out / (flops_rate or rates.dense_flops), fan_in * fan_out * BYTES / rates.hbm_bw)


def nvlink(nbytes, rates: Rates) -> np.ndarray:
    """:func:`eplb.simulate.nvlink_time`, but never faster than the smallest anchor's time (1 MB in 62.5 us):
    its log-linear bandwidth makes 1-2.4 MB messages faster than 1 MB, which no link does (0 -> 0)."""
    b = np.asarray(nbytes, dtype=np.float64)
    small = rates.nvlink_anchors[0]
    return np.where(b > 0, np.maximum(nvlink_time(b, rates), small[0] / small[1]), 0.0)


def on_node(size: int, stride: int, ppn: int) -> int:
    """Members of a group of ``size`` ranks ``stride`` apart that share a node with a given member."""
    return min(size, max(1, ppn // stride))


def a2a_time(buf: float, size: int, stride: int, rates: Rates) -> float:
    """All-to-all of a ``buf``-byte per-rank buffer (1/size to each member, the own share stays):
    NVLink bytes at the anchors' rate for that message size, network bytes at ``net_bw`` + latency,
    concurrently (:func:`eplb.simulate.nvlink_time`, :func:`eplb.simulate.net_time`)."""
    if size <= 1:
        return 0.0
    loc = on_node(size, stride, rates.gpus_per_node)
    return max(_t(nvlink(buf * (loc - 1) / size, rates)), _t(net_time(buf * (size - loc) / size, rates)))


def gather_time(shard: float, size: int, stride: int, rates: Rates) -> float:
    """All-gather (or reduce-scatter) of ``shard`` bytes per rank: each rank receives ``size - 1`` shards.
    Split like the all-to-all (an optimistic floor for NCCL's ring across nodes: generous to its users)."""
    if size <= 1:
        return 0.0
    loc = on_node(size, stride, rates.gpus_per_node)
    return max(_t(nvlink(shard * (loc - 1), rates)), _t(net_time(shard * (size - loc), rates)))


def allreduce_time(buf: float, size: int, stride: int, rates: Rates) -> float:
    """All-reduce = reduce-scatter + all-gather of ``buf / size`` shards."""
    return 2.0 * gather_time(buf / size, size, stride, rates) if size > 1 else 0.0


def p2p_time(nbytes: float, crosses_nodes: bool, rates: Rates) -> float:
    """One ring pass (every rank sends to its neighbour): the all-to-all curve on NVLink (it meets the
    anchors' 75 MB point-to-point figure, 225 GB/s), the network when the ring leaves the node."""
    return _t(net_time(nbytes, rates)) if crosses_nodes else _t(nvlink(nbytes, rates))


# ---------------------------------------------------------------------------------------------
# layouts


KINDS = ("moe-ep", "replicated", "vllm-omni")


@dataclass(frozen=True)
class Layout:
    kind: str
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    tp: int = 1
    ep: int = 1          # moe-ep: EP group size (consecutive ranks); vllm-omni: all ranks
    eplb: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.ulysses * self.ring * self.cfg

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def label(self) -> str:
        parts = [f"tp{self.tp}"] if self.kind == "vllm-omni" else []
        parts += [f"u{self.ulysses}", f"r{self.ring}", f"cfg{self.cfg}"]
        if self.kind == "moe-ep":
            parts.append(f"ep{self.ep}" + ("+eplb" if self.eplb and self.ep > 1 else ""))
        elif self.kind == "vllm-omni":
            parts.append(f"ep{self.gpus}")
        return " ".join(parts)


def check_layout(model: DiT, lay: Layout) -> None:
    """Raise ValueError unless ``lay`` can run ``model``."""
    if lay.kind not in KINDS:
        raise ValueError(f"layout kind: {lay.kind!r}, expected one of {KINDS}")
    for name in ("ulysses", "ring", "cfg", "tp", "ep"):
        if getattr(lay, name) < 1:
            raise ValueError(f"layout {name}: must be >= 1, got {getattr(lay, name)}")
    if model.batch % lay.cfg:
        raise ValueError(f"layout cfg: {lay.cfg} does not divide the batch {model.batch}")
    if model.heads % (lay.tp * lay.ulysses):
        raise ValueError(f"layout tp x ulysses: {lay.tp * lay.ulysses} does not divide {model.heads} heads")
    if lay.kind != "vllm-omni" and lay.tp != 1:
        raise ValueError(f"layout tp: only vllm-omni uses tensor parallelism, got tp={lay.tp} for {lay.kind}")
    if lay.kind == "moe-ep" and lay.gpus % lay.ep:
        raise ValueError(f"layout ep: {lay.ep} does not divide {lay.gpus} GPUs")
    if lay.kind == "replicated" and lay.ep != 1:
        raise ValueError(f"layout ep: replicated experts means ep=1, got {lay.ep}")


def layouts_for(model: DiT, gpus: int, kind: str) -> list[Layout]:
    """Every valid layout of ``kind`` on ``gpus`` GPUs (moe-ep: every ep dividing gpus, with/without EPLB)."""
    out = []
    divs = [d for d in range(1, gpus + 1) if gpus % d == 0]
    for cfg in (1, 2):
        for tp in (divs if kind == "vllm-omni" else [1]):
            for u in divs:
                if gpus % (cfg * tp * u) or model.batch % cfg or model.heads % (tp * u):
                    continue
                r = gpus // (cfg * tp * u)
                if kind == "moe-ep":
                    out += [Layout(kind, u, r, cfg, 1, ep, eplb) for ep in divs for eplb in (False, True)
                            if not (ep == 1 and eplb)]
                elif kind == "vllm-omni":
                    out.append(Layout(kind, u, r, cfg, tp, gpus))
                else:
                    out.append(Layout(kind, u, r, cfg))
    return out


# ---------------------------------------------------------------------------------------------
# routing imbalance


@dataclass(frozen=True)
class Routing:
    """Expert loads: a synthetic Zipf trace (:func:`eplb.simulate.zipf_trace`), two windows per MoE layer:
    EPLB plans on window 0 (the previous forwards) and every placement runs on window 1."""

    skew: float = 1.2
    seed: int = 0
    redundant_per_gpu: int | None = None  # EPLB slots per GPU beyond ceil(E/ep); None: 1 if ep <= E else 0


@functools.lru_cache(maxsize=32)
def _trace(skew: float, layers: int, experts: int, top_k: int, tokens: int, seed: int):
    w = zipf_trace(skew, layers, experts, top_k, 2, tokens, seed, samples=1 << 15)
    return w[0], w[1]


@functools.lru_cache(maxsize=64)   # every layout with the same (ep, EPLB) shares one plan
def placement(model: DiT, routing: Routing, ep: int, eplb: bool) -> np.ndarray:
    """``phy2log [L_moe, R]`` for an EP group of ``ep`` ranks. Without EPLB: ``R = ep x ceil(E/ep)`` slots,
    expert ``e`` in slots ``e, e+E, ...`` (each expert the same number of replicas when ep > E). With
    EPLB: the ``default`` planner on window 0, ``R = ep x (ceil(E/ep) + redundant)``."""
    E, L = model.experts, model.moe_layers
    per = -(-E // ep)
    if not eplb:
        if (E % ep if ep <= E else ep % E):
            raise ValueError(f"layout ep: {ep} ranks cannot hold {E} experts evenly without EPLB")
        # ep <= E: expert e in slot e (GPU e // (E/ep)); ep > E: expert e on GPUs e, e+E, ... (ep/E replicas each)
        return np.tile(np.arange(E), (L, max(1, ep // E)))
    extra = routing.redundant_per_gpu
    if extra is None:
        extra = 1 if ep <= E else 0
    plan_on, _ = _trace(routing.skew, L, E, model.top_k, model.batch * max(b.moe_rows for b in model.blocks), routing.seed)
    nodes = max(1, ep // 8) if ep % 8 == 0 else 1
    p2l, _, _ = rebalance_experts(plan_on, ep * (per + extra), 1, nodes, ep, policy="default")
    return p2l.numpy()


# ---------------------------------------------------------------------------------------------
# the forward


@dataclass
class Breakdown:
    """Seconds of one forward on the slowest rank, by part."""

    dense: float = 0.0        # weight GEMMs outside the MoE (projections, dense FFNs)
    elementwise: float = 0.0  # memory-bound passes over activations
    attention: float = 0.0    # attention kernels (with overlapped ring passes)
    attn_comm: float = 0.0    # Ulysses all-to-alls, exposed ring passes
    tp_comm: float = 0.0      # TP all-reduces outside the MoE
    moe_compute: float = 0.0  # routed experts (slowest rank) + shared expert + routing passes
    moe_comm: float = 0.0     # dispatch + combine (+ counts exchange), all of it
    moe_exposed: float = 0.0  # the part of moe_comm not hidden under the shared expert
    max_over_mean: float = 1.0  # routed copies on the busiest rank / mean, mean over MoE layers
    memory: float = 0.0       # bytes per GPU: weights + rough activations
    comm_bytes: dict = field(default_factory=dict)  # per-rank bytes leaving (or arriving), per forward, by collective

    @property
    def total(self) -> float:
        return (self.dense + self.elementwise + self.attention + self.attn_comm + self.tp_comm
                + self.moe_compute + self.moe_exposed)


def _add(d: dict, key: str, nbytes: float) -> None:
    d[key] = d.get(key, 0.0) + nbytes


def forward(model: DiT, lay: Layout, rates: Rates = Rates(), routing: Routing = Routing()) -> Breakdown:
    """Predict one forward (batch ``model.batch``) of ``model`` on layout ``lay``. See docs/simulator.md."""
    check_layout(model, lay)
    H, ppn = model.hidden, rates.gpus_per_node
    tp, u, r, sp, cfg = lay.tp, lay.ulysses, lay.ring, lay.sp, lay.cfg
    samples = model.batch // cfg                      # samples per CFG group
    shard = lambda rows: samples * rows / sp           # rows per rank of a sequence-split tensor
    out = Breakdown()
    cb = out.comm_bytes
    moe_i = 0                                          # index of the first MoE layer of this kind in the trace
    mm_sum, mm_n = 0.0, 0
    act_peak = 0.0
    for b in model.blocks:
        n = b.count
        # dense weight GEMMs: rows split over SP, columns over TP
        out.dense += n * sum(gemm_time(shard(g.rows) if g.seq_split else samples * g.rows, g.fan_in, g.fan_out // tp, rates)
                             for g in b.gemms)
        out.elementwise += n * rates.elementwise_passes * shard(b.rows) * H * BYTES / rates.hbm_bw  # not split by TP
        for a in b.attns:
            flops = 4.0 * samples * a.q_rows * a.kv_rows * H / (sp * tp)
            t_attn = flops / rates.attn_flops
            comm = 0.0
            if a.seq_parallel:
                rows = shard(a.q_rows)
                # Ulysses: q, k, v in one all-to-all, the output in another (head-split <-> sequence-split)
                qkv, o = 3 * rows * H / tp * BYTES, rows * H / tp * BYTES
                comm += a2a_time(qkv, u, tp, rates) + a2a_time(o, u, tp, rates)
                if u > 1:
                    _add(cb, "ulysses", n * (qkv + o) * (u - 1) / u)
                if r > 1:  # r - 1 passes of this rank's K and V block (all its heads after Ulysses)
                    kv = 2 * rows * H / tp * BYTES
                    ring = (r - 1) * p2p_time(kv, on_node(r, tp * u, ppn) < r, rates)
                    _add(cb, "ring", n * (r - 1) * kv)
                    if rates.ring_overlap:
                        ring, t_attn = max(0.0, ring - t_attn), t_attn
                    comm += ring
            out.attention += n * t_attn
            out.attn_comm += n * comm
        for rows in b.tp_reduces:
            buf = shard(rows) * H * BYTES
            out.tp_comm += n * allreduce_time(buf, tp, 1, rates)
            if tp > 1:
                _add(cb, "tp_allreduce", n * 2 * buf * (tp - 1) / tp)
        act_peak = max(act_peak, shard(b.rows) * H * BYTES * 24)
        if not b.moe_rows:
            continue
        layers = slice(moe_i, moe_i + n)
        moe_i += n
        res = _moe(model, lay, rates, routing, b, layers, shard(b.moe_rows))
        out.moe_compute += res["compute"]
        out.moe_comm += res["comm"]
        out.moe_exposed += res["exposed"]
        for k, v in res["bytes"].items():
            _add(cb, k, v)
        mm_sum += res["max_over_mean"] * n
        mm_n += n
        act_peak = max(act_peak, res["act"])
    out.max_over_mean = mm_sum / mm_n if mm_n else 1.0
    out.memory = _weights(model, lay, routing) + act_peak
    return out


def _slots_per_rank(model: DiT, lay: Layout, routing: Routing) -> int:
    E = model.experts
    if lay.kind == "replicated" or lay.ep == 1:
        return E
    ep = lay.gpus if lay.kind == "vllm-omni" else lay.ep
    per = -(-E // ep)
    if lay.kind == "moe-ep" and lay.eplb:
        extra = routing.redundant_per_gpu
        per += (1 if ep <= E else 0) if extra is None else extra
    return per


def _weights(model: DiT, lay: Layout, routing: Routing) -> float:
    """Weight bytes per GPU: routed experts by slot count; the rest replicated (GEMMs and shared expert / tp)."""
    experts = model.moe_layers * _slots_per_rank(model, lay, routing) * model.expert_params
    gemms = sum(b.count * (sum(g.fan_in * g.fan_out for g in b.gemms)
                           + (3 * model.hidden * model.shared_hidden if b.moe_rows else 0)) for b in model.blocks)
    rest = model.dense_params() - gemms
    return (experts + gemms / lay.tp + rest) * BYTES


def _moe(model: DiT, lay: Layout, rates: Rates, routing: Routing, b: BlockKind, layers: slice, rows: float) -> dict:
    """One kind's MoE layers on the slowest rank. ``rows``: token rows this rank holds (its SP shard)."""
    H, F, k, E = model.hidden, model.expert_hidden, model.top_k, model.experts
    n = b.count
    flops_copy = 6.0 * H * F
    expert_bytes = model.expert_params * BYTES
    tp = lay.tp
    # shared expert on this rank's rows (TP-split for vllm-omni)
    shared = 0.0
    if model.shared_hidden:
        Fs = model.shared_hidden // tp
        shared = gemm_time(rows, H, 2 * Fs, rates) + gemm_time(rows, Fs, H, rates)
    bytes_ = {}
    ep = lay.gpus if lay.kind == "vllm-omni" else lay.ep
    if lay.kind == "replicated" or ep == 1:
        copies = np.full(n, rows * k)                                   # [n] every copy stays on the rank
        routed = np.maximum(copies * flops_copy / gemm_rate(copies / E, rates), E * expert_bytes / rates.hbm_bw)
        comm = np.zeros(n)
        mm = np.ones(n)
    else:
        p2l = placement(model, routing, ep, lay.kind == "moe-ep" and lay.eplb)[layers]   # [n, R]
        _, run_on = _trace(routing.skew, model.moe_layers, E, k, model.batch * max(x.moe_rows for x in model.blocks), routing.seed)
        m = Model(hidden=H, expert_hidden=F, top_k=k, tokens_per_gpu=1)
        if lay.kind == "vllm-omni":
            # every rank gathers all rows of its TP group's peers; tp ranks hold the same rows
            group_rows = rows * (ep // tp)
        else:
            group_rows = rows * ep
        load = step_load(run_on[layers], replace(m, tokens_per_gpu=group_rows / ep), ep)  # [n, E] copies this forward
        g = gpu_load(load, p2l, ep).numpy()                            # [n, ep] copies per rank
        slots = p2l.shape[1] // ep
        per_rank = np.maximum(g * flops_copy / gemm_rate(g / slots, rates), slots * expert_bytes / rates.hbm_bw)
        routed = per_rank.max(1)
        copies = g.max(1)
        mm = g.max(1) / g.mean(1)
        if lay.kind == "moe-ep":
            ppn = ppn_of(ep, rates)
            if rates.dedup_tokens:
                intra_b, inter_b = pair_bytes(g, rows, k, ppn, H * BYTES)  # [n, ep] one row per (token, rank)
            else:  # one row per routed copy: eplb.simulate's closed form
                t = layer_times(load, p2l, ep, ep // ppn, replace(m, tokens_per_gpu=rows), rates)
                intra_b, inter_b = t["intra_bytes"], t["inter_bytes"]
            a2a = np.maximum(nvlink(intra_b, rates), net_time(inter_b, rates)).max(1)  # [n] slowest rank
            counts = a2a_time(1.0, ep, 1, rates)                       # split sizes before dispatch (latency only)
            dispatch, combine = a2a + counts, a2a                      # combine: the same rows back
            if rates.dedup_tokens and rates.overlap_own_rows:
                own = routed / ep                                      # this rank's own rows, computed meanwhile
                dispatch = np.maximum(dispatch - own, 0.0)
            comm = a2a + a2a + counts
            moved = (intra_b + inter_b).max(1)                         # [n] busiest rank, one direction
            bytes_["ep_dispatch"] = float(moved.sum())
            bytes_["ep_combine"] = float(moved.sum())
        else:
            D = ep // tp                                                # the sp x cfg group, stride tp
            shard_b = rows * H * BYTES
            ag = gather_time(shard_b, D, tp, rates)
            rs = gather_time(shard_b, D, tp, rates)
            ar = allreduce_time(shard_b, tp, 1, rates)
            comm = np.full(n, ag + rs + ar)
            bytes_["ag_dispatch"] = n * shard_b * (D - 1)
            bytes_["rs_combine"] = n * shard_b * (D - 1)
            if tp > 1:
                bytes_["tp_allreduce"] = n * 2 * shard_b * (tp - 1) / tp
    routing_t = rates.routing_passes * copies * H * BYTES / rates.hbm_bw
    comp = routed + routing_t
    if lay.kind == "moe-ep" and ep > 1:
        comm_left = dispatch + combine                                  # after the own-rows overlap
    else:
        comm_left = comm
    exposed = np.maximum(comm_left - shared, 0.0) if rates.shared_overlap else comm_left
    gathered = rows * (ep // tp) if lay.kind == "vllm-omni" and ep > 1 else rows
    act = float(np.max(copies)) * (3 * F + 2 * H) * BYTES + 2 * gathered * H * BYTES
    return dict(compute=float(comp.sum() + n * shared), comm=float(np.sum(comm)), exposed=float(np.sum(exposed)),
                bytes=bytes_, max_over_mean=float(np.mean(mm)), act=act)


def pair_bytes(g: np.ndarray, rows: float, top_k: int, ppn: int, row_bytes: float):
    """Per-rank bytes of a (token, destination rank) exchange: ``(intra, inter)`` ``[n, ep]``, the larger of
    send and receive. ``g [n, ep]``: routed copies each rank computes; tokens start evenly (``rows`` each).

    A token reaches rank ``d`` at least once with probability ``q_d = 1 - (1 - share_d)^k``, ``share_d`` =
    ``d``'s share of the copies (copies taken as independent: exact for k = 1, a slight over-count of the
    distinct ranks otherwise). Source ``s`` sends ``rows x q_d`` rows to every other rank ``d``."""
    n, ep = g.shape
    share = g / np.maximum(g.sum(1, keepdims=True), 1e-300)
    q = 1.0 - (1.0 - share) ** top_k                                   # [n, ep]
    nodes = ep // ppn
    node_q = np.repeat(q.reshape(n, nodes, ppn).sum(2), ppn, axis=1)   # [n, ep] sum of q over my node
    recv_intra, recv_inter = rows * q * (ppn - 1), rows * q * (ep - ppn)
    send_intra, send_inter = rows * (node_q - q), rows * (q.sum(1, keepdims=True) - node_q)
    return np.maximum(send_intra, recv_intra) * row_bytes, np.maximum(send_inter, recv_inter) * row_bytes


def ppn_of(ep: int, rates: Rates) -> int:
    """GPUs per node of an EP group of ``ep`` consecutive ranks."""
    return min(ep, rates.gpus_per_node)


# ---------------------------------------------------------------------------------------------
# search and the table


def best(model: DiT, gpus: int, kind: str, rates: Rates, routing: Routing, where=lambda lay: True):
    """(layout, breakdown) with the least predicted time among ``layouts_for(model, gpus, kind)``."""
    cands = []
    for lay in layouts_for(model, gpus, kind):
        if not where(lay):
            continue
        try:
            cands.append((forward(model, lay, rates, routing), lay))
        except ValueError:
            continue  # e.g. ep that cannot hold the experts evenly without EPLB
    if not cands:
        return None, None
    bd, lay = min(cands, key=lambda c: (c[0].total, c[1].gpus - c[1].ep))
    return lay, bd


def rows_for(model: DiT, gpus: tuple, rates: Rates, routing: Routing) -> list[dict]:
    rows = []
    for P in gpus:
        row = dict(gpus=P)
        row["best"] = best(model, P, "moe-ep", rates, routing)
        row["ep_all"] = best(model, P, "moe-ep", rates, routing, lambda l: l.ep == P and (l.eplb or P == 1))
        row["ep_all_noeplb"] = best(model, P, "moe-ep", rates, routing, lambda l: l.ep == P and not l.eplb)
        row["replicated"] = best(model, P, "replicated", rates, routing)
        row["vllm"] = best(model, P, "vllm-omni", rates, routing)
        rows.append(row)
    return rows


def _ms(x) -> str:
    return "-" if x[1] is None else f"{x[1].total * 1e3:.1f}"


def format_table(rows: list[dict], one_gpu: float) -> str:
    """The CLI's table. ``one_gpu``: seconds of the 1-GPU forward (every layout is the same there)."""
    head = ("| GPUs | best moe-ep layout | ms | moe-ep EP=all+EPLB: layout | ms | no EPLB ms | SP-replicated: layout | ms "
            "| vLLM-Omni: layout | ms | speedup vs 1 GPU (best moe-ep) | EP=all vs replicated "
            "| GiB/GPU: best / EP=all / replicated / vLLM-Omni |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        (bl, bb), (al, ab), (rl, rb), (vl, vb) = r["best"], r["ep_all"], r["replicated"], r["vllm"]
        vs = f"{(ab.total / rb.total - 1) * 100:+.1f}%" if ab and rb else "-"
        mem = " / ".join("-" if x is None else f"{x.memory / GiB:.1f}" for x in (bb, ab, rb, vb))
        lines.append(f"| {r['gpus']} | {bl.label()} | {bb.total * 1e3:.1f} | {al.label() if al else '-'} | {_ms(r['ep_all'])} "
                     f"| {_ms(r['ep_all_noeplb'])} | {rl.label() if rl else '-'} | {_ms(r['replicated'])} "
                     f"| {vl.label() if vl else '-'} | {_ms(r['vllm'])} | {one_gpu / bb.total:.2f}x | {vs} | {mem} |")
    return "\n".join(lines)


def format_breakdown(rows: list[dict]) -> str:
    """Where the time goes for EP over all ranks (with EPLB) against replicated experts, same SP x CFG."""
    head = ("| GPUs | layout | dense | attention | attn comm | MoE compute | MoE comm (exposed) | max/mean | "
            "replicated MoE compute | EP - replicated |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        al, ab = r["ep_all"]
        rb = r["replicated"][1]
        if ab is None:
            continue
        f = lambda s: f"{s * 1e3:.1f}"
        lines.append(f"| {r['gpus']} | {al.label()} | {f(ab.dense + ab.elementwise)} | {f(ab.attention)} | {f(ab.attn_comm)} | "
                     f"{f(ab.moe_compute)} | {f(ab.moe_comm)} ({f(ab.moe_exposed)}) | {ab.max_over_mean:.2f} | "
                     f"{f(rb.moe_compute)} | {(ab.total - rb.total) * 1e3:+.1f} ms |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def add_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("simulate-layouts", help="predict one image's forward on 1-64 GPUs per parallel layout")
    s.add_argument("--model", default="hidream", help="'hidream', 'hunyuan_like' (configs/hunyuan_like.json) or a config path")
    s.add_argument("--size", type=int, default=1024, help="image height = width in pixels")
    s.add_argument("--gpus", default="1,2,4,8,16,32,64", help="comma-separated GPU counts (powers of two)")
    s.add_argument("--synthetic", default="zipf:1.2", help="routing skew 'zipf:S' or 'uniform' (eplb.simulate's trace)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--redundant-per-gpu", type=int, default=None, help="EPLB slots per GPU beyond ceil(E/ep) (default 1 if ep <= E else 0)")
    s.add_argument("--net-gbps", type=float, default=50.0, help="per-GPU network bandwidth, GB/s each way")
    s.add_argument("--attn-tflops", type=float, default=400.0, help="attention kernel rate (assumption)")
    s.add_argument("--hbm-tbps", type=float, default=3.0, help="effective HBM bandwidth (assumption)")
    s.add_argument("--no-shared-overlap", action="store_true", help="do not hide all-to-alls under the shared expert")
    s.add_argument("--no-ring-overlap", action="store_true", help="ring K/V passes do not overlap attention")
    s.add_argument("--copies", action="store_true",
                   help="moe-ep sends one row per routed copy (no per-rank dedup, no own-rows overlap)")
    s.add_argument("--breakdown", action="store_true", help="also print where the time goes")
    return s


def parse_gpus(spec: str) -> tuple:
    try:
        gpus = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--gpus: expected comma-separated integers, got {spec!r}") from None
    bad = [p for p in gpus if p < 1 or p & (p - 1) or p > 1024]
    if bad:
        raise ValueError(f"--gpus: {bad[0]} is not a power of two between 1 and 1024")
    return gpus


def run_cli(args) -> int:
    gpus = parse_gpus(args.gpus)
    skew = parse_synthetic(args.synthetic)
    for name in ("net_gbps", "attn_tflops", "hbm_tbps"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')}: must be a positive number, got {v}")
    if args.redundant_per_gpu is not None and args.redundant_per_gpu < 0:
        raise ValueError(f"--redundant-per-gpu: must be >= 0, got {args.redundant_per_gpu}")
    model = load_model(args.model, args.size)
    rates = Rates(net_bw=args.net_gbps * 1e9, attn_flops=args.attn_tflops * 1e12, hbm_bw=args.hbm_tbps * 1e12,
                  shared_overlap=not args.no_shared_overlap, ring_overlap=not args.no_ring_overlap,
                  dedup_tokens=not args.copies, overlap_own_rows=not args.copies)
    routing = Routing(skew, args.seed, args.redundant_per_gpu)
    print(f"# {model.name} {args.size}x{args.size}: {model.image_tokens} image + {model.text_tokens} text tokens, batch {model.batch} "
          f"(CFG), {sum(b.count for b in model.blocks)} blocks, hidden {model.hidden}, {model.heads} heads, {model.experts} experts "
          f"top-{model.top_k} (width {model.expert_hidden}, shared {model.shared_hidden}), {model.params() / 1e9:.1f} B params; "
          f"routing zipf:{skew} seed {args.seed}; net {args.net_gbps} GB/s/GPU; attention {args.attn_tflops} TFLOP/s; "
          f"HBM {args.hbm_tbps} TB/s; shared-expert overlap {rates.shared_overlap}; ring overlap {rates.ring_overlap}; "
          f"moe-ep exchange: {'one row per copy' if args.copies else 'one row per (token, rank), own rows overlapped'}")
    rows = rows_for(model, gpus, rates, routing)
    one = forward(model, Layout("replicated"), rates, routing).total
    print(format_table(rows, one))
    if args.breakdown:
        print()
        print(format_breakdown(rows))
    return 0
