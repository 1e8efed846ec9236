"""Router: token scores -> top-k logical experts and their weights."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MoEConfig


class Router(nn.Module):
    """Softmax or sigmoid scores, optional group-limited routing, top-k, renormalise, scale.

    Group-limited routing follows DeepSeek-V3: experts are split into `n_group` groups, a
    group scores by its best expert (softmax) or its two best (sigmoid), and a token picks
    its k experts from its `topk_group` best groups only.
    """

    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(hidden_size, cfg.num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] float32, expert ids [T, k] int64)."""
        cfg = self.cfg
        # Scores in float32 (as DeepSpeed and DeepSeek do): bf16 logits would flip near-ties
        # and route tokens differently from a float32 reference.
        logits = F.linear(x.float(), self.gate.weight.float())           # [T, E]
        scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
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
        return weights, ids
