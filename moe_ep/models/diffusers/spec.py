"""A model family's MoE block, described as data: what to replace, where its weights live, how it routes.

One `MoEBlockSpec` per family is all the runtime needs to serve a diffusers MoE transformer with
expert parallelism: the generic wrapper (`wrap.EPMoEBlock`) replaces every module of class
`block_class` in place and calls `moe_ep.layer.MoELayer`; the loader (`loader.py`) reads the
gate, the non-expert weights and this rank's experts by the key names the spec gives. Nothing
else is model specific. The two specs that ship are in `hidream.py` and `nucleus.py`.

Adding a family is writing one more spec. Two examples that are not shipped (their modules live
outside diffusers; check the attribute names against the modeling file you load):

DiT-MoE's ``SparseMoeBlock`` (``experts`` = ModuleList of ``MoeMLP`` with gate_proj / up_proj /
down_proj Linears, ``gate`` = ``MoEGate`` with a ``weight`` [E, H], softmax top-k without
renormalisation, optional ``shared_experts``)::

    DIT_MOE = MoEBlockSpec(
        name="dit-moe", model_class="DiT", block_class="SparseMoeBlock",
        gate="gate.weight",
        experts=ExpertLayout("module_list", "experts", w1="gate_proj", w3="up_proj", w2="down_proj"),
        routing={"routing": "token_choice", "num_experts": Attr("gate.n_routed_experts"),
                 "top_k": Attr("gate.top_k"), "score_func": "softmax",
                 "renormalize": Attr("gate.norm_topk_prob"), "route_scale": 1.0},
        shared="shared_experts",
        call=CallSignature(args=("hidden_states",), expert_input="hidden_states"))

HunyuanImage-3.0's ``HunyuanMoE`` (per-expert ``gate_and_up_proj`` Linear [2F, H] fused and
``down_proj``, router Linear ``gate.wg``, softmax top-k with renormalisation, ``shared_mlp``)::

    HUNYUAN_IMAGE_3 = MoEBlockSpec(
        name="hunyuan-image-3", model_class="HunyuanImage3ForCausalMM", block_class="HunyuanMoE",
        gate="gate.wg.weight",
        experts=ExpertLayout("module_list", "experts", w13="gate_and_up_proj", w2="down_proj",
                             w13_order="gate_up"),   # or "up_gate": read the MLP's chunk order
        routing={"routing": "token_choice", "num_experts": Attr("num_experts"),
                 "top_k": Attr("moe_topk"), "score_func": "softmax", "renormalize": True},
        shared="shared_mlp",
        call=CallSignature(args=("hidden_states",), expert_input="hidden_states"))

Vocabulary: a block's *expert input* is what its experts (and its shared expert) see; its
*router input* is what its gate sees, the same tensor unless `router_input` says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch.nn as nn

from ...config import ConfigError, MoEConfig

BATCH_INVARIANT = ("auto", "on", "off")          # MoEConfig.batch_invariant

ROUTER_INPUTS = ("hidden", "concat(timestep, unmodulated)")


@dataclass(frozen=True)
class Attr:
    """A value read from the diffusers MoE block: `path` is a dotted attribute path on the block
    ("gate.top_k"); `values`, if given, maps what is found to the MoEConfig value
    ({True: "sigmoid", False: "softmax"})."""

    path: str
    values: Optional[dict] = None

    def read(self, block: nn.Module) -> Any:
        obj: Any = block
        for part in self.path.split("."):
            obj = getattr(obj, part)
        if self.values is not None:
            return self.values[obj]
        return obj


@dataclass(frozen=True)
class ExpertLayout:
    """Where the routed experts' weights live, relative to the MoE block.

    kind "module_list": `container` is an nn.ModuleList of one module per expert, holding nn.Linear
        modules (weight [out, in]): either `w1` (gate) and `w3` (up) [F, H], or one fused `w13`
        [2F, H] whose rows are in `w13_order`; and `w2` (down) [H, F].
        Key of expert e: f"{block}.{container}.{e}.{w1}.weight".
    kind "packed": `container` is a module with two parameters stacked over experts, already in
        the x @ W convention: `gate_up` [E, H, 2F] (gate columns first) and `down` [E, F, H].
        Key: f"{block}.{container}.{gate_up}" (a rank reads rows [e] of it only).
    Either way one expert is SwiGLU: silu(x @ Wgate) * (x @ Wup) @ Wdown.
    """

    kind: Literal["module_list", "packed"]
    container: str = "experts"
    w1: Optional[str] = "w1"
    w3: Optional[str] = "w3"
    w2: str = "w2"
    w13: Optional[str] = None
    w13_order: Literal["gate_up", "up_gate"] = "gate_up"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"

    def expert_keys(self, block: str, expert: int) -> list[str]:
        """State-dict keys that hold logical expert `expert` of the block at path `block`
        (for "packed": the stacked tensors, of which the expert is one row)."""
        base = f"{block}.{self.container}"
        if self.kind == "packed":
            return [f"{base}.{self.gate_up}", f"{base}.{self.down}"]
        names = [self.w13] if self.w13 else [self.w1, self.w3]
        return [f"{base}.{expert}.{n}.weight" for n in names + [self.w2]]

    def container_prefix(self, block: str) -> str:
        """Every key under this prefix belongs to the routed experts."""
        return f"{block}.{self.container}."


@dataclass(frozen=True)
class CallSignature:
    """How the diffusers code calls the MoE block: its argument names in positional order, which
    one the experts see, and (for router input "concat(timestep, unmodulated)") which ones hold
    the timestep embedding [B, Ht] and the unmodulated hidden state [B, S, H]."""

    args: tuple[str, ...]
    expert_input: str
    timestep: Optional[str] = None
    unmodulated: Optional[str] = None

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """(args, kwargs) of one call -> {argument name: value}; unknown names are an error."""
        if len(args) > len(self.args):
            raise TypeError(f"MoE block takes {len(self.args)} positional arguments {self.args}, got {len(args)}")
        bound = dict(zip(self.args, args))
        for name, value in kwargs.items():
            if name not in self.args:
                raise TypeError(f"MoE block got an unexpected argument {name!r}; it takes {self.args}")
            if name in bound:
                raise TypeError(f"MoE block got {name!r} twice")
            bound[name] = value
        if self.expert_input not in bound:
            raise TypeError(f"MoE block needs {self.expert_input!r}")
        return bound


@dataclass(frozen=True)
class MoEBlockSpec:
    """One model family's MoE block (see the module docstring).

    name           short family name (logs, summary.json)
    model_class    the diffusers transformer class name (config.json's `_class_name`)
    block_class    class name of the MoE module to replace
    gate           path of the gate weight [E, Hr] relative to the block
    experts        expert layout (ExpertLayout)
    routing        MoEConfig fields -> constant or Attr read from the block; routing, num_experts
                   and score_func are required. expert_hidden_size comes from the weights' shapes.
    shared         attribute of the shared expert, kept as the diffusers module and replicated on
                   every rank (None: no shared expert)
    router_input   "hidden" (the gate sees the expert input) or "concat(timestep, unmodulated)"
                   (cat([timestep embedding expanded over S, unmodulated hidden], -1): NucleusMoE)
    call           how the block is called (CallSignature)
    score_dtype    the default MoEConfig.score_dtype: "input" scores like diffusers does
    rebuild        module class name -> factory(old module) -> new module, for modules that hold
                   tensors made in __init__ that are not in the weights (plain tensor attributes,
                   non-persistent buffers): the loader builds the model on the meta device and
                   re-creates these modules on the CPU with the factory
    """

    name: str
    model_class: str
    block_class: str
    gate: str
    experts: ExpertLayout
    routing: dict
    call: CallSignature
    shared: Optional[str] = None
    router_input: str = "hidden"
    score_dtype: Literal["float32", "input"] = "input"
    rebuild: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.router_input not in ROUTER_INPUTS:
            raise ValueError(f"spec {self.name}: router_input must be one of {ROUTER_INPUTS}")
        if self.router_input != "hidden" and not (self.call.timestep and self.call.unmodulated):
            raise ValueError(f"spec {self.name}: router input {self.router_input!r} needs call.timestep "
                             "and call.unmodulated")
        missing = {"routing", "num_experts", "score_func"} - set(self.routing)
        if missing:
            raise ValueError(f"spec {self.name}: routing lacks {sorted(missing)}")

    def gate_key(self, block: str) -> str:
        return f"{block}.{self.gate}"

    def shared_prefix(self, block: str) -> Optional[str]:
        return f"{block}.{self.shared}." if self.shared else None


def expert_shapes(spec: MoEBlockSpec, block: nn.Module) -> tuple[int, int, int]:
    """(num_experts E, hidden H, expert hidden F) from the (possibly meta) block's expert weights."""
    lay = spec.experts
    container = block.get_submodule(lay.container)
    if lay.kind == "packed":
        E, H, F2 = getattr(container, lay.gate_up).shape      # [E, H, 2F]
        return E, H, F2 // 2
    first = container[0]
    if lay.w13:
        F2, H = first.get_submodule(lay.w13).weight.shape     # [2F, H]
        return len(container), H, F2 // 2
    F, H = first.get_submodule(lay.w1).weight.shape           # [F, H]
    return len(container), H, F


def gate_weight(spec: MoEBlockSpec, block: nn.Module):
    """The block's gate weight [E, Hr] (a parameter, possibly on the meta device)."""
    obj: Any = block
    for part in spec.gate.split("."):
        obj = getattr(obj, part)
    return obj


def moe_config(spec: MoEBlockSpec, block: nn.Module, score_dtype: Optional[str] = None,
               batch_invariant: str = "auto") -> MoEConfig:
    """The MoEConfig of one diffusers MoE block, read by the spec's routing rule.

    The shared expert is not counted here (num_shared_experts 0): it stays the diffusers
    module and MoELayer gets it as `shared`. `batch_invariant` is how the layer runs, not the
    model's (model.moe.batch_invariant, docs/config.md: "auto", "on", "off").
    """
    if batch_invariant not in BATCH_INVARIANT:
        raise ConfigError("model.moe.batch_invariant", batch_invariant, f"must be one of {', '.join(BATCH_INVARIANT)}")
    E, _, F = expert_shapes(spec, block)
    values = {k: (v.read(block) if isinstance(v, Attr) else v) for k, v in spec.routing.items()}
    if values["num_experts"] != E:
        raise ValueError(f"{spec.block_class}: routing says {values['num_experts']} experts, "
                         f"the weights hold {E}")
    values.setdefault("top_k", 1)
    if values.get("routing", "token_choice") == "token_choice" and not 1 <= int(values["top_k"]) <= E:
        # diffusers' own module could not run it either (torch.topk with k > E)
        raise ValueError(f"{spec.block_class}: routing picks top {values['top_k']} of {E} experts; "
                         f"must be between 1 and {E}")
    values["top_k"] = min(int(values["top_k"]), E)   # expert choice: unused
    return MoEConfig(expert_hidden_size=F, num_shared_experts=0,
                     score_dtype=score_dtype or spec.score_dtype, batch_invariant=batch_invariant, **values)


def spec_registry() -> dict[str, MoEBlockSpec]:
    """diffusers transformer class name -> the spec that serves it (the specs that ship)."""
    from .hidream import HIDREAM
    from .nucleus import NUCLEUS
    return {s.model_class: s for s in (HIDREAM, NUCLEUS)}


def spec_for(model_class: str) -> MoEBlockSpec:
    """The spec for a diffusers transformer class name; KeyError names the supported ones."""
    registry = spec_registry()
    if model_class not in registry:
        raise KeyError(f"no moe-ep spec for {model_class!r}; supported: {', '.join(sorted(registry))}")
    return registry[model_class]

