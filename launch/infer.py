"""Sample images with the MoE diffusion transformer under expert parallelism.

    deepspeed --num_gpus 2 launch/infer.py --config configs/quickstart.json [--set section.key=value ...]
    python launch/infer.py --config configs/quickstart.json        # one rank, no launcher
    python launch/infer.py --config ... --print-launch-cmd --hostfile hostfile --num-nodes 2 --num-gpus 8

The config is validated (including sizes against the world size and the checkpoint
header) before any process group starts; a bad value prints one line
`error: config field 'x' = v: ...` and exits 2 with nothing written to output_dir.

When a rank dies or hangs while sampling, the others stop within `parallel.timeout_s` (or at
the launcher's SIGTERM) with `error: rank N lost contact with its peers during <phase>: ...`
and exit 1, leaving the images of finished batches and stats.json (closed windows) on disk.
A file under output_dir that cannot be written while the job runs (disk full) stops it with
`error: config field 'output_dir': rank N could not write <file>: ...` and exit 3, keeping
what was written before.
"""
from __future__ import annotations

import argparse
import collections
import os
import shlex
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_ep import config as config_mod  # noqa: E402
from moe_ep.config import ConfigError  # noqa: E402
from moe_ep.paths import PATH_FIELDS  # noqa: E402


def launch_command(hostfile: str | None, nodes: int, gpus: int, config: str,
                   overrides: list[str] | None = None, script: str = "launch/infer.py") -> list[str]:
    """The DeepSpeed launcher command line for `nodes` x `gpus` ranks (docs/model.md)."""
    cmd = ["deepspeed"]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if nodes > 1:
        cmd += ["--num_nodes", str(nodes)]
    cmd += ["--num_gpus", str(gpus), script, "--config", config]
    for item in overrides or []:
        cmd += ["--set", item]
    return cmd


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="JSON config (configs/*.json)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (JSON-parsed); repeatable")
    p.add_argument("--print-launch-cmd", action="store_true",
                   help="print the deepspeed command for --hostfile/--num-nodes/--num-gpus and exit")
    p.add_argument("--hostfile", default=None)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # from deepspeed
    return p.parse_args(argv)


PEER_LOST = 1  # exit status when a rank lost contact with its peers (2: bad config)
WRITE_FAILED = 3  # exit status when a file under output_dir could not be written mid-run


def error(err, who: str = "rank0") -> int:
    """One line on stderr. `who`: "rank0" (every rank finds the same error, or the ranks agreed on
    it), "node" (a check of this node's files: rank 0 and the first rank of every other node),
    "self" (an error of this rank alone: it says so itself)."""
    rank, local = os.environ.get("RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    if rank == "0":
        print(f"error: {err}", file=sys.stderr, flush=True)
    elif who == "self" or who == "node" and local == "0":
        print(f"error: rank {rank}: {err}", file=sys.stderr, flush=True)
    return 2


def config_error(err: ConfigError) -> int:
    """A bad config found before the process group: a file this node reads (the config itself,
    a path of it) is reported per node, anything else by rank 0."""
    return error(err, "node" if err.field_name == "--config" or err.field_name in PATH_FIELDS else "rank0")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_mod.load(args.config, args.set)
    except ConfigError as err:
        return config_error(err)
    except (ValueError, TypeError, RecursionError, OSError) as err:  # a file config.load cannot parse
        return error(f"config file {args.config!r} cannot be read: {type(err).__name__}: {err}", "node")
    if args.print_launch_cmd:
        print(shlex.join(launch_command(args.hostfile, args.num_nodes, args.num_gpus, args.config, args.set)))
        return 0

    from moe_ep.job import OutputWriteError, PeerLostError, RunInterrupted, preflight, run
    from moe_ep.parallel import init_distributed, shutdown

    try:
        preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        return config_error(err)
    try:
        ctx = init_distributed(cfg.parallel)
    except ConfigError as err:   # this rank's device (e.g. no GPU of its own): it says so itself
        return error(err, "self")
    except Exception as err:  # noqa: BLE001 - the rendezvous failed: a peer stopped in its checks (its own
        # line says why) or cannot be reached; one line per rank instead of a C++ stack dump
        first = (str(err).strip().splitlines() or [""])[0][:300]
        waited = f" within parallel.timeout_s ({cfg.parallel.timeout_s:g} s)" if "time" in first.lower() else ""
        print(f"error: rank {os.environ.get('RANK', '0')} could not join the process group{waited}: "
              f"{type(err).__name__}: {first}", file=sys.stderr, flush=True)
        return PEER_LOST

    def on_sigterm(signum, frame):  # the launcher stops every rank when one fails: end through the error path
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise RunInterrupted("SIGTERM")

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        summary = run(cfg, ctx, progress=not args.no_progress)
    except ConfigError as err:
        # the eplb files are checked on every rank and the ranks agree on one message (rank 0
        # prints it); anything else found mid-run (a user text encoder's output) is this rank's own
        shutdown()
        return error(err, "rank0" if err.field_name in ("eplb.stats_file", "eplb.placement_file") else "self")
    except PeerLostError as err:
        # every rank that notices says so (rank 0 may be the one that died); no process-group
        # teardown with dead peers: the caller exits at once (see __main__ below)
        print(f"error: {err}", file=sys.stderr, flush=True)
        return PEER_LOST
    except OutputWriteError as err:
        # the rank that could not write says so; its peers then stop through the launcher's SIGTERM
        print(f"error: {err}", file=sys.stderr, flush=True)
        if ctx.world_size == 1:  # no peers to wait on
            shutdown()
        return WRITE_FAILED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    shutdown()
    if ctx.is_main:
        print(f"wrote {len(summary['images'])} images, stats.json and summary.json to {cfg.output_dir} "
              f"({summary['wall_s']:.1f} s sampling, {summary['tokens_per_s']:.0f} tokens/s, "
              f"balancedness {summary['balancedness']['mean']:.3f}, {rebalance_line(summary['rebalances'])})")
    return 0


def rebalance_line(events: list[dict]) -> str:
    """'3 of 8 rebalances moved experts (5 skipped)': what the attempts in summary.json did."""
    others = collections.Counter(str(e.get("status")) for e in events if not e.get("ok"))
    rest = ", ".join(f"{n} {status}" for status, n in sorted(others.items()))
    moved = len(events) - sum(others.values())
    return f"{moved} of {len(events)} rebalances moved experts" + (f" ({rest})" if rest else "")


if __name__ == "__main__":
    rc = main()
    if rc in (PEER_LOST, WRITE_FAILED):  # do not wait on a process group (or threads) whose peers are gone
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
