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
    dest = slots // slots_per_rank                                              # [N]
    token = copies.rows()                                                       # [N]
    # One pair per (destination, token); sorting by that key groups pairs by destination.
    key = dest * max(T, 1) + token                                              # [N]
    pair_key, pair_of_copy = torch.unique(key, sorted=True, return_inverse=True)  # [U], [N]
    pair_dest = pair_key // max(T, 1)                                           # [U]
    pair_token = pair_key % max(T, 1)                                           # [U]
    pair_counts = count_per_bin(pair_dest, ep_size)                             # [ep]
    copy_counts = count_per_bin(dest, ep_size)                                  # [ep]
    # Index of each copy's pair within the chunk its destination receives.
    pair_start = torch.cumsum(pair_counts, 0) - pair_counts                     # [ep]
    pair_in_chunk = pair_of_copy - pair_start[dest]                             # [N]
    order = torch.argsort(dest, stable=True)                                    # copies grouped by dest
    meta = torch.stack([pair_in_chunk * slots_per_rank + slots % slots_per_rank,
                        _weight_bits(copies.weight)], dim=1)[order]             # [N, 2] int64

    counts = torch.stack([pair_counts, copy_counts], dim=1)                     # [ep, 2]
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    host = torch.cat([counts, recv_counts], dim=1).tolist()                     # the host sync
    send_pairs, send_copies = [h[0] for h in host], [h[1] for h in host]
    recv_pairs, recv_copies = [h[2] for h in host], [h[3] for h in host]

    recv_x = x.new_empty(sum(recv_pairs), H)                                    # [U_r, H]
    recv_meta = meta.new_empty(sum(recv_copies), 2)                             # [N_r, 2]
    dist.all_to_all_single(recv_x, x[pair_token], recv_pairs, send_pairs, group=group)
    dist.all_to_all_single(recv_meta, meta, recv_copies, send_copies, group=group)

    # Received copies: their row within all received rows, their local slot, their weight.
    src_pair_start = torch.tensor([0] + recv_pairs[:-1], device=x.device).cumsum(0)          # [ep]
    src_of_copy = torch.repeat_interleave(torch.arange(ep_size, device=x.device),
                                          torch.tensor(recv_copies, device=x.device),
                                          output_size=recv_meta.shape[0])                     # [N_r]
    row = recv_meta[:, 0] // slots_per_rank + src_pair_start[src_of_copy]                     # [N_r]
    local_slot = recv_meta[:, 0] % slots_per_rank                                            # [N_r]
    by_slot = torch.argsort(local_slot, stable=True)                                         # [N_r]
    remote = sum(n for r, n in enumerate(send_pairs) if r != ep_rank)
    plan = PairPlan(pair_token, send_pairs, recv_pairs, row[by_slot], _bits_weight(recv_meta[:, 1])[by_slot],
                    count_per_bin(local_slot, slots_per_rank), T, remote)
    return recv_x[plan.row_of_copy], plan


def combine_pairs(y: torch.Tensor, plan: PairPlan, group) -> torch.Tensor:
    """y [N_r, H] expert outputs (slot-grouped) -> [T, H] on the sender (zeros for unrouted tokens)."""
    H = y.shape[1]
    sums = torch.zeros(sum(plan.recv_splits), H, dtype=torch.float32, device=y.device)   # [U_r, H]
    sums.index_add_(0, plan.row_of_copy, y.float() * plan.weight.unsqueeze(1))
    back = y.new_empty(sum(plan.send_splits), H)                                          # [U, H]
    dist.all_to_all_single(back, sums.to(y.dtype), plan.send_splits, plan.recv_splits, group=group)
    out = torch.zeros(plan.num_tokens, H, dtype=torch.float32, device=y.device)
    return out.index_add_(0, plan.pair_token, back.float()).to(y.dtype)

