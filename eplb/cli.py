"""Command line: ``python -m eplb plan ...``, ``python -m eplb bench [--quick]``, ``python -m eplb simulate ...``
and ``python -m eplb simulate-layouts ...``."""
from __future__ import annotations

import argparse
import os
import sys

from .io import load_placement, load_stats, save_placement
from .metrics import plan_balancedness
from .rebalance import POLICIES, rebalance_experts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eplb", description="Expert-parallel load balancing planner")
    sub = p.add_subparsers(dest="cmd", required=True)
    plan = sub.add_parser("plan", help="plan a placement from a stats file")
    plan.add_argument("--stats", required=True, help="expert-load stats file (docs/formats.md)")
    plan.add_argument("--replicas", type=int, required=True, help="physical slots per layer R")
    plan.add_argument("--groups", type=int, default=1, help="expert groups G (hierarchical when G %% N == 0)")
    plan.add_argument("--nodes", type=int, default=1, help="nodes N")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs P (EP ranks)")
    plan.add_argument("--policy", default="default", choices=POLICIES)
    plan.add_argument("--out", help="placement file to write (atomically)")
    plan.add_argument("--previous", help="current placement file: keep experts in place where possible")
    plan.add_argument("--max-moves", type=int, help="with --previous: a layer whose plan changes more slots keeps its placement")
    plan.add_argument("--no-drift-hedge", action="store_true", help="default policy: keep the plan best on the stats alone")
    bench = sub.add_parser("bench", help="compare greedy and default on synthetic loads")
    bench.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    bench.add_argument("--seeds", type=int, nargs="+", help="seed offsets of the synthetic loads (default: 0)")
    from .simulate import add_parser as add_simulate_parser
    add_simulate_parser(sub)
    from .simulate_layouts import add_parser as add_layouts_parser
    add_layouts_parser(sub)
    return p


def _check_out(path: str) -> None:
    """--out must be a file name in an existing, writable folder (checked before any planning)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--out {path}: is a folder, must be a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"--out {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {path}: folder {folder} is not writable")


def _named(flag: str, read, path: str):
    """read(path), with the flag that named the file in front of any error (`--stats run.json: ...`)."""
    try:
        return read(path)
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(f"{flag} {msg if msg.startswith(str(path)) else f'{path}: {msg}'}") from None


def _plan(args) -> int:
    if args.max_moves is not None and not args.previous:
        raise ValueError("--max-moves: needs --previous (the placement whose moves it limits)")
    if args.out:
        _check_out(args.out)
    stats = _named("--stats", load_stats, args.stats)
    load = stats["load"]  # [L, E]
    L, E = load.shape
    prev = None
    if args.previous:
        prev = _named("--previous", load_placement, args.previous)
        if prev.shape != (L, args.replicas):
            raise ValueError(f"--previous: phy2log shape {prev.shape} does not match ({L}, {args.replicas})")
    opts = dict(policy=args.policy, previous_phy2log=prev, max_moves=args.max_moves, drift_hedge=not args.no_drift_hedge)
    phy2log, _, logcnt = rebalance_experts(load, args.replicas, args.groups, args.nodes, args.gpus, **opts)
    P = args.gpus
    if args.replicas == E:
        contiguous = [list(range(E))] * L  # [L, E] expert e in slot e
        print(f"balancedness before (contiguous, no replicas): {plan_balancedness(load, contiguous, P):.4f}")
    if args.policy != "greedy":
        greedy, _, _ = rebalance_experts(load, args.replicas, args.groups, args.nodes, args.gpus, policy="greedy")
        print(f"balancedness greedy: {plan_balancedness(load, greedy, P):.4f}")
    print(f"balancedness after ({args.policy}): {plan_balancedness(load, phy2log, P):.4f}")
    if prev is not None:
        moved = int((phy2log.numpy() != prev).sum())
        print(f"experts moved vs --previous: {moved} of {prev.size} slots")
    if args.out:
        save_placement(args.out, phy2log, args.gpus, args.nodes, num_experts=E)
        print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "plan":
            return _plan(args)
        if args.cmd == "simulate":
            from .simulate import run_cli
            return run_cli(args)
        if args.cmd == "simulate-layouts":
            from .simulate_layouts import run_cli as run_layouts
            return run_layouts(args)
        from .bench import main as bench_main
        return bench_main(quick=args.quick, seeds=args.seeds)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
