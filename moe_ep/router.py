"""Router: token scores -> routed copies, the (token, logical expert, weight) triples of a layer.

The rule is data (`MoEConfig`), not code: token choice (each token picks its top-k experts,
with softmax or sigmoid scores, DeepSeek-V3 group limiting, renormalisation and a route scale)
or expert choice (each expert picks its top-C tokens of every sample, the NucleusMoE rule).
Whatever the rule, the rest of the layer sees `RoutedCopies`: a token may reach 0..E experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batch_invariant import blocked_linear
from .config import MoEConfig
from .parallel_layout import ParallelLayout
from .sequence_parallel import unshard_sequence


@dataclass
class RoutedCopies:
    """The N routed copies of one forward: copy i sends row `token[i]` of the layer input to
    logical expert `expert[i]`, and its output comes back multiplied by `weight[i]`.

    Token choice keeps the regular layout `token = arange(T).repeat_interleave(k)` implicit
    (`token is None`, `top_k = k`), which lets the combine sum over k with one batched product.
    """

    expert: torch.Tensor             # [N] int64 logical expert of each copy
    weight: torch.Tensor             # [N] float32 routed weight of each copy
    num_tokens: int                  # T, rows of the layer input
    token: Optional[torch.Tensor] = None   # [N] int64 input row of each copy; None: copy i is row i // top_k
    top_k: Optional[int] = None      # k of the regular layout (token is None)
    _rows: Optional[torch.Tensor] = field(default=None, repr=False)   # rows() of the regular layout, made once

    @property
    def num_copies(self) -> int:
        return self.expert.numel()

    def rows(self) -> torch.Tensor:
        """[N] int64 input row of every copy (the regular layout materialised once: the stats and
        the exchange both ask)."""
        if self.token is not None:
            return self.token
        if self._rows is None:
            self._rows = torch.arange(self.num_copies, device=self.expert.device) // self.top_k
        return self._rows


def fp32_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., Hr] @ weight [E, Hr]^T in float32: [..., E].

    On CUDA with bf16/fp16 operands, one matmul that accumulates and writes float32 (the same
    exact products, summed in float32) instead of up-casting x first: 0.04 ms instead of 0.21 ms
    for [8192, 4096] x [64, 4096] on an H200 (docs/benchmarks.md section 1d).
    """
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype:
        flat = x.reshape(-1, x.shape[-1])                                 # [T, Hr]
        return torch.mm(flat, weight.t(), out_dtype=torch.float32).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x.float(), weight.float())


class Router(nn.Module):
    """Gate scores -> routed copies, by the rule in `cfg` (see the module docstring).

    Group-limited routing follows DeepSeek-V3: experts are split into `n_group` groups, a
    group scores by its best expert (softmax) or its two best (sigmoid), and a token picks
    its k experts from its `topk_group` best groups only.
    """

    def __init__(self, input_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(input_size, cfg.num_experts, bias=False)
        # Sequence parallel (moe_ep/models/diffusers/context_parallel.py sets it): the input's
        # samples are this rank's contiguous shard of each sample's tokens, and expert choice
        # picks over the whole sample (gathered scores), keeping the picks of this shard.
        self.sequence_layout: Optional[ParallelLayout] = None
        # True: the gate's product in fixed row blocks (moe_ep/batch_invariant.py), so a token's
        # scores do not depend on the other tokens. Set by MoELayer from model.moe.batch_invariant.
        self.batch_invariant = False

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., Hr] -> scores [..., E]: float32, or in x's dtype with `score_dtype = "input"`."""
        if self.cfg.score_dtype == "input":
            # The model's own numerics: logits in the input dtype, the non-linearity in float32
            # and rounded back (what diffusers' HiDream and NucleusMoE gates compute).
            w = self.gate.weight.to(x.dtype)
            logits = blocked_linear(x, w) if self.batch_invariant else F.linear(x, w)
            act = logits.float().softmax(-1) if self.cfg.score_func == "softmax" else logits.float().sigmoid()
            return act.to(x.dtype)
        # float32 scores (as DeepSpeed and DeepSeek do): bf16 logits would flip near-ties and
        # route tokens differently from a float32 reference.
        if self.batch_invariant:
            logits = blocked_linear(x.float(), self.gate.weight.float())  # [..., E] float32
        else:
            logits = fp32_logits(x, self.gate.weight)                     # [..., E] float32
        return logits.softmax(-1) if self.cfg.score_func == "softmax" else logits.sigmoid()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token choice. x [T, Hr] -> (weights [T, k] float32, expert ids [T, k] int64)."""
        return self.top_k(self.scores(x))

    def top_k(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token choice on given scores [T, E] -> (weights [T, k] float32, ids [T, k] int64).
        Differentiable in the weights (training uses it with its own scores for an aux loss)."""
        cfg = self.cfg
        choose_from = scores
        if cfg.n_group > 1:
            grouped = scores.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)  # [T, G, E/G]
            if cfg.score_func == "sigmoid" and grouped.shape[-1] >= 2:
                group_score = grouped.topk(2, dim=-1).values.sum(-1)      # [T, G]
            else:
                group_score = grouped.amax(-1)                            # [T, G]
            keep = group_score.topk(cfg.topk_group, dim=-1).indices       # [T, topk_group]
            mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choose_from = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view_as(scores)
        ids = choose_from.topk(cfg.top_k, dim=-1).indices                 # [T, k]
        weights = scores.gather(1, ids)                                   # [T, k]
        if cfg.renormalize and cfg.top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        if cfg.route_scale != 1.0:
            weights = weights * cfg.route_scale
        return weights.float(), ids

    def expert_choice(self, x: torch.Tensor) -> RoutedCopies:
        """Expert choice. x [B, S, Hr] -> copies ordered (expert, sample, rank among its picks).

        Every expert takes the C best-scoring tokens of every sample, C = max(1, ceil(
        capacity_factor * S / E)) (at most S); a copy's weight is its score divided by the sum of
        the scores of all experts that chose that token (+1e-12), times route_scale.

        Under sequence parallelism (`sequence_layout` with sp > 1) x holds this rank's shard
        [B, S/sp, Hr] of every sample: the scores are all-gathered over the sp group, the experts
        choose over the whole sample (C from the whole S) exactly as on one rank, and only the
        copies of this shard's tokens are kept (token = row of x). Collective over the sp group.
        """
        B, n, _ = x.shape
        if B == 0 or n == 0:   # an idle rank: every rank of its sp group is idle too (same prompts)
            empty = torch.zeros(0, dtype=torch.int64, device=x.device)
            return RoutedCopies(empty, empty.float(), B * n, token=empty)
        scores = self.scores(x)                                           # [B, n, E]
        layout = self.sequence_layout
        if layout is None or layout.sp == 1:
            return expert_choice_copies(scores, self.cfg)
        full = unshard_sequence(scores, layout, dim=1)                    # [B, S, E], shards in sp order
        return expert_choice_copies(full, self.cfg, shard=(layout.index("sp") * n, n))

    def route(self, x: torch.Tensor) -> RoutedCopies:
        """x [B, S, Hr] or [T, Hr] (token choice only) -> the routed copies of its rows."""
        if self.cfg.routing == "expert_choice":
            if x.dim() != 3:
                raise ValueError(f"expert-choice routing needs the input as [samples, tokens, features], "
                                 f"got shape {tuple(x.shape)}")
            return self.expert_choice(x)
        flat = x.reshape(-1, x.shape[-1])                                 # [T, Hr]
        weights, ids = self(flat)                                         # [T, k] each
        return RoutedCopies(ids.reshape(-1), weights.reshape(-1), flat.shape[0], top_k=self.cfg.top_k)


def expert_choice_copies(scores: torch.Tensor, cfg: MoEConfig,
                         shard: Optional[tuple[int, int]] = None) -> RoutedCopies:
    """Expert choice on the scores of whole samples, scores [B, S, E] -> copies ordered (expert,
    sample, rank among its picks) (Router.expert_choice has the rule).

    shard (start, n): keep only the copies of tokens [start, start + n) of every sample, their
    rows numbered as in a [B, n] shard (b * n + token - start). The choice and the weights are
    those of the whole sample; a token's weight needs only the experts that chose it.
    """
    B, S, E = scores.shape
    # min first: a huge (finite) capacity_factor makes cf * S / E inf, which ceil cannot take
    capacity = max(1, math.ceil(min(float(S), cfg.capacity_factor * S / E)))
    affinity = scores.transpose(1, 2)                                     # [B, E, S]
    picked = affinity.topk(capacity, dim=-1)                              # [B, E, C]
    position = picked.indices.transpose(0, 1).reshape(-1)                 # [E*B*C] token within its sample
    sample = torch.arange(B, device=scores.device).view(1, B, 1).expand(E, B, capacity).reshape(-1)  # [E*B*C]
    token = sample * S + position                                         # [E*B*C] row of [B*S]
    score = picked.values.transpose(0, 1).reshape(-1)                     # [E*B*C]
    expert = torch.arange(E, device=scores.device).repeat_interleave(B * capacity)  # [E*B*C]
    total = torch.zeros(B * S, device=scores.device, dtype=score.dtype).scatter_add_(0, token, score)  # [B*S]
    weight = score / (total[token] + 1e-12) * cfg.route_scale
    if shard is None:
        return RoutedCopies(expert, weight.float(), B * S, token=token)
    start, n = shard
    mine = (position >= start) & (position < start + n)                   # [E*B*C]
    local = sample[mine] * n + (position[mine] - start)
    return RoutedCopies(expert[mine], weight[mine].float(), B * n, token=local)
