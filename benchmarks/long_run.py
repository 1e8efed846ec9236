"""A long CPU job for leaks: the tiny model (tests/tiny_job.py's shape) on 2 gloo ranks, EPLB on
with an asynchronous migration every few windows, wandb offline, metrics.jsonl. Every `every`
forwards each rank samples its own RSS, thread count and open file descriptors, and rank 0 the
sizes of metrics.jsonl and wandb/. docs/reliability.md ("Long runs") has the figures.

    PYTHONPATH=. nice python benchmarks/long_run.py --forwards 2000 --out /tmp/long_run

Prints one line per sample of rank 0 and writes <out>/long_run_rank<r>.json. tests/test_long_run.py
runs a short version (200 forwards) and asserts flat memory, constant threads and descriptors,
and one metrics.jsonl line per forward.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEPS = 4          # forwards per round (one image per rank per round)
TINY_MODEL = {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "moe_every": 1, "dense_hidden_size": 128,
              "in_channels": 4, "patch_size": 2, "text_dim": 64, "max_prompt_tokens": 32, "dtype": "float32",
              "seed": 0, "moe": {"num_experts": 8, "top_k": 2, "expert_hidden_size": 64, "num_shared_experts": 1}}


def job_config(out: str, forwards: int, world: int = 2, wandb: bool = True) -> dict:
    """`forwards` forwards on `world` ranks: forwards / STEPS rounds of one prompt per rank; a
    rebalance attempt every 3 windows of 4 forwards, always taken (min_gain -1), migrated
    asynchronously (one layer per forward)."""
    prompts = [f"prompt {i}" for i in range(forwards // STEPS * world)]
    return {"model": TINY_MODEL,
            "parallel": {"device": "cpu", "timeout_s": 120},
            "eplb": {"enabled": True, "num_redundant_experts": 4, "window_size": 4, "interval": 12, "min_gain": -1,
                     "migration": "async"},
            "sampling": {"prompts": prompts, "num_inference_steps": STEPS, "height": 16, "width": 16,
                         "batch_size": 1, "seed": 0},
            "telemetry": {"wandb": wandb, "wandb_mode": "offline", "log_images": False, "run_name": "long_run"},
            "output_dir": out}


def _proc_status() -> dict:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"])}


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if os.path.isfile(os.path.join(d, f)))


def sample(rank: int, forward: int, out: str, t0: float) -> dict:
    s = {"forward": forward, "t_s": round(time.perf_counter() - t0, 2), **_proc_status(),
         "fds": len(os.listdir("/proc/self/fd")), "py_threads": threading.active_count()}
    if rank == 0:
        metrics = os.path.join(out, "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics, "rb") as f:
                data = f.read()
            s.update(metrics_lines=data.count(b"\n"), metrics_bytes=len(data))
        s["wandb_bytes"] = _folder_bytes(os.path.join(out, "wandb"))
    return s


def rank_main(rank: int, world: int, out: str, forwards: int, every: int, wandb: bool = True,
              verbose: bool = False) -> list[dict]:
    """One rank of the job (process group already initialised); -> its samples (also written to
    <out>/long_run_rank<rank>.json)."""
    from moe_ep import config as config_mod
    from moe_ep import job
    from moe_ep.parallel import context_for_tests

    cfg = config_mod.from_dict(job_config(out, forwards, world, wandb))
    ctx = context_for_tests(rank, world, None)
    samples: list[dict] = []
    t0 = time.perf_counter()
    real_end = job.ForwardRecorder.on_forward_end

    def on_forward_end(self, step, t, info):
        real_end(self, step, t, info)
        if self.forward % every == 0:     # self.forward: forwards done so far
            samples.append(sample(rank, self.forward, out, t0))
            if verbose and rank == 0:
                print(json.dumps(samples[-1]), flush=True)

    job.ForwardRecorder.on_forward_end = on_forward_end
    try:
        summary = job.run(cfg, ctx, progress=False)
    finally:
        job.ForwardRecorder.on_forward_end = real_end
    samples.append(dict(sample(rank, summary["num_forwards"], out, t0), final=True,
                        rebalances=len(summary["rebalances"]), num_forwards=summary["num_forwards"]))
    from moe_ep.atomic import write_json_atomic
    write_json_atomic(os.path.join(out, f"long_run_rank{rank}.json"), samples)
    return samples


def _entry(rank: int, world: int, port: int, out: str, forwards: int, every: int, wandb: bool) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        rank_main(rank, world, out, forwards, every, wandb, verbose=True)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--forwards", type=int, default=2000)
    p.add_argument("--every", type=int, default=100, help="sample every this many forwards")
    p.add_argument("--out", default="outputs/long_run")
    p.add_argument("--no-wandb", action="store_true")
    args = p.parse_args(argv)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_entry, args=(2, port, args.out, args.forwards, args.every, not args.no_wandb), nprocs=2,
                       join=True, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
