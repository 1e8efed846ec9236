"""Stats-file and placement-file reading/validation (docs/formats.md), shared by the CLI and the runtime.

Every problem is a ValueError whose message names the offending field. Files are written atomically.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

STATS_FORMAT = "moe-ep.expert-load"
PLACEMENT_FORMAT = "moe-ep.placement"


def _read_json(path) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def write_json_atomic(path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` via a temp file in the same folder, fsync and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_load_matrix(value, field: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Validate a ``[L][E]`` matrix of non-negative finite numbers; returns float64 ``[L, E]``."""
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        raise ValueError(f"{field}: expected a non-empty list of lists [num_layers][num_experts]")
    width = len(value[0])
    if width == 0 or any(len(r) != width for r in value):
        raise ValueError(f"{field}: rows must all have the same non-zero length")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for r in value for x in r):
        raise ValueError(f"{field}: entries must be numbers")
    try:
        arr = np.asarray(value, dtype=np.float64)  # [L, E]
    except OverflowError:  # an integer beyond float64 (JSON allows any size)
        raise ValueError(f"{field}: contains a number too large for float64") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"{field}: contains NaN or inf")
    if (arr < 0).any():
        raise ValueError(f"{field}: contains negative loads")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{field}: expected shape {tuple(shape)}, got {arr.shape}")
    return arr


def load_stats(path) -> dict:
    """Read an expert-load stats file. Returns the JSON object with ``"load"`` as float64 ``[L, E]``
    (and each ``windows[i]["load"]`` likewise, when present). Raises ValueError naming the field."""
    data = _read_json(path)
    fmt = data.get("format", STATS_FORMAT)
    if fmt != STATS_FORMAT:
        raise ValueError(f"format: expected {STATS_FORMAT!r}, got {fmt!r}")
    if "load" not in data:
        raise ValueError("load: missing (required [num_layers][num_experts] loads)")
    load = check_load_matrix(data["load"], "load")
    L, E = load.shape
    for key, want in (("num_layers", L), ("num_experts", E)):
        if key in data and data[key] != want:
            raise ValueError(f"{key}: {data[key]!r} does not match load shape {load.shape}")
    out = dict(data)
    out["load"] = load
    if "windows" in data:
        if not isinstance(data["windows"], list):
            raise ValueError("windows: expected a list of {\"load\": [[...]]}")
        wins = []
        for i, win in enumerate(data["windows"]):
            if not isinstance(win, dict) or "load" not in win:
                raise ValueError(f"windows[{i}].load: missing")
            wins.append(dict(win, load=check_load_matrix(win["load"], f"windows[{i}].load", (L, E))))
        out["windows"] = wins
    return out


def check_phy2log(phy2log, field: str = "phy2log", num_experts: int | None = None) -> np.ndarray:
    """Validate a placement ``[L, R]`` of logical ids: every id of ``0..E-1`` present in every layer.

    ``E`` defaults to ``max id + 1``. Returns int64 ``[L, R]``.
    """
    arr = np.asarray(phy2log)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{field}: expected a non-empty [num_layers][num_replicas] array, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ValueError(f"{field}: entries must be integers")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{field}: entries must be integers")
    arr = arr.astype(np.int64)
    E = int(arr.max()) + 1 if num_experts is None else num_experts
    bad = (arr < 0) | (arr >= E)
    if bad.any():
        layer, slot = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{field}[{layer}][{slot}]: logical expert id {int(arr[layer, slot])} not in [0, {E})")
    present = np.zeros((arr.shape[0], E), dtype=bool)
    present[np.arange(arr.shape[0])[:, None], arr] = True
    if not present.all():
        layer = int(np.nonzero(~present.all(1))[0][0])
        raise ValueError(f"{field}[{layer}]: no slot for logical experts {np.nonzero(~present[layer])[0].tolist()[:8]}"
                         "; every expert needs one")
    return arr


def save_placement(path, phy2log, num_gpus: int, num_nodes: int, num_experts: int | None = None) -> None:
    """Write a placement file (docs/formats.md) atomically. ``phy2log [L, R]`` (tensor or array)."""
    if hasattr(phy2log, "detach"):
        phy2log = phy2log.detach().cpu().numpy()
    arr = check_phy2log(phy2log, "phy2log", num_experts)
    L, R = arr.shape
    if not isinstance(num_gpus, int) or num_gpus <= 0 or R % num_gpus:
        raise ValueError(f"num_gpus: {num_gpus!r} must be a positive divisor of num_replicas {R}")
    if not isinstance(num_nodes, int) or num_nodes <= 0 or num_gpus % num_nodes:
        raise ValueError(f"num_nodes: {num_nodes!r} must be a positive divisor of num_gpus {num_gpus}")
    write_json_atomic(path, {
        "format": PLACEMENT_FORMAT, "version": 1, "num_layers": L,
        "num_experts": int(arr.max()) + 1 if num_experts is None else num_experts,
        "num_replicas": R, "num_gpus": num_gpus, "num_nodes": num_nodes, "phy2log": arr.tolist(),
    })


def load_placement(path, return_meta: bool = False, expect: dict | None = None):
    """Read a placement file; returns ``phy2log`` int64 ``[L, R]`` (and the JSON object if ``return_meta``).

    Checks format, version, that every declared size matches ``phy2log``, that ``num_replicas`` is
    divisible by ``num_gpus`` and that every logical expert has a slot. ``expect`` (optional, e.g.
    ``{"num_layers": 4, "num_experts": 8, "num_replicas": 12, "num_gpus": 4}`` for the run that
    installs it) must match the declared sizes; it is checked before ``phy2log``. ValueError names
    the field (``phy2log[l][s]`` for one entry).
    """
    data = _read_json(path)
    if data.get("format") != PLACEMENT_FORMAT:
        raise ValueError(f"format: expected {PLACEMENT_FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != 1:
        raise ValueError(f"version: expected 1, got {data.get('version')!r}")
    for key, want in (expect or {}).items():
        if data.get(key) != want:
            raise ValueError(f"{key}: the file has {data.get(key)!r}, expected {want}")
    if "phy2log" not in data:
        raise ValueError("phy2log: missing")
    raw = data["phy2log"]
    if not isinstance(raw, list) or not raw or not all(isinstance(r, list) for r in raw) or len({len(r) for r in raw}) != 1:
        raise ValueError("phy2log: expected a non-empty [num_layers][num_replicas] list of lists")
    for layer, row in enumerate(raw):
        for slot, x in enumerate(row):
            if not isinstance(x, int) or isinstance(x, bool):
                raise ValueError(f"phy2log[{layer}][{slot}]: expected an integer expert id, got {x!r}")
    E = data.get("num_experts")
    if not isinstance(E, int) or E <= 0:
        raise ValueError(f"num_experts: expected a positive int, got {E!r}")
    try:
        arr = np.asarray(raw, dtype=np.int64)
    except OverflowError:
        raise ValueError(f"phy2log: logical expert ids must be in [0, {E})") from None
    arr = check_phy2log(arr, "phy2log", E)
    L, R = arr.shape
    for key, want in (("num_layers", L), ("num_replicas", R)):
        if data.get(key) != want:
            raise ValueError(f"{key}: {data.get(key)!r} does not match phy2log shape {arr.shape}")
    P, N = data.get("num_gpus"), data.get("num_nodes", 1)
    if not isinstance(P, int) or P <= 0 or R % P:
        raise ValueError(f"num_gpus: {P!r} must be a positive divisor of num_replicas {R}")
    if not isinstance(N, int) or N <= 0 or P % N:
        raise ValueError(f"num_nodes: {N!r} must be a positive divisor of num_gpus {P}")
    return (arr, data) if return_meta else arr
