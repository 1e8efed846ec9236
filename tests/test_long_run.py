"""A short version of benchmarks/long_run.py (docs/reliability.md, "Long runs"): 200 forwards of
the tiny model on 2 gloo ranks with a rebalance every 3 windows migrated asynchronously, wandb
offline. After the warm-up (the first 40 forwards: allocator pools, wandb's threads) memory
stays flat, open file descriptors do not change, the thread count grows by wandb's writers at most, and metrics.jsonl gets
exactly one line per forward."""
from __future__ import annotations

import json
import os
import sys

import pytest

from mp import run_ranks
from tiny_job import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import long_run  # noqa: E402

FORWARDS, EVERY, WARM = 200, 20, 40
RSS_GROWTH_MIB = 16     # after warm-up; 2,000 forwards grew 2 MiB (docs/reliability.md)


def _rank(rank: int, world: int, out: str) -> None:
    long_run.rank_main(rank, world, out, FORWARDS, EVERY)


@pytest.mark.slow   # about 1 minute on 2 loaded cores
def test_a_long_run_leaks_no_memory_threads_or_files(tmp_path):
    out = str(tmp_path / "out")
    run_ranks(2, _rank, out)
    for rank in (0, 1):
        samples = json.load(open(os.path.join(out, f"long_run_rank{rank}.json")))
        final = samples[-1]
        assert final["num_forwards"] == FORWARDS and final["rebalances"] >= FORWARDS // 12 - 2, final
        warm = [s for s in samples if s["forward"] >= WARM and not s.get("final")]
        assert len(warm) >= 7
        growth = max(s["rss_mib"] for s in warm) - warm[0]["rss_mib"]
        assert growth < RSS_GROWTH_MIB, (rank, growth, samples)
        # wandb starts 2 writer threads at its first flush (forward ~250 of the 2,000-forward run), once;
        # a leak per rebalance would add one or more per 12 forwards
        assert max(s["threads"] for s in warm) <= warm[0]["threads"] + 2, (rank, samples)
        assert len({s["fds"] for s in warm}) == 1, (rank, samples)
        if rank == 0:
            for s in warm:
                assert s["metrics_lines"] == s["forward"], s     # one line per forward, written as it ends
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert sum(1 for _ in f) == FORWARDS
