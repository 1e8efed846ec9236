"""launch/report.py renders PNG plots, report.md and report.html from a real (tiny) run folder,
and stops with a clear error on a folder that is not a run. Its numbers are checked against values
recomputed here from the run's own files (metrics.jsonl, stats.json, the config), not just its labels."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np

import pytest
from PIL import Image

from test_telemetry import tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import report  # noqa: E402  (launch/report.py)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(str(tmp_path_factory.mktemp("rep") / "run"), ["telemetry.wandb=false"])


def test_report_renders_from_a_real_run(run_dir, tmp_path):
    out = report.make_report(run_dir)
    assert set(out["plots"]) == {"load_heatmap", "load_windows", "balancedness", "latency", "latency_ranks"}
    for path in out["plots"].values():
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    md = open(out["md"]).read()
    html = open(out["html"]).read()
    for name in ("load_heatmap.png", "balancedness.png", "latency.png"):
        assert f"({name})" in md and f'src="{name}"' in html
    for text in ("Key numbers", "tokens/s", "balancedness", "Rebalances", "attention", "experts"):
        assert text in md and text in html
    assert "../images/000.png" in html and "a red fox" in html
    assert not [f for f in os.listdir(os.path.dirname(out["md"])) if f.endswith(".tmp") or f.startswith(".tmp")]
    # a rerun into the run folder removes exactly these (moe_ep.job.remove_earlier_outputs)
    from moe_ep.job import REPORT_FILES
    assert sorted(os.listdir(os.path.dirname(out["md"]))) == sorted(REPORT_FILES)


def test_report_cli_errors_on_a_folder_without_run_files(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "report.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "stats.json" in proc.stderr and "metrics.jsonl" in proc.stderr
    assert not (tmp_path / "report").exists()


def test_report_skips_a_torn_last_metrics_line(run_dir, tmp_path):
    """metrics.jsonl is an append log: a run killed mid-write leaves a torn last line, which the
    report skips (every complete line is kept)."""
    import shutil

    torn = str(tmp_path / "torn")
    shutil.copytree(run_dir, torn, ignore=shutil.ignore_patterns("report", "wandb"))
    path = os.path.join(torn, "metrics.jsonl")
    lines = open(path).read().splitlines()
    assert len(lines) >= 2
    with open(path, "a") as f:  # a write cut off after the first bytes of a record
        f.write(lines[-1][: len(lines[-1]) // 2])
    _, _, records = report.load_run(torn)
    assert len(records) == len(lines)
    assert report.make_report(torn)["md"]


def _key_numbers(md: str) -> dict[str, str]:
    """The "Key numbers" table of report.md: label -> value cell."""
    section = md.split("## Key numbers", 1)[1].split("\n## ", 1)[0]
    rows = [ln.strip().strip("|").split("|") for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln]
    return {k.strip(): v.strip() for k, v in rows if k.strip()}


def _floats(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"-?[0-9][0-9,]*\.?[0-9]*", text)]


def test_report_numbers_match_the_run_files(run_dir):
    """Every key number of report.md, recomputed from metrics.jsonl (per-forward records), stats.json
    (window loads) and the config: forwards, tokens/s, latency, per-layer and mean balancedness,
    rebalances, experts and bytes moved; and the window balancedness itself from the window's loads
    and the start-up placement (eplb.gpu_load), so a wrong number anywhere in the chain fails."""
    import torch

    from eplb import gpu_load
    from moe_ep.placement import contiguous_placement

    out = report.make_report(run_dir)
    got = _key_numbers(open(out["md"]).read())
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    stats = json.load(open(os.path.join(run_dir, "stats.json")))
    cfg = summary["config"]

    assert _floats(got["prompts / forwards"]) == [len(cfg["sampling"]["prompts"]), len(records)]
    assert _floats(got["ranks (world / EP / DP)"]) == [2, 2, 1]
    # the speed figures leave out the first forward (the warm-up), which is given apart
    assert len(records) > 1
    lat = np.array([r["latency_ms"] for r in records[1:]])                  # [forwards - 1]
    assert _floats(got["latency per forward after the first (mean / p50 / max)"]) == pytest.approx(
        [round(lat.mean(), 1), round(float(np.median(lat)), 1), round(lat.max(), 1)], abs=0.051)
    tokens_per_s = sum(r["tokens"] for r in records[1:]) / (lat.sum() / 1e3)
    assert _floats(got["tokens/s (forward time, after the first)"])[0] == pytest.approx(tokens_per_s, abs=0.51)
    assert _floats(got["first forward (warm-up: kernels compile)"])[0] == pytest.approx(records[0]["latency_ms"], abs=0.051)

    # window balancedness: the first window from its loads and the start-up (contiguous) placement
    L, E = stats["num_layers"], stats["num_experts"]
    start = contiguous_placement(E, cfg["eplb"]["num_redundant_experts"], 2).phy2log     # [R]
    gpus = gpu_load(np.asarray(stats["windows"][0]["load"], dtype=np.float64), torch.stack([start] * L), 2)  # [L, 2]
    first = (gpus.mean(-1) / gpus.max(-1).values).numpy()                                 # [L]
    closed = [r for r in records if "balancedness/layer0" in r]                           # one per closed window
    assert len(closed) == stats["num_windows"] == len(stats["windows"])
    assert np.allclose([closed[0][f"balancedness/layer{i}"] for i in range(L)], first, atol=1e-12)
    per_layer = np.mean([[r[f"balancedness/layer{i}"] for i in range(L)] for r in closed], axis=0)   # [L]
    assert _floats(got["balancedness per layer"]) == pytest.approx(np.round(per_layer, 3).tolist(), abs=5e-4)
    assert _floats(got["balancedness over the run (mean of layers)"])[0] == pytest.approx(per_layer.mean(), abs=5e-4)

    attempts = [r for r in records if r.get("rebalance/attempt")]
    ok = [r for r in attempts if r.get("rebalance/ok")]
    assert ok, "the tiny run (min_gain -1) rebalances: nothing to check"
    assert _floats(got["rebalances (moved / attempts)"]) == [len(ok), len(attempts)]
    moved = sum(r["rebalance/experts_moved"] for r in ok)
    moved_bytes = sum(r["rebalance/bytes_moved"] for r in ok)
    experts, size = got["experts moved / bytes moved"].split(" / ")
    number, unit = size.split(" ")
    scale = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}[unit]
    assert int(experts) == moved
    assert float(number) == pytest.approx(moved_bytes / scale, abs=0.051) and (unit == "GiB" or moved_bytes < 1024 * scale)
