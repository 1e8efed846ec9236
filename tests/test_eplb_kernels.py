"""eplb: NumPy kernels of the default policy, the loop baselines, the drift hedge and max_moves."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb import experts_moved, gpu_load, rebalance_experts
from eplb.greedy import greedy_plan, greedy_pylist, greedy_torch_loops
from eplb.kernels import differencing_pack, greedy_pack, layout_loads, refine_swaps, replicate_rows
from eplb.packing import greedy_packing, pack_loads
from eplb.policy import _assemble, plan_candidates
from eplb.replication import replicate_divisor
from eplb.synthetic import zipf_windows

from test_eplb_plan import check_valid, problems

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.integers(0, 2**16), st.integers(1, 9), st.integers(0, 20), st.integers(1, 5), st.sampled_from([-0.5, 0.0, 1.0]))
def test_replicate_rows_matches_torch_divisor(seed, n, extra, cap, delta):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 50, size=(3, n)).astype(np.float64)
    got = replicate_rows(w, n + extra, np.full(3, cap), np.full(3, delta))
    want = replicate_divisor(torch.from_numpy(w), n + extra, cap=cap, delta=delta).numpy()
    assert np.array_equal(got, want)
    uncapped = replicate_rows(w, n + extra, np.full(3, n + extra), np.zeros(3))
    assert np.array_equal(uncapped, replicate_divisor(torch.from_numpy(w), n + extra).numpy())


@FAST
@given(st.integers(0, 2**16), st.sampled_from([1, 2, 3, 8]), st.integers(1, 6))
def test_packings_are_layouts_and_refine_never_raises(seed, P, k):
    rng = np.random.default_rng(seed)
    items = np.round(rng.pareto(1.5, size=(5, P * k)) * 100)  # integer loads, ties included
    for fn in (greedy_pack, differencing_pack):
        idx = fn(items, P)
        assert idx.shape == (5, P, k)
        assert (np.sort(idx.reshape(5, -1), axis=1) == np.arange(P * k)).all()  # every item once
        before = layout_loads(items, idx).max(-1)
        refine_swaps(items, idx, partners=2)
        assert (np.sort(idx.reshape(5, -1), axis=1) == np.arange(P * k)).all()
        assert (layout_loads(items, idx).max(-1) <= before * (1 + 1e-12)).all()
    # greedy_pack gives greedy_packing's pack loads
    pack, _ = greedy_packing(torch.from_numpy(items), P)
    want = torch.sort(pack_loads(torch.from_numpy(items), pack, P), -1).values.numpy()
    assert np.array_equal(np.sort(layout_loads(items, greedy_pack(items, P)), -1), want)


def _unrefined_rule0(w, R, g, n, P) -> torch.Tensor:
    c = plan_candidates(torch.from_numpy(w), R, g, n, P)
    return torch.from_numpy(_assemble(c["mlog2log"][0], c["item_expert"][0, 0], c["idx0"][0, 0]))


@pytest.mark.parametrize("plan", [
    greedy_torch_loops,   # the loop baselines
    greedy_pylist,
    # the drift hedge and the never-worse guard rely on candidate (rule 0, option 0) before
    # refinement being greedy's plan
    _unrefined_rule0,
], ids=["greedy_torch_loops", "greedy_pylist", "unrefined_rule0"])
@settings(max_examples=15, deadline=None)
@given(prob=problems())
def test_matches_vectorised_greedy(plan, prob):
    """The loop baselines and the default policy's unrefined (rule 0, option 0) candidate give
    exactly greedy_plan's placement."""
    w, R, G, N, P = prob
    w = np.round(w)
    g, n = (G, N) if G % N == 0 else (1, 1)
    got = plan(w, R, g, n, P)
    want = greedy_plan(torch.from_numpy(w), R, g, n, P)
    assert torch.equal(got, want)


@FAST
@given(problems())
def test_no_hedge_is_valid_and_never_worse(prob):
    w, R, G, N, P = prob
    out = rebalance_experts(w, R, G, N, P, drift_hedge=False)
    check_valid(w, R, G, N, P, *out)
    top_g = gpu_load(w, rebalance_experts(w, R, G, N, P, policy="greedy")[0], P).max(-1).values
    assert (gpu_load(w, out[0], P).max(-1).values <= top_g * (1 + 1e-9) + 1e-9).all()


def test_hedge_is_deterministic_and_helps_on_skewed_case():
    w1, _ = zipf_windows(11, 6, 64, 1.3)
    a = rebalance_experts(w1, 80, 8, 2, 8)[0]
    assert torch.equal(a, rebalance_experts(torch.from_numpy(w1), 80, 8, 2, 8)[0])
    g = gpu_load(w1, rebalance_experts(w1, 80, 8, 2, 8, policy="greedy")[0], 8).max(-1).values
    assert (gpu_load(w1, a, 8).max(-1).values <= g * (1 + 1e-9)).all()


@pytest.mark.parametrize("topo", [(32, 48, 8, 4, 8), (16, 16, 1, 1, 4), (16, 24, 4, 2, 4)])
def test_max_moves_budget(topo):
    E, R, G, N, P = topo
    w1, w2 = zipf_windows(3, 6, E, 1.2, tokens_per_layer=5000)
    prev = rebalance_experts(w1, R, G, N, P, policy="greedy")[0]
    free = rebalance_experts(w2, R, G, N, P, previous_phy2log=prev)[0]
    per_layer = (free != prev).sum(-1)
    budget = int(per_layer.float().median())
    out = rebalance_experts(w2, R, G, N, P, previous_phy2log=prev, max_moves=budget)
    check_valid(w2, R, G, N, P, *out)
    moved = (out[0] != prev).sum(-1)
    assert (moved <= budget).all()
    within = per_layer <= budget
    assert torch.equal(out[0][within], free[within])  # layers within budget keep the plan
    assert torch.equal(out[0][~within], prev[~within])  # the others keep their placement
    assert experts_moved(prev, rebalance_experts(w2, R, G, N, P, previous_phy2log=prev, max_moves=0)[0]) == 0


def test_max_moves_bad_input():
    w = np.ones((2, 8))
    prev = np.tile(np.arange(8), (2, 1))
    with pytest.raises(ValueError, match="max_moves"):
        rebalance_experts(w, 8, 1, 1, 4, max_moves=3)  # no previous placement
    with pytest.raises(ValueError, match="max_moves"):
        rebalance_experts(w, 8, 1, 1, 4, previous_phy2log=prev, max_moves=-1)
    holey = prev.copy()
    holey[1, 0] = 1  # expert 0 has no slot in layer 1
    with pytest.raises(ValueError, match="previous_phy2log: layer 1 has no slot for expert 0"):
        rebalance_experts(w, 8, 1, 1, 4, previous_phy2log=holey, max_moves=3)


def test_cli_max_moves_needs_previous(tmp_path, capsys):
    import json
    from eplb.cli import main
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"load": [[1, 2, 3, 4]]}))
    assert main(["plan", "--stats", str(path), "--replicas", "4", "--gpus", "2", "--max-moves", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-moves: needs --previous (the placement whose moves it limits)"
