"""On-device expert-load counters: per MoE layer x logical expert, no host sync per layer."""
from __future__ import annotations

import torch


class ExpertLoadCounter:
    """counts [L, E] int64 on the device; each MoE layer adds its routed token copies."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)

    def record(self, layer: int, expert_ids: torch.Tensor) -> None:
        """expert_ids [T, k] logical ids chosen by the router of MoE layer `layer`."""
        flat = expert_ids.reshape(-1)
        self.counts[layer].scatter_add_(0, flat, torch.ones_like(flat))

    def reset(self) -> None:
        self.counts.zero_()
