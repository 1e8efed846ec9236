"""Expert-load statistics: per MoE layer x logical expert token counts, kept on the device.

Counts are split by diffusion timestep bucket and by guidance branch (conditional rows
first, unconditional rows second in one batch). Layers only add to device buffers;
the host sees the numbers when a window closes, after one all-reduce over the EP and
data-parallel groups -- never per layer.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

BRANCHES = ("cond", "uncond")


class ExpertLoadStats:
    """Windowed expert-load counters.

    counts [buckets, branches, L, E] int64 on the device accumulate the open window;
    `end_forward` closes the window every `window_size` forward passes.
    """

    def __init__(self, num_layers: int, num_experts: int, device: torch.device, window_size: int = 8,
                 timestep_buckets: int = 1, top_k: int = 1):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.window_size, self.timestep_buckets = window_size, timestep_buckets
        self.counts = torch.zeros(timestep_buckets, len(BRANCHES), num_layers, num_experts,
                                  dtype=torch.int64, device=device)        # [B, 2, L, E] open window
        self._bucket = 0
        self._cond_rows: Optional[int] = None
        self._forwards_in_window = 0
        self.windows: list[np.ndarray] = []                                 # closed windows [B, 2, L, E]
        self.seed_load: Optional[np.ndarray] = None                         # [L, E] from an earlier run

    # ------------------------------------------------------------ recording
    def begin_forward(self, timestep: float = 0.0, cond_rows: Optional[int] = None) -> None:
        """Before a forward: `timestep` in [0, 1] picks the bucket; the first `cond_rows`
        rows of every MoE layer's input are the conditional branch (None: all of them)."""
        self._bucket = min(int(timestep * self.timestep_buckets), self.timestep_buckets - 1)
        self._cond_rows = cond_rows

    def record(self, layer: int, expert_ids: torch.Tensor) -> None:
        """expert_ids [T, k] chosen by MoE layer `layer`; adds on the device, no sync."""
        rows = expert_ids.shape[0]
        split = rows if self._cond_rows is None else min(self._cond_rows, rows)
        for branch, ids in enumerate((expert_ids[:split], expert_ids[split:])):
            if ids.numel():
                flat = ids.reshape(-1)
                self.counts[self._bucket, branch, layer].scatter_add_(0, flat, torch.ones_like(flat))

    def end_forward(self, groups=()) -> bool:
        """After a forward. Every `window_size` forwards, all-reduce the window over
        `groups` (the EP and DP groups; None entries are skipped), store it, start a new
        one, and return True."""
        self._forwards_in_window += 1
        if self._forwards_in_window < self.window_size:
            return False
        self.close_window(groups)
        return True

    def close_window(self, groups=()) -> None:
        window = self.counts.clone()
        for group in groups:
            if group is not None:
                dist.all_reduce(window, group=group)
        self.windows.append(window.cpu().numpy())
        self.counts.zero_()
        self._forwards_in_window = 0

    # ------------------------------------------------------------ views
    def last_window_load(self) -> Optional[np.ndarray]:
        """[L, E] load of the last closed window (all buckets and branches), or the seed."""
        if self.windows:
            return self.windows[-1].sum(axis=(0, 1)).astype(np.float64)
        return self.seed_load

    def total(self) -> np.ndarray:
        """[B, 2, L, E] over all closed windows."""
        if not self.windows:
            return np.zeros(tuple(self.counts.shape), dtype=np.int64)
        return np.sum(self.windows, axis=0)

    def to_json(self) -> dict:
        """The documented stats format (docs/formats.md)."""
        total = self.total()
        edges = np.linspace(0.0, 1.0, self.timestep_buckets + 1)
        return {
            "format": "moe-ep.expert-load", "version": 1,
            "num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
            "window_size": self.window_size,
            "load": total.sum(axis=(0, 1)).tolist(),
            "windows": [{"load": w.sum(axis=(0, 1)).tolist()} for w in self.windows],
            "timestep_buckets": [{"t_min": float(edges[b]), "t_max": float(edges[b + 1]),
                                  "load": total[b].sum(axis=0).tolist()} for b in range(self.timestep_buckets)],
            "branches": {name: total[:, i].sum(axis=0).tolist() for i, name in enumerate(BRANCHES)},
        }
