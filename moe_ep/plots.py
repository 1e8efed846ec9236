"""The run's plots (matplotlib, Agg): logged to wandb by `Telemetry.finish` and written as PNG
files by launch/report.py. Each takes plain data (metrics.jsonl records, summary.json's
`rebalances`, load arrays) and returns a matplotlib Figure.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .timing import ALL_PHASES

PHASE_COLORS = {"attention": "#4C72B0", "router": "#DD8452", "dispatch": "#55A868", "experts": "#C44E52",
                "combine": "#8172B3", "other": "#B0B0B0"}


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def fig_to_array(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig, path: str) -> None:
    """PNG, atomically (moe_ep.atomic: temp file in the same folder, fsync, os.replace)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from .atomic import atomic_write

    with atomic_write(path, "wb") as f:
        FigureCanvasAgg(fig).print_png(f)


def _ticks(n: int, max_labels: int = 32) -> list[int]:
    step = max(1, math.ceil(n / max_labels))
    return list(range(0, n, step))


def plot_load_heatmap(load: np.ndarray, title: str):
    """load [L, E] -> heatmap of each expert's share of its layer's tokens (1/E = even)."""
    load = np.asarray(load, dtype=np.float64)
    L, E = load.shape
    share = load / np.maximum(load.sum(1, keepdims=True), 1.0)
    fig = _figure(min(14.0, 3.0 + 0.42 * E), min(12.0, 1.9 + 0.42 * L))
    ax = fig.add_subplot()
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.set_xticks(_ticks(E))
    ax.set_yticks(_ticks(L))
    ax.set_xlabel("logical expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    if L * E <= 256:
        top = share.max() if share.size else 0.0
        for l in range(L):
            for e in range(E):
                ax.text(e, l, f"{share[l, e]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if share[l, e] > 0.6 * top else "white")
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    cb.set_label(f"share of layer's tokens\n(even: 1/{E} = {1 / E:.3f})")
    return fig


def plot_layer_windows(windows: np.ndarray, max_layers: int = 12, first_window: int = 0, max_windows: int = 48):
    """windows [W, L, E] -> one heatmap per layer (rows = windows in time order), at most
    `max_layers` layers (evenly spaced) so a 60-layer model stays readable, and the last
    `max_windows` windows; rows are labelled with run-wide window numbers (`first_window` is
    the number of windows[0], stats.json's `first_window`)."""
    windows = np.asarray(windows, dtype=np.float64)
    if windows.shape[0] > max_windows:
        first_window += windows.shape[0] - max_windows
        windows = windows[-max_windows:]
    W, L, E = windows.shape
    layers = list(range(L)) if L <= max_layers else sorted({round(i * (L - 1) / (max_layers - 1))
                                                           for i in range(max_layers)})
    cols = min(3, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = _figure(min(16.0, 1.5 + cols * (1.4 + 0.3 * E)), 1.0 + rows * (0.9 + 0.22 * W))
    share = windows / np.maximum(windows.sum(2, keepdims=True), 1.0)                 # [W, L, E]
    vmax = float(share[:, layers].max()) if share.size else 1.0
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= len(layers):
            ax.set_visible(False)
            continue
        l = layers[k]
        im = ax.imshow(share[:, l], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {l}", fontsize=9)
        ax.set_xticks(_ticks(E, 16))
        ax.set_yticks(_ticks(W, 12))
        ax.set_yticklabels([str(first_window + t) for t in _ticks(W, 12)])
        ax.tick_params(labelsize=7)
        if k % cols == 0:
            ax.set_ylabel("window", fontsize=8)
        if k // cols == rows - 1 or k + cols >= len(layers):
            ax.set_xlabel("expert", fontsize=8)
    extra = "" if len(layers) == L else f" ({len(layers)} of {L} layers shown)"
    fig.suptitle(f"Expert load per window (windows {first_window}-{first_window + W - 1}), per layer{extra}",
                 fontsize=11)
    if im is not None:
        cb = fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02)
        cb.set_label("share of layer's tokens", fontsize=8)
    return fig


def plot_balancedness(records: Sequence[dict], rebalances: Sequence[dict]):
    """Balancedness (mean over layers, and per layer) at each window close, with rebalance
    attempts as vertical lines (solid green: moved; dotted grey: skipped or failed)."""
    pts = [r for r in records if "balancedness" in r]
    fig = _figure(8.0, 4.0)
    ax = fig.add_subplot()
    if pts:
        x = [r["forward"] for r in pts]
        layer_keys = sorted({k for r in pts for k in r if k.startswith("balancedness/layer")},
                            key=lambda k: int(k.rsplit("layer", 1)[1]))
        for k in layer_keys[:16]:
            ax.plot(x, [r.get(k, np.nan) for r in pts], lw=0.9, alpha=0.45, marker=".", ms=3,
                    label=k.split("/")[1])
        ax.plot(x, [r["balancedness"] for r in pts], color="black", lw=2.2, marker="o", ms=5, label="mean")
    attempts = {True: [], False: []}                           # moved -> the attempts' x
    for ev in rebalances:
        if ev.get("forward_idx") is not None and ev["forward_idx"] >= 0:
            attempts[bool(ev.get("ok"))].append(ev["forward_idx"] + 0.5)
    frame = ax.get_xaxis_transform()                           # x in data, y in [0, 1] of the axes
    if attempts[True]:      # one collection per kind: an axvline per attempt was slow for long runs
        ax.vlines(attempts[True], 0, 1, transform=frame, color="tab:green", lw=1.5, label="rebalance (moved)")
    if attempts[False]:
        ax.vlines(attempts[False], 0, 1, transform=frame, color="grey", lw=1.0, linestyles=":",
                  label="rebalance skipped/failed")
    ax.set_ylim(min(0.5, min([r["balancedness"] for r in pts], default=1.0) - 0.05), 1.02)
    last = max([r.get("forward", 0) for r in records] + [ev.get("forward_idx") or 0 for ev in rebalances] + [0])
    ax.set_xlim(-0.5, last + 1.0)
    ax.set_xlabel("forward pass (window closes after it)")
    ax.set_ylabel("balancedness (mean / max GPU load)")
    ax.set_title("Balancedness per statistics window")
    ax.grid(alpha=0.3)
    if pts or attempts[True] or attempts[False]:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return fig


# Above this many forwards the latency plot draws bins (a bar per bin, the bin's mean): one bar
# patch per forward and phase made the plot of a 2,000-forward run take 17 s on one core.
MAX_LATENCY_BARS = 200


def _bin_means(values: np.ndarray, size: int) -> np.ndarray:
    """values [n] -> [ceil(n / size)] mean of each run of `size` consecutive values, NaN (a value
    missing) left out; a bin with no value is 0."""
    n = len(values)
    pad = (-n) % size
    full = np.concatenate([values, np.full(pad, np.nan)]).reshape(-1, size)        # [bins, size]
    have = ~np.isnan(full)
    return np.where(have, full, 0.0).sum(1) / np.maximum(have.sum(1), 1)


def plot_latency(records: Sequence[dict], max_bars: int = MAX_LATENCY_BARS):
    """Stacked bars per forward: mean over ranks of attention, router, dispatch, experts,
    combine and other (rest of the step); line: slowest rank's step latency. More than
    `max_bars` forwards: each bar is the mean of a bin of consecutive forwards."""
    recs = [r for r in records if "forward" in r]
    fig = _figure(8.0, 4.0)
    ax = fig.add_subplot()
    if not recs:
        ax.text(0.5, 0.5, "no step records", ha="center", va="center", transform=ax.transAxes)
        return fig
    size = -(-len(recs) // max_bars)                        # forwards per bar (1: one bar per forward)
    x = _bin_means(np.array([r["forward"] for r in recs], dtype=np.float64), size)
    width = 0.8 * size                                      # bar width in forwards
    bottom = np.zeros(len(x))
    has_phases = any(k.startswith("phase_ms/") for r in recs for k in r)
    if has_phases:
        for p in (p for p in ALL_PHASES if any(f"phase_ms/{p}" in r for r in recs)):   # the timed ones
            v = _bin_means(np.array([r.get(f"phase_ms/{p}", np.nan) for r in recs], dtype=np.float64), size)
            ax.bar(x, v, bottom=bottom, color=PHASE_COLORS[p], label=p, width=width)
            bottom += v
    else:
        ax.bar(x, _bin_means(np.array([r.get("latency_ms", 0.0) for r in recs], dtype=np.float64), size),
               color=PHASE_COLORS["other"], label="step (no phases)", width=width)
    ranks = sorted({int(k[4:].split("/")[0]) for r in recs for k in r if k.startswith("rank") and k.endswith("/latency_ms")})
    if ranks:
        slow = np.array([max(r.get(f"rank{k}/latency_ms", 0.0) for k in ranks) for r in recs], dtype=np.float64)
        ax.plot(x, _bin_means(slow, size), color="black", marker="_", ms=14 if size == 1 else 4, lw=0,
                label="slowest rank" if size == 1 else "slowest rank (bin mean)")
    ax.set_xlabel("forward pass" if size == 1 else f"forward pass (each bar: mean of {size} forwards)")
    ax.set_ylabel("milliseconds")
    ax.set_title("Latency per forward, by phase (mean over ranks)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    if len(x) <= 40:
        ax.set_xticks(x[::max(1, len(x) // 20)])
    return fig


def plot_rank_phases(per_rank: Sequence[dict]):
    """per_rank [{phase: ms}] (summary.json phase_ms.per_rank_mean_per_forward) -> stacked bar per rank."""
    fig = _figure(max(4.5, 2.5 + 0.5 * len(per_rank)), 3.6)
    ax = fig.add_subplot()
    bottom = np.zeros(len(per_rank))
    x = np.arange(len(per_rank))
    for p in (p for p in ALL_PHASES if any(p in row for row in per_rank)):   # the timed ones
        v = np.array([row[p] for row in per_rank])
        ax.bar(x, v, bottom=bottom, color=PHASE_COLORS[p], label=p, width=0.6)
        bottom += v
    ax.set_xticks(x, [f"rank {i}" for i in x])
    ax.set_ylabel("ms per forward")
    ax.set_title("Mean time per forward, by rank")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig
