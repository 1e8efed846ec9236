"""Checkpoints: one safetensors file with every logical expert; each rank reads only its own.

Keys (docs/model.md):
  model.<name>            every non-expert weight (state_dict names of MoEDiT), replicated on all ranks
  experts.<l>.<e>.w13     [H, 2F] of logical expert e of MoE layer l
  experts.<l>.<e>.w2      [F, H]
Metadata: format "moe-ep.checkpoint", version "1", dtype, model_config (JSON of the
architecture: every `model.*` field except seed, checkpoint, dtype, compile, cuda_graph and moe.batch_invariant).

Files are written by a streaming safetensors writer (header first, then one tensor at a
time), so saving never needs all experts in memory or on one rank: `save_from_seed` makes
each expert from its seed as it is written; `save_checkpoint` (collective over the EP group)
has the rank that holds an expert send it to rank 0, which writes. Loading
(`load_checkpoint`) checks the whole header first (model config, keys, shapes, dtypes), then
each rank reads the non-expert weights and only the experts its slots hold (`safe_open` +
`get_tensor` per key). Every problem raises `CheckpointError`, a `ConfigError` naming
`model.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from ...atomic import atomic_write
from ...config import ConfigError, ModelConfig
from ...parallel import ParallelContext

FORMAT, VERSION = "moe-ep.checkpoint", "1"
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
NOT_ARCHITECTURE = ("seed", "checkpoint", "dtype", "compile", "cuda_graph")   # a file loads into any of these
NOT_MOE_ARCHITECTURE = ("batch_invariant",)                      # ... and of model.moe: how it runs


class CheckpointError(ConfigError):
    def __init__(self, path: str, problem: str):
        super().__init__("model.checkpoint", path, problem)


def expert_key(layer: int, expert: int, which: str) -> str:
    return f"experts.{layer}.{expert}.{which}"


def architecture(cfg: ModelConfig) -> dict:
    """The model config fields a checkpoint must match."""
    d = dataclasses.asdict(cfg)
    d["moe"] = {k: v for k, v in d["moe"].items() if k not in NOT_MOE_ARCHITECTURE}
    return {k: v for k, v in d.items() if k not in NOT_ARCHITECTURE}


def _skeleton(cfg: ModelConfig, device: str = "meta"):
    """A MoEDiT holding one expert slot per layer (EP = num_experts, no process group)."""
    from .dit import MoEDiT

    ctx = ParallelContext(ep_size=cfg.moe.num_experts, device=torch.device(device))
    return MoEDiT(cfg, ctx, num_redundant=0)


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (shape, dtype) of every tensor a checkpoint of this model holds."""
    model = _skeleton(cfg)
    out = {f"model.{k}": (tuple(v.shape), v.dtype) for k, v in model.non_expert_state().items()}
    H, F = cfg.hidden_size, cfg.moe.expert_hidden_size
    for layer in range(len(model.moe_layers())):
        for e in range(cfg.moe.num_experts):
            out[expert_key(layer, e, "w13")] = ((H, 2 * F), model.dtype)
            out[expert_key(layer, e, "w2")] = ((F, H), model.dtype)
    return out


# ---------------------------------------------------------------- writing

def write_safetensors(path: str, entries: Iterable[tuple[str, tuple, torch.dtype, Callable[[], torch.Tensor]]],
                      metadata: dict[str, str]) -> None:
    """Stream tensors into a safetensors file: entries are (key, shape, dtype, make_tensor),
    `make_tensor()` is called once per key, in order. Written atomically."""
    entries = list(entries)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, shape, dtype, _ in entries:
        nbytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path, "wb") as f:  # temp file in the same folder, fsync, os.replace
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape, dtype, make in entries:
            t = make()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{key}: made {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
            f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _entries(model, expert_fn: Callable[[object, int, int], torch.Tensor]) -> list[tuple]:
    """The `write_safetensors` entries of `model`'s checkpoint, in file order: every non-expert
    weight, then for each MoE layer and logical expert its w13 and w2. `expert_fn(layer, e, which)`
    makes weight `which` (0: w13 [H, 2F], 1: w2 [F, H]) of expert e of MoE layer `layer` (an
    MoELayer); it is called once per key, while the file is written."""
    H, F = model.cfg.hidden_size, model.cfg.moe.expert_hidden_size
    entries = [(f"model.{k}", tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in model.non_expert_state().items()]
    for layer in model.moe_layers():
        for e in range(model.cfg.moe.num_experts):
            for which, (name, shape) in enumerate((("w13", (H, 2 * F)), ("w2", (F, H)))):
                entries.append((expert_key(layer.layer_idx, e, name), shape, model.dtype,
                                lambda l=layer, e=e, w=which: expert_fn(l, e, w)))
    return entries


def _metadata(cfg: ModelConfig) -> dict[str, str]:
    return {"format": FORMAT, "version": VERSION, "dtype": cfg.dtype,
            "model_config": json.dumps(architecture(cfg), sort_keys=True)}


def save_from_seed(cfg: ModelConfig, path: str, seed: Optional[int] = None) -> None:
    """Write the checkpoint of the seed-initialised model (no process group needed).

    Non-expert weights come from a CPU skeleton holding one expert slot per layer; experts
    are made one at a time with `init_expert_weights` while they are written."""
    from ...experts import init_expert_weights

    seed = cfg.seed if seed is None else seed
    model = _skeleton(cfg, "cpu")
    model.init_from_seed(seed)
    H, F = cfg.hidden_size, cfg.moe.expert_hidden_size

    def make(layer, e: int, which: int) -> torch.Tensor:
        return init_expert_weights(seed, layer.layer_idx, e, H, F, model.dtype)[which]

    write_safetensors(path, _entries(model, make), _metadata(cfg))


def save_checkpoint(model, path: str) -> None:
    """Save a running model (collective: every rank calls it; rank 0 writes).

    The EP group of data-parallel replica 0 takes part: for each (layer, expert) the rank
    holding its first replica sends the weights to rank 0 as they are written."""
    ctx: ParallelContext = model.ctx
    cfg: ModelConfig = model.cfg
    if ctx.dp_rank != 0:
        return
    layers = model.moe_layers()

    def owner(layer, e: int) -> tuple[int, int]:
        slot = int(layer.placement.log2phy[e, 0])
        return slot // layer.slots_per_rank, slot % layer.slots_per_rank

    if ctx.rank != 0:  # send my experts to rank 0, in the order rank 0 writes them
        for layer in layers:
            for e in range(cfg.moe.num_experts):
                rank, slot = owner(layer, e)
                if rank == ctx.ep_rank:
                    for w in layer.experts.slot_weights(slot):
                        dist.send(w.detach().contiguous().reshape(-1).view(torch.uint8), dst=ctx.rank - ctx.ep_rank)
        return

    def fetch(layer, e: int, which: int) -> torch.Tensor:
        rank, slot = owner(layer, e)
        w = layer.experts.slot_weights(slot)[which]                      # [gate | up] columns
        if rank == 0:
            return w.detach()
        buf = torch.empty(w.numel() * w.element_size(), dtype=torch.uint8, device=w.device)
        dist.recv(buf, src=rank)   # global rank == EP rank in replica 0
        return buf.view(w.dtype).view(w.shape)

    write_safetensors(path, _entries(model, fetch), _metadata(cfg))


# ---------------------------------------------------------------- reading

class CheckpointReader:
    """An open checkpoint; `read` records every key it reads (so tests can check who read what)."""

    def __init__(self, path: str, dtype: torch.dtype):
        from safetensors import safe_open

        self.path, self.dtype = path, dtype
        try:
            self._file = safe_open(path, framework="pt", device="cpu")
        except Exception as err:
            raise CheckpointError(path, f"cannot be read as safetensors ({err})") from None
        self.keys_read: list[str] = []

    def read(self, key: str) -> torch.Tensor:
        try:
            t = self._file.get_tensor(key)
        except Exception as err:
            raise CheckpointError(self.path, f"cannot read tensor '{key}' ({err})") from None
        self.keys_read.append(key)
        return t.to(self.dtype)

    def layer_source(self, layer: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
        """expert -> (w13 [H, 2F], w2 [F, H]) of MoE layer `layer`, read from the file."""
        return lambda e: (self.read(expert_key(layer, e, "w13")), self.read(expert_key(layer, e, "w2")))


def inspect_checkpoint(path: str, cfg: ModelConfig) -> None:
    """Check a checkpoint's header against the model config without reading any weights.
    Raises CheckpointError with what is wrong (model config, missing key, shape, dtype)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(path, "file not found")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(path, f"cannot be read as safetensors ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(path, f"is not a moe-ep checkpoint (metadata format = {meta.get('format')!r})")
    try:
        saved = json.loads(meta.get("model_config", ""))
    except json.JSONDecodeError:
        raise CheckpointError(path, "metadata 'model_config' is not valid JSON") from None
    want = json.loads(json.dumps(architecture(cfg)))
    # a field added after the file was saved reads as its default (how the file's model was built)
    saved = _with_defaults(saved, json.loads(json.dumps(architecture(ModelConfig()))))
    diffs = _diff(saved, want, "model")
    if diffs:
        raise CheckpointError(path, "was saved for a different model: " + "; ".join(diffs[:5]))
    file_dtype = meta.get("dtype", "float32")
    from .dit import DTYPES
    st_dtype = ST_DTYPES.get(DTYPES.get(file_dtype))
    for key, (shape, _) in expected_tensors(cfg).items():
        if key not in shapes:
            what = _describe(key)
            raise CheckpointError(path, f"missing tensor '{key}'{what}")
        got_shape, got_dtype = shapes[key]
        if got_shape != shape:
            raise CheckpointError(path, f"tensor '{key}' has shape {list(got_shape)}, the model needs {list(shape)}")
        if got_dtype != st_dtype:
            raise CheckpointError(path, f"tensor '{key}' has dtype {got_dtype}, the file's metadata says "
                                        f"{file_dtype} ({st_dtype})")


def _describe(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "experts":
        return f" (expert {parts[2]} of MoE layer {parts[1]})"
    return ""


def _with_defaults(saved, defaults):
    """`saved` with every key of `defaults` it lacks filled in, recursively (dicts only)."""
    if not (isinstance(saved, dict) and isinstance(defaults, dict)):
        return saved
    return {**{k: v for k, v in defaults.items() if k not in saved},
            **{k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}}


def _diff(saved, want, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(saved) | set(want)):
            if k not in want:
                out.append(f"{prefix}.{k} is in the checkpoint but not a config field")
            elif k not in saved:
                out.append(f"{prefix}.{k} missing in the checkpoint")
            else:
                out += _diff(saved[k], want[k], f"{prefix}.{k}")
        return out
    return [] if saved == want else [f"{prefix} = {saved!r} in the checkpoint, {want!r} in the config"]


@torch.no_grad()
def load_checkpoint(model, path: str, check: bool = True) -> CheckpointReader:
    """Load non-expert weights and this rank's experts. Returns the open reader, whose
    `layer_source(l)` the rebalancer can use to fetch any expert from disk.

    `check`: run `inspect_checkpoint` on the header first; pass False only when the caller
    has already done so for this file and model config (the runner's preflight does)."""
    if check:
        inspect_checkpoint(path, model.cfg)
    reader = CheckpointReader(path, model.dtype)
    for name, tensor in model.non_expert_state().items():
        tensor.copy_(reader.read(f"model.{name}"))
    model.load_experts(reader.layer_source)
    return reader
