"""Grouped experts: the grouped-GEMM path and the per-slot fallback compute the same function."""
from __future__ import annotations

import pytest
import torch

from moe_ep.experts import GroupedExperts, swiglu


@pytest.mark.parametrize("counts", [[5, 0, 20, 5], [0, 0, 0, 7], [1, 1, 1, 1], [0, 0, 0, 0]])
def test_grouped_and_fallback_match_per_slot_reference(counts):
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 8)
    experts.w13.data.normal_()
    experts.w2.data.normal_()
    x = torch.randn(sum(counts), 16)
    c = torch.tensor(counts)
    ref = torch.cat([swiglu(xs, experts.w13[s], experts.w2[s]) for s, xs in enumerate(x.split(counts))]) \
        if sum(counts) else torch.zeros(0, 16)
    for use_grouped in (True, False):
        experts.use_grouped_mm = use_grouped
        out = experts(x, c)
        assert out.shape == (sum(counts), 16)
        assert torch.allclose(out, ref, atol=1e-5), (use_grouped, (out - ref).abs().max())
