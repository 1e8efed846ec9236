"""A user's diffusers pipeline (or transformer) made expert-parallel with one call:

    import moe_ep
    pipe = HiDreamImagePipeline.from_pretrained(...)            # or NucleusMoEImagePipeline, ...
    pipe = moe_ep.expert_parallel(pipe, eplb={"enabled": True, "num_redundant_experts": 4})
    image = pipe(prompt, ...).images[0]                          # every rank calls it, as in any EP job
    pipe.moe_ep.stats.save("stats.json"); print(pipe.moe_ep.summary())

What it does: every MoE block of the transformer becomes an EPMoEBlock (wrap.wrap_transformer;
this rank keeps only its slots' experts; a transformer from `load_transformer`, whose blocks are
EPMoEBlocks already, is adopted as it is), and two hooks on the transformer's forward drive the
per-forward driver (moe_ep/driver.py): count the tokens each expert gets (by timestep bucket and
guidance branch) and, between forwards, close statistics windows and rebalance
(moe_ep.rebalance.Rebalancer). The pipeline's own `__call__`,
scheduler, callbacks and VAE are untouched.

A forward's timestep and guidance branch come from the transformer's call and the family's
pipeline convention (`CONVENTIONS`): HiDream passes t x 1000 and runs [negative, positive]
in one batch; NucleusMoE passes t in [0, 1] and runs the conditional forward, then the
unconditional one, at the same t.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ...config import ConfigError, EplbConfig, ParallelConfig, _build
from ...parallel import ParallelContext, build_context, init_distributed, resolve_layout
from ...cuda_graph import check_cuda_graph, check_cuda_graph_device, install_cuda_graph
from ...driver import ForwardDriver
from ...rebalance import Rebalancer
from ...stats import ExpertLoadStats
from ..base import ForwardHooks, ForwardInfo
from .context_parallel import NOT_TOLD, install_context_parallel
from .spec import BATCH_INVARIANT
from .wrap import EPMoEBlock, find_blocks, find_wrapped, wrap_transformer


@dataclass(frozen=True)
class PipelineConvention:
    """How a family's pipeline calls its transformer."""

    timestep_arg: str            # keyword of the timestep tensor [B]
    timestep_scale: float        # t in [0, 1] = value / timestep_scale
    guidance: str                # "batched_negative_first" | "separate_cond_first"


CONVENTIONS = {
    "hidream": PipelineConvention("timesteps", 1000.0, "batched_negative_first"),
    "nucleusmoe": PipelineConvention("timestep", 1.0, "separate_cond_first"),
}


class TransformerWatch:
    """Hooks on a diffusers transformer's forward that call `hooks.on_forward_begin/end(step, t,
    info)` around every call, with t in [0, 1] and each sample's guidance branch."""

    def __init__(self, transformer: nn.Module, convention: PipelineConvention, hooks: ForwardHooks,
                 pipeline: Any = None):
        self.convention, self.hooks, self.pipeline = convention, hooks, pipeline
        self.step, self._last_t, self._info, self._t = -1, None, None, 0.0
        self._in_step = 0                     # forwards seen at the current step
        self.on_new_call: list = []           # called by new_call (context parallel's reset)
        self._handles = [transformer.register_forward_pre_hook(self._before, with_kwargs=True),
                         transformer.register_forward_hook(self._after, with_kwargs=True)]

    def new_call(self) -> None:
        """A new pipeline call starts (steps count from 0 again; nothing pairs with the last call's)."""
        self.step, self._last_t, self._in_step = -1, None, 0
        for reset in self.on_new_call:
            reset()

    def loop_step(self) -> Any:
        """The pipeline's current denoising step as diffusers' pipelines hold it (`current_timestep`:
        a new tensor at every step of every call, None outside the loop); context_parallel.NOT_TOLD
        for a pipeline (or no pipeline) without that property."""
        p = self.pipeline
        if p is None or not isinstance(getattr(type(p), "current_timestep", None), property):
            return NOT_TOLD
        return getattr(p, "current_timestep", None)          # AttributeError before its first call: None

    def _guided(self) -> bool:
        p = self.pipeline
        return bool(p is not None and getattr(p, "do_classifier_free_guidance", getattr(p, "guidance_scale", 1.0) > 1))

    def _separate_guided(self) -> bool:
        return self.convention.guidance == "separate_cond_first" and self._guided()

    def _branches(self, batch: int) -> Optional[list[int]]:
        if not self._guided():
            return None
        if self.convention.guidance == "batched_negative_first":
            half = batch // 2
            return [1] * half + [0] * (batch - half)
        return [self._in_step - 1] * batch                          # 1st forward of a step: cond, 2nd: uncond

    def _before(self, module, args, kwargs):
        c = self.convention
        t_arg = kwargs.get(c.timestep_arg, args[1] if len(args) > 1 else None)
        x = kwargs.get("hidden_states", args[0] if args else None)
        t = 0.0 if t_arg is None else float(torch.as_tensor(t_arg).flatten()[0]) / c.timestep_scale
        # A new step: every forward, or with separate guidance forwards every second one. Equal t
        # alone cannot tell: the pipeline rounds t to bf16, where neighbouring steps can coincide.
        per_step = 2 if self._separate_guided() else 1
        same_t = self._last_t is not None and math.isclose(t, self._last_t, rel_tol=0, abs_tol=1e-9)
        if self._in_step >= per_step or not same_t or self.step < 0:
            self.step, self._in_step = self.step + 1, 0
        self._in_step += 1
        self._last_t = t
        batch = 0 if x is None else int(x.shape[0])
        self._t = min(1.0, max(0.0, t))
        self._info = ForwardInfo(batch=batch, rows=batch, cond_rows=None,
                                 sample_branch=self._branches(batch))
        self.hooks.on_forward_begin(self.step, self._t, self._info)

    def _after(self, module, args, kwargs, output):
        self.hooks.on_forward_end(self.step, self._t, self._info)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class ExpertParallel(ForwardDriver):
    """What `expert_parallel` attaches as `pipe.moe_ep`: the statistics, the rebalancer and the
    per-forward driver (moe_ep/driver.py) on hooks of the transformer (collective: every rank
    runs the same forwards)."""

    def __init__(self, transformer: nn.Module, wrappers: list[EPMoEBlock], ctx: ParallelContext,
                 eplb: EplbConfig, convention: PipelineConvention, pipeline: Any = None):
        self.transformer, self.wrappers, self.eplb = transformer, wrappers, eplb
        layers = self.moe_layers()
        first = layers[0]
        stats = ExpertLoadStats(len(layers), first.cfg.num_experts, ctx.device, eplb.window_size,
                                eplb.timestep_buckets, first.cfg.top_k)
        for layer in layers:
            layer.stats = stats
        rebalancer = Rebalancer(layers, ctx, eplb, stats, transfer_timeout_s=ctx.timeout_s) if eplb.enabled else None
        super().__init__(ctx, stats, layers, rebalancer)
        self.watch = TransformerWatch(transformer, convention, self, pipeline)

    def moe_layers(self) -> list:
        return [w.moe for w in self.wrappers]

    def summary(self) -> dict:
        """Forwards, balancedness per closed window (placement in effect), rebalance records."""
        bal = self.window_balance
        return {"forwards": self.forward, "windows": self.stats.num_windows,
                "balancedness": float(np.mean(bal)) if bal else 1.0, "balancedness_windows": bal,
                "rebalances": self.rebalance_records(),
                "placement": [m.placement.phy2log.tolist() for m in self.moe_layers()],
                "local_experts": [m.local_experts for m in self.moe_layers()]}

    @contextlib.contextmanager
    def idle(self):
        """For a rank with no prompt of its own in a call the other ranks make: run the pipeline
        with any stand-in prompt inside `with pipe.moe_ep.idle():` -- every MoE layer then joins
        the all-to-alls with no rows (nothing counted) and the image is meaningless."""
        layers = self.moe_layers()
        for layer in layers:
            layer.idle = True
        try:
            yield
        finally:
            for layer in layers:
                layer.idle = False

    def remove_hooks(self) -> None:
        """Take moe-ep's hooks off the transformer: the statistics' watch, the CUDA graph
        (cuda_graph=True) and, under cfg / sequence parallel, the forward replacement, attention
        processors and hooks (context_parallel.py). The MoE blocks stay expert-parallel."""
        self.watch.remove()
        graph = getattr(self, "cuda_graph", None)
        if graph is not None:
            graph.remove()
            self.cuda_graph = None
        cp = getattr(self, "context_parallel", None)
        if cp is not None:
            cp.remove()
            self.context_parallel = None


def _context(parallel: Optional[ParallelConfig], device: torch.device) -> ParallelContext:
    """The EP/DP context: joins an initialised world, or starts one through DeepSpeed."""
    cfg = parallel or ParallelConfig()
    if dist.is_available() and dist.is_initialized():
        return build_context(cfg, dist.get_rank(), dist.get_world_size(), device)
    return init_distributed(cfg)


def adopt_wrapped(transformer: nn.Module, wrappers: list[EPMoEBlock], ctx: Optional[ParallelContext],
                  eplb: EplbConfig, score_dtype: Optional[str], parallel: Optional[ParallelConfig] = None,
                  batch_invariant: Optional[str] = None) -> ParallelContext:
    """Checks that the MoE layers `load_transformer` built (`wrappers`) serve this call as they
    are: every MoE block of the model is wrapped, in layer order, with the redundant slots, score
    dtype and batch invariance asked for, in the EP group and layout of `ctx` (or of `parallel`).
    -> the layers' context. Raises ConfigError (eplb, parallel) or ValueError.

    A different layout is refused, not adopted: the layers' EP group and the sp/cfg groups
    context parallel runs on come from the context they were loaded with."""
    spec = wrappers[0].spec
    left = find_blocks(transformer, spec)
    if left:
        raise ValueError(f"{type(transformer).__name__} mixes expert-parallel blocks with {len(left)} "
                         f"{spec.block_class} module(s) still unwrapped (first: {left[0][0]})")
    layers = [w.moe for w in wrappers]
    if [m.layer_idx for m in layers] != list(range(len(layers))):
        raise ValueError(f"the expert-parallel blocks of {type(transformer).__name__} are not MoE layers "
                         f"0..{len(layers) - 1} in module order: {[m.layer_idx for m in layers]}")
    redundant = layers[0].num_slots - layers[0].cfg.num_experts
    if eplb.num_redundant_experts != redundant:
        raise ConfigError("eplb.num_redundant_experts", eplb.num_redundant_experts,
                          f"the transformer was loaded with {redundant} redundant slots per MoE layer "
                          f"(load_transformer(num_redundant=...)); give the same number")
    if score_dtype is not None and score_dtype != layers[0].cfg.score_dtype:
        raise ValueError(f"score_dtype {score_dtype!r}: the transformer was loaded scoring in "
                         f"{layers[0].cfg.score_dtype!r} (load_transformer(score_dtype=...))")
    if batch_invariant is not None and batch_invariant != layers[0].cfg.batch_invariant:
        raise ValueError(f"batch_invariant {batch_invariant!r}: the transformer was loaded with "
                         f"{layers[0].cfg.batch_invariant!r} (load_transformer(batch_invariant=...))")
    own = layers[0].ctx
    if ctx is not None and (ctx.ep_size, ctx.ep_rank) != (own.ep_size, own.ep_rank):
        raise ValueError(f"ctx is EP rank {ctx.ep_rank} of {ctx.ep_size}; the transformer was loaded as "
                         f"EP rank {own.ep_rank} of {own.ep_size}")
    if ctx is not None:
        _check_same_layout(ctx.layout, own.layout, None)
    elif parallel is not None:
        _check_same_layout(resolve_layout(parallel, own.world_size, own.rank), own.layout, parallel)
    return own


def _check_same_layout(want, own, parallel: Optional[ParallelConfig]) -> None:
    """ConfigError naming the first `parallel` key whose layout differs from the loaded one
    (ValueError on `ctx` when the layout came from a context)."""
    keys = [("parallel.cfg_parallel_size", want.cfg, (want.cfg,), (own.cfg,)),
            (*want.sp_key(), (want.ulysses, want.ring), (own.ulysses, own.ring)),
            ("parallel.ep_size", want.ep, (want.ep,), (own.ep,)),
            ("parallel.data_parallel_size", want.dp, (want.dp,), (own.dp,))]
    for key, value, a, b in keys:
        if a == b:
            continue
        why = (f"the transformer was loaded under {own.describe()}, not {want.describe()}: its MoE layers' groups "
               f"and context parallel follow the context it was loaded with; load it with a context of this layout "
               f"(load_transformer(path, build_context(parallel, rank, world, device))), or leave parallel out")
        if parallel is None:
            raise ValueError(f"ctx has {want.describe()}; {why}")
        raise ConfigError(key, value, why)


def expert_parallel(pipe_or_transformer: Any, ctx: Optional[ParallelContext] = None, *,
                    eplb: EplbConfig | dict | None = None, parallel: ParallelConfig | dict | None = None,
                    score_dtype: Optional[str] = None, batch_invariant: Optional[str] = None,
                    compile: bool = False, cuda_graph: bool = False) -> Any:
    """Make a diffusers pipeline (anything with `.transformer`) or transformer expert-parallel,
    in place, and return it with `.moe_ep` (an `ExpertParallel`: stats, rebalancer, summary()).

    ctx: an EP context (moe_ep.parallel); default: the initialised torch.distributed world
    (every rank in one EP group unless `parallel` says otherwise), or one started through
    DeepSpeed. eplb: an EplbConfig or its dict (the config file's `eplb` section: enabled,
    num_redundant_experts, window_size, interval, migration, ...). score_dtype: None (default)
    scores the gate as the model's own code does (its spec: "input" for HiDream and NucleusMoE),
    "float32" scores in float32 (a few tokens then pick other experts in bf16).
    batch_invariant: model.moe.batch_invariant of the MoE layers ("auto": on for CPU ranks, off
    on GPUs; "on"; "off"); None (default): "auto", or for an adopted transformer what it was loaded with.
    A transformer from `load_transformer` (its MoE blocks already expert-parallel) is adopted
    as it is: its layers' context, with eplb.num_redundant_experts equal to what it was loaded with;
    `ctx` or `parallel`, when given, must have the layout it was loaded with (else ConfigError naming the key).
    The transformer's known host syncs are removed in place on every route (acceleration.remove_host_syncs,
    exact; `.moe_ep.host_sync_fixes` lists what this call changed: empty where they were on already).
    compile: torch.compile the transformer's non-MoE blocks, in place
    (acceleration.compile_transformer; the first forward compiles; not bit-equal to eager).
    cuda_graph: replay the transformer's forward from a CUDA graph, captured once per input
    signature (moe_ep/cuda_graph.py): the forward becomes an instance
    attribute, so `pipe.transformer` stays the module and the statistics and rebalancing hooks run
    around every replay; a rebalance leads to a fresh capture (per layer with async moves: prefer eplb.migration "sync").
    Bit-equal to eager where eager is reproducible; with `compile`,
    to compiled. Needs EP = 1, cfg = sp = 1 and a CUDA device (ConfigError naming `cuda_graph`).
    Every rank must call this with the same weights, and then run the same pipeline calls.
    """
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    pipeline = pipe_or_transformer if transformer is not pipe_or_transformer else None
    if isinstance(eplb, dict):
        eplb = _build(EplbConfig, eplb, "eplb")
    if isinstance(parallel, dict):
        parallel = _build(ParallelConfig, parallel, "parallel")
    eplb = eplb or EplbConfig()
    if batch_invariant is not None and batch_invariant not in BATCH_INVARIANT:
        raise ConfigError("batch_invariant", batch_invariant, f"must be one of {', '.join(BATCH_INVARIANT)} or None")
    if isinstance(getattr(transformer, "moe_ep", None), ExpertParallel):
        raise ValueError(f"{type(transformer).__name__} is expert-parallel already (expert_parallel was called "
                         "on it, or on a pipeline around it): use its `.moe_ep`")
    if cuda_graph and "forward" in vars(transformer):
        raise ValueError(f"cuda_graph: {type(transformer).__name__}.forward was replaced already; a CUDA graph "
                         "wraps the module's own forward")
    wrappers = find_wrapped(transformer)
    if wrappers:                          # load_transformer made it: its blocks are expert-parallel already
        ctx = adopt_wrapped(transformer, wrappers, ctx, eplb, score_dtype, parallel, batch_invariant)
        if cuda_graph:
            check_cuda_graph(ctx, "cuda_graph")
    else:
        device = next(transformer.parameters()).device
        if cuda_graph:                                     # before any process group or wrapping
            check_cuda_graph_device(device, "cuda_graph")
        ctx = ctx or _context(parallel, device)
        if cuda_graph:
            check_cuda_graph(ctx, "cuda_graph")
        wrappers, _ = wrap_transformer(transformer, ctx, num_redundant=eplb.num_redundant_experts,
                                       score_dtype=score_dtype, batch_invariant=batch_invariant or "auto")
    convention = CONVENTIONS.get(wrappers[0].spec.name)
    if convention is None:
        raise ValueError(f"no pipeline convention for model family {wrappers[0].spec.name!r}; "
                         f"known: {sorted(CONVENTIONS)}")
    from .acceleration import compile_transformer, remove_host_syncs
    # exact, on every route (acceleration.remove_host_syncs says what it pays)
    host_sync_fixes = remove_host_syncs(transformer)
    if compile:
        compile_transformer(transformer)
    handle = ExpertParallel(transformer, wrappers, ctx, eplb, convention, pipeline)
    handle.host_sync_fixes = host_sync_fixes
    handle.cuda_graph = None
    if cuda_graph:          # installed before any other forward replacement (none: cfg = sp = 1)
        handle.cuda_graph = install_cuda_graph(transformer, handle.moe_layers())
    # cfg / sequence parallel over ctx.layout (None when both are 1): context_parallel.py
    handle.context_parallel = install_context_parallel(transformer, ctx, handle.moe_layers(), convention.guidance,
                                                       wrappers[0].spec.name, handle.watch._guided,
                                                       handle.watch.loop_step)
    if handle.context_parallel is not None:
        handle.watch.on_new_call.append(handle.context_parallel.reset)
    pipe_or_transformer.moe_ep = handle
    transformer.moe_ep = handle           # a second call, through a pipeline around it, is refused
    return pipe_or_transformer
