"""Grouped experts: the grouped-GEMM path and the per-slot fallback compute the same function."""
from __future__ import annotations

import pytest
import torch

from fake_quack import quack_on_cpu
from moe_ep.experts import GroupedExperts, gate_up_blocks, interleave_gate_up
from reference import plain_swiglu


@pytest.mark.parametrize("counts", [[5, 0, 20, 5], [0, 0, 0, 7], [1, 1, 1, 1], [0, 0, 0, 0]])
def test_grouped_and_fallback_match_per_slot_reference(counts):
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 8)
    experts.w13.data.normal_()
    experts.w2.data.normal_()
    x = torch.randn(sum(counts), 16)
    c = torch.tensor(counts)
    # written out in float64 (tests/reference.py), not the runtime's swiglu that the per-slot path calls
    ref = torch.cat([plain_swiglu(xs, experts.w13[s], experts.w2[s]) for s, xs in enumerate(x.split(counts))]) \
        .float() if sum(counts) else torch.zeros(0, 16)
    for backend in ("grouped_mm", "loop"):
        experts.backend = backend
        out = experts(x, c)
        assert out.shape == (sum(counts), 16)
        assert torch.allclose(out, ref, atol=1e-5), (backend, (out - ref).abs().max())


def test_interleaved_columns_pair_each_gate_with_its_up():
    H, Fh = 3, 4
    w13 = torch.arange(H * 2 * Fh, dtype=torch.float32).view(H, 2 * Fh)       # [gate | up]
    pairs = interleave_gate_up(w13)
    for j in range(Fh):                                                        # written out plainly
        assert torch.equal(pairs[:, 2 * j], w13[:, j]) and torch.equal(pairs[:, 2 * j + 1], w13[:, Fh + j])
    assert torch.equal(gate_up_blocks(pairs), w13)
    stacked = torch.randn(5, H, 2 * Fh)
    assert torch.equal(gate_up_blocks(interleave_gate_up(stacked)), stacked)


def test_quack_backend_stores_w13_interleaved_and_keeps_the_weights():
    """Switching to and from the "quack" path re-lays w13 out in place; set_slot / slot_weights
    speak [gate | up] either way; the quack path (CPU stand-ins for QuACK's kernels) computes the
    per-slot reference, with routed weights and a row index."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 8)
    blocks = [(torch.randn(16, 16), torch.randn(8, 16)) for _ in range(4)]
    for s, (w13, w2) in enumerate(blocks):
        experts.set_slot(s, w13, w2)
    experts.backend = "loop"
    experts.backend = "quack"
    assert experts.paired
    assert torch.equal(experts.w13.data[1], interleave_gate_up(blocks[1][0]))
    assert all(torch.equal(experts.slot_weights(s)[0], blocks[s][0]) for s in range(4))
    experts.set_slot(2, *blocks[3])
    assert torch.equal(experts.w13.data[2], interleave_gate_up(blocks[3][0]))
    experts.set_slot(2, *blocks[2])

    counts = [5, 0, 20, 3]
    x = torch.randn(40, 16)
    row_index = torch.randint(0, 40, (sum(counts),))
    scale = torch.rand(sum(counts))
    xs = x[row_index].split(counts)
    ref = (torch.cat([plain_swiglu(xs[s], *blocks[s]) for s in range(4)]) * scale[:, None]).float()
    with quack_on_cpu():
        out = experts(x, torch.tensor(counts), row_scale=scale, row_index=row_index)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()

    experts.backend = "loop"                                                  # back to [gate | up]
    assert not experts.paired and all(torch.equal(experts.w13.data[s], blocks[s][0]) for s in range(4))
    assert torch.allclose(experts(x, torch.tensor(counts), row_scale=scale, row_index=row_index), ref, atol=1e-4)
    with pytest.raises(ValueError, match="experts.backend must be one of"):
        experts.backend = "cutlass"
