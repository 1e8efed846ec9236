"""eplb.simulate: the paper model of MoE-layer time at scale (docs/simulator.md)."""
import json

import numpy as np
import pytest

from eplb import simulate as S
from eplb.cli import main as cli_main


def _none(windows, P, N, **kw):
    return S.simulate(windows, S.Config(P, N, policies=("none",), **kw))["none"]


def test_rates_hit_anchors_and_clamp():
    hw = S.Hardware()
    assert S.gemm_rate(128) == pytest.approx(370e12)
    assert S.gemm_rate(1024) == pytest.approx(579e12)
    assert S.gemm_rate(16) == pytest.approx(370e12) and S.gemm_rate(1 << 20) == pytest.approx(579e12)
    # log-space: the geometric midpoint of the tokens gets the arithmetic midpoint of the rates
    assert S.gemm_rate(np.sqrt(128 * 1024)) == pytest.approx((370e12 + 579e12) / 2)
    for size, bw in hw.nvlink_anchors:
        assert S.nvlink_time(size) == pytest.approx(size / bw)
    assert S.nvlink_time(0) == 0 and S.net_time(0) == 0
    assert S.nvlink_time(1024) == pytest.approx(S.nvlink_time(1 << 20))  # latency floor
    assert S.net_time(50e9) == pytest.approx(1.0 + hw.net_latency)


def test_one_gpu_within_30_percent_of_measurement():
    rows = S.check_rows()
    one = rows[0]
    assert one["dispatch_ms"] == 0 and one["combine_ms"] == 0
    assert abs(one["ms"] / S.MEASURED_1GPU["total"] - 1) < 0.30
    # the modelled part (expert compute) is close to the measured expert compute
    assert abs(one["compute_ms"] / S.MEASURED_1GPU["expert_compute"] - 1) < 0.05


def test_perfect_balance_equal_compute():
    load = np.full((3, 32), 100.0)
    ev = S.step_load(load, S.Model(), 8)
    t = S.layer_times(ev, S.contiguous(3, 32), 8, 2)
    assert np.allclose(t["gpu_compute"], t["gpu_compute"][0, 0])
    assert np.allclose(t["gpu_copies"], 8192 * 8)


def test_one_node_has_no_inter_node_traffic():
    w = S.zipf_trace(1.2, 4, 64, num_windows=1, seed=1, samples=1 << 13)[0]
    ev = S.step_load(w, S.Model(), 8)
    t = S.layer_times(ev, S.contiguous(4, 64), 8, 1)
    assert (t["inter_bytes"] == 0).all() and (t["intra_bytes"] > 0).any()
    slow_net = S.Hardware(net_bw=1.0, net_latency=10.0)
    assert np.allclose(S.layer_times(ev, S.contiguous(4, 64), 8, 1, hw=slow_net)["total"], t["total"])
    # and on several nodes the network carries traffic
    assert (S.layer_times(ev, S.contiguous(4, 64), 8, 2)["inter_bytes"] > 0).all()


def test_traffic_matches_token_level_routing():
    """The closed form equals routing every source GPU's copies to the replicas one by one."""
    rng = np.random.default_rng(0)
    P, N, E, R = 8, 2, 16, 24
    ppn = P // N
    load = rng.integers(0, 1000, size=(1, E)).astype(float)
    p2l = np.concatenate([np.arange(E), rng.integers(0, E, R - E)])[rng.permutation(R)][None]
    model = S.Model(hidden=64)
    ev = S.step_load(load, model, P)[0]
    cnt = np.bincount(p2l[0], minlength=E)
    M = np.zeros((P, P))  # copies from source s to GPU d
    for s in range(P):
        for slot, e in enumerate(p2l[0]):
            M[s, slot // (R // P)] += ev[e] / P / cnt[e]
    node = np.arange(P) // ppn
    same = node[:, None] == node[None, :]
    off = ~np.eye(P, dtype=bool)
    send_intra, recv_intra = (M * (same & off)).sum(1), (M * (same & off)).sum(0)
    send_inter, recv_inter = (M * ~same).sum(1), (M * ~same).sum(0)
    t = S.layer_times(ev[None], p2l, P, N, model)
    assert np.allclose(t["gpu_copies"][0], M.sum(0))
    assert np.allclose(t["intra_bytes"][0], np.maximum(send_intra, recv_intra) * model.copy_bytes)
    assert np.allclose(t["inter_bytes"][0], np.maximum(send_inter, recv_inter) * model.copy_bytes)


def test_more_skew_is_slower_without_rebalancing():
    times = [_none(S.zipf_trace(s, 4, 64, num_windows=1, seed=3, samples=1 << 13), 16, 2)["ms"] for s in (0.0, 0.6, 1.2, 1.8)]
    assert all(a < b for a, b in zip(times, times[1:])), times


def test_default_planner_not_slower_than_none():
    for E, topo in ((64, ((8, 1), (16, 2), (32, 4), (64, 8))), (256, ((8, 1), (64, 8)))):
        wins = S.zipf_trace(1.2, 4, E, num_windows=2, seed=4, samples=1 << 13)
        for P, N in topo:
            res = S.simulate(wins, S.Config(P, N, policies=("none", "default")))
            assert res["default"]["ms"] <= res["none"]["ms"], (E, P, N, res)
            assert res["default"]["balancedness"] >= res["none"]["balancedness"]


def test_overlap_and_rebalance_cost():
    w = S.zipf_trace(1.2, 2, 64, num_windows=1, seed=5, samples=1 << 13)[0]
    ev = S.step_load(w, S.Model(), 16)
    t0 = S.layer_times(ev, S.contiguous(2, 64), 16, 2)
    t1 = S.layer_times(ev, S.contiguous(2, 64), 16, 2, hw=S.Hardware(overlap=1.0))
    assert np.allclose(t1["total"], np.maximum(t0["compute"], t0["comm"]))
    assert np.allclose(t0["total"], t0["compute"] + t0["comm"])
    p = S.contiguous(2, 64)
    assert S.rebalance_cost(p, p, 16, 2)["seconds"] == 0
    # swap two experts between GPUs 0 and 15 (different nodes): 2 copies over the network per layer
    q = p.copy()
    q[:, [0, 63]] = q[:, [63, 0]]
    c = S.rebalance_cost(p, q, 16, 2)
    assert c["moved"] == 4 and c["inter"] == 4
    assert c["seconds"] == pytest.approx(2 * S.Model().expert_bytes / S.Hardware().net_bw)


def test_cli_stats_file_and_errors(tmp_path, capsys):
    wins = S.zipf_trace(1.2, 2, 16, num_windows=2, seed=6, samples=1 << 13)
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"format": "moe-ep.expert-load", "version": 1, "top_k": 8,
                                "load": (wins[0] + wins[1]).tolist(), "windows": [{"load": w.tolist()} for w in wins]}))
    assert cli_main(["simulate", "--stats", str(path), "--gpus", "8,16", "--nodes", "1,2", "--check"]) == 0
    out = capsys.readouterr().out
    assert "| 8 | 1 |" in out and "| 16 | 2 |" in out and "check, 1 GPU" in out
    assert cli_main(["simulate", "--synthetic", "zipf:-1", "--layers", "1", "--experts", "8"]) == 2
    assert "synthetic" in capsys.readouterr().err
    assert cli_main(["simulate", "--stats", str(tmp_path / "missing.json")]) == 2
