"""``python -m eplb bench``: greedy vs default on seeded synthetic loads, judged on the next window too."""
from __future__ import annotations

import math
import time

import numpy as np

from .greedy import greedy_reference
from .metrics import lower_bound_balancedness, plan_balancedness
from .rebalance import rebalance_experts
from .synthetic import zipf_windows

# (layers, experts, replicas, groups, nodes, gpus)
SIZES = (
    (4, 8, 12, 4, 2, 4),
    (12, 16, 16, 1, 1, 4),
    (24, 64, 80, 8, 2, 8),
    (58, 256, 288, 8, 4, 32),
    (58, 256, 320, 1, 1, 64),
    (58, 256, 320, 32, 8, 64),
    (58, 256, 320, 8, 8, 64),
)
SKEWS = (0.8, 1.1, 1.5)
QUICK_SIZES = (SIZES[0], SIZES[2], SIZES[-1])


def _time(fn, repeat: int) -> tuple[float, object]:
    """Best-of-``repeat`` wall time in ms and the last result."""
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3, out


def run(quick: bool = False, seed: int = 0, repeat: int = 3) -> list[dict]:
    """Run every case; returns one dict per (size, skew) with balancedness and runtimes (ms)."""
    rows = []
    sizes = QUICK_SIZES if quick else SIZES
    skews = (SKEWS[0], SKEWS[-1]) if quick else SKEWS
    for ci, (L, E, R, G, N, P) in enumerate(sizes):
        for si, skew in enumerate(skews):
            w1, w2 = zipf_windows(seed + 100 * ci + si, L, E, skew)
            hier = G % N == 0
            t_g, (pg, _, _) = _time(lambda: rebalance_experts(w1, R, G, N, P, policy="greedy"), repeat)
            t_r, pr = _time(lambda: greedy_reference(w1, R, G if hier else 1, N if hier else 1, P), 1)
            t_d, (pd, _, _) = _time(lambda: rebalance_experts(w1, R, G, N, P), repeat)
            rows.append(dict(
                L=L, E=E, R=R, G=G, N=N, P=P, skew=skew,
                greedy=plan_balancedness(w1, pg, P), default=plan_balancedness(w1, pd, P),
                greedy_next=plan_balancedness(w2, pg, P), default_next=plan_balancedness(w2, pd, P),
                bound=lower_bound_balancedness(w1, R, G if hier else 1, N if hier else 1, P),
                t_greedy=t_g, t_reference=t_r, t_default=t_d,
            ))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table plus a summary line."""
    head = ("| L x E, R slots | G/N/P | skew | greedy | default | bound | next: greedy | next: default "
            "| greedy ms | reference ms | default ms |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['L']}x{r['E']}, {r['R']} | {r['G']}/{r['N']}/{r['P']} | {r['skew']} | {r['greedy']:.4f} | "
            f"{r['default']:.4f} | {r['bound']:.4f} | {r['greedy_next']:.4f} | {r['default_next']:.4f} | "
            f"{r['t_greedy']:.1f} | {r['t_reference']:.1f} | {r['t_default']:.1f} |")
    gain = np.exp(np.mean([np.log(r["default"] / r["greedy"]) for r in rows]))
    gain_next = np.exp(np.mean([np.log(r["default_next"] / r["greedy_next"]) for r in rows]))
    worst = min(r["default"] - r["greedy"] for r in rows)
    worst_next = min(r["default_next"] - r["greedy_next"] for r in rows)
    big = rows[-1]
    lines.append("")
    lines.append(f"geomean default/greedy: planning window {gain:.4f} ({(gain - 1) * 100:+.1f}%), "
                 f"next window {gain_next:.4f} ({(gain_next - 1) * 100:+.1f}%); "
                 f"min(default - greedy): planning {worst:+.4f}, next {worst_next:+.4f}")
    lines.append(f"largest case ({big['L']}x{big['E']}, {big['R']} slots, {big['P']} GPUs, {big['N']} nodes, skew {big['skew']}): "
                 f"default {big['t_default']:.1f} ms, greedy {big['t_greedy']:.1f} ms, reference {big['t_reference']:.1f} ms "
                 f"(default is {big['t_reference'] / big['t_default']:.1f}x faster than the reference)")
    return "\n".join(lines)


def main(quick: bool = False) -> int:
    print(format_table(run(quick=quick)))
    return 0
