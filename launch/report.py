"""A run report without wandb: PNG plots plus report.md and report.html from a run folder.

    python launch/report.py RUN_DIR [--out DIR]

Reads RUN_DIR/summary.json, stats.json and metrics.jsonl (written by launch/infer.py) and
writes into RUN_DIR/report/ (or --out): load_heatmap.png, load_windows.png,
balancedness.png, latency.png, latency_ranks.png, report.md, report.html.
A folder without summary.json, stats.json or metrics.jsonl stops with `error: ...` and exit status 2.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from moe_ep import plots as P  # noqa: E402
from moe_ep import telemetry as T  # noqa: E402
from moe_ep.atomic import atomic_write  # noqa: E402

REQUIRED = ("summary.json", "stats.json", T.METRICS_FILE)


class ReportError(Exception):
    pass


def load_run(run_dir: str) -> tuple[dict, dict, list[dict]]:
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir}: not a folder")
    missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(run_dir, f))]
    if missing:
        raise ReportError(f"{run_dir} lacks {', '.join(missing)}; expected the output_dir of a finished "
                          f"launch/infer.py run (it writes {', '.join(REQUIRED)})")
    out = []
    for name in ("summary.json", "stats.json"):
        try:
            with open(os.path.join(run_dir, name)) as f:
                out.append(json.load(f))
        except json.JSONDecodeError as err:
            raise ReportError(f"{os.path.join(run_dir, name)}: not valid JSON ({err})") from None
    records = T.read_metrics(os.path.join(run_dir, T.METRICS_FILE))
    if not records:  # an empty metrics file (e.g. a run killed early): the per-forward lines of summary.json
        records = list(out[0].get("steps", []))
    return out[0], out[1], records


def make_plots(summary: dict, stats: dict, records: list[dict], out_dir: str) -> dict[str, str]:
    """-> {name: file name} of the PNGs written to out_dir."""
    files = {}
    load = np.asarray(stats.get("load", []), dtype=np.float64)
    if load.ndim == 2 and load.size:
        files["load_heatmap"] = "load_heatmap.png"
        P.save_figure(P.plot_load_heatmap(load, "Expert load over the run (share of each layer's tokens)"),
                      os.path.join(out_dir, files["load_heatmap"]))
    windows = [w.get("load") for w in stats.get("windows", []) if isinstance(w, dict)]
    if windows:
        files["load_windows"] = "load_windows.png"
        P.save_figure(P.plot_layer_windows(np.asarray(windows, dtype=np.float64),
                                           first_window=int(stats.get("first_window", 0) or 0)),
                      os.path.join(out_dir, files["load_windows"]))
    files["balancedness"] = "balancedness.png"
    P.save_figure(P.plot_balancedness(records, summary.get("rebalances", [])),
                  os.path.join(out_dir, files["balancedness"]))
    files["latency"] = "latency.png"
    P.save_figure(P.plot_latency(records), os.path.join(out_dir, files["latency"]))
    per_rank = (summary.get("phase_ms") or {}).get("per_rank_mean_per_forward")
    if per_rank:
        files["latency_ranks"] = "latency_ranks.png"
        P.save_figure(P.plot_rank_phases(per_rank), os.path.join(out_dir, files["latency_ranks"]))
    return files


# ---------------------------------------------------------------- text

def _f(x, nd=3) -> str:
    return "–" if x is None else (f"{x:,.{nd}f}" if isinstance(x, float) else str(x))


def _bytes(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def key_numbers(summary: dict) -> list[tuple[str, str]]:
    cfg = summary.get("config", {})
    lat = summary.get("latency_ms", {})
    bal = summary.get("balancedness", {})
    ok = [e for e in summary.get("rebalances", []) if e.get("ok")]
    rows = [
        ("run", str((cfg.get("telemetry") or {}).get("run_name") or os.path.basename(str(cfg.get("output_dir", ""))))),
        ("ranks (world / EP / DP)", f"{summary.get('world_size')} / {summary.get('ep_size')} / {summary.get('dp_size')}"),
        ("device", str(summary.get("device"))),
        ("prompts / forwards", f"{summary.get('num_prompts')} / {summary.get('num_forwards')}"),
        ("sampling wall time", f"{_f(summary.get('wall_s'), 2)} s"),
        ("tokens/s (forward time, after the first)", _f(summary.get("tokens_per_s"), 0)),
        ("latency per forward after the first (mean / p50 / max)",
         f"{_f(lat.get('mean'), 1)} / {_f(lat.get('p50'), 1)} / {_f(lat.get('max'), 1)} ms"),
        ("first forward (warm-up: kernels compile)", f"{_f(summary.get('first_forward_ms'), 1)} ms"),
        ("balancedness over the run (mean of layers)", _f(bal.get("mean"))),
        ("balancedness per layer", ", ".join(_f(b) for b in bal.get("per_layer", []))),
        ("rebalances (moved / attempts)", f"{len(ok)} / {len(summary.get('rebalances', []))}"),
        ("experts moved / bytes moved",
         f"{sum(int(e.get('experts_moved') or 0) for e in ok)} / {_bytes(sum(int(e.get('bytes_moved') or 0) for e in ok))}"),
    ]
    return rows


def phase_rows(summary: dict) -> list[tuple[str, float, float]]:
    mean = (summary.get("phase_ms") or {}).get("mean_per_forward") or {}
    total = sum(mean.values()) or 1.0
    return [(p, mean[p], 100.0 * mean[p] / total) for p in T.ALL_PHASES if p in mean]


def rebalance_rows(summary: dict) -> list[list[str]]:
    rows = []
    for e in summary.get("rebalances", []):
        b = (e.get("balancedness_before") or {}).get("mean")
        a = (e.get("balancedness_after") or {}).get("mean")
        m = (e.get("measured_balancedness") or {}).get("mean")
        rows.append([str(e.get("forward_idx")), str(e.get("trigger")), str(e.get("status")),
                     str(e.get("experts_moved", 0)), _bytes(e.get("bytes_moved", 0)), _f(e.get("time_ms"), 1),
                     _f(b), _f(a), _f(m), _f(None if b is None or a is None else a - b),
                     _f(None if b is None or m is None else m - b), str(e.get("reason") or "")])
    return rows


REB_HEAD = ["forward", "trigger", "status", "experts moved", "bytes", "time ms", "bal. before",
            "predicted after", "measured after", "predicted gain", "measured gain", "reason"]
PLOT_TITLES = {"load_heatmap": "Expert load (whole run)", "load_windows": "Expert load per window",
               "balancedness": "Balancedness over time", "latency": "Latency breakdown per forward",
               "latency_ranks": "Time per forward by rank"}


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(summary: dict, files: dict[str, str], out_dir: str, run_dir: str) -> str:
    parts = [f"# Run report: {key_numbers(summary)[0][1]}", "",
             "Balancedness = mean GPU load / max GPU load (1.0 is perfect). "
             "Latency phases are the mean over ranks; *other* is the rest of the forward.", "",
             "## Key numbers", "", _md_table(["", "value"], [[k, v] for k, v in key_numbers(summary)])]
    ph = phase_rows(summary)
    if ph:
        parts += ["", "## Latency per forward by phase", "",
                  _md_table(["phase", "ms / forward", "share"], [[p, f"{ms:.2f}", f"{pc:.1f} %"] for p, ms, pc in ph])]
    rb = rebalance_rows(summary)
    parts += ["", "## Rebalances", "", _md_table(REB_HEAD, rb) if rb else "No rebalance attempts."]
    parts += ["", "## Plots", ""]
    for key, name in files.items():
        parts += [f"### {PLOT_TITLES.get(key, key)}", "", f"![{PLOT_TITLES.get(key, key)}]({name})", ""]
    imgs = summary.get("images", [])
    if imgs:
        rel = os.path.relpath(run_dir, out_dir)
        parts += ["## Images", ""] + [f"- `{x['path']}` — {x['prompt']} (seed {x['seed']})  \n"
                                      f"  ![{x['prompt']}]({os.path.join(rel, x['path'])})" for x in imgs]
    path = os.path.join(out_dir, "report.md")
    _write_text(path, "\n".join(parts) + "\n")
    return path


def write_html(summary: dict, files: dict[str, str], out_dir: str, run_dir: str) -> str:
    e = html.escape
    title = key_numbers(summary)[0][1]

    def table(head, rows):
        h = "".join(f"<th>{e(c)}</th>" for c in head)
        b = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"

    body = [f"<h1>Run report: {e(title)}</h1>",
            "<p>Balancedness = mean GPU load / max GPU load (1.0 is perfect). Latency phases are the mean "
            "over ranks; <i>other</i> is the rest of the forward.</p>",
            "<h2>Key numbers</h2>", table(["", "value"], key_numbers(summary))]
    ph = phase_rows(summary)
    if ph:
        body += ["<h2>Latency per forward by phase</h2>",
                 table(["phase", "ms / forward", "share"], [[p, f"{ms:.2f}", f"{pc:.1f} %"] for p, ms, pc in ph])]
    rb = rebalance_rows(summary)
    body += ["<h2>Rebalances</h2>", table(REB_HEAD, rb) if rb else "<p>No rebalance attempts.</p>", "<h2>Plots</h2>"]
    for key, name in files.items():
        t = PLOT_TITLES.get(key, key)
        body.append(f"<figure><img src=\"{e(name)}\" alt=\"{e(t)}\"><figcaption>{e(t)}</figcaption></figure>")
    imgs = summary.get("images", [])
    if imgs:
        rel = os.path.relpath(run_dir, out_dir)
        body.append("<h2>Images</h2><div class=\"imgs\">")
        for x in imgs:
            src = os.path.join(rel, x["path"]).replace(os.sep, "/")
            body.append(f"<figure><img class=\"sample\" src=\"{e(src)}\" alt=\"{e(x['prompt'])}\">"
                        f"<figcaption>{e(x['prompt'])}<br>seed {e(str(x['seed']))}</figcaption></figure>")
        body.append("</div>")
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
           "font-size:14px;text-align:left}th{background:#f3f3f3}figure{margin:1em 0}"
           "img{max-width:100%}.imgs{display:flex;flex-wrap:wrap;gap:12px}"
           "img.sample{width:128px;image-rendering:pixelated}figcaption{font-size:13px;color:#555}")
    doc = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{e(title)} – moe-ep report</title>"
           f"<style>{css}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = os.path.join(out_dir, "report.html")
    _write_text(path, doc)
    return path


def _write_text(path: str, text: str) -> None:
    with atomic_write(path, "w") as f:  # temp file in the same folder, fsync, os.replace
        f.write(text)


def make_report(run_dir: str, out_dir: str | None = None) -> dict:
    """Write the plots, report.md and report.html; -> {"md", "html", "plots": {name: path}}."""
    summary, stats, records = load_run(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    files = make_plots(summary, stats, records, out_dir)
    return {"md": write_markdown(summary, files, out_dir, run_dir),
            "html": write_html(summary, files, out_dir, run_dir),
            "plots": {k: os.path.join(out_dir, v) for k, v in files.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="output_dir of a launch/infer.py run")
    p.add_argument("--out", default=None, help="where to write the report (default RUN_DIR/report)")
    args = p.parse_args(argv)
    try:
        out = make_report(args.run_dir, args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out['md']}, {out['html']} and {len(out['plots'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
