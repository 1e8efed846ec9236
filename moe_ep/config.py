"""JSON config -> typed, validated config.

Every section is a dataclass; the loader walks the dataclass fields, so a key that is
not a field, a value of the wrong type or out of range, and an impossible combination
of sizes all stop with one ``ConfigError`` naming the field, its value and what is
allowed -- before any process group starts or any file is written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional


class ConfigError(ValueError):
    """A config field has a value that is not allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field_name, self.value, self.allowed = field_name, value, allowed
        super().__init__(f"config field '{field_name}' = {value!r}: {allowed}")


@dataclass
class MoEConfig:
    """One MoE feed-forward layer (the same for every MoE block of the model)."""

    num_experts: int = 8                 # logical experts E
    top_k: int = 2                       # experts per token
    expert_hidden_size: int = 64         # SwiGLU inner size of one expert
    num_shared_experts: int = 0          # dense experts every token goes through
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True             # top-k weights sum to 1
    route_scale: float = 1.0             # multiplies the top-k weights
    n_group: int = 1                     # expert groups for group-limited routing
    topk_group: int = 1                  # groups a token may pick from (n_group > 1)
    # "token_choice": each token picks its top_k experts; "expert_choice": each expert picks its
    # top-C tokens of every sample, C = ceil(capacity_factor * tokens per sample / num_experts)
    routing: Literal["token_choice", "expert_choice"] = "token_choice"
    capacity_factor: float = 1.0         # expert choice only
    # "float32": router scores in float32 (robust to near-ties); "input": in the input's dtype,
    # as a model's own code does (matches it bit for bit, e.g. diffusers' HiDream gate in bf16)
    score_dtype: Literal["float32", "input"] = "float32"
    # "on": a token's expert output independent of the other tokens, the EP size and the placement
    # (moe_ep/batch_invariant.py: fixed-size GEMM row blocks on the CPU, one row per routed copy
    # on the wire, a weighted sum in copy order); "auto": on for CPU ranks, off on GPUs (where
    # one row per copy costs all-to-all bytes and the path is not measured); "off"
    batch_invariant: Literal["auto", "on", "off"] = "auto"


@dataclass
class ModelConfig:
    hidden_size: int = 64
    num_layers: int = 2                  # transformer blocks
    num_heads: int = 4
    qk_norm: bool = False                # RMSNorm on each head's queries and keys (stable training)
    moe_every: int = 1                   # an MoE feed-forward in every n-th block, dense otherwise
    dense_hidden_size: int = 128         # feed-forward size of non-MoE blocks
    in_channels: int = 4                 # latent channels
    patch_size: int = 2
    text_dim: int = 64                   # width of the prompt encoder's output
    max_prompt_tokens: int = 32
    text_encoder: str = "builtin"        # "builtin" or "module:function" (docs/model.md)
    vae_scale_factor: int = 1            # image pixels per latent pixel (the built-in decoder upsamples)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0                        # initialises the weights when there is no checkpoint
    checkpoint: Optional[str] = None     # safetensors file saved by moe_ep
    # "moe_dit": the built-in model; "diffusers": a diffusers MoE transformer read from `path`
    type: Literal["moe_dit", "diffusers"] = "moe_dit"
    path: Optional[str] = None           # diffusers folder (save_pretrained layout), type "diffusers"
    # torch.compile the transformer forward ("moe_dit"), or each non-MoE block with the host syncs
    # removed ("diffusers": acceleration.compile_transformer): inductor fuses the norms, modulation,
    # gates and residuals around the attention; the MoE layers stay eager (docs/config.md)
    compile: bool = False
    # replay the transformer forward from a CUDA graph captured once per input shape (moe_ep/cuda_graph.py):
    # no CPU launch gaps; statistics and rebalancing kept, phase timings not. EP = 1, cfg = sp = 1, CUDA
    cuda_graph: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class ParallelConfig:
    ep_size: Optional[int] = None        # expert-parallel ranks; None: derived (see docs/config.md)
    enable_expert_parallel: bool = False
    tensor_parallel_size: int = 1        # only 1: tensor parallelism is not implemented
    # sequence parallel ranks per image = ulysses_degree x ring_degree (docs/parallelism.md);
    # None: the product of the two degrees given, 1 when neither is
    sequence_parallel_size: Optional[int] = None
    ulysses_degree: Optional[int] = None  # None: sequence_parallel_size / ring_degree (all-Ulysses)
    ring_degree: Optional[int] = None     # None: sequence_parallel_size / ulysses_degree, else 1
    cfg_parallel_size: int = 1           # ranks that split the guidance branches of one image
    data_parallel_size: Optional[int] = None  # prompt-splitting ranks; None: world / (cfg x sp)
    ranks_per_node: Optional[int] = None  # None: LOCAL_WORLD_SIZE from the launcher
    timeout_s: float = 300.0             # every collective fails after this long
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class EplbConfig:
    enabled: bool = False
    num_redundant_experts: int = 0       # extra physical slots per layer (replicas)
    window_size: int = 8                 # forward passes per statistics window
    interval: int = 8                    # forward passes between rebalance attempts
    min_gain: float = 0.05               # rebalance only if predicted balancedness improves by this
    policy: Literal["default", "greedy"] = "default"
    num_groups: int = 1                  # expert groups for the hierarchical planner
    timestep_buckets: int = 1            # statistics split by diffusion timestep
    timestep_aware: bool = False         # one placement per timestep phase
    placement_file: Optional[str] = None  # start from a placement planned offline
    stats_file: Optional[str] = None     # seed the statistics from an earlier run
    # "sync": stop, move every layer, swap all at once; "async": one layer per forward boundary
    # while sampling goes on (docs/eplb_runtime.md)
    migration: Literal["sync", "async"] = "sync"


DEFAULT_PROMPTS = ("a red fox in the snow",)


@dataclass
class SamplingConfig:
    prompts: list = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    # a text file (one prompt a line) or JSONL (prompt, seed, negative_prompt, name): moe_ep/prompts.py
    prompts_file: Optional[str] = None
    negative_prompt: str = ""
    num_inference_steps: int = 8
    guidance_scale: float = 4.0
    height: int = 32
    width: int = 32
    seed: int = 0                        # prompt i uses seed + i
    batch_size: int = 2                  # prompts sampled together
    shift: float = 1.0                   # flow-matching timestep shift


@dataclass
class TelemetryConfig:
    wandb: bool = True
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "moe-ep"
    run_name: Optional[str] = None
    tags: list = field(default_factory=list)
    log_images: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eplb: EplbConfig = field(default_factory=EplbConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    output_dir: str = "outputs/run"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- parsing

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number",
            str: "a string", list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp, name: str):
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, name)
            except ConfigError:
                pass
        raise ConfigError(name, value, f"must be {_type_name(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise ConfigError(name, value, f"must be {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise ConfigError(name, value, "must be a finite number") from None
            if not math.isfinite(number):
                raise ConfigError(name, value, "must be a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list:
        if isinstance(value, list):
            return value
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    raise ConfigError(name, value, f"must be {_type_name(tp)}")


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", data, "must be a JSON object")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(where, data[key], "unknown key; allowed keys here: " + ", ".join(sorted(names)))
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _convert(value, hints[key], where)
    return cls(**kwargs)


# ---------------------------------------------------------------- allowed values, one table

@dataclass(frozen=True)
class Allowed:
    """The values one config field may take beyond its JSON type: a numeric range (`lo`/`hi`,
    open or closed) or a predicate on the value with its description (`text`).

    `describe()` is the text of the "allowed" column of docs/config.md, and `refuse()` the check
    `validate` runs; tests/test_config.py holds the two against each other, field by field.
    """

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    text: Optional[str] = None
    ok: Optional[Callable[[Any], bool]] = None

    def describe(self) -> str:
        if self.text is not None:
            return self.text
        parts = []
        if self.lo is not None:
            parts.append(("> " if self.lo_open else ">= ") + _number_text(self.lo))
        if self.hi is not None:
            parts.append(("< " if self.hi_open else "<= ") + _number_text(self.hi))
        return ", ".join(parts) or "any"

    def refuse(self, value) -> bool:
        """True when `value` (already of the field's JSON type, not None) is not allowed."""
        if self.ok is not None and not self.ok(value):
            return True
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return True
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return True
        return False


def _number_text(v) -> str:
    """2**63 as "2**63", 1e9 as "1e9", others as written."""
    if isinstance(v, int) and abs(v) >= 2 ** 32 and abs(v) & (abs(v) - 1) == 0:
        return ("-" if v < 0 else "") + f"2**{abs(v).bit_length() - 1}"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1e6:
        mantissa, exponent = f"{v:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return str(v)


def _text_encoder_ok(v: str) -> bool:
    return v == "builtin" or (v.count(":") == 1 and all(v.split(":")))


POSITIVE_INT = Allowed(lo=1)
COUNT = Allowed(lo=0)
POSITIVE = Allowed(lo=0, lo_open=True)
NON_EMPTY = Allowed(text="non-empty", ok=lambda v: len(v) > 0)
ANY_TEXT = Allowed(text="any")
SEED = Allowed(lo=-2 ** 63, hi=2 ** 64, hi_open=True)   # what torch.Generator takes

# Every int, number, string and list field of the config (dotted name -> allowed values).
# Fields typed Literal[...] (the allowed strings are the type) and bools need no row; a new field
# of another type must get one (tests/test_config.py fails until it has), and a row in docs/config.md.
# Consistency between fields (top_k <= num_experts, divisibility, ...) is checked in `validate`.
FIELDS: dict[str, Allowed] = {
    "model.hidden_size": POSITIVE_INT,
    "model.num_layers": POSITIVE_INT,
    "model.num_heads": POSITIVE_INT,
    "model.moe_every": POSITIVE_INT,
    "model.dense_hidden_size": POSITIVE_INT,
    "model.in_channels": POSITIVE_INT,
    "model.patch_size": POSITIVE_INT,
    "model.text_dim": POSITIVE_INT,
    "model.max_prompt_tokens": POSITIVE_INT,
    "model.text_encoder": Allowed(text='`"builtin"` or `"module:function"`', ok=_text_encoder_ok),
    "model.vae_scale_factor": POSITIVE_INT,
    "model.seed": SEED,
    "model.checkpoint": NON_EMPTY,
    "model.path": NON_EMPTY,
    "model.moe.num_experts": POSITIVE_INT,
    "model.moe.top_k": POSITIVE_INT,
    "model.moe.expert_hidden_size": POSITIVE_INT,
    "model.moe.num_shared_experts": COUNT,
    "model.moe.route_scale": POSITIVE,
    "model.moe.n_group": POSITIVE_INT,
    "model.moe.topk_group": POSITIVE_INT,
    "model.moe.capacity_factor": POSITIVE,
    "parallel.ep_size": POSITIVE_INT,
    "parallel.tensor_parallel_size": Allowed(lo=1, hi=1, text="1 (tensor parallelism is not implemented)"),
    "parallel.sequence_parallel_size": POSITIVE_INT,
    "parallel.ulysses_degree": POSITIVE_INT,
    "parallel.ring_degree": POSITIVE_INT,
    "parallel.cfg_parallel_size": Allowed(lo=1, hi=2),   # two guidance branches at most
    "parallel.data_parallel_size": POSITIVE_INT,
    "parallel.ranks_per_node": POSITIVE_INT,
    # datetime.timedelta and the backends take no more than 1e9 s
    "parallel.timeout_s": Allowed(lo=1, hi=1e9),   # gloo and NCCL count whole milliseconds; below 1 s a rendezvous cannot finish
    "eplb.num_redundant_experts": COUNT,
    "eplb.window_size": POSITIVE_INT,
    "eplb.interval": POSITIVE_INT,
    # a difference of two balancedness values, which lie in [0, 1]; -1: always rebalance
    "eplb.min_gain": Allowed(lo=-1, hi=1),
    "eplb.num_groups": POSITIVE_INT,
    "eplb.timestep_buckets": POSITIVE_INT,
    "eplb.placement_file": NON_EMPTY,
    "eplb.stats_file": NON_EMPTY,
    "sampling.prompts": Allowed(text="non-empty list of strings",
                                ok=lambda v: bool(v) and all(isinstance(x, str) for x in v)),
    "sampling.prompts_file": NON_EMPTY,
    "sampling.negative_prompt": ANY_TEXT,
    "sampling.num_inference_steps": POSITIVE_INT,
    "sampling.guidance_scale": COUNT,
    "sampling.height": POSITIVE_INT,
    "sampling.width": POSITIVE_INT,
    "sampling.seed": SEED,
    "sampling.batch_size": POSITIVE_INT,
    "sampling.shift": POSITIVE,
    "telemetry.project": NON_EMPTY,
    "telemetry.run_name": ANY_TEXT,
    "telemetry.tags": Allowed(text="list of strings", ok=lambda v: all(isinstance(x, str) for x in v)),
    "output_dir": NON_EMPTY,
}


def field_types(cls=None, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of the config: dotted name -> its annotation (e.g. Optional[int])."""
    cls = cls or Config
    out = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(field_types(tp, name + "."))
        else:
            out[name] = tp
    return out


def allowed_text(name: str) -> str:
    """The allowed values of a leaf field, as docs/config.md states them."""
    tp = field_types()[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return ", ".join(f'`"{a}"`' for a in typing.get_args(args[0]))
    if args == [bool]:
        return "true, false"
    return FIELDS[name].describe()


def _value(cfg: "Config", name: str):
    node = cfg
    for part in name.split("."):
        node = getattr(node, part)
    return node


def check_fields(cfg: "Config") -> None:
    """Each field in FIELDS against its allowed values (None, where a field may be null, passes)."""
    for name, allowed in FIELDS.items():
        value = _value(cfg, name)
        if value is not None and allowed.refuse(value):
            raise ConfigError(name, value, f"must be {allowed.describe()}".replace("`", ""))


def sequence_parallel_degrees(p: ParallelConfig) -> tuple[int, int]:
    """(ulysses, ring) degrees of `parallel`; raises ConfigError naming the keys that disagree.

    sequence_parallel_size = ulysses_degree x ring_degree. A missing degree is what the others
    leave: sequence_parallel_size alone is all-Ulysses (ring 1, as diffusers' and xDiT's default
    is Ulysses); neither size nor degrees: no sequence parallelism.
    """
    sp, u, r = p.sequence_parallel_size, p.ulysses_degree, p.ring_degree
    if sp is None:
        return (u or 1), (r or 1)
    if u is None and r is None:
        return sp, 1
    if u is not None and r is not None:
        if u * r != sp:
            raise ConfigError("parallel.sequence_parallel_size", sp,
                              f"must equal parallel.ulysses_degree x parallel.ring_degree ({u} x {r} = {u * r})")
        return u, r
    given, value, other = ("parallel.ulysses_degree", u, "ring") if u is not None else ("parallel.ring_degree", r, "ulysses")
    if sp % value:
        raise ConfigError(given, value, f"must divide parallel.sequence_parallel_size ({sp}); the {other} degree "
                                        f"is their quotient")
    return (u, sp // u) if u is not None else (sp // r, r)


def sequence_parallel_field(p: ParallelConfig) -> str:
    """The key(s) that set the sequence-parallel size, as the user gave them (errors about that
    size name these): sequence_parallel_size when given, else the degree(s) above 1."""
    if p.sequence_parallel_size is not None:
        return "parallel.sequence_parallel_size"
    given = [name for name, v in (("parallel.ulysses_degree", p.ulysses_degree), ("parallel.ring_degree", p.ring_degree))
             if v is not None and v > 1]
    return " x ".join(given) or "parallel.sequence_parallel_size"


def check_cuda_graph_fields(cfg: Config) -> None:
    """model.cuda_graph against the parallel section alone (the world size is checked in the job's
    preflight, moe_ep.cuda_graph.check_cuda_graph_config): a CUDA-graph forward runs EP = 1, one
    image on one rank, on a GPU."""
    p = cfg.parallel
    ulysses, ring = sequence_parallel_degrees(p)
    if p.device == "cpu":
        raise ConfigError("model.cuda_graph", True, "needs a CUDA device (parallel.device is 'cpu')")
    if p.ep_size is not None and p.ep_size != 1:
        raise ConfigError("model.cuda_graph", True, f"needs EP = 1 (parallel.ep_size is {p.ep_size}): EP > 1 reads "
                                                    "split sizes back to the host between kernels")
    if p.cfg_parallel_size * ulysses * ring > 1:
        raise ConfigError("model.cuda_graph", True, f"needs one image on one rank (parallel.cfg_parallel_size "
                                                    f"{p.cfg_parallel_size}, sequence parallel {ulysses * ring}): "
                                                    "their collectives are not captured")


def validate(cfg: Config) -> Config:
    """Range and consistency checks that need no process group. Raises ConfigError."""
    m, moe, e, s = cfg.model, cfg.model.moe, cfg.eplb, cfg.sampling
    check_fields(cfg)
    sequence_parallel_degrees(cfg.parallel)
    if m.type == "diffusers" and not m.path:
        raise ConfigError("model.path", m.path, "must name a diffusers model folder when model.type is 'diffusers'")
    if m.type == "diffusers" and m.checkpoint:
        raise ConfigError("model.checkpoint", m.checkpoint, "is only for model.type 'moe_dit' (a diffusers model "
                                                            "reads its weights from model.path)")
    if m.type == "moe_dit" and m.path:
        raise ConfigError("model.path", m.path, "is only for model.type 'diffusers' (the built-in model "
                                                "loads model.checkpoint)")
    if s.prompts_file and list(s.prompts) != list(DEFAULT_PROMPTS):
        raise ConfigError("sampling.prompts_file", s.prompts_file, "is given together with sampling.prompts; "
                                                                   "give one of the two")
    # torch.Generator takes seeds in [-2**63, 2**64); prompt i uses sampling.seed + i (a prompts
    # file's lines are checked when it is read, moe_ep/prompts.py)
    if not s.prompts_file and s.seed + len(s.prompts) - 1 >= 2 ** 64:
        raise ConfigError("sampling.seed", s.seed, "must be < 2**64 - (number of prompts - 1): prompt i uses seed + i")
    if m.cuda_graph:
        check_cuda_graph_fields(cfg)
    if m.moe_every > m.num_layers:
        raise ConfigError("model.moe_every", m.moe_every,
                          f"must be <= model.num_layers ({m.num_layers}), or the model has no MoE layer")
    if moe.top_k > moe.num_experts:
        raise ConfigError("model.moe.top_k", moe.top_k, f"must be <= model.moe.num_experts ({moe.num_experts})")
    if moe.num_experts % moe.n_group:
        raise ConfigError("model.moe.n_group", moe.n_group,
                          f"must divide model.moe.num_experts ({moe.num_experts})")
    if moe.topk_group > moe.n_group:
        raise ConfigError("model.moe.topk_group", moe.topk_group, f"must be <= model.moe.n_group ({moe.n_group})")
    if moe.n_group > 1 and moe.top_k > moe.topk_group * (moe.num_experts // moe.n_group):
        raise ConfigError("model.moe.top_k", moe.top_k,
                          "must be <= topk_group * experts per group, or a token cannot pick k experts")
    if m.hidden_size % m.num_heads:
        raise ConfigError("model.num_heads", m.num_heads, f"must divide model.hidden_size ({m.hidden_size})")
    for name, size in [("sampling.height", s.height), ("sampling.width", s.width)]:
        if size % (m.patch_size * m.vae_scale_factor):
            raise ConfigError(name, size, f"must be a multiple of model.patch_size x model.vae_scale_factor "
                                          f"({m.patch_size * m.vae_scale_factor})")
    if e.enabled and e.timestep_aware and e.timestep_buckets < 2:
        raise ConfigError("eplb.timestep_aware", True, "needs eplb.timestep_buckets >= 2 (one placement per "
                                                       "timestep phase; with 1 bucket there is one phase)")
    # diffusers models: checked in preflight against the folder's expert count (model.moe is unused
    # but for batch_invariant, how the layers run)
    if m.type == "moe_dit" and e.num_groups > 1 and moe.num_experts % e.num_groups:
        raise ConfigError("eplb.num_groups", e.num_groups,
                          f"must divide model.moe.num_experts ({moe.num_experts})")
    return cfg


def from_dict(data: dict) -> Config:
    return validate(_build(Config, data, ""))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (value parsed as JSON, else kept as a string)."""
    if not isinstance(data, dict):
        raise ConfigError("<root>", type(data).__name__, "the config file must hold a JSON object")
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", item, "must look like section.key=value")
        path, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        except RecursionError:
            raise ConfigError("--set", item[:80], "is nested too deeply") from None
        except ValueError as err:   # e.g. an integer of more than 4300 digits
            raise ConfigError("--set", item[:80], f"cannot be parsed: {err}") from None
        node = data
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(path, value, f"'{k}' is not a section")
        node[keys[-1]] = value
    return data


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list) -> dict:
    """json's object_pairs_hook: a key given twice is an error, not "the last one wins"."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def load(path: str, overrides: Optional[list[str]] = None) -> Config:
    """Read a JSON config file, apply overrides, validate. Raises ConfigError."""
    if os.path.isdir(path):
        raise ConfigError("--config", path, "is a folder, must be a JSON file")
    if not os.path.isfile(path):
        raise ConfigError("--config", path, "file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as err:
        raise ConfigError("--config", path, f"has the key {err.args[0]!r} twice in one object") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError("--config", path, f"is not valid UTF-8 JSON ({err})") from None
    except RecursionError:
        raise ConfigError("--config", path, "is nested too deeply") from None
    except ValueError as err:   # e.g. an integer of more than 4300 digits
        raise ConfigError("--config", path, f"cannot be parsed: {err}") from None
    return from_dict(apply_overrides(data, overrides or []))
