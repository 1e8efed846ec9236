"""``python -m eplb bench``: greedy vs default on seeded synthetic loads, judged on the next window too."""
from __future__ import annotations

import os
import time

import numpy as np

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
# Routing learned by a model: the trained shapes demo's trace (moe_ep/demo/routing.py, docs/eplb_runtime.md).
# Planning window: its even sampling steps; next window: its odd steps. (replicas, groups, nodes, gpus)
TRACE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "shapes_demo_trace.json")
TRACE_SIZES = ((72, 1, 1, 8), (128, 8, 8, 64))


def trace_windows(path: str = TRACE):
    """The trace's (planning, next) windows [L, E]: sums of its even and of its odd per-step windows;
    None when the file is not there (an installed package without tests/)."""
    from .io import load_stats

    if not os.path.isfile(path):
        return None
    wins = [np.asarray(w["load"], dtype=np.float64) for w in load_stats(path)["windows"]]
    return sum(wins[0::2]), sum(wins[1::2])


def _time(fn, repeat: int) -> tuple[float, float, object]:
    """Best and median of ``repeat`` wall times in ms, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3, float(np.median(times)) * 1e3, out


def run(quick: bool = False, seed: int = 0, repeat: int = 5, seeds=None, baseline_repeat: int = 3) -> list[dict]:
    """Run every case; returns one dict per (size, skew) with balancedness and runtimes (ms).

    ``seeds``: seed offsets (default: just ``seed``). Times are best of ``repeat`` (greedy, default)
    or ``baseline_repeat`` (the loop baselines); default without the drift hedge is timed once. Every
    policy runs through ``rebalance_experts`` (one torch thread, input checks and ``log2phy`` included).
    """
    rows = []
    sizes = QUICK_SIZES if quick else SIZES
    skews = (SKEWS[0], SKEWS[-1]) if quick else SKEWS
    trace = trace_windows()
    cases = [(sd, size, si, skew, None) for sd in (seeds or (seed,)) for size in sizes for si, skew in enumerate(skews)]
    if trace is not None:  # the learned trace is one fixed load: once, whatever the seeds
        L, E = trace[0].shape
        cases += [((seeds or (seed,))[0], (L, E) + size, 0, "trace", trace) for size in TRACE_SIZES]
    for sd, size, si, skew, loads in cases:
        ci = sizes.index(size) if loads is None else 0
        L, E, R, G, N, P = size
        w1, w2 = zipf_windows(sd + 100 * ci + si, L, E, skew) if loads is None else loads
        hier = G % N == 0
        g, n = (G, N) if hier else (1, 1)
        t_g, _, (pg, _, _) = _time(lambda: rebalance_experts(w1, R, G, N, P, policy="greedy"), repeat)
        t_t, _, _ = _time(lambda: rebalance_experts(w1, R, G, N, P, policy="greedy_torch_loops"), baseline_repeat)
        t_l, _, _ = _time(lambda: rebalance_experts(w1, R, G, N, P, policy="greedy_pylist"), baseline_repeat)
        t_d, t_dm, (pd, _, _) = _time(lambda: rebalance_experts(w1, R, G, N, P), repeat)
        t_p, _, (pp, _, _) = _time(lambda: rebalance_experts(w1, R, G, N, P, drift_hedge=False), 1)
        rows.append(dict(
            L=L, E=E, R=R, G=G, N=N, P=P, skew=skew, seed=sd,
            greedy=plan_balancedness(w1, pg, P), default=plan_balancedness(w1, pd, P),
            plain=plan_balancedness(w1, pp, P),
            greedy_next=plan_balancedness(w2, pg, P), default_next=plan_balancedness(w2, pd, P),
            plain_next=plan_balancedness(w2, pp, P),
            bound=lower_bound_balancedness(w1, R, g, n, P),
            t_greedy=t_g, t_torch=t_t, t_pylist=t_l, t_default=t_d, t_default_median=t_dm,
        ))
    return rows


def _gm(xs) -> float:
    return float(np.exp(np.mean(np.log(xs))))


def summary(rows: list[dict]) -> list[str]:
    """Geometric means and worst cases of default (with and without the drift hedge) against greedy."""
    out = []
    for key, name in (("default", "default"), ("plain", "default, no hedge")):
        gain = _gm([r[key] / r["greedy"] for r in rows])
        gain_next = _gm([r[key + "_next"] / r["greedy_next"] for r in rows])
        worst = min(r[key] - r["greedy"] for r in rows)
        worst_next = min(r[key + "_next"] - r["greedy_next"] for r in rows)
        behind = sum(r[key + "_next"] < r["greedy_next"] - 1e-12 for r in rows)
        out.append(f"{name} / greedy: planning window {gain:.4f} ({(gain - 1) * 100:+.1f}%), next window {gain_next:.4f} "
                   f"({(gain_next - 1) * 100:+.1f}%); min(default - greedy): planning {worst:+.4f}, next {worst_next:+.4f}; "
                   f"behind greedy on the next window in {behind} of {len(rows)} cases")
    return out


def format_table(rows: list[dict]) -> str:
    """Markdown table plus summary lines."""
    head = ("| L x E, R slots | G/N/P | skew | greedy | default | no hedge | bound | next: greedy | next: default "
            "| next: no hedge | greedy ms | torch-loops ms | pylist ms | default ms |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['L']}x{r['E']}, {r['R']} | {r['G']}/{r['N']}/{r['P']} | {r['skew']} | {r['greedy']:.4f} | "
            f"{r['default']:.4f} | {r['plain']:.4f} | {r['bound']:.4f} | {r['greedy_next']:.4f} | {r['default_next']:.4f} | "
            f"{r['plain_next']:.4f} | {r['t_greedy']:.1f} | {r['t_torch']:.0f} | {r['t_pylist']:.1f} | {r['t_default']:.1f} |")
    lines.append("")
    lines.extend(summary(rows))
    for big in rows:
        if (big["L"], big["E"], big["R"], big["N"], big["P"]) == (58, 256, 320, 8, 64):
            lines.append(f"largest case ({big['L']}x{big['E']}, {big['R']} slots, G/N/P {big['G']}/{big['N']}/{big['P']}, skew {big['skew']}): "
                         f"default {big['t_default']:.1f} ms best / {big['t_default_median']:.1f} ms median of 5; "
                         f"{big['t_torch'] / big['t_default']:.0f}x faster than torch loops ({big['t_torch']:.0f} ms), "
                         f"{big['t_pylist'] / big['t_default']:.1f}x faster than pylist ({big['t_pylist']:.1f} ms)")
    return "\n".join(lines)


def main(quick: bool = False, seeds=None) -> int:
    print(format_table(run(quick=quick, seeds=seeds)))
    return 0
