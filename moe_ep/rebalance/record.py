"""What a rebalance attempt did: a frozen record, made once per outcome.

One attempt gives one record; an asynchronous migration gives one when it starts (status
"migrating") and a new one when it ends (its outcome, `ends_migration`); a successful move gives
one more when its balancedness has been measured on a window under the new placement. Each is
complete when made and never changes: `Rebalancer.events` holds the latest record of every
attempt (summary.json `rebalances`), and whoever logs them is handed each new record.

A record reads like the JSON dict it stands for (`record["ok"]`, `record.get("migration")`,
`key in record`), which is what summary.json holds (`as_dict()`); optional fields that were not
set are not keys, as in the dicts of earlier versions.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Balancedness:
    """Per-layer balancedness (mean / max GPU load) summed up over the layers."""

    mean: float
    min: float

    @classmethod
    def of(cls, per_layer) -> "Balancedness":
        """per_layer [L] -> its mean and min."""
        return cls(float(np.mean(per_layer)), float(np.min(per_layer)))

    def as_dict(self) -> dict:
        return {"mean": self.mean, "min": self.min}


@dataclass(frozen=True)
class Attempted:
    """What a move that failed would have moved."""

    experts_moved: int
    bytes_moved: int

    def as_dict(self) -> dict:
        return {"experts_moved": self.experts_moved, "bytes_moved": self.bytes_moved}


# keys summary.json always has, then those it has only when set (docs/eplb_runtime.md)
ALWAYS = ("forward_idx", "trigger", "status", "ok", "reason", "experts_moved", "remote_moves", "local_copies",
          "bytes_moved", "time_ms", "balancedness_before", "balancedness_after", "measured_balancedness")
WHEN_SET = ("predicted_saving_ms", "predicted_cost_ms", "transfer_ms", "migration", "layers_moved",
            "stall_ms_per_forward", "stall_ms_max", "forwards", "peak_staging_bytes", "attempted")
_WHEN_SET = frozenset(WHEN_SET)
_KEYS = frozenset(ALWAYS + WHEN_SET)


@dataclass(frozen=True)
class RebalanceRecord(Mapping):
    """One outcome of a rebalance attempt (see the module doc; the fields are summary.json's keys)."""

    forward_idx: int                   # the forward after which it was attempted (-1: at start-up)
    trigger: str                       # interval | stats_file | placement_file | phase_plan | phase:B | ...
    status: str                        # ok | skipped | failed | migrating
    ok: bool = False                   # the new placement is installed
    reason: str = ""                   # why not, when not ok
    experts_moved: int = 0             # slots whose expert changed (all ranks), when ok
    remote_moves: int = 0
    local_copies: int = 0
    bytes_moved: int = 0               # bytes sent between ranks (all ranks), when ok
    time_ms: float = 0.0               # plan + transfer + swap on this rank (a migration: start to end)
    balancedness_before: Optional[Balancedness] = None   # predicted on the planning window, old placement
    balancedness_after: Optional[Balancedness] = None    # the same window, new placement
    measured_balancedness: Optional[Balancedness] = None  # the first clean window under the new placement
    # only when set
    predicted_saving_ms: Optional[float] = None   # timestep phase switches: the cost model's terms
    predicted_cost_ms: Optional[float] = None
    transfer_ms: Optional[float] = None           # a synchronous move that succeeded: the exchange alone
    migration: Optional[str] = None               # "async": moved layer by layer
    layers_moved: Optional[int] = None            # the migration's figures, when it ended
    stall_ms_per_forward: Optional[float] = None
    stall_ms_max: Optional[float] = None
    forwards: Optional[int] = None
    peak_staging_bytes: Optional[int] = None
    attempted: Optional[Attempted] = None         # a failed move: what it would have moved
    # not in the JSON: the end of an asynchronous migration whose start record was the attempt
    ends_migration: bool = False

    # ------------------------------------------------------------ the JSON dict it stands for
    def __getitem__(self, key: str):
        if key not in _KEYS or (key in _WHEN_SET and getattr(self, key) is None):
            raise KeyError(key)
        value = getattr(self, key)
        return value.as_dict() if hasattr(value, "as_dict") else value

    def __iter__(self):
        return (k for k in ALWAYS + WHEN_SET if k not in _WHEN_SET or getattr(self, k) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def as_dict(self) -> dict:
        """summary.json's entry: plain values (nested records as dicts)."""
        return {k: self[k] for k in self}
