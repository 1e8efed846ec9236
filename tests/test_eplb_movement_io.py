"""eplb: minimal movement, metrics, stats/placement files and the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb import experts_moved, gpu_load, load_placement, load_stats, rebalance_experts, save_placement
from eplb.synthetic import zipf_windows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([(16, 24, 4, 2, 4), (16, 24, 3, 2, 4), (8, 8, 1, 1, 4), (32, 48, 8, 4, 8)]))
def test_minimal_movement_keeps_balance_and_moves_less(seed, topo):
    E, R, G, N, P = topo
    w1, w2 = zipf_windows(seed, 3, E, 1.2, tokens_per_layer=5000)
    prev = rebalance_experts(w1, R, G, N, P, policy="greedy")[0]
    plain = rebalance_experts(w2, R, G, N, P)[0]
    kept = rebalance_experts(w2, R, G, N, P, previous_phy2log=prev)[0]
    # same per-GPU loads up to a permutation of GPUs -> identical balance
    a = torch.sort(gpu_load(w2, plain, P), -1).values
    b = torch.sort(gpu_load(w2, kept, P), -1).values
    assert torch.allclose(a, b, rtol=0, atol=1e-9)
    assert experts_moved(prev, kept) <= experts_moved(prev, plain)
    # planning again with the plan as previous placement moves nothing
    again = rebalance_experts(w2, R, G, N, P, previous_phy2log=kept)[0]
    assert experts_moved(kept, again) == 0


def test_movement_hierarchical_locality_kept():
    w1, w2 = zipf_windows(5, 4, 32, 1.3)
    prev = rebalance_experts(w1, 48, 8, 4, 8)[0]
    out = rebalance_experts(w2, 48, 8, 4, 8, previous_phy2log=prev)
    group = out[0] // 4  # [L, R]
    node = torch.arange(48) // 12
    for layer in range(4):
        for g in range(8):
            assert len(set(node[group[layer] == g].tolist())) == 1


def test_metrics():
    w = np.array([[4.0, 2.0, 1.0, 1.0]])
    p2l = np.array([[0, 1, 2, 3]])
    loads = gpu_load(w, p2l, 2)
    assert loads.tolist() == [[6.0, 2.0]]
    assert eplb.balancedness(loads) == pytest.approx(4.0 / 6.0)
    assert eplb.balancedness(np.zeros((3, 4))) == 1.0
    assert eplb.balancedness_per_layer(np.zeros((2, 4))).tolist() == [1.0, 1.0]
    assert experts_moved(p2l, np.array([[0, 1, 3, 2]])) == 2
    # one expert at 8 with 2 replicas over 2 GPUs can reach max 4 per GPU; bound says >= 4
    assert float(eplb.max_load_lower_bound(np.array([[8.0, 0.0]]), 4, 1, 1, 2)[0]) == pytest.approx(4.0)


def _stats(tmp_path, load, **extra):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"format": "moe-ep.expert-load", "version": 1, "load": load, **extra}))
    return str(path)


def test_stats_and_placement_round_trip(tmp_path):
    w1, w2 = zipf_windows(1, 2, 8, 1.0)
    path = _stats(tmp_path, w1.tolist(), num_layers=2, num_experts=8, windows=[{"load": w2.tolist()}])
    stats = load_stats(path)
    assert stats["load"].dtype == np.float64 and stats["load"].shape == (2, 8)
    assert stats["windows"][0]["load"].shape == (2, 8)
    phy2log = rebalance_experts(stats["load"], 12, 4, 2, 4)[0]
    out = tmp_path / "placement.json"
    save_placement(str(out), phy2log, 4, 2)
    back, meta = load_placement(str(out), return_meta=True)
    assert back.dtype == np.int64 and np.array_equal(back, phy2log.numpy())
    assert meta["num_replicas"] == 12 and meta["num_gpus"] == 4 and meta["num_nodes"] == 2
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


@pytest.mark.parametrize("doc, field", [
    ({"version": 1}, "load"),
    ({"load": [[1, 2], [3]]}, "load"),
    ({"load": [[1, -2]]}, "load"),
    ({"load": [[1, "x"]]}, "load"),
    ({"load": [[1, 2]], "num_experts": 3}, "num_experts"),
    ({"load": [[1, 2]], "windows": [{"load": [[1, 2, 3]]}]}, r"windows\[0\].load"),
    ({"load": [[1, 2]], "format": "other"}, "format"),
])
def test_bad_stats_file(tmp_path, doc, field):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=field):
        load_stats(str(path))


def test_bad_stats_nan(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"load": [[1, NaN]]}')
    with pytest.raises(ValueError, match="load"):
        load_stats(str(path))


@pytest.mark.parametrize("change, field", [
    ({"format": "x"}, "format"),
    ({"num_replicas": 5}, "num_replicas"),
    ({"num_gpus": 3}, "num_gpus"),
    ({"phy2log": [[0, 1, 1, 1]]}, "phy2log"),
    ({"phy2log": [[0, 1, 2, 9]]}, "phy2log"),
])
def test_bad_placement_file(tmp_path, change, field):
    doc = {"format": "moe-ep.placement", "version": 1, "num_layers": 1, "num_experts": 4, "num_replicas": 4,
           "num_gpus": 2, "num_nodes": 1, "phy2log": [[0, 1, 2, 3]]}
    doc.update(change)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=field):
        load_placement(str(path))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "eplb", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_cli_plan_round_trip(tmp_path, capsys):
    """`python -m eplb plan` as a user runs it, then the same CLI (in process: a second interpreter
    costs 4 s on 2 cores) from the placement it wrote as --previous: nothing moves."""
    from eplb.cli import main

    w1, _ = zipf_windows(2, 3, 16, 1.2)
    stats = _stats(tmp_path, w1.tolist())
    out = tmp_path / "placement.json"
    r = _cli("plan", "--stats", stats, "--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "balancedness before" in r.stdout and "balancedness after" in r.stdout
    p1 = load_placement(str(out))
    assert p1.shape == (3, 16)
    out2 = tmp_path / "placement2.json"
    rc = main(["plan", "--stats", stats, "--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "4",
               "--previous", str(out), "--out", str(out2)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "experts moved vs --previous: 0" in captured.out


@pytest.mark.parametrize("doc, args, field", [
    ({"load": [[1, 2, 3, 4]]}, ("--replicas", "6", "--gpus", "4"), "num_replicas"),
    ({"load": [[1, 2, 3, 4]]}, ("--replicas", "2", "--gpus", "2"), "num_replicas"),
    ({"nope": 1}, ("--replicas", "4", "--gpus", "2"), "load"),
])
def test_cli_bad_input_exit_2(tmp_path, capsys, doc, args, field):
    from eplb.cli import main
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    assert main(["plan", "--stats", str(path), *args, "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert field in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


def test_cli_file_problems_are_one_line(tmp_path, capsys):
    """A folder as --stats, and --out a folder or in a missing folder (refused before planning):
    exit 2, one error line, no traceback, nothing written. simulate's top-k out of range too."""
    from eplb.cli import main
    good = tmp_path / "s.json"
    good.write_text(json.dumps({"load": [[1, 2, 3, 4]]}))
    cases = [(["plan", "--stats", str(tmp_path), "--replicas", "4", "--gpus", "2"], "--stats " + str(tmp_path) + ": is a folder"),
             (["plan", "--stats", str(tmp_path / "nope.json"), "--replicas", "4", "--gpus", "2"], "--stats "),
             (["plan", "--stats", str(good), "--replicas", "4", "--gpus", "2", "--previous", str(tmp_path / "p.json")],
              "--previous " + str(tmp_path / "p.json") + ": file not found"),
             (["plan", "--stats", str(good), "--replicas", "4", "--gpus", "2", "--out", str(tmp_path)], "--out"),
             (["plan", "--stats", str(good), "--replicas", "4", "--gpus", "2", "--out",
               str(tmp_path / "no" / "o.json")], "does not exist"),
             (["simulate", "--synthetic", "zipf:1.2", "--layers", "1", "--experts", "8", "--top-k", "-2"], "--top-k"),
             (["simulate", "--stats", str(good), "--top-k", "5"], "--top-k")]
    for argv, words in cases:
        assert main(argv) == 2, argv
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (argv, out.err)
        assert "balancedness" not in out.out, argv   # refused before planning
    assert sorted(os.listdir(tmp_path)) == ["s.json"]
