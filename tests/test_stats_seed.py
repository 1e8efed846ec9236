"""A stats seed (eplb.stats_file) from a much longer run counts as at most one window of the new run
where it adds to the new run's counts (ExpertLoadStats.seed_weight, docs/eplb_runtime.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_ep.stats import ExpertLoadStats

L, E, K, B = 2, 8, 2, 2          # MoE layers, experts, top-k, timestep buckets
TOKENS = 64                      # tokens per forward


def forwards(stats: ExpertLoadStats, hot: int, n: int, seed: int = 0) -> None:
    """n forwards whose tokens all pick expert `hot` first (plus one other), half in each bucket."""
    g = torch.Generator().manual_seed(seed)
    for f in range(n):
        stats.begin_forward(timestep=0.25 if f % 2 else 0.75)
        for layer in range(L):
            other = (hot + 1 + torch.randint(0, E - 1, (TOKENS, 1), generator=g)) % E      # [T, 1] never hot
            ids = torch.cat([torch.full((TOKENS, 1), hot), other], 1)                    # [T, k]
            stats.record(layer, ids)
        stats.end_forward()


def new_stats() -> ExpertLoadStats:
    return ExpertLoadStats(L, E, torch.device("cpu"), window_size=2, timestep_buckets=B, top_k=K)


@pytest.fixture
def long_seed(tmp_path):
    """A stats file of a run 100x longer than the ones below (200 windows), expert 0 hot."""
    old = new_stats()
    forwards(old, hot=0, n=400)
    path = tmp_path / "stats.json"
    old.save(str(path))
    return str(path), old.bucket_load()                                          # [B, L, E]


def test_seed_from_a_long_run_counts_as_one_window(long_seed):
    path, seed_buckets = long_seed
    run = new_stats()
    run.load_seed(path)
    assert np.array_equal(run.bucket_load(), seed_buckets)          # alone (no window yet): as read
    assert np.array_equal(run.last_window_load(), seed_buckets.sum(0))
    forwards(run, hot=5, n=6, seed=1)                                # 3 windows, expert 5 hot
    assert run.num_windows == 3
    own = run.total().sum(axis=1).astype(np.float64)                 # [B, L, E] this run's counts
    window = own.sum(axis=(0, 2)) / 3                                # [L] mean window load
    w = run.seed_weight()                                            # [L]
    assert np.allclose(w, window / seed_buckets.sum(axis=(0, 2))) and (w < 0.02).all()
    got = run.bucket_load()
    assert np.allclose(got, own + seed_buckets * w[None, :, None])
    # the seed is one window's worth of tokens: a quarter of the total after 3 windows
    assert np.allclose((got - own).sum(axis=(0, 2)), window)
    assert np.allclose((got - own).sum(axis=(0, 2)) / got.sum(axis=(0, 2)), 1 / 4)
    # and the new run's hot expert leads in every bucket and layer (the raw seed would hide it)
    assert (got.argmax(-1) == 5).all()
    assert ((own + seed_buckets).argmax(-1) == 0).all()
    assert np.array_equal(run.last_window_load(), run.windows[-1].astype(np.float64))


def test_seed_shorter_than_a_window_keeps_its_counts(tmp_path):
    short = ExpertLoadStats(L, E, torch.device("cpu"), window_size=1, timestep_buckets=B, top_k=K)
    forwards(short, hot=0, n=1)                                      # half a window of the run below
    path = tmp_path / "short.json"
    short.save(str(path))
    run = new_stats()
    run.load_seed(str(path))
    forwards(run, hot=5, n=4, seed=2)
    assert np.array_equal(run.seed_weight(), np.ones(L))
    own = run.total().sum(axis=1).astype(np.float64)
    assert np.array_equal(run.bucket_load(), own + short.bucket_load())


def test_all_zero_seed_adds_nothing(tmp_path):
    zero = new_stats()
    path = tmp_path / "zero.json"
    zero.save(str(path))                                             # no windows: all-zero loads
    run = new_stats()
    run.load_seed(str(path))
    forwards(run, hot=3, n=2)
    assert np.array_equal(run.bucket_load(), run.total().sum(axis=1).astype(np.float64))
