"""Moving expert weights between EP ranks for a new placement.

`plan_transfers` is pure and deterministic, so every rank computes the same list of
moves from (old, new) placements without talking. `Transfer` then runs this rank's
share in three steps that never touch the live weights:

1. `prepare()`  -- local copies and send buffers are taken from the OLD weights, receive
   buffers are allocated (staging) and the P2P ops are built; no communication. Every
   fault stage that may fail on one rank alone ("prepare", "send") is here.
2. `run()`      -- one `batch_isend_irecv` per rank with one packed buffer per peer.
3. `commit()`   -- copy staging into `experts.w13 / w2` and install the new placement.

The rebalancer puts a collective go/no-go between 1 and 2 and between 2 and 3. A failure
on one rank inside 2 (the exchange itself) cannot be recovered: its peers wait on their
receives until `timeout_s`, and the job ends through the dead-rank path.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Move:
    layer: int        # index into the rebalancer's layer list
    dst_slot: int     # physical slot (global) that receives the expert
    src_slot: int     # physical slot (global) in the OLD placement that holds it
    src_rank: int     # EP rank of src_slot
    dst_rank: int     # EP rank of dst_slot
    expert: int

    @property
    def local(self) -> bool:
        return self.src_rank == self.dst_rank


def plan_transfers(old: torch.Tensor, new: torch.Tensor, ep_size: int) -> list[Move]:
    """old, new [L, R] int64 -> the moves that turn `old` into `new`.

    A slot whose expert does not change does not move. Otherwise its expert comes from a
    slot that holds it in the OLD placement: one on the destination rank if there is one
    (a local copy, no communication), else the holder rank that has been picked least so
    far (ties: the lowest rank, then the lowest slot) so that sends spread over replicas.
    Deterministic: every rank gets the same list in the same order.
    """
    old = torch.as_tensor(old, dtype=torch.int64).cpu()
    new = torch.as_tensor(new, dtype=torch.int64).cpu()
    if old.shape != new.shape or old.dim() != 2:
        raise ValueError(f"placements must both be [L, R]; got {tuple(old.shape)} and {tuple(new.shape)}")
    L, R = old.shape
    per = R // ep_size
    moves: list[Move] = []
    for l in range(L):
        o, n = old[l].tolist(), new[l].tolist()
        holders: dict[int, list[int]] = {}
        for s, e in enumerate(o):
            holders.setdefault(e, []).append(s)
        sends = [0] * ep_size
        for s, e in enumerate(n):
            if o[s] == e:
                continue
            if e not in holders:
                raise ValueError(f"layer {l}: expert {e} has no holder in the old placement")
            dst = s // per
            cands = holders[e]
            local = [c for c in cands if c // per == dst]
            if local:
                src = local[0]
            else:
                src = min(cands, key=lambda c: (sends[c // per], c // per, c))
                sends[src // per] += 1
            moves.append(Move(l, s, src, src // per, dst, e))
    return moves


@dataclass
class TransferStats:
    experts_moved: int = 0      # slots whose expert changed (all ranks)
    remote_moves: int = 0       # of those, copied from another rank
    local_copies: int = 0       # of those, copied within a rank
    bytes_moved: int = 0        # bytes sent between ranks (all ranks)
    max_rank_bytes: int = 0     # max over ranks of sent + received


def summarize(moves: list[Move], layers, ep_size: int) -> TransferStats:
    st = TransferStats()
    per_rank = [0] * ep_size
    for m in moves:
        st.experts_moved += 1
        if m.local:
            st.local_copies += 1
            continue
        st.remote_moves += 1
        ex = layers[m.layer].experts
        nbytes = (ex.w13[0].numel() + ex.w2[0].numel()) * ex.w13.element_size()
        st.bytes_moved += nbytes
        per_rank[m.src_rank] += nbytes
        per_rank[m.dst_rank] += nbytes
    st.max_rank_bytes = max(per_rank) if per_rank else 0
    return st


@dataclass
class Transfer:
    """This rank's part of a set of moves (see the module doc)."""

    layers: list
    moves: list[Move]
    ep_rank: int
    ep_group: object = None
    tag: int = 0
    timeout_s: Optional[float] = None
    fault_hook: Optional[Callable[[str], None]] = None
    # filled by prepare()
    staging: dict = field(default_factory=dict)   # (layer, local slot) -> (w13, w2)
    _send: dict = field(default_factory=dict)     # peer -> packed flat buffer
    # peer -> (flat buffer, [(layer, local slot, w13 shape, w2 shape, w13)]); w13, the slots' Parameter,
    # gives the buffer's dtype and device
    _recv: dict = field(default_factory=dict)
    _ops: list = field(default_factory=list)      # the P2P ops run() posts

    def _local_slot(self, layer: int, slot: int) -> int:
        return slot - self.ep_rank * self.layers[layer].slots_per_rank

    def _weights(self, layer: int, slot: int):
        # [gate | up] columns on the wire and in staging, whatever layout either rank stores
        return self.layers[layer].experts.slot_weights(self._local_slot(layer, slot))

    def prepare(self) -> None:
        """Staging buffers, send buffers (from the OLD weights) and the P2P ops; no communication."""
        me = self.ep_rank
        send_parts: dict[int, list[torch.Tensor]] = {}
        recv_meta: dict[int, list] = {}
        for m in self.moves:
            if m.local and m.dst_rank == me:
                w13, w2 = self._weights(m.layer, m.src_slot)
                self.staging[(m.layer, self._local_slot(m.layer, m.dst_slot))] = (w13.clone(), w2.clone())
            elif m.src_rank == me and not m.local:
                w13, w2 = self._weights(m.layer, m.src_slot)
                send_parts.setdefault(m.dst_rank, []).extend([w13.reshape(-1), w2.reshape(-1)])
            elif m.dst_rank == me and not m.local:
                ex = self.layers[m.layer].experts
                recv_meta.setdefault(m.src_rank, []).append(
                    (m.layer, self._local_slot(m.layer, m.dst_slot), ex.w13.shape[1:], ex.w2.shape[1:], ex.w13))
        for peer, parts in send_parts.items():
            self._send[peer] = torch.cat(parts)                      # [sum of numel], one message per peer
        for peer, meta in recv_meta.items():
            ref = meta[0][4]
            n = sum(a.numel() + b.numel() for _, _, a, b, _ in meta)
            self._recv[peer] = (torch.empty(n, dtype=ref.dtype, device=ref.device), meta)
        if self.fault_hook is not None:
            self.fault_hook("prepare")
        self._ops = []
        for peer in sorted(set(self._send) | set(self._recv)):
            g = self._global(peer)
            if peer in self._send:
                self._ops.append(dist.P2POp(dist.isend, self._send[peer], g, self.ep_group, self.tag))
            if peer in self._recv:
                self._ops.append(dist.P2POp(dist.irecv, self._recv[peer][0], g, self.ep_group, self.tag))
        if self.fault_hook is not None:
            self.fault_hook("send")     # last chance to fail alone: still before the go/no-go vote

    def _global(self, ep_rank: int) -> int:
        if self.ep_group is None:
            return ep_rank
        return dist.get_global_rank(self.ep_group, ep_rank)

    def run(self) -> None:
        """Exchange the packed buffers (batch_isend_irecv), then unpack into staging.

        Call on every rank of the EP group after a successful go/no-go vote on prepare().
        """
        self.finish(self.post())

    def post(self) -> list:
        """Post this rank's sends and receives (batch_isend_irecv) and return their works at
        once; the exchange goes on in the background until `finish`."""
        ops, self._ops = self._ops, []
        return dist.batch_isend_irecv(ops) if ops else []

    def finish(self, works: list) -> None:
        """Wait for the posted exchange (at most `timeout_s`), then unpack into staging."""
        timeout = None if self.timeout_s is None else datetime.timedelta(seconds=self.timeout_s)
        for w in works:
            w.wait(timeout) if timeout is not None else w.wait()
        for peer, (buf, meta) in self._recv.items():
            off = 0
            for layer, local_slot, s13, s2, _ in meta:
                n13, n2 = s13.numel(), s2.numel()
                w13 = buf[off:off + n13].view(s13)
                w2 = buf[off + n13:off + n13 + n2].view(s2)
                off += n13 + n2
                self.staging[(layer, local_slot)] = (w13, w2)
        self._send.clear()
        if self.fault_hook is not None:
            self.fault_hook("received")

    def commit(self, new_phy2log: torch.Tensor, only_layers: Optional[list[int]] = None) -> None:
        """Copy staging into the live weights and install the new placement on every layer
        (or on `only_layers`, whose moves are all this transfer holds)."""
        for (layer, local_slot), (w13, w2) in self.staging.items():
            self.layers[layer].experts.set_slot(local_slot, w13, w2)
        for l, layer in enumerate(self.layers):
            if only_layers is None or l in only_layers:
                layer.set_placement(new_phy2log[l])
        self.clear()

    def clear(self) -> None:
        """Drop every buffer (after a commit, or when the attempt is abandoned)."""
        self.staging.clear()
        self._recv.clear()
        self._send.clear()
        self._ops = []
