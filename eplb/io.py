"""Stats-file and placement-file reading/validation (docs/formats.md), shared by the CLI and the runtime.

Every problem is a ValueError whose message names the offending field. Files are written atomically.
"""
from __future__ import annotations

import json

import numpy as np

from . import atomic

STATS_FORMAT = "moe-ep.expert-load"
PLACEMENT_FORMAT = "moe-ep.placement"


def _read_json(path) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, must be a file") from None
    except OSError as exc:   # no permission, a device, ...
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
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
    """Write ``data`` as compact JSON to ``path`` atomically (eplb.atomic: temp file, fsync, rename)."""
    atomic.write_json_atomic(path, data, indent=None)


RUN_SHAPE_NAMES = ("this run's MoE layers", "this run's num_experts")


def _fits_float(x) -> bool:
    """False for an integer beyond float64 (JSON allows any size)."""
    try:
        float(x)
    except OverflowError:
        return False
    return True


def check_load_matrix(value, field: str, shape: tuple[int, int] | None = None,
                      shape_names: tuple[str, str] = ("num_layers", "num_experts")) -> np.ndarray:
    """Validate a ``[L][E]`` matrix of non-negative finite numbers; returns float64 ``[L, E]``.

    ``shape`` (optional) is the required ``(L, E)``; ``shape_names`` says where it comes from in a
    mismatch message (e.g. ``RUN_SHAPE_NAMES``). Messages name the field and, for one entry or
    row, its index (``load[1][2]``).
    """
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        raise ValueError(f"{field}: expected a non-empty list of lists [num_layers][num_experts]")
    if shape is not None and len(value) != shape[0]:
        raise ValueError(f"{field}: expected {shape[0]} layers ({shape_names[0]}), got {len(value)}")
    width = len(value[0]) if shape is None else shape[1]
    for i, row in enumerate(value):
        if len(row) != width or not row:
            want = f"{width} experts ({shape_names[1]})" if shape is not None else f"{width} entries, as {field}[0]"
            raise ValueError(f"{field}[{i}]: expected {want}, got {len(row)}")
    numbers = [[isinstance(x, (int, float)) and not isinstance(x, bool) for x in r] for r in value]
    if not all(map(all, numbers)):
        i = next(i for i, r in enumerate(numbers) if not all(r))
        j = numbers[i].index(False)
        raise ValueError(f"{field}[{i}][{j}] = {value[i][j]!r}: expected a number")
    try:
        arr = np.asarray(value, dtype=np.float64)  # [L, E]
    except OverflowError:  # an integer beyond float64 (JSON allows any size)
        i, j = next((i, j) for i, r in enumerate(value) for j, x in enumerate(r) if not _fits_float(x))
        raise ValueError(f"{field}[{i}][{j}]: number too large for float64") from None
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        i, j = (int(k) for k in np.argwhere(bad)[0])
        raise ValueError(f"{field}[{i}][{j}] = {value[i][j]!r}: expected a non-negative finite number")
    return arr


def _check_entries(data: dict, key: str, shape: tuple[int, int], shape_names: tuple[str, str]) -> list | None:
    """``windows`` / ``timestep_buckets``: an optional list of objects each with a ``load`` matrix of
    ``shape``; returns copies with ``load`` as float64 ``[L, E]`` (None when absent)."""
    if key not in data:
        return None
    if not isinstance(data[key], list):
        raise ValueError(f"{key}: expected a list of {{\"load\": [[...]]}} objects")
    out = []
    for i, entry in enumerate(data[key]):
        if not isinstance(entry, dict) or "load" not in entry:
            raise ValueError(f"{key}[{i}].load: missing ({key}[{i}] must be an object with \"load\")")
        out.append(dict(entry, load=check_load_matrix(entry["load"], f"{key}[{i}].load", shape, shape_names)))
    return out


def load_stats(path, expect_shape: tuple[int, int] | None = None) -> dict:
    """Read and validate an expert-load stats file (docs/formats.md): ``format``, ``version``,
    ``num_layers`` / ``num_experts`` against ``load``, and every load matrix (``load``, ``windows``,
    ``timestep_buckets``, ``branches``) as ``[L][E]`` non-negative finite numbers of one shape.

    ``expect_shape`` (optional) is the reading run's ``(MoE layers, num_experts)``; the file must
    match it. Returns the JSON object with every load matrix as float64 ``[L, E]``. Raises
    ValueError naming the field (a file that cannot be read: naming ``path``).
    """
    data = _read_json(path)
    fmt = data.get("format", STATS_FORMAT)
    if fmt != STATS_FORMAT:
        raise ValueError(f"format: expected {STATS_FORMAT!r}, got {fmt!r}")
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version != 1:
        raise ValueError(f"version: expected 1 (the only version), got {version!r}")
    for i, key in enumerate(("num_layers", "num_experts")):
        if key not in data:
            continue
        n = data[key]
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"{key}: expected a positive int, got {n!r}")
        if expect_shape is not None and n != expect_shape[i]:
            raise ValueError(f"{key}: the file has {n}, expected {expect_shape[i]} ({RUN_SHAPE_NAMES[i]})")
    if "load" not in data:
        raise ValueError("load: missing (required [num_layers][num_experts] loads)")
    shape_names = RUN_SHAPE_NAMES if expect_shape is not None else ("num_layers", "num_experts")
    load = check_load_matrix(data["load"], "load", expect_shape, shape_names)
    L, E = load.shape
    for key, want in (("num_layers", L), ("num_experts", E)):
        if key in data and data[key] != want:
            raise ValueError(f"{key}: {data[key]!r} does not match load shape {load.shape}")
    if expect_shape is None:
        shape_names = ("as in load", "as in load")
    out = dict(data, load=load)
    for key in ("windows", "timestep_buckets"):
        entries = _check_entries(data, key, (L, E), shape_names)
        if entries is not None:
            out[key] = entries
    if "branches" in data:
        if not isinstance(data["branches"], dict):
            raise ValueError("branches: expected an object {\"cond\": [[...]], \"uncond\": [[...]]}")
        out["branches"] = {name: check_load_matrix(m, f"branches.{name}", (L, E), shape_names)
                           for name, m in data["branches"].items()}
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
