"""Load a diffusers MoE transformer from a folder so that no rank holds more than its share.

Layout read (diffusers' `save_pretrained`): a transformer folder with `config.json` and
`diffusion_pytorch_model.safetensors`, or shards `diffusion_pytorch_model-0000k-of-0000n.safetensors`
listed in `diffusion_pytorch_model.safetensors.index.json`; or a pipeline folder
(`model_index.json`) whose `transformer/` is such a folder.

Per rank (`load_transformer`):
  1. read config.json and the safetensors headers (shapes and dtypes only, no data);
  2. build the diffusers class from its config on the meta device (no memory), re-create on the
     CPU the few modules that hold tensors made in __init__ (spec.rebuild), and check that every
     key and shape of the files matches the model -- a mismatch stops with one line naming the
     file and the key;
  3. read every non-expert tensor by key into the model (`safe_open`, one tensor at a time);
  4. replace each MoE block by an `EPMoEBlock` whose MoELayer has only this rank's slots, copy its
     gate in, and read only the experts its slots hold (per-expert keys, or rows of the packed
     stacks through `get_slice`);
  5. check that nothing is left on the meta device.
The full model is never materialised, not even the experts of one layer. `DiskExpertSource`
reads any one logical expert later (the rebalancer's fallback when no peer holds it).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ...config import ConfigError
from ...parallel import ParallelContext, check_layout
from .spec import MoEBlockSpec, gate_weight, moe_config, spec_for, spec_registry
from .wrap import EPMoEBlock, expert_parts, find_blocks, make_layer, replace_module, to_w13_w2

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _fail(path: str, what: str) -> ConfigError:
    """The one error a bad folder raises: names model.path, the file and the key, on one line."""
    return ConfigError("model.path", path, " ".join(what.split()))


# ---------------------------------------------------------------- the folder

@dataclass
class TensorInfo:
    file: str                 # safetensors file holding it
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class FolderInfo:
    """What a diffusers transformer folder holds, from its config and headers (no tensor data)."""

    path: str                 # as the user gave it (model.path)
    folder: str               # the transformer folder
    config_file: str
    config: dict
    model_class: str
    spec: MoEBlockSpec
    weights_file: str         # the index file, or the single safetensors file
    tensors: dict[str, TensorInfo]


def _transformer_folder(path: str) -> str:
    if not os.path.isdir(path):
        raise _fail(path, "is not a folder (a diffusers transformer folder with config.json, or a pipeline "
                          "folder with model_index.json and transformer/)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    sub = os.path.join(path, "transformer")
    if os.path.isfile(os.path.join(path, "model_index.json")) and os.path.isfile(os.path.join(sub, "config.json")):
        return sub
    raise _fail(path, "has no config.json (a diffusers transformer folder) nor model_index.json with "
                      "transformer/config.json (a pipeline folder)")


def _read_config(path: str, config_file: str) -> tuple[dict, str]:
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise _fail(path, f"{config_file}: cannot be read as JSON ({e})") from None
    except RecursionError:
        raise _fail(path, f"{config_file}: cannot be read as JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise _fail(path, f"{config_file}: must be a JSON object")
    name = config.get("_class_name")
    if not isinstance(name, str):
        raise _fail(path, f"{config_file}: key '_class_name' is missing (diffusers writes the model class there)")
    if name not in spec_registry():
        raise _fail(path, f"{config_file}: key '_class_name' = {name!r} is not a model moe-ep serves; "
                          f"supported: {', '.join(sorted(spec_registry()))}")
    return config, name


def _read_headers(path: str, folder: str) -> tuple[str, dict[str, TensorInfo]]:
    """weights file (index or single) and key -> TensorInfo from the safetensors headers."""
    from safetensors import safe_open

    index = os.path.join(folder, INDEX_NAME)
    single = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError, RecursionError) as e:
            raise _fail(path, f"{index}: not a safetensors index with a 'weight_map' object ({e!r})") from None
        for key, shard in weight_map.items():
            # a shard is a file name inside this folder (diffusers writes plain names)
            if not isinstance(shard, str) or not shard or os.path.isabs(shard) or ".." in shard.split("/"):
                raise _fail(path, f"{index}: weight_map['{key}'] = {shard!r} must be the name of a file in {folder}")
        files = {os.path.join(folder, shard) for shard in weight_map.values()}
        weights_file = index
    elif os.path.isfile(single):
        weight_map, files, weights_file = None, {single}, single
    else:
        raise _fail(path, f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME} (only safetensors weights are read)")
    tensors: dict[str, TensorInfo] = {}
    for file in sorted(files):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    tensors[key] = TensorInfo(file, tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), None))
        except Exception as e:  # a missing or truncated shard: safetensors raises its own types
            raise _fail(path, f"{file}: cannot be read as safetensors ({e})") from None
    if weight_map is not None:
        for key, shard in sorted(weight_map.items()):
            got = tensors.get(key)
            if got is None or os.path.basename(got.file) != shard:
                raise _fail(path, f"{index}: key '{key}' is listed in shard {shard}, which does not hold it")
    return weights_file, tensors


def inspect_folder(path: str) -> FolderInfo:
    """Read a folder's config and safetensors headers; ConfigError("model.path", ...) if unusable."""
    folder = _transformer_folder(path)
    config_file = os.path.join(folder, "config.json")
    config, name = _read_config(path, config_file)
    weights_file, tensors = _read_headers(path, folder)
    return FolderInfo(path, folder, config_file, config, name, spec_for(name), weights_file, tensors)


# ---------------------------------------------------------------- the model on the meta device

def _tensor_attrs(model: nn.Module) -> list[tuple[str, nn.Module, str, torch.Tensor]]:
    """(module path, module, attribute, tensor) of every tensor a module holds that is not in the
    state dict: plain tensor attributes and non-persistent buffers."""
    out = []
    for mpath, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                out.append((mpath, mod, attr, value))
        for attr in getattr(mod, "_non_persistent_buffers_set", ()):
            if mod._buffers.get(attr) is not None:
                out.append((mpath, mod, attr, mod._buffers[attr]))
    return out


def _model_class(info: FolderInfo) -> type:
    import diffusers

    return getattr(diffusers, info.model_class)


def build_meta_model(info: FolderInfo) -> nn.Module:
    """The diffusers class built from the folder's config with every parameter on the meta device
    (no memory), and the spec's rebuild modules re-created on the CPU. Raises ConfigError if the
    config does not build, or if a module holds a tensor made in __init__ that no rule re-creates."""
    cls = _model_class(info)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # init functions on meta / zero-size tensors
            model = cls.from_config(info.config)
    except Exception as e:  # a wrong config value surfaces as any exception from the model's __init__
        raise _fail(info.path, f"{info.config_file}: {info.model_class} cannot be built from this config "
                               f"({type(e).__name__}: {e})") from None
    with torch.device("cpu"):
        for mpath, mod in list(model.named_modules()):
            factory = info.spec.rebuild.get(type(mod).__name__)
            if factory is not None:
                replace_module(model, mpath, factory(mod))
    for mpath, _, attr, value in _tensor_attrs(model):
        if value.is_meta:
            raise _fail(info.path, f"{info.model_class}: module '{mpath}' holds tensor '{attr}' that its __init__ "
                                   f"makes and the weights do not hold; the {info.spec.name} spec needs a rebuild "
                                   "rule for its class")
    return model.eval().requires_grad_(False)


def check_weights(info: FolderInfo, model: nn.Module) -> None:
    """Every key and shape of the files must be the model's; the first mismatch (in key order)
    raises one line naming the file and the key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    for key in sorted(expected):
        got = info.tensors.get(key)
        if got is None:
            raise _fail(info.path, f"{info.weights_file}: key '{key}' is missing ({info.model_class} built from "
                                   f"{info.config_file} has it, shape {list(expected[key])})")
        if got.shape != expected[key]:
            raise _fail(info.path, f"{got.file}: key '{key}' has shape {list(got.shape)}, {info.config_file} "
                                   f"makes it {list(expected[key])}")
        if got.dtype is None or not (got.dtype.is_floating_point or got.dtype == torch.bool):
            raise _fail(info.path, f"{got.file}: key '{key}' has dtype {got.dtype}, expected floating point")
    for key in sorted(set(info.tensors) - set(expected)):
        raise _fail(info.path, f"{info.tensors[key].file}: key '{key}' is not in {info.model_class} built from "
                               f"{info.config_file} (wrong config for these weights?)")


def moe_layout(info: FolderInfo, model: nn.Module) -> tuple[int, int, int]:
    """(MoE layers L, experts E, top_k) of the meta model; every MoE layer must have the same E."""
    blocks = find_blocks(model, info.spec)
    if not blocks:
        raise _fail(info.path, f"{info.config_file}: {info.model_class} built from it has no "
                               f"{info.spec.block_class} (no MoE layer to serve)")
    try:
        cfgs = [moe_config(info.spec, b) for _, b in blocks]
    except ValueError as err:
        raise _fail(info.path, f"{info.config_file}: {err}") from None
    if len({c.num_experts for c in cfgs}) != 1:
        raise _fail(info.path, f"{info.config_file}: MoE layers differ in expert count "
                               f"({sorted({c.num_experts for c in cfgs})}); moe-ep needs one E")
    return len(blocks), cfgs[0].num_experts, cfgs[0].top_k


# ---------------------------------------------------------------- reading

@dataclass
class LoadReport:
    """What one rank read and held while loading (bytes).

    expert_keys_read    (layer, logical expert) read from disk, in order
    peak_tensor_bytes   max over the load of (tensors the rank holds + the tensors being read):
                        the rank's tensor memory, counted exactly from tensor sizes
    peak_rss_growth_bytes  growth of the process's peak resident set over the load (OS measure,
                        includes touched pages of the mapped files and allocator slack); None
                        where /proc is not available
    cuda_peak_bytes     torch.cuda.max_memory_allocated over the load on a GPU rank, else None
    """

    expert_bytes_read: int = 0
    other_bytes_read: int = 0
    expert_keys_read: list = field(default_factory=list)
    expert_slot_bytes: int = 0     # held: this rank's expert slots
    other_bytes: int = 0           # held: everything else (replicated)
    peak_tensor_bytes: int = 0
    peak_rss_growth_bytes: Optional[int] = None
    cuda_peak_bytes: Optional[int] = None

    def as_dict(self) -> dict:
        d = dict(vars(self))
        d["expert_keys_read"] = [list(k) for k in self.expert_keys_read]
        return d


class _Meter:
    """Tensor bytes held + bytes in flight; records the peak."""

    def __init__(self, report: LoadReport):
        self.report, self.held = report, 0

    def hold(self, nbytes: int) -> None:
        self.held += nbytes
        self.report.peak_tensor_bytes = max(self.report.peak_tensor_bytes, self.held)

    def transient(self, nbytes: int) -> None:
        self.report.peak_tensor_bytes = max(self.report.peak_tensor_bytes, self.held + nbytes)


def _rss_hwm_kib() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError, ValueError):
        return None


def _reset_rss_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class DiskExpertSource:
    """expert -> (w13 [H, 2F], w2 [F, H]) of one MoE layer, read from the folder by key.

    Reads that expert's tensors only: its per-expert Linear weights, or row [expert] of the
    packed stacks (`get_slice`). Opens the files per call (no handle is kept). Counts what it
    read in `report` (if given) under layer `layer_idx`.
    """

    def __init__(self, info: FolderInfo, block_path: str, layer_idx: int, dtype: Optional[torch.dtype] = None,
                 report: Optional[LoadReport] = None):
        self.info, self.block_path, self.layer_idx, self.dtype, self.report = info, block_path, layer_idx, dtype, report
        self.meter: Optional[_Meter] = None

    def __call__(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        parts, nbytes = {}, 0
        plan = expert_parts(self.info.spec.experts, self.block_path, expert)
        with ExitStack() as stack:
            handles = {}
            for role, key, row in plan:
                file = self.info.tensors[key].file
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                f = handles[file]
                t = f.get_slice(key)[row] if row is not None else f.get_tensor(key)
                parts[role] = t if self.dtype is None else t.to(self.dtype)
                nbytes += t.numel() * t.element_size()
        w13, w2 = to_w13_w2(self.info.spec.experts, parts)
        if self.report is not None:
            self.report.expert_bytes_read += nbytes
            self.report.expert_keys_read.append((self.layer_idx, int(expert)))
        if self.meter is not None:  # the stored parts and the assembled (w13, w2) are alive together
            self.meter.transient(2 * nbytes)
        return w13, w2


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """state-dict key -> (module, attribute name, is parameter), before any block is replaced."""
    owners = {}
    for mpath, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mpath}." if mpath else ""
        for name, p in mod._parameters.items():
            if p is not None:
                owners[prefix + name] = (mod, name, True)
        for name, b in mod._buffers.items():
            if b is not None and name not in getattr(mod, "_non_persistent_buffers_set", ()):
                owners[prefix + name] = (mod, name, False)
    return owners


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype], device: torch.device) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device)


def _materialise(owner: tuple[nn.Module, str, bool], value: torch.Tensor) -> None:
    mod, name, is_param = owner
    if is_param:
        mod._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[name] = value


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@torch.no_grad()
def fill_slots(layer, source) -> None:
    """Fill this rank's slots of `layer` (an MoELayer) from `source`, reading each distinct
    logical expert once (a rank may hold two replicas of one expert)."""
    slots_of: dict[int, list[int]] = {}
    for slot, expert in enumerate(layer.local_experts):
        slots_of.setdefault(expert, []).append(slot)
    for expert, slots in slots_of.items():
        w13, w2 = source(expert)                                          # [H, 2F], [F, H]
        for slot in slots:
            layer.experts.set_slot(slot, w13, w2)


@dataclass
class LoadedTransformer:
    """A diffusers transformer served expert-parallel on this rank.

    model       the diffusers module; call it exactly as diffusers' own (same arguments, outputs)
    wrappers    the EPMoEBlock of each MoE layer, in layer order (wrappers[i].moe is layer i)
    sources     DiskExpertSource of each MoE layer (any logical expert, from disk)
    info        the folder (config, headers, spec)
    report      what this rank read and held
    """

    model: nn.Module
    wrappers: list[EPMoEBlock]
    sources: list[DiskExpertSource]
    info: FolderInfo
    report: LoadReport

    @property
    def moe_layers(self) -> list:
        return [w.moe for w in self.wrappers]


@torch.no_grad()
def load_transformer(path: str, ctx: ParallelContext, num_redundant: int = 0,
                     dtype: Optional[torch.dtype] = None, score_dtype: Optional[str] = None,
                     placements: Optional[Sequence] = None, batch_invariant: str = "auto") -> LoadedTransformer:
    """Build a diffusers MoE transformer on this rank from a folder, reading only this rank's experts.

    path          a diffusers transformer folder or a pipeline folder (model.path)
    ctx           this rank's ParallelContext (EP rank/size, device)
    num_redundant redundant physical slots per MoE layer (eplb.num_redundant_experts)
    dtype         weight dtype (None: as stored)
    score_dtype   MoEConfig.score_dtype override (None: the spec's, "input" = diffusers' numerics)
    placements    optional phy2log [R] per MoE layer to start from (else the contiguous one)
    batch_invariant  model.moe.batch_invariant of the MoE layers: "auto" (on for CPU ranks), "on", "off"
    Every rank of an EP group must call it with the same arguments. Raises ConfigError naming
    model.path, the file and the key when the folder does not match the model.
    """
    from safetensors import safe_open

    report = LoadReport()
    meter = _Meter(report)
    device = ctx.device
    info = inspect_folder(path)
    _model_class(info)  # import diffusers' modules before the memory baseline (they are not the model)
    rss_ok = _reset_rss_hwm()
    rss0 = _rss_hwm_kib() if rss_ok else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda0 = torch.cuda.memory_allocated(device)

    model = build_meta_model(info)
    check_weights(info, model)
    spec = info.spec
    blocks = find_blocks(model, spec)
    if placements is not None and len(placements) != len(blocks):
        raise ConfigError("eplb.placement_file", len(placements), f"needs one placement per MoE layer ({len(blocks)})")
    for mpath, _, attr, value in _tensor_attrs(model):  # re-created on the CPU (spec.rebuild)
        meter.hold(_nbytes(value))

    # 3. every tensor but the routed experts and the gates, one at a time, by key
    owners = _owners(model)
    expert_prefixes = tuple(spec.experts.container_prefix(p) for p, _ in blocks)
    gate_keys = {spec.gate_key(p) for p, _ in blocks}
    by_file: dict[str, list[str]] = {}
    for key in sorted(owners):
        if key.startswith(expert_prefixes) or key in gate_keys:
            continue
        by_file.setdefault(info.tensors[key].file, []).append(key)
    for file, keys in sorted(by_file.items()):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in keys:
                stored = f.get_tensor(key)
                nread = _nbytes(stored)
                value = _cast(stored, dtype, device)
                meter.transient(nread + (_nbytes(value) if value is not stored else 0))
                del stored
                _materialise(owners[key], value)
                report.other_bytes_read += nread
                meter.hold(_nbytes(value))

    # 4. the MoE blocks: wrappers with this rank's slots only, then the gate and the local experts
    wrappers, sources = [], []
    for idx, (bpath, block) in enumerate(blocks):
        gate_meta = gate_weight(spec, block)
        layer_dtype = dtype or info.tensors[spec.gate_key(bpath)].dtype
        layer = make_layer(spec, block, ctx, idx, num_redundant, layer_dtype, score_dtype, batch_invariant)
        meter.hold(_nbytes(layer.experts.w13) + _nbytes(layer.experts.w2) + _nbytes(layer.router.gate.weight))
        report.expert_slot_bytes += _nbytes(layer.experts.w13) + _nbytes(layer.experts.w2)
        with safe_open(info.tensors[spec.gate_key(bpath)].file, framework="pt", device="cpu") as f:
            g = f.get_tensor(spec.gate_key(bpath))                                     # [E, Hr]
        assert tuple(g.shape) == tuple(gate_meta.shape)
        layer.router.gate.weight.copy_(g)
        report.other_bytes_read += _nbytes(g)
        source = DiskExpertSource(info, bpath, idx, dtype, report)
        source.meter = meter
        if placements is not None:
            layer.set_placement(placements[idx])
        fill_slots(layer, source)
        source.report, source.meter = None, None  # later reads (rebalancer fallback) are not the load's
        wrapper = EPMoEBlock(spec, layer, bpath)
        replace_module(model, bpath, wrapper)
        wrappers.append(wrapper)
        sources.append(source)

    # 5. nothing may be left on the meta device
    for key, t in model.state_dict(keep_vars=True).items():
        if t.is_meta:
            raise _fail(path, f"{info.weights_file}: key '{key}' was not loaded (still on the meta device)")
    for mpath, _, attr, value in _tensor_attrs(model):
        if value.is_meta:
            raise _fail(path, f"{info.model_class}: module '{mpath}' tensor '{attr}' is still on the meta device")

    report.other_bytes = meter.held - report.expert_slot_bytes
    if rss0 is not None:
        report.peak_rss_growth_bytes = max(0, (_rss_hwm_kib() or rss0) - rss0) * 1024
    if device.type == "cuda":
        report.cuda_peak_bytes = torch.cuda.max_memory_allocated(device) - cuda0
    return LoadedTransformer(model, wrappers, sources, info, report)


# ---------------------------------------------------------------- before any process group

def check_folder(path: Optional[str], num_redundant: int = 0, ep_size: int = 1) -> tuple[FolderInfo, int, int, int]:
    """Everything `load_transformer` would refuse, checked from the config and headers alone
    (no tensor data, the model on the meta device): returns (info, MoE layers, experts, top_k)."""
    if not path:
        raise ConfigError("model.path", path, "model.type 'diffusers' needs the path of a diffusers folder")
    info = inspect_folder(path)
    model = build_meta_model(info)
    check_weights(info, model)
    layers, experts, top_k = moe_layout(info, model)
    check_layout(experts, num_redundant, ep_size)
    return info, layers, experts, top_k
