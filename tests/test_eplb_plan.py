"""eplb planner: validity, determinism, default vs greedy, degenerate inputs, lower bound."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb import gpu_load, max_load_lower_bound, plan_balancedness, rebalance_experts
from eplb.greedy import greedy_plan, greedy_reference
from eplb.synthetic import zipf_windows

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    """(weight [L, E], R, G, N, P) with a valid topology, hierarchical or global."""
    N = draw(st.sampled_from([1, 2, 4]))
    ppn = draw(st.sampled_from([1, 2, 4]))
    P = N * ppn
    hier = draw(st.booleans())
    if hier:
        G = N * draw(st.sampled_from([1, 2, 3]))
        E = G * draw(st.integers(1, 4))
    else:
        G = draw(st.sampled_from([3, 5])) if N > 1 else 1
        E = draw(st.integers(2, 24))
    k_min = -(-E // P)
    k = draw(st.integers(k_min, k_min + 3))
    R = P * k
    L = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["zipf", "int", "zero", "hot", "ties"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "zipf":
        w = zipf_windows(int(rng.integers(1 << 16)), L, E, float(rng.uniform(0.5, 2.0)), tokens_per_layer=4096)[0]
    elif kind == "int":
        w = rng.integers(0, 1000, size=(L, E)).astype(np.float64)
    elif kind == "zero":
        w = np.zeros((L, E))
    elif kind == "hot":
        w = np.zeros((L, E))
        w[:, rng.integers(E)] = 1000.0
    else:
        w = np.full((L, E), 7.0)
    return w, R, G, N, P


def check_valid(w, R, G, N, P, phy2log, log2phy, logcnt):
    L, E = w.shape
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.shape == (L, R) and logcnt.shape == (L, E) and log2phy.shape == (L, E, R - E + 1)
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == R).all()
    cnt = torch.zeros(L, E, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    assert torch.equal(cnt, logcnt)
    for layer in range(L):
        for e in range(E):
            slots = log2phy[layer, e]
            valid = slots[slots >= 0]
            assert len(valid) == logcnt[layer, e]
            assert (slots[len(valid):] == -1).all()
            assert (phy2log[layer, valid] == e).all()
    if G % N == 0 and N > 1:  # every replica of a group's experts on one node
        node_of_slot = torch.arange(R) // (R // N)
        group = phy2log // (E // G)  # [L, R]
        for layer in range(L):
            for g in range(G):
                assert len(set(node_of_slot[group[layer] == g].tolist())) == 1


@SETTINGS
@given(problems(), st.sampled_from(["default", "greedy"]))
def test_valid_and_deterministic(prob, policy):
    w, R, G, N, P = prob
    out = rebalance_experts(w, R, G, N, P, policy=policy)
    check_valid(w, R, G, N, P, *out)
    again = rebalance_experts(torch.from_numpy(w.copy()), R, G, N, P, policy=policy)
    for a, b in zip(out, again):
        assert torch.equal(a, b)


@SETTINGS
@given(problems())
def test_default_never_worse_than_greedy_per_layer(prob):
    w, R, G, N, P = prob
    pg = rebalance_experts(w, R, G, N, P, policy="greedy")[0]
    pd = rebalance_experts(w, R, G, N, P)[0]
    top_g = gpu_load(w, pg, P).max(-1).values
    top_d = gpu_load(w, pd, P).max(-1).values
    assert (top_d <= top_g * (1 + 1e-9) + 1e-9).all()
    assert plan_balancedness(w, pd, P) >= plan_balancedness(w, pg, P) - 1e-9


@SETTINGS
@given(problems())
def test_lower_bound_is_below_achieved(prob):
    w, R, G, N, P = prob
    hier = G % N == 0
    bound = max_load_lower_bound(w, R, G if hier else 1, N if hier else 1, P)
    for policy in ("default", "greedy"):
        top = gpu_load(w, rebalance_experts(w, R, G, N, P, policy=policy)[0], P).max(-1).values
        assert (bound <= top * (1 + 1e-9) + 1e-9).all()


@settings(max_examples=15, deadline=None)
@given(problems())
def test_greedy_vectorised_matches_reference(prob):
    w, R, G, N, P = prob
    w = np.round(w)  # integer loads: sums are exact, both versions see identical numbers
    hier = G % N == 0
    g, n = (G, N) if hier else (1, 1)
    assert torch.equal(greedy_plan(torch.from_numpy(w), R, g, n, P), greedy_reference(w, R, g, n, P))


def test_skewed_case_much_better():
    w1, _ = zipf_windows(3, 8, 64, 1.5)
    g = plan_balancedness(w1, rebalance_experts(w1, 80, 8, 2, 8, policy="greedy")[0], 8)
    d = plan_balancedness(w1, rebalance_experts(w1, 80, 8, 2, 8)[0], 8)
    assert d >= g * 1.02


def test_greedy_reference_policy_matches():
    w = np.random.default_rng(0).integers(0, 100, size=(3, 16)).astype(float)
    a = rebalance_experts(w, 24, 4, 2, 4, policy="greedy")
    b = rebalance_experts(w, 24, 4, 2, 4, policy="greedy_reference")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("weight, args, field", [
    (np.ones(8), (8, 1, 1, 4), "weight"),
    (np.ones((2, 2, 2)), (8, 1, 1, 4), "weight"),
    (np.zeros((2, 0)), (8, 1, 1, 4), "weight"),
    (np.array([[1.0, float("nan")] * 4]), (8, 1, 1, 4), "NaN"),
    (np.array([[1.0, float("inf")] * 4]), (8, 1, 1, 4), "inf"),
    (np.array([[1.0, -1.0] * 4]), (8, 1, 1, 4), "negative"),
    (np.ones((2, 8)), (10, 1, 1, 4), "num_replicas"),
    (np.ones((2, 8)), (4, 1, 1, 4), "num_replicas"),
    (np.ones((2, 8)), (8, 3, 3, 4), "num_gpus"),
    (np.ones((2, 9)), (12, 2, 2, 4), "num_groups"),
    (np.ones((2, 8)), (8, 0, 1, 4), "num_groups"),
    (np.ones((2, 8)), (8, 1, 1, 4.0), "num_gpus"),
    ([["a"] * 8], (8, 1, 1, 4), "weight"),
])
def test_bad_input_is_a_clear_value_error(weight, args, field):
    with pytest.raises(ValueError, match=field):
        rebalance_experts(weight, *args)


def test_bad_policy_and_previous():
    w = np.ones((2, 8))
    with pytest.raises(ValueError, match="policy"):
        rebalance_experts(w, 8, 1, 1, 4, policy="nope")
    with pytest.raises(ValueError, match="previous_phy2log"):
        rebalance_experts(w, 8, 1, 1, 4, previous_phy2log=np.zeros((2, 7), dtype=np.int64))
    with pytest.raises(ValueError, match="previous_phy2log"):
        rebalance_experts(w, 8, 1, 1, 4, previous_phy2log=np.full((2, 8), 9))


def test_global_fallback_when_groups_do_not_divide_nodes():
    w = np.arange(1, 11, dtype=float)[None].repeat(2, 0)  # E=10 not divisible by 3 groups
    out = rebalance_experts(w, 12, 3, 2, 4)
    check_valid(w, 12, 3, 2, 4, *out)


def test_integer_and_tensor_inputs():
    w = torch.tensor([[5, 1, 1, 1, 0, 0, 0, 0]])
    out = rebalance_experts(w, 8, 1, 1, 2)
    check_valid(w.double().numpy(), 8, 1, 1, 2, *out)


def test_bench_cli_numbers(monkeypatch, capsys):
    """`python -m eplb bench --quick --seeds 0 7` (through eplb/__main__.py, on two small sizes): one
    table row per (seed, size, skew) whose balancedness columns are the planner's own numbers for
    those seeded loads, default >= greedy <= bound, and summary lines that follow from the rows."""
    import re
    import runpy
    import sys

    import eplb.bench as bench
    from eplb import lower_bound_balancedness

    sizes = ((4, 8, 12, 4, 2, 4), (6, 16, 20, 1, 1, 4))  # (L, E, R, G, N, P)
    monkeypatch.setattr(bench, "QUICK_SIZES", sizes)
    # only the seeded synthetic cases here (rows from a recorded trace, where the bench adds them, are left out)
    monkeypatch.setattr(bench, "trace_windows", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(sys, "argv", ["python -m eplb", "bench", "--quick", "--seeds", "0", "7"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("eplb", run_name="__main__")
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln for ln in lines if re.match(r"^\| \d+x\d+", ln)]
    assert len(rows) == 2 * len(sizes) * 2
    ratios, ratios_next = [], []
    for i, row in enumerate(rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        sd, ci, si = (0, 7)[i // 4], (i // 2) % 2, i % 2
        L, E, R, G, N, P = sizes[ci]
        skew = bench.SKEWS[0] if si == 0 else bench.SKEWS[-1]
        assert cells[0] == f"{L}x{E}, {R}" and cells[1] == f"{G}/{N}/{P}" and float(cells[2]) == skew
        w1, w2 = zipf_windows(sd + 100 * ci + si, L, E, skew)
        pg = rebalance_experts(w1, R, G, N, P, policy="greedy")[0]
        pd = rebalance_experts(w1, R, G, N, P)[0]
        pp = rebalance_experts(w1, R, G, N, P, drift_hedge=False)[0]
        hier = G % N == 0
        want = [plan_balancedness(w1, pg, P), plan_balancedness(w1, pd, P), plan_balancedness(w1, pp, P),
                lower_bound_balancedness(w1, R, G if hier else 1, N if hier else 1, P),
                plan_balancedness(w2, pg, P), plan_balancedness(w2, pd, P), plan_balancedness(w2, pp, P)]
        got = [float(c) for c in cells[3:10]]
        assert got == pytest.approx(want, abs=5.1e-5), (row, want)
        assert got[1] >= got[0] - 1e-4 and got[3] >= got[1] - 1e-4
        assert all(float(c) > 0 for c in cells[10:14])  # times, ms
        ratios.append(want[1] / want[0])
        ratios_next.append(want[5] / want[4])
    summary = next(ln for ln in lines if ln.startswith("default / greedy:"))
    gm = float(np.exp(np.mean(np.log(ratios))))
    gm_next = float(np.exp(np.mean(np.log(ratios_next))))
    assert f"planning window {gm:.4f}" in summary and f"next window {gm_next:.4f}" in summary, summary
    assert summary.endswith(f"of {len(rows)} cases")
