"""launch/infer.py end to end: the DeepSpeed launcher on 2 CPU ranks, EP = 1/2/4 give the same
images (with a rebalance in the middle of the run), bad configs stop cleanly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from moe_ep import config as config_mod
from mp import run_ranks
from tiny_job import ROOT, QUICKSTART, TINY_MODEL_SET, free_port

sys.path.insert(0, os.path.join(ROOT, "launch"))
import infer  # noqa: E402  (launch/infer.py)

# small and fast; the quickstart's eplb settings (window 2, interval 2) rebalance mid-run; the
# tiny model of tests/tiny_job.py, not the demo model
SMALL = [TINY_MODEL_SET, "sampling.num_inference_steps=4", "sampling.height=16", "sampling.width=16", "telemetry.wandb=false",
         'sampling.prompts=["a red fox", "a blue lake", "a green hill"]', "sampling.batch_size=2"]


def read_images(folder: str) -> dict[str, np.ndarray]:
    names = sorted(n for n in os.listdir(os.path.join(folder, "images")) if n.endswith(".png"))
    return {n: np.asarray(Image.open(os.path.join(folder, "images", n))) for n in names}



def _ranks_run(rank: int, world: int, overrides: list[str]) -> None:
    from moe_ep.job import run
    from moe_ep.parallel import context_for_tests

    cfg = config_mod.load(QUICKSTART, overrides)
    ctx = context_for_tests(rank, world, cfg.parallel.ep_size)
    run(cfg, ctx, progress=False)


def run_world(world: int, out: str, extra=()) -> None:
    run_ranks(world, _ranks_run, SMALL + [f"output_dir={out}"] + list(extra))


@pytest.mark.slow   # starts jobs under DeepSpeed's launcher
def test_deepspeed_launcher_quickstart_and_ep_invariance(tmp_path):
    """The real launcher on 2 ranks (telemetry on), then the same sampling on 1 rank, 4 ranks
    (EP 4) and 4 ranks as EP 2 x DP 2: identical images."""
    out2 = str(tmp_path / "ep2")
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    sets = [s for s in SMALL if not s.startswith("telemetry")] + [f"output_dir={out2}"]
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "launch/infer.py",
           "--config", QUICKSTART, "--no-progress", "--set", *sets]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.load(open(os.path.join(out2, "summary.json")))
    assert (summary["world_size"], summary["ep_size"], summary["dp_size"]) == (2, 2, 1)
    assert summary["num_forwards"] == 4  # batches [0, 1] and [2] on ranks 0 and 1: one round of 4 steps
    assert len(summary["steps"]) == summary["num_forwards"]
    assert all(s["latency_ms"] > 0 and s["tokens_per_s"] > 0 for s in summary["steps"])
    assert len(summary["balancedness"]["per_layer"]) == 3
    assert summary["eplb"]["enabled"]
    stats = json.load(open(os.path.join(out2, "stats.json")))
    load = np.asarray(stats["load"])                          # [L, E]
    tokens = 3 * (16 // 2) ** 2 * 2 * 4                        # prompts x tokens x cfg halves x steps
    assert load.shape == (3, 8) and (load.sum(1) == tokens * 2).all()  # top-2
    assert os.path.isdir(os.path.join(out2, "wandb"))
    assert not [f for f in os.listdir(out2) if f.startswith(".tmp")]

    imgs2 = read_images(out2)
    assert sorted(imgs2) == ["000.png", "001.png", "002.png"]
    for name, img in imgs2.items():
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8
        assert img.std() > 10, f"{name} is (nearly) constant"
    assert not np.array_equal(imgs2["000.png"], imgs2["001.png"])

    # EP 1; EP 4 and EP 2 x DP 2 with weights moving mid-run (min_gain -1)
    for name_, world, ep, extra in (("ep1", 1, 1, []), ("ep4", 4, 4, ["eplb.min_gain=-1"]),
                                    ("ep2dp2", 4, 2, ["eplb.min_gain=-1", "parallel.ep_size=2"])):
        out = str(tmp_path / name_)
        run_world(world, out, extra)
        imgs = read_images(out)
        assert sorted(imgs) == sorted(imgs2)
        for name in imgs:
            diff = np.abs(imgs[name].astype(int) - imgs2[name].astype(int)).max()
            assert diff == 0, f"{name_} vs EP=2: {name} differs by {diff}"
        s = json.load(open(os.path.join(out, "summary.json")))
        assert (s["world_size"], s["ep_size"], s["dp_size"]) == (world, ep, world // ep)
        if world == 4:  # rebalanced mid-run, weights moved, and the images above did not change
            assert all(e.get("status") != "failed" for e in s["rebalances"]), s["rebalances"]
            assert any(e.get("status") == "ok" and e["forward_idx"] >= 0 and e["experts_moved"] > 0
                       for e in s["rebalances"]), s["rebalances"]   # "skipped" everywhere is not a rebalance


def test_launch_command_and_print(capsys):
    cmd = infer.launch_command("hostfile", 2, 8, "configs/hunyuan_like.json", ["sampling.seed=3"])
    assert cmd == ["deepspeed", "--hostfile", "hostfile", "--num_nodes", "2", "--num_gpus", "8",
                   "launch/infer.py", "--config", "configs/hunyuan_like.json", "--set", "sampling.seed=3"]
    assert infer.launch_command(None, 1, 2, "c.json") == ["deepspeed", "--num_gpus", "2", "launch/infer.py",
                                                          "--config", "c.json"]
    rc = infer.main(["--config", QUICKSTART, "--print-launch-cmd", "--hostfile", "hf", "--num-nodes", "2",
                     "--num-gpus", "8"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == (
        f"deepspeed --hostfile hf --num_nodes 2 --num_gpus 8 launch/infer.py --config {QUICKSTART}")


BAD = [
    (["model.hidden_sise=64"], "model.hidden_sise", "unknown key"),
    (["sampling.num_inference_steps=\"four\""], "sampling.num_inference_steps", "must be an integer"),
    (["model.moe.top_k=65"], "model.moe.top_k", "must be <= model.moe.num_experts"),
    (["sampling.height=33"], "sampling.height", "multiple of model.patch_size"),
    (["parallel.ep_size=3"], "parallel.ep_size", "must divide the world size"),
    (["eplb.num_redundant_experts=1", "parallel.ep_size=2"], "parallel.ep_size", "divide the world size"),
    (["model.text_encoder=\"no_such_module_xyz:encode\""], "model.text_encoder", "cannot import"),
    (["model.checkpoint=\"/nonexistent/ckpt.safetensors\""], "model.checkpoint", "file not found"),
    # experts that cannot fit: ~300 GB of slots on one rank, refused before anything is allocated
    (["model.checkpoint=null", "model.moe.expert_hidden_size=1000000"], "model.moe.expert_hidden_size",
     "one rank's expert slots alone need"),
]


@pytest.mark.parametrize("overrides,field,words", BAD)
def test_bad_config_in_process(tmp_path, capsys, overrides, field, words):
    out = tmp_path / "out"
    rc = infer.main(["--config", QUICKSTART, "--set", f"output_dir={out}", *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"error: config field '{field}'"), err
    assert words in err, err
    assert not out.exists()


def test_bad_layout_for_world_size(tmp_path, capsys, monkeypatch):
    """64 experts + 1 redundant slot cannot split over 3 EP ranks: caught before any process group."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    out = tmp_path / "out"
    rc = infer.main(["--config", QUICKSTART, "--set", f"output_dir={out}", "eplb.num_redundant_experts=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: config field 'eplb.num_redundant_experts' = 1:"), err
    assert "divisible by the EP size (3)" in err and not out.exists()


def test_bad_config_subprocess(tmp_path):
    """As a user runs it: exit status 2, one line on stderr, nothing written."""
    bad = tmp_path / "bad.json"
    data = json.load(open(QUICKSTART))
    data["model"]["moe"]["num_expert"] = 8
    data["output_dir"] = str(tmp_path / "out")
    bad.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "infer.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip()] and proc.stderr.startswith("error: config field 'model.moe.num_expert' = 8: unknown key")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rank,local,sets,printed", [
    ("1", "0", ["model.checkpoint=\"/nonexistent/ckpt.safetensors\""], True),   # a path: this node's own view
    ("1", "1", ["model.checkpoint=\"/nonexistent/ckpt.safetensors\""], False),  # its node's first rank says it
    ("1", "0", ["model.moe.top_k=65"], False),                                  # the same on every node: rank 0
])
def test_who_prints_an_error_found_before_the_process_group(tmp_path, capsys, monkeypatch, rank, local, sets, printed):
    """Rank 0 always prints; the first rank of another node prints path errors too (its files may
    differ), prefixed with its rank; nobody else does. Exit 2 either way."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local)
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = infer.main(["--config", QUICKSTART, "--set", f"output_dir={tmp_path / 'out'}", *sets])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    if printed:
        assert len(err.splitlines()) == 1 and err.startswith("error: rank 1: config field 'model.checkpoint'"), err
    else:
        assert err == "", err


def test_last_line_counts_moves_not_attempts():
    """The run's last line says how many rebalances moved experts, apart from the attempts that were
    skipped or failed (at EP = 1 every attempt is skipped: one rank is always balanced)."""
    events = [{"ok": True, "status": "ok"}, {"ok": False, "status": "skipped"}, {"ok": False, "status": "skipped"},
              {"ok": False, "status": "failed"}]
    assert infer.rebalance_line(events) == "1 of 4 rebalances moved experts (1 failed, 2 skipped)"
    assert infer.rebalance_line([]) == "0 of 0 rebalances moved experts"
    assert infer.rebalance_line(events[:1]) == "1 of 1 rebalances moved experts"
