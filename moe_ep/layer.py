"""MoELayer = router + placement + dispatch + grouped experts (+ shared experts)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from .config import ConfigError, MoEConfig
from .batch_invariant import ordered_combine, resolve as resolve_batch_invariant
from .dispatch import combine, dispatch, returned_copies
from .token_exchange import combine_pairs, dispatch_pairs, overlapped_exchange
from .experts import DenseMLP, GroupedExperts
from .parallel import ParallelContext, check_layout
from .local_path import local_combine, local_dispatch
from .router import RoutedCopies, Router
from .placement import Placement, assign_slots, contiguous_placement, make_placement, replica_choices
from .stats import ExpertLoadStats
from .timing import PhaseTimer, maybe_phase

# expert id -> (w13 [H, 2F], w2 [F, H]) of that logical expert
ExpertWeightSource = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class MoELayer(nn.Module):
    """An expert-parallel, dropless MoE feed-forward.

    Every rank of the EP group holds `R / ep_size` physical slots (R = experts + redundant)
    of stacked expert weights; the placement says which logical expert each slot holds.
    """

    def __init__(self, hidden_size: int, cfg: MoEConfig, ctx: ParallelContext, num_redundant: int = 0,
                 layer_idx: int = 0, dtype: torch.dtype = torch.float32, router_input_size: Optional[int] = None,
                 shared: Optional[nn.Module] = None):
        """`router_input_size`: width of the router's input when it is not the expert input x
        (NucleusMoE routes on [timestep embedding, unmodulated hidden]). `shared`: a module every
        token goes through, added to the routed sum (a model's own shared expert, replicated);
        without it, `cfg.num_shared_experts` built-in SwiGLU experts."""
        super().__init__()
        if cfg.routing == "token_choice" and cfg.top_k > cfg.num_experts:
            raise ConfigError("model.moe.top_k", cfg.top_k, f"must be <= model.moe.num_experts ({cfg.num_experts})")
        check_layout(cfg.num_experts, num_redundant, ctx.ep_size)
        self.cfg, self.ctx, self.layer_idx = cfg, ctx, layer_idx
        self.num_slots = cfg.num_experts + num_redundant
        self.slots_per_rank = self.num_slots // ctx.ep_size
        dev = ctx.device
        self.router = Router(router_input_size or hidden_size, cfg).to(device=dev, dtype=dtype)
        self.experts = GroupedExperts(self.slots_per_rank, hidden_size, cfg.expert_hidden_size, dtype, dev)
        if shared is None and cfg.num_shared_experts:
            shared = DenseMLP(hidden_size, cfg.num_shared_experts * cfg.expert_hidden_size, dtype, dev)
        self.shared = shared
        self.stats: Optional[ExpertLoadStats] = None
        # EP > 1: send each token once per destination rank (False: once per routed copy)
        self.dedup_tokens = True
        # EP > 1 with dedup: compute this rank's own pairs while the others' rows travel (two
        # expert passes over parts of the rows); 1.37x on 2 CPU ranks, not yet measured on GPUs
        # (docs/benchmarks.md 1e)
        self.overlap_own_rows = True
        self.wire_rows = 0      # token rows this rank sent to other ranks in the last forward
        # True while this rank's rows are padding (a rank with no prompt left runs a stand-in
        # batch): it takes part in the exchange with no rows and returns zeros
        self.idle = False
        self.timer: Optional[PhaseTimer] = None
        # EP = 1: the fused local path (local_path.py); False: the generic dispatch/combine
        self.fused_local = True
        # CUDA: run the shared expert on a side stream, overlapping the routed experts
        self.shared_side_stream = True
        self._side_stream: Optional[torch.cuda.Stream] = None
        self.placement: Placement = contiguous_placement(cfg.num_experts, num_redundant, ctx.ep_size)
        self._install_routing(self.placement)
        self.batch_invariant = resolve_batch_invariant(cfg.batch_invariant, dev)

    # ------------------------------------------------------------ batch invariance
    @property
    def batch_invariant(self) -> bool:
        """True: a token's output does not depend on the other tokens of the forward, the EP size or
        the placement (moe_ep/batch_invariant.py); one path at every EP size (one row per routed copy
        on the wire, a weighted sum in copy order), instead of the ones `dedup_tokens`,
        `overlap_own_rows` and `fused_local` pick."""
        return self._batch_invariant

    @batch_invariant.setter
    def batch_invariant(self, on: bool) -> None:
        self._batch_invariant = on
        self.experts.batch_invariant = on
        self.router.batch_invariant = on
        if on and self.experts.backend in ("quack", "triton+quack"):
            self.experts.backend = "triton"   # fixed Triton tile configs; QuACK's were not checked
        if hasattr(self.shared, "batch_invariant"):   # moe-ep's DenseMLP (a model's own module: as it is)
            self.shared.batch_invariant = on

    # ------------------------------------------------------------ placement
    @property
    def local_experts(self) -> list[int]:
        """Logical expert held by each of this rank's slots."""
        start = self.ctx.ep_rank * self.slots_per_rank
        return self.placement.phy2log[start:start + self.slots_per_rank].tolist()

    def _install_routing(self, placement: Placement) -> None:
        choices, nchoices = replica_choices(placement, self.ctx.ep_rank, self.ctx.ep_size)
        self._choices = choices.to(self.ctx.device)        # [E, max_rep]
        self._nchoices = nchoices.to(self.ctx.device)      # [E]
        self._has_replicas = bool((nchoices > 1).any())

    def set_placement(self, phy2log, weights: Optional[ExpertWeightSource] = None) -> None:
        """Install a placement; with `weights`, fill this rank's slots from it.

        Without `weights` the caller must already have put the right weights in the slots
        (the rebalancer does, after moving them between ranks).
        """
        placement = make_placement(phy2log, self.cfg.num_experts, self.ctx.ep_size, "placement")
        if placement.num_slots != self.num_slots:
            raise ConfigError("placement", placement.num_slots, f"layer has {self.num_slots} slots")
        self.placement = placement
        self._install_routing(placement)
        if weights is not None:
            self.load_expert_weights(weights)

    def load_expert_weights(self, weights: ExpertWeightSource) -> None:
        """Copy each local slot's logical-expert weights in."""
        for slot, expert in enumerate(self.local_experts):
            self.experts.set_slot(slot, *weights(expert))

    # ------------------------------------------------------------ forward
    # Inside a torch.compile'd model this layer runs eagerly: its kernels are fused by hand, and at
    # EP > 1 it reads split sizes back to the host and runs collectives.
    @torch.compiler.disable
    @torch.no_grad()
    def forward(self, x: torch.Tensor, router_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, S, H] (or [T, H] for token choice) -> the same shape.

        `router_input` [B, S, Hr] (default: x) is what the router scores; the experts see x.
        Expert choice picks tokens per sample, so it needs x as [B, S, H].
        """
        if self.idle:
            self._forward_rows(x[:0], None if router_input is None else router_input[:0])
            return x.new_zeros(x.shape)
        return self._forward_rows(x, router_input)

    def _forward_rows(self, x: torch.Tensor, router_input: Optional[torch.Tensor]) -> torch.Tensor:
        shape = x.shape
        r_in = x if router_input is None else router_input
        rows_per_sample = shape[1] if x.dim() == 3 else None
        x = x.reshape(-1, shape[-1])                                           # [T, H]
        shared_out = self._start_shared(x)                                     # [T, H] on a side stream, or None
        with maybe_phase(self.timer, "router"):
            copies = self.router.route(r_in)                                   # N copies
            if self.stats is not None:
                self.stats.record_copies(self.layer_idx, copies, rows_per_sample)
            slots = assign_slots(copies.expert, self._choices, self._nchoices,
                                 self.ctx.ep_rank, self._has_replicas)         # [N]
        if self.batch_invariant:
            out = self._forward_invariant(x, slots, copies)                    # [T, H]
        elif self.ctx.ep_size == 1 and self.fused_local:
            return self._forward_local(x, slots, copies, shared_out).view(shape)
        elif self.ctx.ep_size > 1 and self.dedup_tokens and self.overlap_own_rows:
            out = self._forward_overlapped(x, slots, copies)                   # [T, H]
        else:
            out = self._forward_exchanged(x, slots, copies)                    # [T, H]
        if self.shared is not None:
            out = out + self._shared_result(x, shared_out)
        return out.view(shape)

    def _forward_overlapped(self, x: torch.Tensor, slots: torch.Tensor, copies: RoutedCopies) -> torch.Tensor:
        """EP > 1, one row per (token, destination rank), this rank's own rows computed while the
        others travel (token_exchange.overlapped_exchange): x [T, H] -> routed sum [T, H]."""
        out, self.wire_rows = overlapped_exchange(x, slots, copies, self.ctx.ep_rank, self.ctx.ep_size,
                                                  self.slots_per_rank, self.ctx.ep_group, self.experts,
                                                  phase=lambda name: maybe_phase(self.timer, name))
        return out

    def _forward_invariant(self, x: torch.Tensor, slots: torch.Tensor, copies: RoutedCopies) -> torch.Tensor:
        """The batch-invariant path (moe_ep/batch_invariant.py), the same at every EP size: each
        routed copy's row to its slot's rank and its output back (EP = 1: the counting sort, the
        experts gathering x), then `ordered_combine`. x [T, H] -> routed sum [T, H]."""
        with maybe_phase(self.timer, "dispatch"):
            if self.ctx.ep_size == 1:
                plan = local_dispatch(slots, copies, self.slots_per_rank)
                self.wire_rows = 0
            else:
                rows, plan = dispatch(x, slots, copies, self.ctx.ep_size, self.slots_per_rank, self.ctx.ep_group)
                self.wire_rows = sum(plan.send_splits) - plan.send_splits[self.ctx.ep_rank]
        with maybe_phase(self.timer, "experts"):
            if self.ctx.ep_size == 1:
                per_copy = self.experts(x, plan.counts, row_index=plan.row_index)[plan.pos]   # [N, H] copy order
            else:
                y = self.experts(rows, plan.local_counts)                          # [M, H]
        with maybe_phase(self.timer, "combine"):
            if self.ctx.ep_size > 1:
                per_copy = returned_copies(y, plan, self.ctx.ep_group)         # [N, H] copy order
            return ordered_combine(per_copy, copies)

    def _forward_exchanged(self, x: torch.Tensor, slots: torch.Tensor, copies: RoutedCopies) -> torch.Tensor:
        """Exchange, then experts, then the way back: one row per (token, destination rank) with
        `dedup_tokens` at EP > 1, else one row per routed copy. x [T, H] -> routed sum [T, H]."""
        pairs = self.dedup_tokens and self.ctx.ep_size > 1
        group = self.ctx.ep_group
        with maybe_phase(self.timer, "dispatch"):
            if pairs:
                rows, plan = dispatch_pairs(x, slots, copies, self.ctx.ep_rank, self.ctx.ep_size,
                                            self.slots_per_rank, group)       # [M, H]
                self.wire_rows = plan.wire_rows
            else:
                rows, plan = dispatch(x, slots, copies, self.ctx.ep_size, self.slots_per_rank, group)  # [M, H]
                self.wire_rows = sum(plan.send_splits) - (plan.send_splits[self.ctx.ep_rank]
                                                          if plan.send_splits else 0)
        with maybe_phase(self.timer, "experts"):
            y = self.experts(rows, plan.local_counts)                          # [M, H]
        with maybe_phase(self.timer, "combine"):
            return combine_pairs(y, plan, group) if pairs else combine(y, copies, plan, group)

    def _forward_local(self, x: torch.Tensor, slots: torch.Tensor, copies: RoutedCopies,
                       shared_out: Optional[torch.Tensor]) -> torch.Tensor:
        """EP = 1: x [T, H], slots [N] -> [T, H]. Counting sort, experts gathering x on load
        with the routed weight in their epilogue, one gather-sum combine; no host sync."""
        with maybe_phase(self.timer, "dispatch"):
            plan = local_dispatch(slots, copies, self.slots_per_rank)
        with maybe_phase(self.timer, "experts"):
            y = self.experts(x, plan.counts, row_scale=plan.row_scale, row_index=plan.row_index)  # [N, H]
        with maybe_phase(self.timer, "combine"):
            shared = self._shared_result(x, shared_out) if self.shared is not None else None
            return local_combine(y, copies, plan, shared)                     # [T, H]

    # ------------------------------------------------------------ shared expert
    def _start_shared(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """On CUDA, start the shared expert on a side stream so it overlaps the routed path:
        x [T, H] -> its output [T, H] (not ready until `_shared_result`), else None."""
        if self.shared is None or not x.is_cuda or not self.shared_side_stream:
            return None
        main = torch.cuda.current_stream(x.device)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(x.device)
        self._side_stream.wait_stream(main)        # x is ready
        with torch.cuda.stream(self._side_stream):
            # No record_stream needed: the main stream waits for the side stream (below) before
            # the caller can free x, and the next side-stream work waits for the main stream.
            return self.shared(x)

    def _shared_result(self, x: torch.Tensor, started: Optional[torch.Tensor]) -> torch.Tensor:
        """The shared expert's output [T, H]: join the side stream, or compute it here."""
        if started is None:
            return self.shared(x)
        torch.cuda.current_stream(x.device).wait_stream(self._side_stream)
        return started
