"""The one generic wrapper that replaces a diffusers MoE block in place and runs it expert-parallel.

`EPMoEBlock` is called exactly like the diffusers block it replaces (the spec's CallSignature),
builds the router input by the spec's rule and calls `moe_ep.layer.MoELayer`, whose router holds
the diffusers gate weight, whose slots hold this rank's experts, and whose `shared` is the
diffusers shared-expert module itself (replicated on every rank).

Two ways in:
  - `loader.load_transformer` (from a folder, reading only this rank's experts), and
  - `wrap_transformer` here (a diffusers transformer already in memory, e.g. the one of a
    user's pipeline: its local slots are filled from its own experts, the rest is dropped).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ...layer import MoELayer
from ...parallel import ParallelContext
from .spec import ExpertLayout, MoEBlockSpec, expert_shapes, gate_weight, moe_config, spec_for


class EPMoEBlock(nn.Module):
    """Drop-in replacement of one diffusers MoE block (`spec.block_class`).

    forward(*args, **kwargs) takes the diffusers block's arguments; the expert input is
    [B, S, H]; returns [B, S, H]: the routed experts' weighted sum plus the shared expert.
    """

    def __init__(self, spec: MoEBlockSpec, moe: MoELayer, path: str):
        super().__init__()
        self.spec, self.moe, self.path = spec, moe, path

    def router_input(self, bound: dict) -> Optional[torch.Tensor]:
        """The gate's input by the spec's rule; None: the gate sees the expert input."""
        if self.spec.router_input == "hidden":
            return None
        unmod = bound[self.spec.call.unmodulated]                       # [B, S, H]
        t = bound.get(self.spec.call.timestep)                          # [B, Ht] or None
        if t is None:  # diffusers' NucleusMoELayer routes on the unmodulated hidden alone then
            return unmod
        return torch.cat([t.unsqueeze(1).expand(-1, unmod.shape[1], -1), unmod], dim=-1)  # [B, S, Ht+H]

    def forward(self, *args, **kwargs) -> torch.Tensor:
        bound = self.spec.call.bind(args, kwargs)
        x = bound[self.spec.call.expert_input]                          # [B, S, H]
        return self.moe(x, router_input=self.router_input(bound))

    def extra_repr(self) -> str:
        m = self.moe
        return (f"spec={self.spec.name}, path={self.path}, layer={m.layer_idx}, experts={m.cfg.num_experts}, "
                f"slots={m.num_slots}, local={m.local_experts}, routing={m.cfg.routing}")


def find_blocks(model: nn.Module, spec: MoEBlockSpec) -> list[tuple[str, nn.Module]]:
    """(path, module) of every MoE block of the spec's class, in module order (= MoE layer index)."""
    return [(name, mod) for name, mod in model.named_modules() if type(mod).__name__ == spec.block_class]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` where the submodule at dotted `path` is."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)  # ModuleList and Sequential accept setattr by index name too


def make_layer(spec: MoEBlockSpec, block: nn.Module, ctx: ParallelContext, layer_idx: int,
               num_redundant: int, dtype: torch.dtype, score_dtype: Optional[str] = None,
               batch_invariant: str = "auto") -> MoELayer:
    """An MoELayer for one diffusers block: its routing rule, sizes and shared expert (the block's
    own module, moved as it is), run batch-invariant or not (model.moe.batch_invariant). Its gate
    and slots are left for the caller to fill."""
    cfg = moe_config(spec, block, score_dtype, batch_invariant)
    _, H, _ = expert_shapes(spec, block)
    router_in = gate_weight(spec, block).shape[1]
    shared = getattr(block, spec.shared) if spec.shared else None
    return MoELayer(H, cfg, ctx, num_redundant=num_redundant, layer_idx=layer_idx, dtype=dtype,
                    router_input_size=router_in, shared=shared)


def to_w13_w2(layout: ExpertLayout, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's tensors as stored -> (w13 [H, 2F] gate columns first, w2 [F, H]).

    parts: module_list {"w1": [F, H], "w3": [F, H], "w2": [H, F]} or {"w13": [2F, H], "w2": [H, F]}
    (nn.Linear weights); packed {"gate_up": [H, 2F], "down": [F, H]} (one row of the stacks).
    """
    if layout.kind == "packed":
        return parts["gate_up"], parts["down"]
    if "w13" in parts:
        w13 = parts["w13"].t()                                          # [H, 2F]
        if layout.w13_order == "up_gate":
            up, gate = w13.chunk(2, dim=1)
            w13 = torch.cat([gate, up], dim=1)
    else:
        w13 = torch.cat([parts["w1"].t(), parts["w3"].t()], dim=1)      # [H, 2F]
    return w13.contiguous(), parts["w2"].t().contiguous()               # [H, 2F], [F, H]


def expert_parts(layout: ExpertLayout, block_path: str, expert: int) -> list[tuple[str, str, Optional[int]]]:
    """(role, state-dict key, row) of each stored tensor of one expert; row is the expert's index
    in a packed stack (read that row only), None for a per-expert tensor."""
    base = f"{block_path}.{layout.container}"
    if layout.kind == "packed":
        return [("gate_up", f"{base}.{layout.gate_up}", expert), ("down", f"{base}.{layout.down}", expert)]
    roles = [("w13", layout.w13)] if layout.w13 else [("w1", layout.w1), ("w3", layout.w3)]
    return [(role, f"{base}.{expert}.{name}.weight", None) for role, name in roles + [("w2", layout.w2)]]


class ModuleExpertSource:
    """expert -> (w13 [H, 2F], w2 [F, H]) from a diffusers block in memory (its own experts)."""

    def __init__(self, spec: MoEBlockSpec, block: nn.Module):
        self.layout = spec.experts
        self.container = block.get_submodule(spec.experts.container)

    def __call__(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        lay, c = self.layout, self.container
        if lay.kind == "packed":
            parts = {"gate_up": getattr(c, lay.gate_up)[expert], "down": getattr(c, lay.down)[expert]}
        elif lay.w13:
            parts = {"w13": c[expert].get_submodule(lay.w13).weight, "w2": c[expert].get_submodule(lay.w2).weight}
        else:
            m = c[expert]
            parts = {"w1": m.get_submodule(lay.w1).weight, "w3": m.get_submodule(lay.w3).weight,
                     "w2": m.get_submodule(lay.w2).weight}
        return to_w13_w2(lay, {k: v.detach() for k, v in parts.items()})


def adoptable(spec: MoEBlockSpec, block: nn.Module, layer: MoELayer) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The block's packed stacks (gate_up [E, H, 2F], down [E, F, H]) when `layer` can take them
    as its slot weights without a copy: the same layout as GroupedExperts (packed, [gate | up]
    columns, x @ W), every expert in its own slot in order (EP = 1, no redundant slots, the
    contiguous placement), the same dtype and device, contiguous. Else None."""
    lay = spec.experts
    if lay.kind != "packed" or layer.local_experts != list(range(layer.cfg.num_experts)):
        return None
    c = block.get_submodule(lay.container)
    gate_up, down = getattr(c, lay.gate_up), getattr(c, lay.down)
    ref = layer.experts.w13
    if any(t.dtype != ref.dtype or t.device != ref.device or not t.is_contiguous() for t in (gate_up, down)):
        return None
    return gate_up.detach(), down.detach()


@torch.no_grad()
def wrap_block(model: nn.Module, path: str, spec: MoEBlockSpec, ctx: ParallelContext, layer_idx: int,
               num_redundant: int, dtype: Optional[torch.dtype], score_dtype: Optional[str],
               keep_source: bool = False, batch_invariant: str = "auto"
               ) -> tuple[EPMoEBlock, Optional[ModuleExpertSource]]:
    """Replace the diffusers MoE block at `path` by an EPMoEBlock and let the block go.

    Its gate is copied, its shared expert moves as it is, and this rank's slots are filled from
    its experts: adopted without a copy where `adoptable` says so (unless `keep_source`, whose
    source must keep the block's own weights unchanged), else copied expert by expert. Only
    this function holds the block, so it is freed on return (unless `keep_source`): wrapping
    a model holds at most the model plus one layer's new slots."""
    block = model.get_submodule(path)
    gate = gate_weight(spec, block)
    layer = make_layer(spec, block, ctx, layer_idx, num_redundant, dtype or gate.dtype, score_dtype, batch_invariant)
    layer.router.gate.weight.copy_(gate)
    stacks = None if keep_source else adoptable(spec, block, layer)
    source = ModuleExpertSource(spec, block) if keep_source or stacks is None else None
    if stacks is not None:
        layer.experts.adopt(*stacks)                    # the zero slots made above are freed here
    else:
        layer.load_expert_weights(source)
    wrapper = EPMoEBlock(spec, layer, path)
    replace_module(model, path, wrapper)
    return wrapper, (source if keep_source else None)


def find_wrapped(model: nn.Module) -> list[EPMoEBlock]:
    """The EPMoEBlocks already in `model` (a `load_transformer` model), in module order."""
    return [m for m in model.modules() if isinstance(m, EPMoEBlock)]


@torch.no_grad()
def wrap_transformer(model: nn.Module, ctx: ParallelContext, num_redundant: int = 0,
                     dtype: Optional[torch.dtype] = None, spec: Optional[MoEBlockSpec] = None,
                     score_dtype: Optional[str] = None, keep_sources: bool = False,
                     batch_invariant: str = "auto") -> tuple[list[EPMoEBlock], list]:
    """Make a diffusers transformer that is already in memory expert-parallel, in place.

    Every MoE block becomes an EPMoEBlock whose MoELayer holds the block's gate, its shared
    expert (the same module) and, in this rank's slots, the experts the contiguous placement
    gives it. One block at a time (`wrap_block`): its slots are filled, it is replaced and
    freed before the next, so the peak is the model plus one layer's slots. At EP = 1 without
    redundant slots a packed expert stack (NucleusMoE) becomes the slots themselves, no copy.
    The block's other experts are dropped with the block unless `keep_sources`, in which case
    the returned sources keep them (the rebalancer's fallback; the blocks then stay in memory).
    Every rank must call this with the same model (the same weights), as in any EP job.
    batch_invariant: model.moe.batch_invariant for the new layers ("auto": on for CPU ranks).
    Returns (wrappers, sources): sources[i] is expert -> (w13, w2) of MoE layer i, or None.
    """
    spec = spec or spec_for(type(model).__name__)
    paths = [path for path, _ in find_blocks(model, spec)]   # names only: a module held here would stay alive
    if not paths:
        raise ValueError(f"{type(model).__name__} has no {spec.block_class} module to make expert-parallel")
    wrappers, sources = [], []
    for idx, path in enumerate(paths):
        wrapper, source = wrap_block(model, path, spec, ctx, idx, num_redundant, dtype, score_dtype, keep_sources,
                                     batch_invariant)
        wrappers.append(wrapper)
        sources.append(source)
    return wrappers, sources
