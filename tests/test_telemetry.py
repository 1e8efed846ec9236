"""Telemetry on real (tiny) 2-rank runs: the offline wandb run's history holds the documented
keys (read back from the .wandb file, no mocks), metrics.jsonl holds the same step records,
summary.json gets the phase breakdown, and telemetry.wandb=false leaves no wandb folder."""
from __future__ import annotations

import glob
import json
import os
import re
import struct

import pytest

from moe_ep import config as config_mod
from mp import run_ranks
from tiny_job import ROOT, QUICKSTART, TINY_MODEL_SET

DOCS = os.path.join(ROOT, "docs", "dashboards.md")

# 2 prompts, one per rank, 4 steps: windows close after forwards 1 and 3, a rebalance at
# forward 1 is measured at forward 3.
# The tiny model of tests/tiny_job.py.
TINY = [TINY_MODEL_SET, "sampling.num_inference_steps=4", "sampling.height=16", "sampling.width=16",
        'sampling.prompts=["a red fox", "a blue lake"]', "sampling.batch_size=1",
        "eplb.min_gain=-1", "telemetry.run_name=test-telemetry", 'telemetry.tags=["test"]']


def _ranks_run(rank: int, world: int, overrides: list[str], defer_limit=None) -> None:
    from moe_ep.job import run
    from moe_ep.parallel import context_for_tests
    from moe_ep.telemetry import Telemetry

    if defer_limit is not None:
        Telemetry.DEFER_LIMIT = defer_limit
    cfg = config_mod.load(QUICKSTART, overrides)
    run(cfg, context_for_tests(rank, world, cfg.parallel.ep_size), progress=False)


def tiny_run(out: str, extra=(), defer_limit=None) -> str:
    run_ranks(2, _ranks_run, TINY + [f"output_dir={out}"] + list(extra), defer_limit)
    return out


def wandb_records(path: str):
    """Records of a .wandb file (LevelDB-style log: 7-byte header ':W&B' 0xBEE1 version, then
    32 KiB blocks of chunks [crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last])."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, typ = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and typ == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if typ in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def history_and_summary(run_dir: str) -> tuple[list[dict], dict, object]:
    files = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    history, summary, run_rec = [], {}, None
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "run":
            run_rec = rec.run
    return history, summary, run_rec


def documented_keys() -> set[str]:
    """Keys in the first column of docs/dashboards.md's key tables (`key` in backticks)."""
    keys = set()
    for line in open(DOCS):
        m = re.match(r"\|\s*`([^`]+)`", line)
        if m:
            keys.update(k.strip() for k in m.group(1).split(","))
    return keys


def normalise(key: str) -> str:
    key = re.sub(r"^rank\d+/", "rank{r}/", key)
    key = re.sub(r"^balancedness/layer\d+$", "balancedness/layer{l}", key)
    return key


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    return tiny_run(str(tmp_path_factory.mktemp("tel") / "run"))


def test_offline_wandb_history_has_documented_keys(offline_run):
    history, summary, run_rec = history_and_summary(offline_run)
    assert run_rec is not None and run_rec.display_name == "test-telemetry" and list(run_rec.tags) == ["test"]
    steps = [h for h in history if "forward" in h]
    assert [h["forward"] for h in steps] == [0, 1, 2, 3]
    for h in steps:
        for p in ("attention", "router", "dispatch", "experts", "combine"):
            assert h[f"phase_ms/{p}"] > 0, (p, h)
        assert h["tokens_per_s"] > 0 and h["latency_ms"] > 0
        assert {"rank0/latency_ms", "rank1/latency_ms", "rank1/phase_ms/experts"} <= set(h)
    windows = [h for h in steps if "balancedness" in h]
    assert [h["forward"] for h in windows] == [1, 3]
    for h in windows:
        assert 0 < h["balancedness"] <= 1 and {"balancedness/layer0", "balancedness/layer2"} <= set(h)
        assert h["load/heatmap/_type"] == "image-file" and h["load/table/_type"] == "table-file"
    reb = [h for h in steps if "rebalance/attempt" in h]
    assert reb and reb[0]["forward"] == 1
    assert {"rebalance/experts_moved", "rebalance/bytes_moved", "rebalance/time_ms",
            "rebalance/predicted_gain"} <= set(reb[0])
    assert reb[0]["rebalance/ok"] == 1 and reb[0]["rebalance/bytes_moved"] > 0      # eplb.min_gain=-1 in TINY
    assert "rebalance/measured_gain" in steps[3] and steps[3]["rebalance/measured_forward"] == 1
    keys = {k for h in history for k in h}
    assert {"images/_type", "plots/load_heatmap/_type", "plots/balancedness/_type",
            "plots/latency_breakdown/_type"} <= keys
    assert summary["tokens_per_s"] > 0 and "phase_ms/mean_per_forward/experts" in summary

    # every logged key (rank and layer numbers folded) is documented in docs/dashboards.md
    logged = {normalise(k) for k in keys if not k.startswith("_")}
    media_sub = re.compile(r"^(load/heatmap|load/table|images|plots/\w+)/")
    logged = {media_sub.match(k).group(1) if media_sub.match(k) else k for k in logged}
    missing = logged - documented_keys()
    assert not missing, f"logged but not in docs/dashboards.md: {sorted(missing)}"


def test_metrics_jsonl_and_summary_match_wandb(offline_run):
    lines = [json.loads(x) for x in open(os.path.join(offline_run, "metrics.jsonl"))]
    history, _, _ = history_and_summary(offline_run)
    by_step = {h["forward"]: h for h in history if "forward" in h}
    assert [r["forward"] for r in lines] == [0, 1, 2, 3]
    for r in lines:
        h = by_step[r["forward"]]
        assert {k: h[k] for k in r} == r          # the same record (media keys only in wandb)
    summary = json.load(open(os.path.join(offline_run, "summary.json")))
    ph = summary["phase_ms"]["mean_per_forward"]
    assert set(ph) == {"attention", "router", "dispatch", "experts", "combine", "other"}
    assert len(summary["phase_ms"]["per_rank_mean_per_forward"]) == 2
    assert summary["telemetry"]["wandb_run_dir"].startswith(os.path.join("wandb", "offline-run-"))
    assert not [f for f in os.listdir(offline_run) if f.startswith(".tmp")]


def test_telemetry_off_leaves_no_wandb_folder(tmp_path):
    out = tiny_run(str(tmp_path / "off"), ["telemetry.wandb=false", "sampling.num_inference_steps=2"])
    assert not os.path.exists(os.path.join(out, "wandb"))
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert len(lines) == 2 and all(r["phase_ms/experts"] > 0 for r in lines)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["telemetry"]["wandb_run_dir"] is None


def test_small_defer_limit_keeps_every_step_in_order(tmp_path):
    """Offline records flushed to wandb in chunks of 3 while sampling: the history still holds
    every forward once, in order, with the same records as metrics.jsonl."""
    out = tiny_run(str(tmp_path / "chunks"), ["sampling.num_inference_steps=7"], defer_limit=3)
    history, summary, _ = history_and_summary(out)
    steps = [h for h in history if "forward" in h]
    assert [h["forward"] for h in steps] == list(range(7))
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [{k: h[k] for k in r} for r, h in zip(lines, steps)] == lines
    assert [h["forward"] for h in steps if "load/heatmap/_type" in h] == [1, 3, 5]
    tel = json.load(open(os.path.join(out, "summary.json")))["telemetry"]
    assert tel["rank0_deferred_flushes"] == 2 and "images/_type" in {k for h in history for k in h}


def test_window_media_cap():
    from moe_ep.telemetry import window_has_media

    assert all(window_has_media(w) for w in range(16))
    assert [w for w in range(16, 64) if window_has_media(w)] == [16, 20, 24, 28, 32, 40, 48, 56]
    assert sum(window_has_media(w) for w in range(1250)) <= 44
    assert sum(window_has_media(w) for w in range(65536)) == 64


def test_abort_leaves_readable_offline_run(tmp_path):
    """In-process, a world of one without a process group: abort() after some steps writes the
    deferred history, finishes the run with exit code 1 and never raises (also when repeated)."""
    import types

    import torch

    from moe_ep.telemetry import Telemetry

    out = str(tmp_path / "abort")
    cfg = config_mod.load(QUICKSTART, TINY + [f"output_dir={out}"])
    ctx = types.SimpleNamespace(is_main=True, rank=0, world_size=1, device=torch.device("cpu"))
    tel = Telemetry(cfg, ctx, out)
    # a run of its own (a wandb run another test left open in this process would be returned instead)
    assert tel.run is not None and os.path.realpath(tel.run.dir).startswith(os.path.realpath(out)), tel.run
    for f in range(5):
        tel.log_step({"forward": f, "latency_ms": 1.0 + f, "tokens": 8, "tokens_per_s": 8.0})
    assert len(tel._deferred) == 5
    tel.abort()
    tel.abort()                                    # a second call is harmless
    history, _, _ = history_and_summary(out)
    assert [h["forward"] for h in history if "forward" in h] == [0, 1, 2, 3, 4]
    assert not os.path.exists(os.path.join(out, "summary.json"))
    exits = [rec.exit.exit_code for rec in wandb_records(
        glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))[0])
        if rec.WhichOneof("record_type") == "exit"]
    assert exits == [1]
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 5


def test_metrics_write_error_does_not_stop_the_run(tmp_path):
    import types

    import torch

    from moe_ep.telemetry import Telemetry

    class Full:
        def write(self, _):
            raise OSError(28, "No space left on device")

        flush = close = lambda self: None

    out = str(tmp_path / "full")
    cfg = config_mod.load(QUICKSTART, TINY + [f"output_dir={out}", "telemetry.wandb=false"])
    ctx = types.SimpleNamespace(is_main=True, rank=0, world_size=1, device=torch.device("cpu"))
    tel = Telemetry(cfg, ctx, out)
    tel._metrics = Full()
    with pytest.warns(UserWarning, match="No space left"):
        tel.log_step({"forward": 0, "latency_ms": 1.0})
    assert tel._metrics is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tel.log_step({"forward": 1, "latency_ms": 1.0})      # no second warning, no error
    assert json.load(open(tel.finish({})))["telemetry"]["metrics_file"] == "metrics.jsonl"


@pytest.mark.parametrize("timed_attention", [True, False])
def test_a_phase_nothing_times_is_left_out_not_reported_as_zero(tmp_path, timed_attention):
    """Under model.compile (and for diffusers models) no block times "attention": records,
    summary.json and the plots then leave that phase out, and its time counts in "other"."""
    import types

    import torch

    from moe_ep.telemetry import Telemetry

    out = str(tmp_path / "phases")
    cfg = config_mod.load(QUICKSTART, TINY + [f"output_dir={out}", "telemetry.wandb=false"])
    ctx = types.SimpleNamespace(is_main=True, rank=0, world_size=1, device=torch.device("cpu"))
    tel = Telemetry(cfg, ctx, out)
    layer, block = types.SimpleNamespace(timer=None), types.SimpleNamespace(timer=None)
    tel.attach(types.SimpleNamespace(moe_layers=lambda: [layer],
                                     attention_blocks=lambda: [block] if timed_attention else []))
    assert layer.timer is tel.timer and (block.timer is tel.timer) == timed_attention
    tel.timer.totals_ms.update({"router": 1.0, "experts": 4.0, **({"attention": 2.0} if timed_attention else {})})
    tel.log_step({"forward": 0, "latency_ms": 10.0})
    rec = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert ("phase_ms/attention" in rec) == timed_attention
    assert ("rank0/phase_ms/attention" in rec) == timed_attention
    assert rec["phase_ms/other"] == pytest.approx(3.0 if timed_attention else 5.0)
    summary = json.load(open(tel.finish({})))
    assert ("attention" in summary["phase_ms"]["mean_per_forward"]) == timed_attention
    assert summary["phase_ms"]["mean_per_forward"]["experts"] == pytest.approx(4.0)
    from moe_ep.plots import plot_latency
    labels = plot_latency([rec]).axes[0].get_legend_handles_labels()[1]
    assert ("attention" in labels) == timed_attention and "experts" in labels


def test_async_migration_is_logged_when_it_ends(tmp_path):
    """eplb.migration = "async": the record of the forward where a migration starts says so
    (status "migrating", ok 0); the record of the forward where it ends carries its outcome (ok,
    experts and bytes moved), and its measured balancedness follows once a window has run on it."""
    out = tiny_run(str(tmp_path / "async"), ["telemetry.wandb=false", "sampling.num_inference_steps=10",
                                             "eplb.migration=async"])
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    reb = [r for r in lines if "rebalance/attempt" in r]
    started = [r for r in reb if r["rebalance/status"] == "migrating"]
    ended = [r for r in reb if r["rebalance/status"] == "ok"]
    assert started and ended, [(r["forward"], r["rebalance/status"]) for r in reb]
    first_start, first_end = started[0], ended[0]
    assert first_start["rebalance/ok"] == 0 and first_start["rebalanced"] == 0
    assert first_start["rebalance/attempt"] == 1 and first_end["rebalance/attempt"] == 0   # one attempt, two records
    # 3 MoE layers, one per forward boundary: it ends 3 forwards after the one that started it
    assert first_end["forward"] == first_start["forward"] + 3
    assert first_end["rebalance/ok"] == 1 and first_end["rebalanced"] == 1
    assert first_end["rebalance/experts_moved"] > 0 and first_end["rebalance/bytes_moved"] > 0
    measured = [r for r in lines if r.get("rebalance/measured_forward") == first_start["forward"]]
    assert measured and measured[0]["forward"] > first_end["forward"]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert any(e["status"] == "ok" and e.get("migration") == "async" for e in summary["rebalances"])


def test_a_rebalance_before_the_last_partial_window_is_measured_on_it(tmp_path):
    """3 forwards, windows of 2: the rebalance after forward 1 has only the last, partial window
    (forward 2) under its placement; closing that window when sampling ends measures it, so
    summary.json's event carries measured_balancedness (it stayed null before)."""
    out = tiny_run(str(tmp_path / "partial"), ["telemetry.wandb=false", "sampling.num_inference_steps=3"])
    events = json.load(open(os.path.join(out, "summary.json")))["rebalances"]
    moved = [e for e in events if e["ok"]]
    assert moved and moved[0]["forward_idx"] == 1, events
    m = moved[0]["measured_balancedness"]
    assert m is not None and 0 < m["min"] <= m["mean"] <= 1, moved[0]


def test_a_migration_is_logged_from_each_record_as_it_was_handed_over(tmp_path):
    """Rebalance records are frozen and made once per outcome: a migration's start, its end (a
    new record) and its measurement (a third). Telemetry logs each from the record it is handed,
    never from an earlier one of the same attempt (no aliasing, no identity)."""
    import dataclasses
    import types

    import torch

    from moe_ep.rebalance import Balancedness, RebalanceRecord
    from moe_ep.telemetry import Telemetry

    out = str(tmp_path / "records")
    cfg = config_mod.load(QUICKSTART, TINY + [f"output_dir={out}", "telemetry.wandb=false"])
    ctx = types.SimpleNamespace(is_main=True, rank=0, world_size=1, device=torch.device("cpu"))
    tel = Telemetry(cfg, ctx, out)
    start = RebalanceRecord(4, "interval", "migrating", migration="async", time_ms=0.0,
                            balancedness_before=Balancedness(0.6, 0.5), balancedness_after=Balancedness(0.9, 0.8))
    end = dataclasses.replace(start, status="ok", ok=True, experts_moved=5, remote_moves=3, local_copies=2,
                              bytes_moved=4096, time_ms=7.0, layers_moved=3, ends_migration=True)
    measured = dataclasses.replace(end, measured_balancedness=Balancedness(0.85, 0.7))
    steps = {4: [start], 6: [end], 8: [measured]}
    for f in range(4, 9):
        for record in steps.get(f, []):
            (tel.log_measured if record.measured_balancedness else tel.log_rebalance)(record)
        tel.log_step({"forward": f, "latency_ms": 1.0})
    lines = {r["forward"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}
    assert not any(k.startswith("rebalance/") for f in (5, 7) for k in lines[f])
    first, last = lines[4], lines[6]
    assert (first["rebalance/status"], first["rebalance/ok"], first["rebalance/attempt"]) == ("migrating", 0, 1)
    assert first["rebalance/bytes_moved"] == 0 and first["rebalance/predicted_gain"] == pytest.approx(0.3)
    assert (last["rebalance/status"], last["rebalance/ok"], last["rebalance/attempt"]) == ("ok", 1, 0)
    assert (last["rebalance/experts_moved"], last["rebalance/remote_moves"], last["rebalance/bytes_moved"],
            last["rebalance/time_ms"]) == (5, 3, 4096, 7.0)
    m = lines[8]
    assert "rebalance/attempt" not in m and m["rebalance/measured_forward"] == 4
    assert m["rebalance/measured_balancedness"] == 0.85 and m["rebalance/measured_gain"] == pytest.approx(0.25)
    assert (start.status, start.bytes_moved, start.measured_balancedness) == ("migrating", 0, None)  # unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        start.status = "ok"


def test_latency_plot_of_a_long_run_draws_bin_means():
    """More forwards than MAX_LATENCY_BARS: one bar per bin of consecutive forwards, its height
    the bin's mean (a bar per forward made a 2,000-forward run's final plots take minutes)."""
    from moe_ep.plots import MAX_LATENCY_BARS, plot_latency
    n = 1000
    recs = [{"forward": f, "latency_ms": 2.0 + f, "phase_ms/experts": float(f), "phase_ms/other": 2.0}
            for f in range(n)]
    ax = plot_latency(recs).axes[0]
    size = -(-n // MAX_LATENCY_BARS)                                     # 5 forwards per bar
    experts = [p for p in ax.patches if p.get_facecolor() == ax.patches[0].get_facecolor()]
    assert len(experts) == n // size <= MAX_LATENCY_BARS
    # bin 3 holds forwards 15..19: experts 15..19 -> mean 17
    assert experts[3].get_height() == pytest.approx(sum(range(15, 20)) / 5)
    assert experts[3].get_x() + experts[3].get_width() / 2 == pytest.approx(17.0)
    short = plot_latency(recs[:30]).axes[0]                              # one bar per forward
    assert len(short.patches) == 2 * 30


def test_a_job_logs_into_its_own_wandb_run_when_one_is_open(tmp_path):
    """A wandb run already open in the process (a user's script, an earlier job that was not
    finished): the job's telemetry makes a run of its own and leaves the other one alone."""
    import types

    import torch
    import wandb

    from moe_ep.telemetry import Telemetry

    other = wandb.init(mode="offline", dir=str(tmp_path), project="users-own")   # wandb.run is this one
    try:
        out = str(tmp_path / "job")
        cfg = config_mod.load(QUICKSTART, TINY + [f"output_dir={out}"])
        ctx = types.SimpleNamespace(is_main=True, rank=0, world_size=1, device=torch.device("cpu"))
        tel = Telemetry(cfg, ctx, out)
        assert tel.run is not None and tel.run is not other
        assert os.path.realpath(tel.run.dir).startswith(os.path.realpath(out))
        tel.log_step({"forward": 0, "latency_ms": 1.0, "tokens": 8, "tokens_per_s": 8.0})
        tel.finish({})
        assert not other._is_finished and wandb.run is other
        other.log({"users_metric": 1.0})                 # the user's run still works
    finally:
        other.finish()
        wandb.teardown()
    history, _, _ = history_and_summary(out)
    assert [h["forward"] for h in history if "forward" in h] == [0]
