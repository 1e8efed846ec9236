"""launch/report.py renders PNG plots, report.md and report.html from a real (tiny) run folder,
and stops with a clear error on a folder that is not a run."""
from __future__ import annotations

import os
import subprocess
import sys

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
