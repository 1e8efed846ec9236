"""Reliability: a dead or hung rank stops the job in bounded time with one clear line per rank and
keeps what was finished; files are written atomically; a run resumes from an earlier run's
statistics; the same config and seed give byte-identical PNGs. docs/reliability.md has the list.

The dead-rank tests use the real DeepSpeed launcher on 2 CPU ranks and the test hook
MOE_EP_TEST_DIE_AT_STEP=<forward>:<rank>[:hang] (moe_ep/job.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import eplb
from moe_ep import config as config_mod
from moe_ep.atomic import TMP_PREFIX, atomic_write, is_temp_file, write_json_atomic
from moe_ep.stats import read_stats_file
from mp import run_ranks
from tiny_job import ROOT, QUICKSTART, TINY_MODEL_SET, free_port

sys.path.insert(0, os.path.join(ROOT, "launch"))
import infer  # noqa: E402  (launch/infer.py)

# 4 prompts, one per batch: 2 rounds of 4 forwards on 2 ranks; eplb windows of 2 forwards; the tiny
# model of tests/tiny_job.py
SMALL = [TINY_MODEL_SET, "sampling.num_inference_steps=4", "sampling.height=16", "sampling.width=16", "telemetry.wandb=false",
         "sampling.batch_size=1"]
TOKENS_PER_FORWARD = 2 * (16 // 2) ** 2 * 2        # 2 ranks x 64 tokens x 2 guidance branches
L, E, TOP_K = 3, 8, 2


def launch(out: str, sets=(), env=None, timeout=120) -> tuple[subprocess.CompletedProcess, float]:
    """`deepspeed --num_gpus 2 launch/infer.py` as a user runs it; returns (process, seconds)."""
    bindir = os.path.dirname(sys.executable)
    cmd = [os.path.join(bindir, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/infer.py", "--config", QUICKSTART, "--no-progress", "--set", *SMALL, f"output_dir={out}", *sets]
    full_env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), **(env or {}))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def error_lines(proc) -> list[str]:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error: ")]


def no_temp_files(folder: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if is_temp_file(f)]


def _ranks_run(rank: int, world: int, overrides: list[str]) -> None:
    from moe_ep.job import run
    from moe_ep.parallel import context_for_tests

    cfg = config_mod.load(QUICKSTART, overrides)
    run(cfg, context_for_tests(rank, world, cfg.parallel.ep_size), progress=False)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Two complete runs with the same config and seed (2 gloo ranks), and a third one that resumes
    from the first one's stats.json."""
    base = tmp_path_factory.mktemp("full")
    outs = {name: str(base / name) for name in ("a", "b", "resumed")}
    for name in ("a", "b"):
        run_ranks(2, _ranks_run, SMALL + [f"output_dir={outs[name]}"])
    # min_gain -1: the start-up rebalance from the seed moves weights whatever the predicted gain
    run_ranks(2, _ranks_run, SMALL + [f"output_dir={outs['resumed']}", f"eplb.stats_file={outs['a']}/stats.json",
                                      "eplb.min_gain=-1"])
    return outs


def png_bytes(folder: str) -> dict[str, bytes]:
    d = os.path.join(folder, "images")
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d)) if n.endswith(".png")}


# ---------------------------------------------------------------- determinism and resume

@pytest.mark.slow   # starts jobs under DeepSpeed's launcher
def test_same_config_and_seed_give_byte_identical_pngs(full_runs):
    a, b = png_bytes(full_runs["a"]), png_bytes(full_runs["b"])
    assert sorted(a) == ["000.png", "001.png", "002.png", "003.png"]
    assert a == b
    sa = json.load(open(os.path.join(full_runs["a"], "stats.json")))
    sb = json.load(open(os.path.join(full_runs["b"], "stats.json")))
    assert sa == sb  # the statistics (hence every rebalance decision) repeat too


@pytest.mark.slow   # starts jobs under DeepSpeed's launcher
def test_resume_from_an_earlier_runs_statistics(full_runs):
    """eplb.stats_file seeds the planner: the resumed run rebalances from it before its first
    forward, and the images do not change."""
    summary = json.load(open(os.path.join(full_runs["resumed"], "summary.json")))
    first = summary["rebalances"][0]
    assert first["trigger"] == "stats_file" and first["forward_idx"] == -1, first
    assert first["status"] == "ok" and first["experts_moved"] > 0, first   # "skipped" is not a resume
    a = {n: np.asarray(Image.open(os.path.join(full_runs["a"], "images", n))) for n in png_bytes(full_runs["a"])}
    for n, img in a.items():
        assert np.array_equal(img, np.asarray(Image.open(os.path.join(full_runs["resumed"], "images", n)))), n


def test_bad_stats_file_stops_before_anything_is_written(tmp_path, capsys):
    """A truncated or mismatched stats.json (eplb.stats_file) is refused by the pre-flight checks:
    one line naming the field, exit 2, no output folder."""
    full = {"format": "moe-ep.expert-load", "version": 1, "num_layers": L, "num_experts": E,
            "load": [[1] * E] * L}
    text = json.dumps(full)
    cases = {"truncated.json": text[: len(text) // 2], "wrong_experts.json": json.dumps(dict(full, load=[[1] * 4] * L)),
             "nan.json": text.replace("[1, ", "[NaN, ", 1)}
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        out = tmp_path / f"out-{name}"
        rc = infer.main(["--config", QUICKSTART, "--set", f"output_dir={out}", f"eplb.stats_file={tmp_path / name}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, (name, err)
        assert err.startswith("error: config field 'eplb.stats_file'"), (name, err)
        assert not out.exists(), name


# ---------------------------------------------------------------- dead and hung ranks

def check_partial_output(out: str, full: str, finished: list[str]) -> None:
    """What a failed run leaves: the images of finished batches, byte-identical to a complete
    run's, a valid stats.json with only complete windows, no summary.json, no temp files."""
    # each finished image with its record (moe_ep/manifest.py), nothing else
    assert sorted(os.listdir(os.path.join(out, "images"))) == sorted(finished + [n[:-4] + ".json" for n in finished])
    for n in finished:
        assert open(os.path.join(out, "images", n), "rb").read() == open(os.path.join(full, "images", n), "rb").read()
    path = os.path.join(out, "stats.json")
    data = read_stats_file(path, L, E)          # what eplb.stats_file accepts in a later run
    eplb.load_stats(path)                       # what `python -m eplb plan --stats` accepts
    assert len(data["windows"]) >= 2            # forwards 0-3 (round 0) closed two windows
    for w in data["windows"]:
        assert (np.asarray(w["load"]).sum(1) == 2 * TOKENS_PER_FORWARD * TOP_K).all()  # 2 forwards per window
    assert not os.path.exists(os.path.join(out, "summary.json"))
    assert not no_temp_files(out)


def _dead_rank_lines(lines: list[str]) -> bool:
    return bool(lines) and re.match(r"error: rank 0 lost contact with its peers during forward 5 \(round 1, step 1\): ",
                                     lines[0]) is not None


def _hung_rank_lines(lines: list[str]) -> bool:
    return (any(re.match(r"error: rank 0 lost contact with its peers during forward 5 .*(timed out|Timed out)", ln)
                for ln in lines)
            and any(ln.startswith("error: rank 1 lost contact with its peers during forward 5") and "SIGTERM" in ln
                    for ln in lines))


DEAD = "5:1"                 # MOE_EP_TEST_DIE_AT_STEP of the dead-rank run
DEAD_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def dead_run(tmp_path_factory):
    """The launcher job whose rank 1 dies before forward 5 (round 1), run once for the two tests
    that check it: what it prints and leaves (test_lost_rank_...[dead]) and what the same command
    run again does in a copy of its folder (test_a_killed_run_...). -> (process, seconds, out)."""
    out = str(tmp_path_factory.mktemp("dead") / "out")
    proc, took = launch(out, [f"parallel.timeout_s={DEAD_TIMEOUT_S}"], env={"MOE_EP_TEST_DIE_AT_STEP": DEAD})
    return proc, took, out


@pytest.mark.parametrize("timeout_s, die_at, lines_ok, traceback_free", [
    # dead: rank 1 exits (os._exit(1)) before forward 5, in the second round. Rank 0's all-to-all
    # fails at once (connection reset); it writes stats.json, prints one line and exits 1.
    pytest.param(DEAD_TIMEOUT_S, DEAD, _dead_rank_lines, True, id="dead"),
    # hung: rank 1 sleeps before forward 5: rank 0's collective times out after parallel.timeout_s,
    # it exits 1, and the launcher's SIGTERM ends rank 1 through its error path too.
    pytest.param(5, "5:1:hang", _hung_rank_lines, False, id="hung"),
])
@pytest.mark.slow   # starts jobs under DeepSpeed's launcher
def test_lost_rank_stops_the_job_and_keeps_finished_work(request, tmp_path, full_runs, timeout_s, die_at, lines_ok,
                                                         traceback_free):
    """A dead or hung rank 1 (MOE_EP_TEST_DIE_AT_STEP): the launcher exits non-zero within 60 s,
    each rank prints the expected one-line error (no traceback for the dead rank), and the output
    holds what was finished. Nothing waits forever."""
    if die_at == DEAD:   # the job test_a_killed_run_... starts again: the fixture runs it once for both
        proc, took, out = request.getfixturevalue("dead_run")
    else:
        out = str(tmp_path / "out")
        proc, took = launch(out, [f"parallel.timeout_s={timeout_s}"], env={"MOE_EP_TEST_DIE_AT_STEP": die_at})
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode != 0, log
    assert took < 60, log
    assert lines_ok(error_lines(proc)), log
    if traceback_free:
        assert "Traceback" not in proc.stderr, log
    check_partial_output(out, full_runs["a"], ["000.png", "001.png"])


@pytest.mark.slow   # starts jobs under DeepSpeed's launcher
def test_a_killed_run_run_again_keeps_its_finished_images_and_ends_as_an_uninterrupted_one(tmp_path, full_runs,
                                                                                           dead_run):
    """Rank 1 dies before forward 5 (round 1); the same command again keeps round 0's PNGs and
    records untouched (same inode and mtime), samples only round 1, and the folder then holds the
    bytes of an uninterrupted run (full_runs["a"]), with a manifest of all four images. The killed
    run is dead_run's, in a copy of its folder (files, mtimes; records name images by relative path)."""
    proc, _, dead_out = dead_run
    assert proc.returncode != 0, proc.stderr[-2000:]
    out = str(tmp_path / "out")
    shutil.copytree(dead_out, out)
    images = os.path.join(out, "images")
    finished = ["000.json", "000.png", "001.json", "001.png"]
    assert sorted(os.listdir(images)) == finished
    before = {n: (os.stat(os.path.join(images, n)).st_ino, os.stat(os.path.join(images, n)).st_mtime_ns)
              for n in finished}
    proc, _ = launch(out, [f"parallel.timeout_s={DEAD_TIMEOUT_S}"])
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert f"moe-ep: {out} held earlier images: keeping 2 of 4 images (finished, same record)" in proc.stderr, log
    for n in finished:
        st = os.stat(os.path.join(images, n))
        assert (st.st_ino, st.st_mtime_ns) == before[n], n      # not rewritten
    assert png_bytes(out) == png_bytes(full_runs["a"])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["resume"] == {"kept": 2, "sampled": 2} and summary["num_forwards"] == 4   # round 1 only
    with open(os.path.join(out, "manifest.jsonl")) as f:
        records = [json.loads(ln) for ln in f]
    assert [r["name"] for r in records] == ["000", "001", "002", "003"]
    assert [r["seed"] for r in records] == [0, 1, 2, 3]


@pytest.mark.slow   # starts jobs under DeepSpeed's launcher
def test_world_size_checks_under_the_launcher(tmp_path):
    """8 experts + 1 redundant slot cannot split over 2 EP ranks: found before any process group,
    one error line (from rank 0), exit 2 through the launcher, no output folder."""
    out = str(tmp_path / "out")
    proc, _ = launch(out, ["eplb.num_redundant_experts=1"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert error_lines(proc) == ["error: config field 'eplb.num_redundant_experts' = 1: experts + redundant experts "
                                 "(9) must be divisible by the EP size (2)"]
    assert "Traceback" not in proc.stderr and not os.path.exists(out)


def test_unreadable_config_file_is_one_line(tmp_path):
    """A config file config.load cannot parse (not UTF-8): one line, exit 2, no traceback."""
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe{}")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "infer.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: config field '--config'"), proc.stderr


# ---------------------------------------------------------------- atomic files

def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = str(tmp_path / "stats.json")
    write_json_atomic(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write('{"v": 2, "trunc')
            raise RuntimeError("interrupted")
    assert json.load(open(path)) == {"v": 1}
    assert os.listdir(tmp_path) == ["stats.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # like open(): not mkstemp's 0600


WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from moe_ep.atomic import atomic_write
with atomic_write({path!r}, "wb") as f:
    f.write(b"x" * 100000)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_sigkill_mid_write_leaves_old_file(tmp_path):
    """A writer SIGKILLed in the middle: the destination still holds the old, complete file; the
    leftover temp file has the .tmp- prefix no reader opens."""
    path = str(tmp_path / "000.png")
    open(path, "wb").write(b"old")
    p = subprocess.Popen([sys.executable, "-c", WRITER.format(root=ROOT, path=path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert open(path, "rb").read() == b"old"
    left = [f for f in os.listdir(tmp_path) if f != "000.png"]
    assert left and all(f.startswith(TMP_PREFIX) for f in left)


# `open(` then a write mode later on the same line, also past nested calls (open(os.path.join(a, b), "w"))
WRITE_CALL = re.compile(r"""open\(.*?["'](w|wb|a|ab|x|w\+)["']|torch\.save\(|np\.save|save_file\(|\.to_csv\(""")
ALLOWED = {("eplb/atomic.py", "os.fdopen"),                         # the helper itself (shared by eplb and moe_ep)
           ("moe_ep/telemetry.py", "METRICS_FILE"),                 # append-only log; torn last line skipped by readers
           ("moe_ep/models/diffusers/loader.py", "/proc/self/clear_refs")}  # resets the kernel's peak-RSS counter


def test_every_writer_is_atomic():
    """Audit: no module of the runtime, the planner, the launch or the benchmark scripts opens a file for
    writing except through an atomic helper (temp file + fsync + os.replace)."""
    bad = []
    for pkg in ("moe_ep", "eplb", "launch", "benchmarks"):
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(d, f), ROOT)
                for n, line in enumerate(open(os.path.join(d, f)), 1):
                    if WRITE_CALL.search(line) and not any(rel == a and tag in line for a, tag in ALLOWED):
                        bad.append(f"{rel}:{n}: {line.strip()}")
    assert not bad, "non-atomic writers:\n" + "\n".join(bad)
