"""Token exchange that sends each token once per destination rank (as DeepEP does).

The copy-level exchange (moe_ep.dispatch) sends a token k times when its k experts live on
one peer. Here the sender sends every (token, destination rank) pair once, with a small
metadata row per copy (which received row it reads, which local slot, its weight). The
expert rank weights its copies' outputs and sums them per received row before the return
trip, so the way back also carries one row per pair, and the sender adds at most ep_size
partial sums per token.

    sender                                   expert rank
    pairs [U] (token, dest) --x rows U-->    recv rows [U_r, H]
    copies [N] --meta [N, 2]-->              copies [N_r] -> sort by slot -> experts
    out[T] += back[U]   <--sums [U_r, H]--   weight, sum per received row

Exact and dropless like the copy exchange; partial sums are accumulated in float32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .placement import count_per_bin
from .router import RoutedCopies


@dataclass
class PairPlan:
    """What the return trip needs."""

    pair_token: torch.Tensor      # [U] sender: input row of each sent pair, in send order
    send_splits: list[int]        # pairs sent to each rank
    recv_splits: list[int]        # pairs received from each rank
    row_of_copy: torch.Tensor     # [N_r] expert rank: received row of each copy, slot-grouped order
    weight: torch.Tensor          # [N_r] float32 expert rank: routed weight, slot-grouped order
    local_counts: torch.Tensor    # [S] copies per local slot
    num_tokens: int
    wire_rows: int                # rows this rank sent to other ranks (out and back counted once)


def _weight_bits(weight: torch.Tensor) -> torch.Tensor:
    """float32 [N] -> int64 [N] holding its bit pattern (so weights travel with the int metadata)."""
    return weight.float().contiguous().view(torch.int32).to(torch.int64)


def _bits_weight(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def dispatch_pairs(x: torch.Tensor, slots: torch.Tensor, copies: RoutedCopies, ep_rank: int, ep_size: int,
                   slots_per_rank: int, group) -> tuple[torch.Tensor, PairPlan]:
    """x [T, H], slots [N] -> (rows [N_r, H] grouped by local slot, plan). ep_size > 1."""
    T, H = x.shape
    pair_token, meta, send_pairs, send_copies, recv_pairs, recv_copies, recv_counts = _pair_meta(
        x, slots, copies, ep_size, slots_per_rank, group)
    recv_x = x.new_empty(sum(recv_pairs), H)                                    # [U_r, H]
    recv_meta = meta.new_empty(sum(recv_copies), 2)                             # [N_r, 2]
    dist.all_to_all_single(recv_x, x[pair_token], recv_pairs, send_pairs, group=group)
    dist.all_to_all_single(recv_meta, meta, recv_copies, send_copies, group=group)
    row, weight, slot_counts = _received_copies(recv_meta, recv_counts, slots_per_rank)
    remote = sum(n for r, n in enumerate(send_pairs) if r != ep_rank)
    plan = PairPlan(pair_token, send_pairs, recv_pairs, row, weight, slot_counts, T, remote)
    return recv_x[row], plan


def combine_pairs(y: torch.Tensor, plan: PairPlan, group) -> torch.Tensor:
    """y [N_r, H] expert outputs (slot-grouped) -> [T, H] on the sender (zeros for unrouted tokens)."""
    H = y.shape[1]
    sums = _sum_copies(y, plan.row_of_copy, plan.weight, sum(plan.recv_splits))            # [U_r, H] per received row
    back = y.new_empty(sum(plan.send_splits), H)                                          # [U, H]
    dist.all_to_all_single(back, sums.to(y.dtype), plan.send_splits, plan.recv_splits, group=group)
    out = torch.zeros(plan.num_tokens, H, dtype=torch.float32, device=y.device)
    return out.index_add_(0, plan.pair_token, back.float()).to(y.dtype)



# ---------------------------------------------------------------- shared parts, overlapped variant

def _pair_meta(x, slots, copies, ep_size, slots_per_rank, group):
    """Pairs, copy metadata and the counts exchange (the one host sync) for both variants.
    -> (pair_token [U], meta [N, 2] grouped by destination, send_pairs, send_copies,
    recv_pairs, recv_copies, recv_counts [ep, 2] on the device: pairs and copies per source)."""
    T = max(x.shape[0], 1)
    dest = slots // slots_per_rank                                              # [N]
    key = dest * T + copies.rows()                                              # [N] (dest, token) as one index
    # Pairs as a presence mask over (dest, token) instead of torch.unique: no sort, and no host
    # sync for the output size before the counts exchange below (the one sync of this function).
    present = torch.zeros(ep_size * T, dtype=torch.bool, device=x.device)      # [ep * T]
    present[key] = True
    pair_index = torch.cumsum(present, 0) - 1                                   # [ep * T] pair id of each key
    pair_of_copy = pair_index[key]                                              # [N]
    pair_counts = present.view(ep_size, T).sum(1)                               # [ep]
    copy_counts = count_per_bin(dest, ep_size)                                  # [ep]
    pair_start = torch.cumsum(pair_counts, 0) - pair_counts                     # [ep]
    meta = torch.stack([(pair_of_copy - pair_start[dest]) * slots_per_rank + slots % slots_per_rank,
                        _weight_bits(copies.weight)], dim=1)[torch.argsort(dest, stable=True)]  # [N, 2]
    counts = torch.stack([pair_counts, copy_counts], dim=1)                     # [ep, 2]
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    host = torch.cat([counts, recv_counts], dim=1).tolist()                     # the host sync
    pair_key = torch.nonzero_static(present, size=sum(h[0] for h in host)).squeeze(1)   # [U] ascending
    return (pair_key % T, meta, [h[0] for h in host], [h[1] for h in host],
            [h[2] for h in host], [h[3] for h in host], recv_counts)


def _received_copies(meta: torch.Tensor, chunk_counts: torch.Tensor,
                     slots_per_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert rank: received copies' metadata [N_r, 2], in chunks by source whose (pairs, copies)
    are chunk_counts [C, 2] (on the device: no host round trip) -> in slot-grouped order:
    (received row [N_r], weight [N_r] float32, copies per local slot [S])."""
    n = meta.shape[0]
    start = torch.cumsum(chunk_counts[:, 0], 0) - chunk_counts[:, 0]                     # [C] first row of each
    src = torch.repeat_interleave(torch.arange(chunk_counts.shape[0], device=meta.device),
                                  chunk_counts[:, 1], output_size=n)                      # [N_r] chunk of each copy
    row = meta[:, 0] // slots_per_rank + start[src]                                         # [N_r]
    slot = meta[:, 0] % slots_per_rank                                                      # [N_r]
    by_slot = torch.argsort(slot, stable=True)
    return row[by_slot], _bits_weight(meta[:, 1])[by_slot], count_per_bin(slot, slots_per_rank)


def _weighted_sums(rows_x: torch.Tensor, meta: torch.Tensor, chunk_counts: torch.Tensor,
                   slots_per_rank: int, experts) -> torch.Tensor:
    """Expert rank: received rows [U_r, H] and their copies' metadata -> per received row the
    weighted sum of its copies' expert outputs, float32 [U_r, H]."""
    row, weight, slot_counts = _received_copies(meta, chunk_counts, slots_per_rank)
    y = experts(rows_x[row], slot_counts)                                                   # [N_r, H]
    return _sum_copies(y, row, weight, rows_x.shape[0])


def _sum_copies(y: torch.Tensor, row: torch.Tensor, weight: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Expert outputs of the copies y [N_r, H], each weighted (float32) and added into its received
    row -> float32 [num_rows, H]: one row per (token, this rank) goes back."""
    sums = torch.zeros(num_rows, y.shape[1], dtype=torch.float32, device=y.device)
    return sums.index_add_(0, row, y.float() * weight.unsqueeze(1))


def overlapped_exchange(x: torch.Tensor, slots: torch.Tensor, copies: RoutedCopies, ep_rank: int, ep_size: int,
                        slots_per_rank: int, group, experts, phase=None) -> tuple[torch.Tensor, int]:
    """Dispatch, experts and combine with this rank's own pairs computed while the other ranks'
    rows are in flight. x [T, H] -> ([T, H], rows sent to other ranks). ep_size > 1.

    Same pairs and metadata as `dispatch_pairs`; the exchange leaves out this rank's own chunk
    (split 0), which runs through the experts first, overlapping the outbound all-to-alls. The
    experts then run a second time on the received rows (two grouped GEMMs over parts of the
    rows). `phase(name)` -> a context manager timing "dispatch", "experts", "combine"."""
    phase = phase or (lambda name: contextlib.nullcontext())
    T, H = x.shape
    me, dev = ep_rank, x.device
    with phase("dispatch"):
        pair_token, meta, send_pairs, send_copies, recv_pairs, recv_copies, recv_counts = _pair_meta(
            x, slots, copies, ep_size, slots_per_rank, group)
        p0, p1 = sum(send_pairs[:me]), sum(send_pairs[:me + 1])       # this rank's own pairs
        c0, c1 = sum(send_copies[:me]), sum(send_copies[:me + 1])     # and their copies
        remote_pairs = torch.cat([torch.arange(0, p0, device=dev), torch.arange(p1, pair_token.numel(), device=dev)])
        remote_copies = torch.cat([torch.arange(0, c0, device=dev), torch.arange(c1, meta.shape[0], device=dev)])
        zero_me = lambda sizes: [0 if r == me else n for r, n in enumerate(sizes)]   # noqa: E731
        s_pairs, s_copies, r_pairs, r_copies = (zero_me(send_pairs), zero_me(send_copies), zero_me(recv_pairs),
                                                zero_me(recv_copies))
        remote_counts = recv_counts.clone()
        remote_counts[me] = 0                                                   # [ep, 2] what arrives
        recv_x = x.new_empty(sum(r_pairs), H)                                   # [U_r, H]
        recv_meta = meta.new_empty(sum(r_copies), 2)                            # [N_r, 2]
        works = [dist.all_to_all_single(recv_x, x[pair_token[remote_pairs]], r_pairs, s_pairs, group=group,
                                        async_op=True),
                 dist.all_to_all_single(recv_meta, meta[remote_copies], r_copies, s_copies, group=group,
                                        async_op=True)]
    with phase("experts"):
        # this rank's own chunk while the rows travel (its counts: what it sends itself)
        out = torch.zeros(T, H, dtype=torch.float32, device=dev)
        own = _weighted_sums(x[pair_token[p0:p1]], meta[c0:c1], recv_counts[me:me + 1], slots_per_rank, experts)
        out.index_add_(0, pair_token[p0:p1], own)
        for w in works:
            w.wait()
        sums = _weighted_sums(recv_x, recv_meta, remote_counts, slots_per_rank, experts)    # [U_r, H]
    with phase("combine"):
        back = x.new_empty(sum(s_pairs), H)                                                 # [U - own, H]
        dist.all_to_all_single(back, sums.to(x.dtype), s_pairs, r_pairs, group=group)
        out.index_add_(0, pair_token[remote_pairs], back.float())
    return out.to(x.dtype), sum(s_pairs)
