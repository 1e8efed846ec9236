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
from typing import Any, Literal, Optional


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


@dataclass
class ModelConfig:
    hidden_size: int = 64
    num_layers: int = 2                  # transformer blocks
    num_heads: int = 4
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
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class ParallelConfig:
    ep_size: Optional[int] = None        # expert-parallel ranks; None: derived (see docs/config.md)
    enable_expert_parallel: bool = False
    tensor_parallel_size: int = 1
    sequence_parallel_size: int = 1
    cfg_parallel_size: int = 1
    data_parallel_size: int = 1
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


@dataclass
class SamplingConfig:
    prompts: list = field(default_factory=lambda: ["a red fox in the snow"])
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


def _positive(name: str, value, allow_zero: bool = False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(name, value, "must be >= 0" if allow_zero else "must be > 0")


def validate(cfg: Config) -> Config:
    """Range and consistency checks that need no process group. Raises ConfigError."""
    m, moe, p, e, s = cfg.model, cfg.model.moe, cfg.parallel, cfg.eplb, cfg.sampling
    for name, value in [("model.hidden_size", m.hidden_size), ("model.num_layers", m.num_layers),
                        ("model.num_heads", m.num_heads), ("model.moe_every", m.moe_every),
                        ("model.dense_hidden_size", m.dense_hidden_size), ("model.in_channels", m.in_channels),
                        ("model.patch_size", m.patch_size), ("model.text_dim", m.text_dim),
                        ("model.vae_scale_factor", m.vae_scale_factor),
                        ("model.max_prompt_tokens", m.max_prompt_tokens),
                        ("model.moe.num_experts", moe.num_experts), ("model.moe.top_k", moe.top_k),
                        ("model.moe.expert_hidden_size", moe.expert_hidden_size),
                        ("model.moe.n_group", moe.n_group), ("model.moe.topk_group", moe.topk_group),
                        ("parallel.ep_size", p.ep_size), ("parallel.tensor_parallel_size", p.tensor_parallel_size),
                        ("parallel.sequence_parallel_size", p.sequence_parallel_size),
                        ("parallel.cfg_parallel_size", p.cfg_parallel_size),
                        ("parallel.data_parallel_size", p.data_parallel_size),
                        ("parallel.ranks_per_node", p.ranks_per_node), ("parallel.timeout_s", p.timeout_s),
                        ("eplb.window_size", e.window_size), ("eplb.interval", e.interval),
                        ("eplb.num_groups", e.num_groups), ("eplb.timestep_buckets", e.timestep_buckets),
                        ("sampling.num_inference_steps", s.num_inference_steps),
                        ("sampling.height", s.height), ("sampling.width", s.width),
                        ("sampling.batch_size", s.batch_size), ("sampling.shift", s.shift)]:
        _positive(name, value)
    _positive("model.moe.num_shared_experts", moe.num_shared_experts, allow_zero=True)
    _positive("eplb.num_redundant_experts", e.num_redundant_experts, allow_zero=True)
    _positive("model.moe.route_scale", moe.route_scale)
    _positive("model.moe.capacity_factor", moe.capacity_factor)
    if m.type == "diffusers" and not m.path:
        raise ConfigError("model.path", m.path, "must name a diffusers model folder when model.type is 'diffusers'")
    if m.type == "moe_dit" and m.path:
        raise ConfigError("model.path", m.path, "is only for model.type 'diffusers' (the built-in model "
                                                "loads model.checkpoint)")
    _positive("sampling.guidance_scale", s.guidance_scale, allow_zero=True)
    if p.timeout_s > 1e9:  # datetime.timedelta and the backends take no more
        raise ConfigError("parallel.timeout_s", p.timeout_s, "must be <= 1e9 seconds")
    # torch.Generator takes seeds in [-2**63, 2**64); prompt i uses sampling.seed + i.
    for name, lo, hi in (("model.seed", m.seed, m.seed), ("sampling.seed", s.seed, s.seed + len(s.prompts) - 1)):
        if lo < -2 ** 63 or hi >= 2 ** 64:
            raise ConfigError(name, lo, "must be in [-2**63, 2**64) (with sampling.seed + prompt index)")
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
    if m.text_encoder != "builtin" and (m.text_encoder.count(":") != 1 or not all(m.text_encoder.split(":"))):
        raise ConfigError("model.text_encoder", m.text_encoder, "must be 'builtin' or 'module:function'")
    if e.num_groups > 1 and moe.num_experts % e.num_groups:
        raise ConfigError("eplb.num_groups", e.num_groups,
                          f"must divide model.moe.num_experts ({moe.num_experts})")
    if not s.prompts or not all(isinstance(x, str) for x in s.prompts):
        raise ConfigError("sampling.prompts", s.prompts, "must be a non-empty list of strings")
    if not all(isinstance(x, str) for x in cfg.telemetry.tags):
        raise ConfigError("telemetry.tags", cfg.telemetry.tags, "must be a list of strings")
    if not cfg.output_dir:
        raise ConfigError("output_dir", cfg.output_dir, "must be a non-empty path")
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
        node = data
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(path, value, f"'{k}' is not a section")
        node[keys[-1]] = value
    return data


def load(path: str, overrides: Optional[list[str]] = None) -> Config:
    """Read a JSON config file, apply overrides, validate. Raises ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError("--config", path, "file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError("--config", path, f"is not valid UTF-8 JSON ({err})") from None
    except RecursionError:
        raise ConfigError("--config", path, "is nested too deeply") from None
    return from_dict(apply_overrides(data, overrides or []))
