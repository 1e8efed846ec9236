"""Sequence-parallel attention (Ulysses, ring, Ulysses x ring) on gloo ranks against plain
single-process attention over the whole, unsharded sequence."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from moe_ep.config import ConfigError, ParallelConfig
from moe_ep.parallel import build_context
from moe_ep.parallel_layout import ParallelLayout
from moe_ep.sequence_parallel import sequence_parallel_attention, shard_sequence, unshard_sequence
from mp import run_ranks

B, H, N, T, D = 2, 4, 8, 3, 8


def reference(q, k, v, tq=None, tk=None, tv=None, mask=None):
    """softmax(Q K^T / sqrt(D)) V over [image; text] tokens, written out: -> (image, text) outputs."""
    if tq is not None:
        q, k, v = torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])              # [B, H, N+T, N+T]
    if mask is not None:
        keep = torch.cat([torch.ones(q.shape[0], N, dtype=torch.bool), mask], 1)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, -1) @ v
    return out[:, :, :N], (out[:, :, N:] if tq is not None else None)


def _inputs():
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(B, H, N, D, generator=g) for _ in range(3)]
    text = [torch.randn(B, H, T, D, generator=g) for _ in range(3)]
    mask = torch.tensor([[True, True, False], [False, False, False]])      # sample 1: all text padded
    return full, text, mask


def _check(rank, world, ulysses, ring):
    ctx = build_context(ParallelConfig(ulysses_degree=ulysses, ring_degree=ring, timeout_s=30), rank, world,
                        torch.device("cpu"))
    lay = ctx.layout
    (q, k, v), text, mask = _inputs()
    shards = [shard_sequence(x, lay, dim=2) for x in (q, k, v)]
    i, n = lay.index("sp"), N // lay.sp
    assert torch.equal(shards[0], q[:, :, i * n:(i + 1) * n])               # contiguous, in sp-rank order
    for case, (tx, m) in {"image only": (None, None), "joint": (text, None), "joint, padded": (text, mask)}.items():
        tq, tk, tv = tx or (None, None, None)
        out, text_out = sequence_parallel_attention(*shards, lay, tq, tk, tv, text_key_mask=m)
        want, want_text = reference(q, k, v, tq, tk, tv, m)
        torch.testing.assert_close(out, want[:, :, i * n:(i + 1) * n], msg=f"{case}: image shard {i}")
        torch.testing.assert_close(unshard_sequence(out, lay, dim=2), want, msg=f"{case}: unsharded")
        if tx is None:
            assert text_out is None
            continue
        torch.testing.assert_close(text_out, want_text, msg=f"{case}: text")
        # text keys without text queries (NucleusMoE): the same image output, no text output
        out_k, no_text = sequence_parallel_attention(*shards, lay, None, tk, tv, text_key_mask=m)
        assert no_text is None
        torch.testing.assert_close(out_k, want[:, :, i * n:(i + 1) * n], msg=f"{case}: text keys only")
        every = [torch.empty_like(text_out) for _ in range(lay.sp)]
        dist.all_gather(every, text_out, group=lay.group("sp"))
        assert all(torch.equal(e, text_out) for e in every), f"{case}: text output differs between sp ranks"


def _two_ranks(rank, world):
    _check(rank, world, ulysses=2, ring=1)
    _check(rank, world, ulysses=1, ring=2)


def _four_ranks(rank, world):
    _check(rank, world, ulysses=2, ring=2)
    _check(rank, world, ulysses=1, ring=2)      # dp 2 x ring 2: two images' rings side by side
    _check(rank, world, ulysses=1, ring=4)      # a ring longer than a swap: blocks travel one way
    # every axis's process group holds the ranks the layout says it does
    ctx = build_context(ParallelConfig(cfg_parallel_size=2, ring_degree=2, ep_size=2, timeout_s=30), rank, world,
                        torch.device("cpu"))
    for axis in ("cfg", "ring", "sp", "ep", "ep_replica"):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=ctx.layout.group(axis))
        assert t.item() == sum(ctx.layout.members(axis)), axis


def test_ulysses_and_ring_on_two_ranks():
    run_ranks(2, _two_ranks)


def test_ulysses_inside_ring_on_four_ranks():
    run_ranks(4, _four_ranks)


def test_heads_and_tokens_that_do_not_divide_are_refused():
    lay = ParallelLayout(world_size=2, ulysses=2)                          # no process group needed
    with pytest.raises(ConfigError) as err:
        sequence_parallel_attention(*(torch.zeros(1, 3, 4, 8) for _ in range(3)), lay)
    assert err.value.field_name == "parallel.ulysses_degree" and "heads (3)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        shard_sequence(torch.zeros(1, 5, 8), ParallelLayout(world_size=4, ring=2, ulysses=2))
    assert err.value.field_name == "parallel.sequence_parallel_size" and "(5;" in str(err.value)
