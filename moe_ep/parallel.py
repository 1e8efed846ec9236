"""Distributed start through DeepSpeed, the parallel layout and its process groups.

World layout (moe_ep/parallel_layout.py, docs/parallelism.md): `world = dp x cfg x sp`,
`sp = ring x ulysses`, Ulysses innermost. Expert parallelism lies over the same ranks: ranks
`[d*ep_size, (d+1)*ep_size)` form EP group `d` (consecutive ranks, so an EP group stays inside
a node when it fits); the ranks with the same EP rank form an EP-replica group, which
`ParallelContext.dp_group` has always named (world = ep_size x dp_size replicas). Everything a
layer needs is carried by a `ParallelContext`; there are no module-level process-group globals.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as tdist

from .config import ConfigError, ParallelConfig, sequence_parallel_degrees, sequence_parallel_field
from .parallel_layout import ParallelLayout


@dataclass
class ParallelContext:
    """Who this process is and the groups it talks in. `ep_group` None means EP = 1.

    `dp_size`/`dp_rank`/`dp_group` are the EP replicas (world = ep_size x dp_size; the ranks
    with the same EP rank), not the prompt-splitting axis: that one is `layout.dp`.
    `layout` holds every axis's size and group (sequence, ulysses, ring, cfg, dp, ep); left
    out, it is the data-parallel layout of this world with no process groups (a context made
    by hand); build_context fills it in.
    """

    rank: int = 0
    world_size: int = 1
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Any = None
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: Any = None
    ranks_per_node: int = 1
    device: torch.device = torch.device("cpu")
    timeout_s: float = 300.0
    layout: Optional[ParallelLayout] = None

    def __post_init__(self):
        if self.layout is None:
            self.layout = ParallelLayout.data_parallel(self.world_size, self.rank, self.ep_size)

    @property
    def num_nodes(self) -> int:
        """Nodes spanned by one EP group (what the hierarchical planner packs onto)."""
        return max(1, self.ep_size // max(1, min(self.ranks_per_node, self.ep_size)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def derive_ep_size(cfg: ParallelConfig, world_size: int) -> int:
    """EP size from the config and the world size; raises ConfigError if impossible, or if the
    rest of the layout is (resolve_layout): every preflight that derives the EP size checks
    the whole layout before any process group starts."""
    return resolve_layout(cfg, world_size).ep


def _ep_size_rule(cfg: ParallelConfig, world_size: int) -> int:
    """Explicit `ep_size` wins. Otherwise, with `enable_expert_parallel`, EP spans the
    tensor x sequence x cfg x data parallel degrees (vLLM-Omni's diffusion EP rule; a
    data_parallel_size left out counts 1); without it, EP spans the whole world."""
    if cfg.ep_size is not None:
        ep = cfg.ep_size
        name = "parallel.ep_size"
    elif cfg.enable_expert_parallel:
        ulysses, ring = sequence_parallel_degrees(cfg)
        ep = cfg.tensor_parallel_size * ulysses * ring * cfg.cfg_parallel_size * (cfg.data_parallel_size or 1)
        name = "parallel.enable_expert_parallel (tensor x sequence x cfg x data parallel sizes)"
    else:
        ep = world_size
        name = "parallel.ep_size"
    if ep < 1 or world_size % ep:
        raise ConfigError(name, ep, f"EP size must divide the world size ({world_size})")
    return ep


def resolve_layout(cfg: ParallelConfig, world_size: int, rank: int = 0) -> ParallelLayout:
    """The layout of `world_size` ranks the config asks for (no process groups yet); raises
    ConfigError naming the key when the sizes do not fit the world.

    dp = data_parallel_size when given (then dp x cfg x sp must be the world), else
    world / (cfg x sp); sp = ulysses_degree x ring_degree (config.sequence_parallel_degrees).
    """
    ep = _ep_size_rule(cfg, world_size)
    if cfg.tensor_parallel_size != 1:
        raise ConfigError("parallel.tensor_parallel_size", cfg.tensor_parallel_size,
                          "must be 1 (tensor parallelism is not implemented)")
    ulysses, ring = sequence_parallel_degrees(cfg)
    sp, cfgp = ulysses * ring, cfg.cfg_parallel_size
    sp_field = sequence_parallel_field(cfg)
    if cfg.data_parallel_size is not None:
        dp = cfg.data_parallel_size
        if dp * cfgp * sp != world_size:
            raise ConfigError("parallel.data_parallel_size", dp,
                              f"data x cfg x sequence parallel sizes ({dp} x {cfgp} x {sp}) must equal the world "
                              f"size ({world_size}); leave data_parallel_size out to use world / (cfg x sequence)")
    else:
        if world_size % (cfgp * sp):
            name, value = (ParallelLayout(world_size=sp, ulysses=ulysses, ring=ring, sp_field=sp_field).sp_key()
                           if cfgp == 1 else ("parallel.cfg_parallel_size", cfgp))
            raise ConfigError(name, value, f"cfg x sequence parallel sizes ({cfgp} x {sp} = {cfgp * sp}; sequence = "
                                           f"ulysses_degree x ring_degree) must divide the world size ({world_size})")
        dp = world_size // (cfgp * sp)
    return ParallelLayout(world_size=world_size, dp=dp, cfg=cfgp, ring=ring, ulysses=ulysses, ep=ep, rank=rank,
                          sp_field=sp_field)


def check_layout(num_experts: int, num_redundant: int, ep_size: int) -> None:
    """Slots must split evenly over EP ranks; raises ConfigError naming the field."""
    slots = num_experts + num_redundant
    if slots % ep_size:
        field = "eplb.num_redundant_experts" if num_redundant else "model.moe.num_experts"
        value = num_redundant if num_redundant else num_experts
        raise ConfigError(field, value, f"experts + redundant experts ({slots}) must be divisible by "
                                        f"the EP size ({ep_size})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_local_world(default: int) -> int:
    """Ranks the launcher started on this node: torchrun sets LOCAL_WORLD_SIZE, DeepSpeed's
    launcher (deepspeed.launcher.launch, one per node) sets LOCAL_SIZE only; `default` if neither."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("parallel.device", kind, "CUDA is not available on this machine; use 'auto' or 'cpu'")
    gpus = torch.cuda.device_count()
    if gpus == 1:            # one visible GPU: this rank's own (a scheduler that gives each rank one)
        local_rank = 0
    elif local_rank >= gpus:  # NCCL refuses two ranks on one GPU, later and less clearly
        raise ConfigError("parallel.device", kind, f"local rank {local_rank} has no GPU of its own: this node has "
                                                   f"{gpus}; start at most {gpus} ranks per node (deepspeed --num_gpus)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", torch.cuda.current_device())


def init_distributed(cfg: ParallelConfig) -> ParallelContext:
    """Start (or join) the process group through DeepSpeed and build the EP/DP groups.

    Works under `deepspeed`/`torchrun` (env vars set) and as a plain single process
    (world of one). gloo on CPU, NCCL on GPU; every collective times out after
    `cfg.timeout_s` instead of hanging.
    """
    if "RANK" not in os.environ:  # plain `python launch/infer.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    # share the cores this process may run on (affinity, not os.cpu_count) between the ranks of
    # this node instead of oversubscribing; GPU ranks too (latent decoding, PNG encoding on the CPU)
    local_world = launcher_local_world(int(os.environ.get("WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, local_world)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm as dist

    if device.type == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce kernel (about 30 s) when its
        # backend starts on CPU. moe-ep's collectives are all-to-all and P2P, which go
        # through gloo, so skip that build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not tdist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    world, rank = dist.get_world_size(), dist.get_rank()
    return build_context(cfg, rank, world, device)


def build_context(cfg: ParallelConfig, rank: int, world: int, device: torch.device) -> ParallelContext:
    """Create every group of the layout (collective: every rank must call it)."""
    layout = resolve_layout(cfg, world, rank)
    if world > 1:
        # new_group is collective over the whole world: every rank creates every group.
        layout = layout.with_process_groups(datetime.timedelta(seconds=cfg.timeout_s))
    ep = layout.ep
    rpn = cfg.ranks_per_node or launcher_local_world(world)
    return ParallelContext(rank=rank, world_size=world, ep_size=ep, ep_rank=layout.index("ep"),
                           ep_group=layout.group("ep"), dp_size=layout.size("ep_replica"),
                           dp_rank=layout.index("ep_replica"), dp_group=layout.group("ep_replica"),
                           ranks_per_node=max(1, rpn), device=device, timeout_s=cfg.timeout_s, layout=layout)


def new_ep_group(ctx: ParallelContext):
    """A second group over this rank's EP ranks (the members of ctx.ep_group, its own
    communicator), or None at EP = 1. Collective over the world: every rank creates every
    EP group, in the layout's order."""
    if ctx.ep_group is None:
        return None
    timeout = datetime.timedelta(seconds=ctx.timeout_s)
    mine = None
    for ranks in ctx.layout.groups("ep"):
        g = tdist.new_group(list(ranks), timeout=timeout)
        if ctx.rank in ranks:
            mine = g
    return mine


def error_on_any_rank(error: Optional[str], ctx: ParallelContext) -> Optional[str]:
    """This rank's error, else the first other rank's as "on rank R: ...", else None when every
    rank of the world is fine. Collective over the world: a check that every rank runs on its own
    files agrees on the outcome, and rank 0 (which prints) can name the real reason."""
    if ctx.world_size == 1:
        return error
    errors: list = [None] * ctx.world_size
    tdist.all_gather_object(errors, error)
    if error is not None:
        return error
    return next((f"on rank {r}: {e}" for r, e in enumerate(errors) if e is not None), None)


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def context_for_tests(rank: int, world: int, ep_size: Optional[int] = None) -> ParallelContext:
    """A context over an already initialised gloo world (used by spawned test ranks)."""
    return build_context(ParallelConfig(ep_size=ep_size, timeout_s=60.0), rank, world, torch.device("cpu"))
