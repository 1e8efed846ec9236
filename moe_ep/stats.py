"""Expert-load statistics: per MoE layer x logical expert token counts, kept on the device.

Counts are split by diffusion timestep bucket and by guidance branch (conditional rows
first, unconditional rows second in one batch). Layers only add to device buffers;
the host sees the numbers when a window closes, after one all-reduce over the EP and
data-parallel groups -- never per layer.

Files: `save(path)` writes the documented format (docs/formats.md) atomically;
`load_seed(path)` reads one back (validated against this run's layers and experts)
to seed planning before the first window closes.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from eplb.io import STATS_FORMAT, load_stats

from .router import RoutedCopies

BRANCHES = ("cond", "uncond")


class ExpertLoadStats:
    """Windowed expert-load counters.

    counts [buckets, branches, L, E] int64 on the device accumulate the open window;
    `end_forward` closes the window every `window_size` forward passes.

    A CUDA graph can replay the recording (moe_ep/cuda_graph.py): layers add into one persistent
    per-forward buffer `pending` [2, L, E] (never reallocated), and the host adds it into the
    open bucket (`counts[bucket] += pending`, on the device, no sync) when the forward ends, the
    bucket changes or someone reads `counts`; the branch labels a layer reads live in one
    persistent buffer per batch length. So the tensors a captured forward writes and reads stay
    the same objects from forward to forward; what a capture bakes in from Python is
    `graph_key()`.

    Host memory and the work per call stay bounded however long the run: closed windows
    add into running totals [B, 2, L, E] (`total()`, `bucket_load()` are O(1) in the run
    length), `windows` keeps only the last `max_windows` window loads [L, E] (oldest
    dropped), `last_window` the full [B, 2, L, E] of the last one, and `num_windows`
    counts every window closed.
    """

    def __init__(self, num_layers: int, num_experts: int, device: torch.device, window_size: int = 8,
                 timestep_buckets: int = 1, top_k: int = 1, max_windows: int = 256):
        if num_layers < 1 or num_experts < 1 or window_size < 1 or timestep_buckets < 1 or max_windows < 1:
            raise ValueError(f"ExpertLoadStats: num_layers ({num_layers}), num_experts ({num_experts}), "
                             f"window_size ({window_size}), timestep_buckets ({timestep_buckets}) and "
                             f"max_windows ({max_windows}) must be >= 1")
        self.max_windows = max_windows
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.window_size, self.timestep_buckets = window_size, timestep_buckets
        self._counts = torch.zeros(timestep_buckets, len(BRANCHES), num_layers, num_experts,
                                   dtype=torch.int64, device=device)       # [B, 2, L, E] open window
        # [2, L, E] what the layers recorded since the last flush, all in bucket `_bucket`
        self.pending = torch.zeros(len(BRANCHES), num_layers, num_experts, dtype=torch.int64, device=device)
        self._bucket = 0
        self._cond_rows: Optional[int] = None
        self._sample_branch: Optional[torch.Tensor] = None                  # [B] branch per sample
        self._branch_tuple: Optional[tuple] = None                          # the same on the host
        self._label_cache: dict[tuple, torch.Tensor] = {}                    # branch tuple -> [B] on the device
        self._label_buffers: dict[int, torch.Tensor] = {}                   # B -> the [B] labels layers read
        self._forwards_in_window = 0
        self.forwards = 0                                                   # forward passes seen
        self.num_windows = 0                                                # windows closed over the run
        self.windows: deque = deque(maxlen=max_windows)                     # last closed windows' [L, E] int64
        self.window_forwards: deque = deque(maxlen=max_windows)             # [B] forwards per bucket, same windows
        self.last_window: Optional[np.ndarray] = None                       # [B, 2, L, E] of the last closed window
        self._total = np.zeros(tuple(self._counts.shape), dtype=np.int64)    # [B, 2, L, E] over all closed windows
        self._bucket_total: Optional[np.ndarray] = None                     # cache of bucket_load() (float64)
        self.version = 0                                                    # bumped when the loads change
        self._bucket_forwards = np.zeros(timestep_buckets, dtype=np.int64)  # [B] open window
        self.seed_load: Optional[np.ndarray] = None                         # [L, E] from an earlier run
        self.seed_buckets: Optional[np.ndarray] = None                      # [B, L, E] from an earlier run
        # called after every window closes, by end_forward or close_window (the rebalancer measures
        # its moves there), so whoever closes the last, partial window needs no special case
        self.on_window_closed: list[Callable[[], None]] = []

    # ------------------------------------------------------------ the open window
    @property
    def counts(self) -> torch.Tensor:
        """[B, 2, L, E] int64 on the device: the open window, the pending forward flushed in."""
        self.flush()
        return self._counts

    def flush(self) -> None:
        """Add the pending rows into the open bucket and clear them (device ops, no host sync)."""
        self._counts[self._bucket] += self.pending
        self.pending.zero_()

    def save_pending(self) -> torch.Tensor:
        """A copy of the pending [2, L, E] (for a CUDA-graph capture: its warm-up forwards record
        rows that must not count; `restore_pending` puts this back afterwards, keeping what this
        forward recorded before the capture)."""
        return self.pending.clone()

    def restore_pending(self, saved: torch.Tensor) -> None:
        """Undo whatever was recorded since `save_pending` returned `saved` (a device copy)."""
        self.pending.copy_(saved)

    def graph_key(self) -> tuple:
        """What a captured forward's recording bakes in from Python: with sample branches, their
        number (the labels buffer of that length and the rows per sample derive from it); else
        `cond_rows` (compared as a Python int). A graph is valid only while this is unchanged."""
        if self._sample_branch is not None and self._sample_branch.numel():
            return ("sample_branch", self._sample_branch.numel())
        return ("cond_rows", self._cond_rows)

    # ------------------------------------------------------------ recording
    def bucket_of(self, timestep: float) -> int:
        """Timestep in [0, 1] -> bucket index (values outside are clamped)."""
        t = 0.0 if timestep is None or not math.isfinite(float(timestep)) else float(timestep)
        return max(0, min(int(t * self.timestep_buckets), self.timestep_buckets - 1))

    def begin_forward(self, timestep: float = 0.0, cond_rows: Optional[int] = None,
                      sample_branch: Optional[Sequence[int]] = None) -> None:
        """Before a forward: `timestep` in [0, 1] picks the bucket. The guidance branch of each
        MoE input row comes from `sample_branch` (per transformer-batch sample: 0 conditional,
        1 unconditional; a layer's input [B, S, H] has S rows per sample), or else from
        `cond_rows` (the first `cond_rows` rows are conditional); with neither, all rows count
        as conditional."""
        bucket = self.bucket_of(timestep)
        if bucket != self._bucket:
            self.flush()          # rows recorded since the last flush belong to the old bucket
        self._bucket = bucket
        self._cond_rows = cond_rows
        self.set_sample_branch(sample_branch)                                                       # [B]

    @property
    def sample_branch(self) -> Optional[list[int]]:
        """The guidance branch of each sample of the open forward (begin_forward's), or None."""
        return None if self._branch_tuple is None else list(self._branch_tuple)

    def set_sample_branch(self, sample_branch: Optional[Sequence[int]]) -> None:
        """Relabel the samples of the open forward, timestep bucket unchanged: a rank that computes
        other samples than the hooks described (cfg parallel: its chunk of the batch, or the other
        guidance branch's forward) gives the branches of the rows its MoE layers really see."""
        self._branch_tuple = None if sample_branch is None else tuple(int(b) for b in sample_branch)
        if self._branch_tuple is None:
            self._sample_branch = None
            return
        n = len(self._branch_tuple)
        buffer = self._label_buffers.get(n)
        if buffer is None:                      # made once per batch length, never replaced
            buffer = self._label_buffers[n] = torch.zeros(n, dtype=torch.int64, device=self._counts.device)
        buffer.copy_(self._labels(self._branch_tuple))                    # device to device, no sync
        self._sample_branch = buffer                                      # [B]

    def _labels(self, branches: tuple) -> torch.Tensor:
        """Branch labels [B] on the device, made once per distinct tuple (a host-to-device copy
        per forward would wait for the GPU's queue); copied into the persistent buffer layers read."""
        cache = self._label_cache
        if branches not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[branches] = torch.tensor(branches, dtype=torch.int64, device=self._counts.device)
        return cache[branches]

    def record(self, layer: int, expert_ids: torch.Tensor) -> None:
        """expert_ids [T, k] chosen by MoE layer `layer` (token choice; row t is token t)."""
        T, k = expert_ids.shape
        self.record_copies(layer, RoutedCopies(expert_ids.reshape(-1), torch.empty(0), T, top_k=k))

    def record_copies(self, layer: int, copies: RoutedCopies, rows_per_sample: Optional[int] = None) -> None:
        """Add the routed copies of MoE layer `layer` (each counts 1 for its expert, in its
        row's branch) to `pending`; on the device, no sync, capturable in a CUDA graph.
        `rows_per_sample`: S of a [B, S, H] input."""
        if not copies.num_copies:
            return
        branch = self._branch_of_rows(copies.rows(), copies.num_tokens, rows_per_sample)   # [N] 0/1
        L, E = self.num_layers, self.num_experts
        flat = branch * (L * E) + layer * E + copies.expert                                # [N] into [2, L, E]
        self.pending.view(-1).scatter_add_(0, flat, torch.ones_like(flat))

    def _branch_of_rows(self, rows: torch.Tensor, num_rows: int, rows_per_sample: Optional[int]) -> torch.Tensor:
        """rows [N] input rows -> [N] int64 branch (0 conditional, 1 unconditional)."""
        if self._sample_branch is not None and self._sample_branch.numel():
            per_sample = rows_per_sample or max(1, num_rows // self._sample_branch.numel())
            sample = (rows // per_sample).clamp_max(self._sample_branch.numel() - 1)
            return self._sample_branch[sample]
        if self._cond_rows is None:
            return torch.zeros_like(rows)
        return (rows >= self._cond_rows).to(torch.int64)

    def end_forward(self, groups=()) -> bool:
        """After a forward. Every `window_size` forwards, all-reduce the window over
        `groups` (the EP and DP groups; None entries are skipped), store it, start a new
        one, and return True. Collective when it closes a window: every rank calls it
        after every forward."""
        self.flush()
        self._forwards_in_window += 1
        self.forwards += 1
        self._bucket_forwards[self._bucket] += 1
        if self._forwards_in_window < self.window_size:
            return False
        self.close_window(groups)
        return True

    def close_window(self, groups=()) -> None:
        self.flush()
        window = self._counts.clone()
        for group in groups:
            if group is not None:
                dist.all_reduce(window, group=group)
        window = window.cpu().numpy()                                       # [B, 2, L, E]
        self._total += window
        self.last_window = window
        self.windows.append(window.sum(axis=(0, 1)))                        # [L, E] int64
        self.num_windows += 1
        self._bucket_total = None
        self.version += 1
        self.window_forwards.append(self._bucket_forwards.copy())
        self._bucket_forwards[:] = 0
        self._counts.zero_()
        self._forwards_in_window = 0
        for listener in self.on_window_closed:
            listener()

    @property
    def window_open(self) -> bool:
        """True when forwards were recorded since the last window closed."""
        return self._forwards_in_window > 0

    # ------------------------------------------------------------ views
    def last_window_load(self) -> Optional[np.ndarray]:
        """[L, E] load of the last closed window (all buckets and branches), or the seed."""
        if self.num_windows:
            return self.windows[-1].astype(np.float64)
        return None if self.seed_load is None else self.seed_load.copy()

    def total(self) -> np.ndarray:
        """[B, 2, L, E] over all closed windows (a copy of the running totals)."""
        return self._total.copy()

    def bucket_load(self) -> Optional[np.ndarray]:
        """[B, L, E] float64: load per timestep bucket over all closed windows plus the seed
        (None when there is neither; the seed weighted by `seed_weight()`). Computed once per
        window close / seed (cached); a copy."""
        if self._bucket_total is None:
            out = None
            if self.num_windows:
                out = self._total.sum(axis=1).astype(np.float64)
            if self.seed_buckets is not None:
                seed = self.seed_buckets * self.seed_weight()[None, :, None]       # [B, L, E]
                out = seed if out is None else out + seed
            if out is None:
                return None
            self._bucket_total = out
        return self._bucket_total.copy()

    def to_json(self) -> dict:
        """The documented stats format (docs/formats.md): `load`, `timestep_buckets` and
        `branches` cover the whole run; `windows` the last `max_windows` closed windows."""
        total = self._total
        edges = np.linspace(0.0, 1.0, self.timestep_buckets + 1)
        return {
            "format": STATS_FORMAT, "version": 1,
            "num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
            "window_size": self.window_size,
            "num_windows": self.num_windows,                              # closed in the whole run
            "first_window": self.num_windows - len(self.windows),         # run index of windows[0]
            "load": total.sum(axis=(0, 1)).tolist(),
            "windows": [{"load": w.tolist()} for w in self.windows],
            "timestep_buckets": [{"t_min": float(edges[b]), "t_max": float(edges[b + 1]),
                                  "load": total[b].sum(axis=0).tolist()} for b in range(self.timestep_buckets)],
            "branches": {name: total[:, i].sum(axis=0).tolist() for i, name in enumerate(BRANCHES)},
        }

    # ------------------------------------------------------------ files
    def save(self, path: str) -> None:
        """Write `to_json()` as compact JSON, atomically (temp file in the same folder, fsync,
        os.replace). Compact matters: 300 windows of 58 x 256 loads are 51 MB indented."""
        from .atomic import write_json_atomic

        write_json_atomic(path, self.to_json(), indent=None)

    def seed_weight(self) -> np.ndarray:
        """[L] float64: the factor the seed's loads get where they add to this run's counts
        (`bucket_load()`). The seed counts as at most one window of this run: per layer,
        min(1, this run's mean window load / the seed's total load), so a seed from a run many
        times longer than this one cannot outweigh what this run measures, and its share falls as
        1 / (windows + 1). Before this run closes a window the seed is used alone, unscaled
        (balance is scale-invariant, so its scale does not matter there). docs/eplb_runtime.md."""
        if self.seed_buckets is None or not self.num_windows:
            return np.ones(self.num_layers)
        run_window = self._total.sum(axis=(0, 1, 3)) / self.num_windows                # [L] mean window load
        seed_total = self.seed_buckets.sum(axis=(0, 2))                                 # [L]
        ratio = np.divide(run_window, seed_total, out=np.ones(self.num_layers), where=seed_total > 0)
        return np.minimum(1.0, ratio)

    def load_seed(self, path: str) -> dict:
        """Read a stats file written by `save` (or by another run) and use its load as the
        seed: `last_window_load()` returns it until a window closes, and its timestep
        buckets (when their count matches) add to `bucket_load()`, weighted by `seed_weight()`.

        Raises ValueError naming the file and the field before changing anything.
        """
        data = read_stats_file(path, self.num_layers, self.num_experts)
        self.seed_load = np.asarray(data["load"], dtype=np.float64)
        buckets = data.get("timestep_buckets")
        if isinstance(buckets, list) and len(buckets) == self.timestep_buckets:
            self.seed_buckets = np.stack([np.asarray(b["load"], dtype=np.float64) for b in buckets])
        else:
            self.seed_buckets = None
        self._bucket_total = None
        self.version += 1
        return data


def read_stats_file(path: str, num_layers: int, num_experts: int) -> dict:
    """Read and validate a stats file for this run (`eplb.io.load_stats` with the run's
    ``(num_layers, num_experts)``): every load matrix becomes float64 [L, E]. Raises ValueError
    ``stats file {path}: <field>: ...``."""
    try:
        return load_stats(path, expect_shape=(num_layers, num_experts))
    except ValueError as err:
        msg = str(err)
        prefix = f"{path}: "   # file-level errors (not found, not JSON) already name the path
        raise ValueError(f"stats file {path}: {msg[len(prefix):] if msg.startswith(prefix) else msg}") from None
