"""Per-image records and the resume decision: what made each PNG, and which PNGs of an earlier
run in the same output folder are finished images of this run.

Files under output_dir:
    images/<name>.png     the image (moe_ep.images.save_png, atomic)
    images/<name>.json    its record, written atomically only after the PNG is on disk:
                          {format, version, path, index, name, prompt, seed, negative_prompt,
                           sampling: {num_inference_steps, guidance_scale, height, width, shift},
                           model: {config: model section, weights: identity of the checkpoint /
                                   model folder / seed, text_encoder},
                           layout: {batch_size, world_size, ep_size} (see IDENTITY_NOTE),
                           png_sha256}
    manifest.jsonl        every image's record, one a line in prompt order: rank 0 writes it
                          atomically when the run completes (a killed run leaves the records)

An image is *finished* for this run when its record parses, says what this run would make
(`expected_record`: the same prompt, seed, negative prompt, sampling, model and layout), and
the PNG beside it has the recorded sha256. A PNG without a matching record is not finished (the
writer died between the two writes, or it belongs to another setting) and is sampled again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from .atomic import write_bytes_atomic, write_json_atomic
import torch

from .batch_invariant import resolve as resolve_batch_invariant
from .config import Config
from .prompts import PromptItem

RECORD_FORMAT, RECORD_VERSION = "moe-ep.image-record", 1
MANIFEST = "manifest.jsonl"
HEAD_BYTES = 1 << 20     # a checkpoint's identity hashes its first MiB (safetensors header + first tensors)
IDENTITY_NOTE = ("what decides which rows share a GEMM is part of an image's record unless batch invariance "
                 "(model.moe.batch_invariant on, or auto on CPU ranks) makes it irrelevant: the world and EP sizes "
                 "for the experts; the batch size too unless the dense parts are covered (the built-in model with "
                 "its built-in text encoder, not compiled); and the cfg / sequence-parallel split of an image "
                 "(its attention and gathers sum in another order) whenever it is not 1")


# ---------------------------------------------------------------- what makes an image

def file_identity(path: str) -> dict:
    """A weights file without reading all of it: size, mtime and the sha256 of its first MiB."""
    st = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head}


def folder_identity(path: str) -> dict:
    """A model folder: sha256 over every file's (relative path, size, mtime), sorted."""
    h, files = hashlib.sha256(), 0
    for d, dirs, names in sorted(os.walk(path)):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(d, n)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            files += 1
    return {"files": files, "sha256": h.hexdigest()}


def model_identity(cfg: Config) -> dict:
    """The model section plus the identity of where its weights come from."""
    m = cfg.model
    model = dict(cfg.to_dict()["model"])
    for key in ("checkpoint", "path"):   # the path may move; the weights' identity is what counts
        model.pop(key, None)
    model.pop("cuda_graph", None)        # a replay runs the same kernels: it cannot change an image
    if m.checkpoint:
        weights = {"checkpoint": file_identity(m.checkpoint)}
    elif m.type == "diffusers" and m.path:
        weights = {"folder": folder_identity(m.path)}
    else:
        weights = {"seed": m.seed}
    return {"config": model, "weights": weights}


def image_settings(cfg: Config, world_size: int, ep_size: int, device_type: str = "cpu",
                   split: Optional[dict] = None) -> dict:
    """What every image of this run shares in its record (model identity read once); device_type:
    the ranks' device ("cpu" / "cuda"), which decides what batch_invariant "auto" means; split:
    {"cfg", "ulysses", "ring"} of the parallel layout (IDENTITY_NOTE says what goes in "layout")."""
    s = cfg.sampling
    settings = {"sampling": {"num_inference_steps": s.num_inference_steps, "guidance_scale": s.guidance_scale,
                             "height": s.height, "width": s.width, "shift": s.shift},
                "model": model_identity(cfg)}
    experts_invariant = resolve_batch_invariant(cfg.model.moe.batch_invariant, torch.device(device_type))
    dense_invariant = (experts_invariant and cfg.model.type == "moe_dit" and cfg.model.text_encoder == "builtin"
                       and not cfg.model.compile)                       # what docs/model.md says is covered
    layout = {}
    if not dense_invariant:
        layout["batch_size"] = s.batch_size
    if not experts_invariant:
        layout.update(world_size=world_size, ep_size=ep_size)
    if split and any(v != 1 for v in split.values()):
        layout.update(split)
    settings["layout"] = layout
    return json.loads(json.dumps(settings))   # as it reads back from a record


def expected_record(item: PromptItem, settings: dict) -> dict:
    """The record this run writes for `item`, less the PNG's hash."""
    return {"format": RECORD_FORMAT, "version": RECORD_VERSION, "path": f"images/{item.png}", "index": item.index,
            "name": item.name, "prompt": item.prompt, "seed": item.seed, "negative_prompt": item.negative_prompt,
            **settings}


def record_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, "images", f"{name}.json")


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_record(out_dir: str, item: PromptItem, settings: dict) -> dict:
    """The record of an image whose PNG is already on disk (its hash is read from the file)."""
    rec = dict(expected_record(item, settings), png_sha256=sha256_file(os.path.join(out_dir, "images", item.png)))
    write_json_atomic(record_path(out_dir, item.name), rec)
    return rec


def read_record(path: str) -> Optional[dict]:
    """A record file, or None when it is missing, unreadable or not a record."""
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == RECORD_FORMAT else None


# ---------------------------------------------------------------- the resume decision

IGNORED_IN_MATCH = ("index", "png_sha256")   # an image that moved in the list, or its bytes' hash


def differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """Dotted keys whose values differ between two records: [(key, old value, new value)]."""
    out = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in IGNORED_IN_MATCH:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


@dataclass
class ResumePlan:
    """Rank 0's look at output_dir before sampling (read only; broadcast to every rank)."""

    finished: frozenset = frozenset()        # prompt indices whose image is kept
    records: dict = field(default_factory=dict)    # index -> kept record
    changed: dict = field(default_factory=dict)    # first differing key -> (count, old, new)
    unfinished: int = 0                      # a PNG or record of this name, but not a finished image

    def line(self, out_dir: str, total: int) -> Optional[str]:
        """One line about what is kept and replaced, or None when the folder held nothing of this run."""
        if not self.finished and not self.changed and not self.unfinished:
            return None
        parts = [f"keeping {len(self.finished)} of {total} images (finished, same record)"]
        for key, (n, old, new) in sorted(self.changed.items()):
            parts.append(f"replacing {n} whose {key} changed ({_short(old)} -> {_short(new)})")
        if self.unfinished:
            parts.append(f"sampling again {self.unfinished} left unfinished (no record, or the PNG is not the "
                         "recorded one)")
        return f"moe-ep: {out_dir} held earlier images: " + "; ".join(parts)


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def plan_resume(out_dir: str, items: Sequence[PromptItem], settings: dict) -> ResumePlan:
    """Which items' images in output_dir/images are finished images of this run."""
    plan = ResumePlan()
    finished, records = set(), {}
    for item in items:
        png = os.path.join(out_dir, "images", item.png)
        rec = read_record(record_path(out_dir, item.name))
        if rec is None:
            plan.unfinished += os.path.exists(png)
            continue
        diff = differences(rec, expected_record(item, settings))
        if diff:
            key, old, new = diff[0]
            n = plan.changed.get(key, (0, old, new))[0]
            plan.changed[key] = (n + 1, old, new)
            continue
        if not os.path.isfile(png) or sha256_file(png) != rec.get("png_sha256"):
            plan.unfinished += 1
            continue
        finished.add(item.index)
        records[item.index] = rec
    plan.finished, plan.records = frozenset(finished), records
    return plan


def stale_image_files(images_dir: str, items: Iterable[PromptItem], keep: Iterable[int],
                      is_legacy_name: Callable[[str], bool]) -> list[str]:
    """Files in images/ that this run does not keep and that a run wrote: the PNG and record of
    every item not kept, an earlier run's records and the PNGs beside them, and numbered PNGs
    (`is_legacy_name`) of a run before records existed. Other files stay."""
    if not os.path.isdir(images_dir):
        return []
    keep = set(keep)
    kept_files = {f for it in items if it.index in keep for f in (it.png, f"{it.name}.json")}
    ours = {f for it in items for f in (it.png, f"{it.name}.json")}
    present = set(os.listdir(images_dir))
    stale = set()
    for f in present:
        if f in kept_files:
            continue
        if f in ours or is_legacy_name(f):
            stale.add(f)
        elif f.endswith(".json") and read_record(os.path.join(images_dir, f)) is not None:
            stale.add(f)
            if f[:-5] + ".png" in present:
                stale.add(f[:-5] + ".png")
    return sorted(f for f in stale if os.path.isfile(os.path.join(images_dir, f)))


def write_manifest(out_dir: str, records: Iterable[dict]) -> str:
    """output_dir/manifest.jsonl: the records, one a line, in prompt order (atomic)."""
    path = os.path.join(out_dir, MANIFEST)
    lines = [json.dumps(r, sort_keys=True) for r in sorted(records, key=lambda r: r["index"])]
    write_bytes_atomic(path, ("\n".join(lines) + "\n" if lines else "").encode())
    return path


def read_manifest(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]
