"""Expert-load statistics: exact counts on real MoE layers, windows, buckets, files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from moe_ep.config import MoEConfig
from moe_ep.parallel import context_for_tests
from moe_ep.stats import ExpertLoadStats
from mp import run_ranks
from rebalance_helpers import inputs, make_stack, run_stack, tokens

E, K, NL = 8, 2, 2


def _ranks_counts(rank, world, ep_size):
    ctx = context_for_tests(rank, world, ep_size)
    layers = make_stack(ctx, NL, MoEConfig(num_experts=E, top_k=K, expert_hidden_size=24), 2 * ctx.ep_size)
    stats = ExpertLoadStats(NL, E, torch.device("cpu"), window_size=2, timestep_buckets=2, top_k=K)
    for layer in layers:
        layer.stats = stats
    ts = [0.9, 0.8, 0.3, 0.2]
    for fwd, t in enumerate(ts):
        x = inputs(rank, fwd)
        cond = x.shape[0] // 3
        stats.begin_forward(t, cond_rows=cond)
        run_stack(layers, x)
        # on this rank, before any reduction: every layer counted exactly its tokens x k
        open_counts = stats.counts.sum(dim=(0, 1))                       # [L, E]
        closed = stats.end_forward((ctx.ep_group, ctx.dp_group))
        if closed:
            w = stats.last_window                                         # [B, 2, L, E], all ranks
            glob = sum(tokens(r, f) for r in range(world) for f in (fwd - 1, fwd)) * K
            assert w.sum(axis=(0, 1, 3)).tolist() == [glob] * NL
            # the cond/uncond split: cond rows are the first third on every rank
            gcond = sum(tokens(r, f) // 3 for r in range(world) for f in (fwd - 1, fwd)) * K
            assert w[:, 0].sum(axis=(0, 2)).tolist() == [gcond] * NL
            # buckets: the first window is all t >= 0.5 (bucket 1), the second all bucket 0
            b = 1 if fwd == 1 else 0
            assert w[1 - b].sum() == 0 and w[b].sum() == glob * NL
        else:
            assert open_counts.sum(-1).tolist() == [tokens(rank, fwd) * K] * NL
    assert len(stats.windows) == stats.num_windows == 2
    assert np.array_equal(stats.windows[-1], stats.last_window.sum(axis=(0, 1)))
    doc = stats.to_json()
    assert np.asarray(doc["load"]).sum() == sum(tokens(r, f) for r in range(world) for f in range(4)) * K * NL


@pytest.mark.parametrize("world,ep_size", [(2, 2)])
def test_counts_sum_to_tokens_times_k(world, ep_size):
    run_ranks(world, _ranks_counts, ep_size)


def _filled_stats(buckets=2):
    s = ExpertLoadStats(2, 4, torch.device("cpu"), window_size=1, timestep_buckets=buckets, top_k=2)
    gen = torch.Generator().manual_seed(0)
    for t in (0.9, 0.1, 0.6):
        s.begin_forward(t, cond_rows=3)
        for l in range(2):
            s.record(l, torch.randint(0, 4, (7, 2), generator=gen))
        s.end_forward()
    return s


def test_save_load_seed_round_trip(tmp_path):
    s = _filled_stats()
    path = tmp_path / "sub" / "stats.json"
    s.save(str(path))
    assert os.listdir(path.parent) == ["stats.json"]                 # no temp file left behind
    assert json.loads(path.read_text()) == s.to_json()
    t = ExpertLoadStats(2, 4, torch.device("cpu"), window_size=1, timestep_buckets=2, top_k=2)
    assert t.last_window_load() is None
    t.load_seed(str(path))
    assert np.array_equal(t.last_window_load(), s.total().sum(axis=(0, 1)))
    assert np.array_equal(t.bucket_load(), s.total().sum(axis=1))
    # after one more window: the new counts plus the seed weighted as at most one window of this
    # run (seed_weight; tests/test_stats_seed.py)
    t.begin_forward(0.2)
    t.record(0, torch.tensor([[0, 1]]))
    t.end_forward()
    w = min(1.0, 2 / s.total()[:, :, 0].sum())                        # layer 0: 2 copies in the window
    assert t.bucket_load()[0, 0, 0] == pytest.approx(s.total().sum(axis=1)[0, 0, 0] * w + 1)
    assert np.array_equal(t.last_window_load(), t.windows[-1])


@pytest.mark.parametrize("edit,field", [
    (lambda d: d.update(num_layers=3), "num_layers"),
    (lambda d: d.update(num_experts=5), "num_experts"),
    (lambda d: d.update(format="moe-ep.placement"), "format"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.pop("load"), "load"),
    (lambda d: d.update(load=[[1, 2, 3, 4]]), "load"),
    (lambda d: d["load"][1].pop(), r"load'? ?\[1\]|load\[1\]|'load'"),
    (lambda d: d["load"][0].__setitem__(2, -1), r"load"),
    (lambda d: d["load"][0].__setitem__(2, float("nan")), r"load"),
    (lambda d: d["load"][0].__setitem__(2, "7"), r"load"),
    (lambda d: d["windows"][0]["load"].pop(), r"windows\[0\]\.load"),
    (lambda d: d["timestep_buckets"][1].pop("load"), r"timestep_buckets\[1\]"),
    (lambda d: d["branches"].update(cond=[[0] * 4]), "branches.cond"),
])
def test_load_seed_rejects_bad_files(tmp_path, edit, field):
    s = _filled_stats()
    doc = s.to_json()
    edit(doc)
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(doc))
    t = ExpertLoadStats(2, 4, torch.device("cpu"), timestep_buckets=2)
    with pytest.raises(ValueError, match=field):
        t.load_seed(str(path))
    assert t.seed_load is None                                        # nothing changed


def test_load_seed_corrupt_and_missing(tmp_path):
    t = ExpertLoadStats(2, 4, torch.device("cpu"))
    path = tmp_path / "stats.json"
    path.write_text('{"load": [[1, 2')
    with pytest.raises(ValueError, match="not valid JSON"):
        t.load_seed(str(path))
    with pytest.raises(ValueError, match="not found"):
        t.load_seed(str(tmp_path / "nope.json"))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        t.load_seed(str(path))


def test_bucket_of_clamps():
    s = ExpertLoadStats(1, 2, torch.device("cpu"), timestep_buckets=4)
    assert [s.bucket_of(t) for t in (0.0, 0.24, 0.25, 0.99, 1.0, 1.5, -1.0)] == [0, 0, 1, 3, 3, 3, 0]


def test_bounded_history_running_totals(tmp_path):
    """More windows than max_windows: totals and buckets still cover every window, the history is
    the last max_windows window loads, and the file round-trips through load_seed."""
    M, B = 3, 2
    s = ExpertLoadStats(2, 4, torch.device("cpu"), window_size=2, timestep_buckets=B, top_k=2, max_windows=M)
    gen = torch.Generator().manual_seed(1)
    full = []                                                         # every window [B, 2, L, E]
    for fwd in range(2 * 7):
        s.begin_forward((fwd % 5) / 5, cond_rows=2)
        for l in range(2):
            s.record(l, torch.randint(0, 4, (5, 2), generator=gen))
        if s.end_forward():
            full.append(s.last_window.copy())
    assert s.num_windows == len(full) == 7
    assert len(s.windows) == len(s.window_forwards) == M
    assert np.array_equal(s.total(), np.sum(full, axis=0))
    assert np.array_equal(s.bucket_load(), np.sum(full, axis=0).sum(axis=1))
    for w, f in zip(s.windows, full[-M:]):
        assert np.array_equal(w, f.sum(axis=(0, 1)))
    assert np.array_equal(s.last_window_load(), full[-1].sum(axis=(0, 1)))
    doc = s.to_json()
    assert len(doc["windows"]) == M
    assert np.array_equal(np.asarray(doc["load"]), np.sum(full, axis=0).sum(axis=(0, 1)))
    assert np.array_equal(np.asarray(doc["branches"]["uncond"]), np.sum(full, axis=0)[:, 1].sum(axis=0))
    path = tmp_path / "stats.json"
    s.save(str(path))
    t = ExpertLoadStats(2, 4, torch.device("cpu"), timestep_buckets=B, max_windows=M)
    data = t.load_seed(str(path))
    assert len(data["windows"]) == M
    assert np.array_equal(t.bucket_load(), s.bucket_load())
    # bucket_load hands out copies: callers cannot change the cached totals
    t.bucket_load()[0] += 1
    assert np.array_equal(t.bucket_load(), s.bucket_load())
    with pytest.raises(ValueError, match="max_windows"):
        ExpertLoadStats(2, 4, torch.device("cpu"), max_windows=0)
