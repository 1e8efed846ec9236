"""Plot the demo model's training: loss and router skew over the stages of one recipe.

    python -m moe_ep.demo.train_plot STAGE1/train_log.json STAGE2/train_log.json ... --out loss.png

Each stage's `train_log.json` (written by launch/train.py) restarts its step count; the stages are
drawn one after the other, with a line where each begins.
"""
from __future__ import annotations

import argparse
import json


def stage_series(logs: list[dict]) -> list[dict]:
    """Per stage: global steps, loss and max/mean per layer, steps offset by the stages before.

    logs: parsed train_log.json files, in recipe order.
    Returns one dict per stage: {"start", "steps" [n], "loss" [n], "max_over_mean" [n][layers]}.
    """
    out, offset = [], 0
    for log in logs:
        rows = log["steps"]
        out.append({"start": offset,
                    "steps": [offset + r["step"] for r in rows],
                    "loss": [r["loss"] for r in rows],
                    "max_over_mean": [r["max_over_mean"] for r in rows]})
        offset += int(log["num_steps"])
    return out


def plot(series: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_skew) = plt.subplots(1, 2, figsize=(10, 3.4))
    for i, s in enumerate(series):
        ax_loss.plot(s["steps"], s["loss"], marker=".", color="C0")
        layers = list(zip(*s["max_over_mean"]))
        for j, col in enumerate(layers):
            ax_skew.plot(s["steps"], col, color=f"C{j + 1}", label=f"layer {j}" if i == 0 else None)
        for ax in (ax_loss, ax_skew):
            if i:
                ax.axvline(s["start"], color="gray", lw=0.8, ls="--")
    ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step (all stages)", ylabel="flow-matching loss (log)", title="training loss")
    ax_skew.set(xlabel="step (all stages)", ylabel="max / mean expert load",
                title="router skew per MoE layer")
    ax_skew.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", help="train_log.json of each stage, in order")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    logs = []
    for path in args.logs:
        with open(path) as f:
            logs.append(json.load(f))
    plot(stage_series(logs), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
