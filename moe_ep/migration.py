"""Asynchronous migration: an agreed new placement is installed one layer per forward boundary,
while sampling goes on.

The synchronous path (moe_ep.rebalance) stops every rank, moves every layer's experts and swaps
them all at once: about twice the moved bytes of extra memory and a stall of the whole move.
Here, at each forward boundary (every rank calls `step()` after every forward):

    finish layer l-1's exchange (posted one forward ago)   --+
    prepare layer l (local copies, send and receive buffers)  +-- one all-reduce: [wait failed,
    vote                                                    --+   prepare failed] over the world
    commit layer l-1 (staging -> live slots, its placement)
    post layer l's isend/irecv; the next forward runs with layer l's OLD placement and weights

Every layer keeps a consistent placement on all ranks at every forward: a layer's placement
changes only at a boundary where every rank of the world voted that its weights had arrived.
A failure aborts the rest: layers committed so far keep their new placement, the others the
old one (placements are per layer, so any mix is valid). Extra memory is one layer's move.

On NCCL the exchange runs on its own process group (its own communicator and stream), so the
forward's all-to-alls are not queued behind it.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from .transfer import Move, Transfer, summarize

Vote = Callable[[list[int]], list[int]]   # per-rank flags -> their MAX over the world


class LayerByLayerMigration:
    """Moves `new` into place one layer per `step()` (see the module doc)."""

    def __init__(self, layers: list, moves: list[Move], new: torch.Tensor, ep_rank: int, ep_size: int, group,
                 vote: Vote, tag: int, timeout_s: Optional[float] = None,
                 fault_hook: Optional[Callable[[str], None]] = None):
        self.layers, self.new, self.ep_rank, self.group = layers, new, ep_rank, group
        self.vote, self.tag, self.timeout_s, self.fault_hook = vote, tag, timeout_s, fault_hook
        by_layer: dict[int, list[Move]] = {}
        for m in moves:
            by_layer.setdefault(m.layer, []).append(m)
        self.pending: list[tuple[int, list[Move]]] = sorted(by_layer.items())   # layers still to move
        self.stats = summarize(moves, layers, ep_size)
        self.inflight: Optional[tuple[int, Transfer, list]] = None
        self.committed: list[int] = []
        self.failed_reason = ""
        self.stall_s: list[float] = []           # time each step() held the sampling loop
        self.peak_staging_bytes = 0              # largest receive + local-copy staging of one layer

    @property
    def done(self) -> bool:
        return self.inflight is None and (not self.pending or bool(self.failed_reason))

    def step(self) -> bool:
        """One forward boundary (collective over the world). Returns True when finished."""
        t0 = time.perf_counter()
        wait_failed = prep_failed = 0
        if self.inflight is not None:
            try:
                self.inflight[1].finish(self.inflight[2])
            except Exception as err:
                wait_failed, self.failed_reason = 1, f"layer {self.inflight[0]}: {type(err).__name__}: {err}"
        nxt = None
        if self.pending and not wait_failed:
            layer, moves = self.pending[0]
            nxt = Transfer(self.layers, moves, self.ep_rank, self.group, tag=self.tag, timeout_s=self.timeout_s,
                           fault_hook=self.fault_hook)
            try:
                nxt.prepare()
            except Exception as err:
                prep_failed, self.failed_reason = 1, f"prepare of layer {layer} on EP rank {self.ep_rank}: " \
                                                     f"{type(err).__name__}: {err}"
        any_wait, any_prep = self.vote([wait_failed, prep_failed])
        if self.inflight is not None:
            layer, transfer, _ = self.inflight
            if not any_wait:
                self.peak_staging_bytes = max(self.peak_staging_bytes, _staging_bytes(transfer))
                transfer.commit(self.new, only_layers=[layer])
                self.committed.append(layer)
            else:
                transfer.clear()
            self.inflight = None
        if nxt is not None:
            if any_wait or any_prep:
                nxt.clear()
                self.failed_reason = self.failed_reason or "failed on another rank"
                self.pending = []
            else:
                layer, _ = self.pending.pop(0)
                self.inflight = (layer, nxt, nxt.post())
        elif any_wait:
            self.failed_reason = self.failed_reason or "failed on another rank"
            self.pending = []
        self.stall_s.append(time.perf_counter() - t0)
        return self.done


def _staging_bytes(transfer: Transfer) -> int:
    return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in transfer.staging.values())
