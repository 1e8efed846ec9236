"""One image on many ranks for a diffusers MoE transformer: CFG parallel and sequence parallel
(Ulysses, ring, both), composed with expert parallelism (docs/parallelism.md, "diffusers").

`install_context_parallel(model, ctx, moe_layers, guidance, guided)` replaces the transformer's
`forward` (an instance attribute, so the module's hooks -- the statistics' TransformerWatch --
still run around it) by `ContextParallel.forward`, which every rank calls with the same
arguments, as the pipeline passes them. The pipeline itself is untouched.

CFG parallel (`parallel.cfg_parallel_size` = G), by the family's guidance convention:
  - batched (HiDream: [negative; positive] rows in one call): cfg rank i runs the contiguous
    i-th chunk of the batch (batch / G rows) and the outputs are all-gathered along the batch,
    so every rank returns the full prediction and its pipeline keeps identical latents.
  - separate (NucleusMoE: the conditional forward, then the unconditional one, same latents and
    t): G must be 2. The first call returns at once, on every rank, an output tensor that is
    not filled yet (NaN until then, never stale memory); the second call runs cfg rank 0 on the
    first call's arguments (conditional) and cfg rank 1 on its own (unconditional) at the same
    time, all-gathers the two outputs, fills the first call's tensor in place and returns the
    second's. This relies on the pipeline reading the first prediction only after the second
    call returns (diffusers' NucleusMoE / QwenImage-style loops do: they combine after both
    calls), and checks that both calls got the same latents and timestep.
    Pairing: two calls pair when the pipeline's `current_timestep` (diffusers' pipelines set a
    new tensor at every step of every call, None outside the loop) is the same object; a first
    call left unpaired (a pipeline call that stopped between its two forwards) is dropped when a
    call of another step comes, and `reset()` (TransformerWatch.new_call) drops it at the start
    of a sampling call. A call made while the pipeline is outside its denoising loop (the
    transformer called alone, guidance on) cannot be paired: RuntimeError, on every rank.
`remove()` undoes the install: the transformer's own forward, attention processors and hooks.
  Either way the expert statistics label the rows a rank's MoE layers really see: the branch
  labels of its own chunk, or its own call's branch (ExpertLoadStats.set_sample_branch).

Sequence parallel (sp = ring x ulysses): the family module (nucleus_sp.py, hidream_sp.py)
shards each sample's image tokens over the sp ranks (contiguous shard i on sp rank i), runs the
blocks on the shard with attention through `moe_ep.sequence_parallel.sequence_parallel_attention`
(text tokens replicated, their keys counted once) and the rotary tables sharded the same way, and
all-gathers the output along the sequence before unpatchify. MoE layers route their own shard;
expert choice picks over the whole sample (Router.sequence_layout, moe_ep/router.py).

Preflight-by-shape: heads not divisible by ulysses_degree stop the install, image tokens not
divisible by sequence_parallel_size stop the first forward, each with one ConfigError naming
the key (sequence_parallel.check_heads / check_tokens).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Protocol

import torch
import torch.distributed as tdist
import torch.nn as nn

from ...config import ConfigError
from ...parallel import ParallelContext
from ...parallel_layout import ParallelLayout


class FamilyPlan(Protocol):
    """What a model family tells the generic part (nucleus_sp.NucleusPlan, hidream_sp.HiDreamPlan)."""

    def install(self, model: nn.Module, layout: ParallelLayout) -> None:
        """Check the heads and put the sequence-parallel attention processors in (sp > 1)."""

    def remove(self) -> None:
        """Give the model back the processors (and drop the hooks) `install` replaced."""

    def sharded_forward(self, model: nn.Module, original: Callable, kwargs: dict,
                        layout: ParallelLayout) -> torch.Tensor:
        """The full output tensor of one forward run sequence-parallel over the sp group."""

    def batch_dims(self, kwargs: dict) -> dict[str, int]:
        """forward argument -> its batch dimension (tensors or lists to split over cfg ranks)."""

    def output_shape(self, model: nn.Module, kwargs: dict) -> tuple[int, ...]:
        """Shape of the output tensor of a call (separate guidance: the tensor filled later)."""


def _split(value: Any, dim: int, start: int, size: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value.narrow(dim, start, size)
    if isinstance(value, list):                                         # a per-sample list
        return value[start:start + size]
    return value                                                        # one value for every sample


def _all_gather(x: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    tdist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


# what `loop_step()` returns for a pipeline that does not say where its loop is (no diffusers
# `current_timestep`): calls then pair in arrival order, reset by TransformerWatch.new_call
NOT_TOLD = object()


class ContextParallel:
    """The transformer's forward under a layout with cfg > 1 and/or sp > 1 (module docstring)."""

    def __init__(self, model: nn.Module, layout: ParallelLayout, plan: FamilyPlan, guidance: str,
                 moe_layers: list, guided: Optional[Callable[[], bool]] = None,
                 loop_step: Optional[Callable[[], Any]] = None):
        if guidance not in ("batched_negative_first", "separate_cond_first"):
            raise ValueError(f"unknown guidance convention {guidance!r}")
        if guidance == "separate_cond_first" and layout.cfg not in (1, 2):
            raise ConfigError("parallel.cfg_parallel_size", layout.cfg,
                              "must be 1 or 2 for a model whose pipeline runs the conditional and the "
                              "unconditional forward as two calls (NucleusMoE): one rank per branch")
        self.model, self.layout, self.plan, self.guidance = model, layout, plan, guidance
        self.moe_layers, self.guided = moe_layers, guided
        self.loop_step = loop_step or (lambda: NOT_TOLD)
        self.original = model.forward                                   # the bound diffusers forward
        self.signature = inspect.signature(self.original)
        self._first: Optional[dict] = None                              # separate guidance: 1st call's args
        self._pending: Optional[torch.Tensor] = None                    # ... and its output, filled later
        self._first_step: Any = None                                    # ... and the pipeline step it came in
        model.forward = self.forward

    def remove(self) -> None:
        """Undo install_context_parallel: the transformer's own forward, the family's attention
        processors and hooks, the MoE layers' whole-sample expert choice."""
        self.reset()
        self.model.__dict__.pop("forward", None)
        self.plan.remove()
        for layer in self.moe_layers:
            layer.router.sequence_layout = None

    def reset(self) -> None:
        """Forget a half-done step (a pipeline call that stopped between its two forwards)."""
        self._first, self._pending, self._first_step = None, None, None

    # ------------------------------------------------------------ the forward
    def forward(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        kw = dict(bound.arguments)
        for name, p in self.signature.parameters.items():              # a **kwargs of the forward
            if p.kind is inspect.Parameter.VAR_KEYWORD and name in kw:
                kw.update(kw.pop(name))
        return_dict = kw.pop("return_dict", True)
        if self.layout.cfg == 1:
            out = self._local(kw)
        elif self.guidance == "batched_negative_first":
            out = self._batched(kw)
        else:
            out = self._separate(kw)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)

    def _local(self, kw: dict) -> torch.Tensor:
        """This cfg rank's forward: whole sequence (sp 1) or sequence parallel."""
        if self.layout.sp == 1:
            return self.original(**kw, return_dict=False)[0]
        return self.plan.sharded_forward(self.model, self.original, kw, self.layout)

    def _stats(self):
        return next((m.stats for m in self.moe_layers if getattr(m, "stats", None) is not None), None)

    def _batched(self, kw: dict) -> torch.Tensor:
        """[negative; positive] rows in one call: cfg rank i runs chunk i of the batch."""
        G, i = self.layout.cfg, self.layout.index("cfg")
        batch = int(kw["hidden_states"].shape[0])
        if batch % G:
            raise ConfigError("parallel.cfg_parallel_size", G,
                              f"must divide the transformer's batch ({batch} rows): cfg parallel splits the "
                              f"guidance branches, so it needs classifier-free guidance on (guidance_scale > 1); "
                              f"use cfg_parallel_size 1 without it")
        b = batch // G
        dims = self.plan.batch_dims(kw)
        local = {k: (_split(v, dims[k], i * b, b) if k in dims and v is not None else v) for k, v in kw.items()}
        stats = self._stats()
        if stats is not None and stats.sample_branch is not None and len(stats.sample_branch) == batch:
            stats.set_sample_branch(stats.sample_branch[i * b:(i + 1) * b])    # this rank's rows' branches
        out = self._local(local)                                        # [b, ...]
        return _all_gather(out, self.layout.group("cfg"), G, dim=0)     # [batch, ...] in cfg-rank order

    def _separate(self, kw: dict) -> torch.Tensor:
        """Conditional call, then unconditional call: both run during the second (module docstring)."""
        step = self.loop_step()
        if step is None:
            raise RuntimeError("cfg parallel (parallel.cfg_parallel_size 2) pairs the conditional and the unconditional "
                               "forward of a pipeline step; this call came while the pipeline is outside its denoising "
                               "loop (its current_timestep is None), so nothing pairs with it and its output would "
                               "never be computed. Call the transformer through its pipeline, or use "
                               "cfg_parallel_size 1 to call it alone")
        if self._first is not None and step is not NOT_TOLD and step is not self._first_step:
            self.reset()                                                # a half-done step of an earlier call
        if self._first is None:
            if self.guided is None or not self.guided():
                raise ConfigError("parallel.cfg_parallel_size", self.layout.cfg,
                                  "needs classifier-free guidance on (guidance_scale > 1) and the model called by "
                                  "its pipeline (two forwards per step); use cfg_parallel_size 1 without it")
            p = next(self.model.parameters())
            self._first, self._first_step = kw, step
            # NaN until the second call fills it: an output read too early is visibly wrong
            self._pending = torch.full(self.plan.output_shape(self.model, kw), float("nan"), dtype=p.dtype,
                                       device=p.device)
            return self._pending
        first, pending = self._first, self._pending
        self.reset()
        for name in ("hidden_states", "timestep"):
            a, b = first.get(name), kw.get(name)
            if isinstance(a, torch.Tensor) and not (a is b or torch.equal(a, b)):
                raise RuntimeError(f"cfg parallel: the two guidance forwards of a step got different {name}; "
                                   f"the pipeline does not follow the conditional-then-unconditional convention")
        i = self.layout.index("cfg")                                    # 0: conditional, 1: unconditional
        mine = first if i == 0 else kw
        stats = self._stats()
        if stats is not None and stats.sample_branch is not None:
            stats.set_sample_branch([i] * int(mine["hidden_states"].shape[0]))
        out = self._local(mine)
        both = _all_gather(out.unsqueeze(0), self.layout.group("cfg"), 2, dim=0)   # [2, ...]
        pending.copy_(both[0])
        return both[1].clone()


def install_context_parallel(model: nn.Module, ctx: ParallelContext, moe_layers: list, guidance: str,
                             family: str, guided: Optional[Callable[[], bool]] = None,
                             loop_step: Optional[Callable[[], Any]] = None) -> Optional[ContextParallel]:
    """Run `model` under ctx.layout's cfg and sp axes (module docstring); None (nothing changed)
    when both are 1. `moe_layers`: its MoELayers (expert choice gathers over sp; the statistics
    are relabelled per cfg rank). `guided()`: whether the pipeline runs classifier-free guidance
    (pipeline.TransformerWatch._guided); `loop_step()`: the pipeline's current step, None outside
    its loop, NOT_TOLD (pipeline.TransformerWatch.loop_step). Every rank of the world calls it;
    `.remove()` on the result undoes it."""
    layout = ctx.layout
    if layout.sp == 1 and layout.cfg == 1:
        return None
    plan = family_plan(family, layout)
    if layout.sp > 1:
        plan.install(model, layout)
        for layer in moe_layers:
            layer.router.sequence_layout = layout
    return ContextParallel(model, layout, plan, guidance, moe_layers, guided, loop_step)


def family_plan(family: str, layout: ParallelLayout) -> FamilyPlan:
    """The family's plan; ConfigError naming the layout key that asked for it (cfg or sp, as the
    user gave it) for a family without one."""
    if family == "nucleusmoe":
        from .nucleus_sp import NucleusPlan

        return NucleusPlan()
    if family == "hidream":
        from .hidream_sp import HiDreamPlan

        return HiDreamPlan()
    name, value = layout.sp_key() if layout.sp > 1 else ("parallel.cfg_parallel_size", layout.cfg)
    raise ConfigError(name, value, f"sequence and cfg parallel are implemented for the hidream and nucleusmoe "
                                   f"families only, not {family!r}")
