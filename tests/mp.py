"""Run a function on N CPU ranks over gloo (the multi-process test harness).

Ranks are fresh processes for every call, forked from one forkserver that has imported torch,
moe_ep (its job, models and samplers), eplb, diffusers (its transformer and pipeline classes) and
pytest once per test session. Spawning them instead (each rank
importing torch anew) cost about 1.5 s per 2 ranks and 3.5 s per 4 ranks on a 2-core machine,
about half of the multi-rank tests' time.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Imported once in the forkserver; every rank forks from it with these already loaded
# (tests/rank_preload.py: the modules the packages below import lazily, on first use).
_PRELOAD = ["torch", "torch.distributed", "numpy", "pytest", "moe_ep", "eplb", "diffusers", "transformers",
            "rank_preload"]
multiprocessing.set_forkserver_preload(_PRELOAD)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, env: dict, fn, args):
    # A forked rank has the forkserver's environment; give it the caller's, as spawning would.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    except BaseException:
        # every failing rank's own traceback (the harness re-raises only the first rank to exit,
        # which is often a peer that lost its connection to the rank that really failed)
        print(f"--- rank {rank} of {world} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> None:
    """fn(rank, world, *args) on `world` new processes; an assertion in any rank fails the test."""
    mp.start_processes(_entry, args=(world, _free_port(), dict(os.environ), fn, args), nprocs=world,
                       join=True, start_method="forkserver")
