"""Property-based planner inputs: `eplb.rebalance_experts`, `eplb.load_stats` and `python -m eplb plan`
with NaN, inf, negative, all-zero, tiny and huge loads, wrong shapes and dtypes, and bad sizes.
Each call gives a clear ValueError or a valid plan (checked slot by slot). docs/reliability.md
lists the counts."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb.checks import as_load_tensor
from eplb.cli import main as eplb_main

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

SPECIAL = [0.0, 1.0, 3.0, 1e-300, 5e-324, 1e6, 1e18, 1e300, -1.0, -0.0, math.nan, math.inf, -math.inf]


def check_plan(weight: np.ndarray, out, R: int, G: int, N: int, P: int) -> None:
    """A plan is valid: shapes, dtypes, every expert placed, log2phy/logcnt consistent with phy2log,
    and (hierarchical case) every expert group on one node."""
    phy2log, log2phy, logcnt = out
    L, E = weight.shape
    assert phy2log.dtype == torch.int64 and tuple(phy2log.shape) == (L, R)
    assert tuple(logcnt.shape) == (L, E) and tuple(log2phy.shape) == (L, E, R - E + 1)
    p = phy2log.numpy()
    assert p.min() >= 0 and p.max() < E
    for l in range(L):
        cnt = np.bincount(p[l], minlength=E)
        assert (cnt >= 1).all(), f"layer {l}: experts without a slot"
        assert np.array_equal(cnt, logcnt[l].numpy())
        for e in range(E):
            slots = sorted(log2phy[l, e, :cnt[e]].tolist())
            assert slots == sorted(np.nonzero(p[l] == e)[0].tolist())
            assert (log2phy[l, e, cnt[e]:] == -1).all()
    if G % N == 0 and N > 1:
        per_node, per_group = R // N, E // G
        for l in range(L):
            node_of_group = {}
            for s in range(R):
                g = int(p[l, s]) // per_group
                assert node_of_group.setdefault(g, s // per_node) == s // per_node, "a group spans nodes"


def plan_or_value_error(weight, R, G, N, P, policy):
    try:
        return eplb.rebalance_experts(weight, R, G, N, P, policy=policy)
    except ValueError as err:
        assert str(err) and "\n" not in str(err).strip(), repr(err)
        return None


@st.composite
def topology(draw):
    """Mostly valid sizes (so plans get checked), sometimes broken ones."""
    E = draw(st.integers(1, 12))
    N = draw(st.sampled_from([1, 1, 2, 3]))
    G = draw(st.sampled_from([1, N, 2 * N, E, 3]))
    P = N * draw(st.integers(1, 3))
    R = draw(st.integers(E, E + 8))
    R += (-R) % P
    if draw(st.integers(0, 9)) == 0:  # broken on purpose
        which = draw(st.sampled_from(["R", "G", "N", "P"]))
        bad = draw(st.sampled_from([0, -1, E - 1, R + 1, 7, True, 2.0, "4", None]))
        R, G, N, P = [bad if k == which else v for k, v in zip("RGNP", (R, G, N, P))]
    return E, R, G, N, P


@FUZZ
@given(topo=topology(), L=st.integers(1, 3), data=st.data(), policy=st.sampled_from(["default", "greedy"]))
def test_fuzz_rebalance_experts_special_loads(topo, L, data, policy):
    """Loads mixing zeros, tiny (5e-324), huge (1e300), negative, NaN and inf values."""
    E, R, G, N, P = topo
    mode = data.draw(st.sampled_from(["special", "zeros", "uniform", "skewed", "huge"]))
    if mode == "special":
        w = np.array(data.draw(st.lists(st.sampled_from(SPECIAL), min_size=L * E, max_size=L * E))).reshape(L, E)
    elif mode == "zeros":
        w = np.zeros((L, E))
    elif mode == "uniform":
        w = np.full((L, E), data.draw(st.sampled_from([1.0, 1e300, 5e-324])))
    elif mode == "huge":  # per-layer sums near float64's limit (1.7e308: see test_gap_loads_near_float64_max)
        w = np.full((L, E), 1e300)
    else:
        w = np.array(data.draw(st.lists(st.floats(0, 1e9), min_size=L * E, max_size=L * E))).reshape(L, E)
        w[:, 0] *= 1000
    out = plan_or_value_error(w, R, G, N, P, policy)
    bad_values = not np.isfinite(w).all() or (w < 0).any()
    sizes_ok = all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (R, G, N, P)) \
        and R >= E and R % P == 0 and P % N == 0 and not (G % N == 0 and E % G)
    if bad_values or not sizes_ok:
        assert out is None, f"accepted bad input: sizes {topo}, loads {w.tolist()}"
    else:
        assert out is not None, f"refused valid input: sizes {topo}, loads {w.tolist()}"
        check_plan(w, out, R, G, N, P)


WEIRD_INPUTS = [
    np.array([1.0, 2.0]), np.zeros((0, 4)), np.zeros((2, 0)), np.zeros((2, 2, 2)), np.array(3.0),
    [[1, 2], [3]], [["a", "b"]], [[None, 1.0]], [[True, False]], {"a": 1}, "1,2", None,
    torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4, dtype=torch.complex64), torch.ones(2, 4, dtype=torch.float16),
    torch.ones(2, 4, dtype=torch.bfloat16), torch.ones(2, 4, dtype=torch.int32), torch.ones(2, 4, dtype=torch.uint8),
    np.ones((2, 4), dtype=np.int64), np.ones((2, 4), dtype=np.float32), np.ones((2, 4), dtype=object),
    np.array([[1, 2, 3, 4]], dtype=np.uint64) * (2 ** 63), torch.full((2, 4), float("nan")),
]


@pytest.mark.parametrize("weight", WEIRD_INPUTS, ids=range(len(WEIRD_INPUTS)))
@pytest.mark.parametrize("policy", ["default", "greedy"])
def test_rebalance_experts_weird_shapes_and_dtypes(weight, policy):
    out = plan_or_value_error(weight, 4, 1, 1, 2, policy)
    if out is not None:
        check_plan(as_load_tensor(weight).numpy(), out, 4, 1, 1, 2)


@FUZZ
@given(policy=st.sampled_from(["default", "greedy"]), prev=st.one_of(
    st.lists(st.lists(st.integers(-2, 9), min_size=0, max_size=9), min_size=0, max_size=3),
    st.sampled_from([None, [[0.5] * 8] * 2, np.zeros((2, 8), dtype=bool), [[0, 1, 2, 3, 4, 5, 6, 7]] * 2])))
def test_fuzz_previous_placement(policy, prev):
    """previous_phy2log of any shape/dtype/value: ValueError or a valid plan."""
    w = np.arange(1, 17, dtype=np.float64).reshape(2, 8)
    try:
        out = eplb.rebalance_experts(w, 8, 1, 1, 2, policy=policy, previous_phy2log=prev)
    except ValueError:
        return
    check_plan(w, out, 8, 1, 1, 2)


VALID_STATS = {"format": "moe-ep.expert-load", "version": 1, "num_layers": 2, "num_experts": 4, "top_k": 2,
               "load": [[1, 2, 3, 4], [4, 3, 2, 1]], "windows": [{"load": [[1, 2, 3, 4], [4, 3, 2, 1]]}]}
JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10 ** 400, 10 ** 400),
                                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4)),
                       lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=12)


@st.composite
def stats_documents(draw):
    doc = json.loads(json.dumps(VALID_STATS))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(VALID_STATS) + ["load.0", "load.0.1", "windows.0.load", "windows.0"]))
        parts, node = key.split("."), doc
        try:
            for p in parts[:-1]:
                node = node[int(p)] if isinstance(node, list) else node[p]
            last = int(parts[-1]) if isinstance(node, list) else parts[-1]
            if draw(st.booleans()):
                node[last] = draw(st.one_of(JSONISH, st.sampled_from([math.nan, math.inf, -1, 10 ** 400, [], [[]]])))
            elif isinstance(node, dict):
                node.pop(last, None)
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    return doc


@FUZZ
@given(doc=stats_documents())
def test_fuzz_load_stats(tmp_path_factory, doc):
    """Mutated stats files (values of any JSON type, NaN, inf, huge integers, missing or extra
    fields): load_stats gives float64 [L, E] finite non-negative loads or a ValueError; the
    runtime's reader (moe_ep.stats.read_stats_file, behind eplb.stats_file) agrees."""
    from moe_ep.stats import read_stats_file

    path = tmp_path_factory.mktemp("s") / "stats.json"
    path.write_text(json.dumps(doc))  # NaN / Infinity are written as JSON extensions, which json reads back
    try:
        out = eplb.load_stats(str(path))
    except ValueError:
        out = None
    if out is not None:
        load = out["load"]
        assert load.dtype == np.float64 and load.ndim == 2 and np.isfinite(load).all() and (load >= 0).all()
    try:
        read_stats_file(str(path), 2, 4)
    except ValueError:
        pass


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe\x00", b"[]", b"null", b'{"load": "x"}',
                                     b'{"load": [[NaN, 1]]}', b'{"load": [[1e999, 1]]}', b'{"load": [[-1, 1]]}',
                                     b'{"load": [[0, 0], [0, 0]]}', b'{"load": [[1, 2], [3]]}', b'{"load": [[1, 2]], "num_layers": 5}',
                                     b'{"load": [[1, 2]], "windows": [{"load": [[1]]}]}', b'{"load": [[1, 2]], "format": "x"}',
                                     b'{"load": [[' + str(10 ** 400).encode() + b', 1]]}'])
def test_cli_plan_bad_stats_files(tmp_path, capsys, content):
    """`python -m eplb plan`: a bad stats file is one `error:` line and exit 2; a valid one (all
    zeros included) plans and writes a loadable placement."""
    stats, out = tmp_path / "stats.json", tmp_path / "placement.json"
    stats.write_bytes(content)
    rc = eplb_main(["plan", "--stats", str(stats), "--replicas", "4", "--gpus", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    if rc == 0:
        assert eplb.load_placement(str(out)).shape[1] == 4
    else:
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert not out.exists()


@pytest.mark.parametrize("args", [["--replicas", "0", "--gpus", "2"], ["--replicas", "3", "--gpus", "2"],
                                  ["--replicas", "4", "--gpus", "0"], ["--replicas", "4", "--gpus", "2", "--nodes", "3"],
                                  ["--replicas", "4", "--gpus", "2", "--groups", "3", "--nodes", "1"],
                                  ["--replicas", "1", "--gpus", "1"]])
def test_cli_plan_bad_sizes(tmp_path, capsys, args):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"load": [[1, 2], [3, 4]]}))
    rc = eplb_main(["plan", "--stats", str(stats), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err


def test_integer_beyond_float64_is_a_value_error():
    """A JSON-size integer beyond float64 names the argument (not OverflowError)."""
    with pytest.raises(ValueError, match="weight"):
        eplb.rebalance_experts([[10 ** 400] * 4], 4, 1, 1, 2)
    with pytest.raises(ValueError, match="weight"):
        eplb.rebalance_experts(np.array([[10 ** 400, 1, 1, 1]], dtype=object), 4, 1, 1, 2)


@pytest.mark.parametrize("policy", ["default", "greedy"])
@pytest.mark.parametrize("top", [1.7e308, np.finfo(np.float64).max, 2.0 ** 600])
def test_loads_near_float64_max_give_valid_plans(policy, top):
    """Loads whose sums overflow float64: each layer is planned on a power-of-two rescale of its
    loads, which gives the same plan as for loads that fit (balance is scale-invariant per layer)."""
    w = np.full((2, 4), top)
    w[0, 0] = top / 3
    out = eplb.rebalance_experts(w, 8, 1, 1, 2, policy=policy)
    check_plan(w, out, 8, 1, 1, 2)
    small = np.ldexp(w, -int(np.frexp(top)[1]) + 20)  # exactly the same ratios, nowhere near overflow
    ref = eplb.rebalance_experts(small, 8, 1, 1, 2, policy=policy)
    assert torch.equal(out[0], ref[0])
    w = np.full((2, 12), top)  # hierarchical, several nodes
    w[:, ::3] /= 7
    check_plan(w, eplb.rebalance_experts(w, 12, 4, 2, 4, policy=policy), 12, 4, 2, 4)


def test_scale_for_planning_is_exact_and_leaves_normal_loads_alone():
    from eplb.checks import scale_for_planning
    w = torch.tensor([[3.0, 1e300, 1e-5], [1.0, 2.0, 5.0]], dtype=torch.float64)
    out = scale_for_planning(w)
    assert torch.equal(out[1], w[1])  # untouched layer, bit for bit
    assert 0.5 <= float(out[0].max()) < 1.0
    ratio = out[0] / w[0]
    assert bool((ratio == ratio[0]).all()) and math.log2(float(ratio[0])).is_integer()


@pytest.mark.parametrize("prev", ["x", ["a", "b"], [[0.5] * 8] * 2, [[1, 2], [3]], [[True] * 8] * 2,
                                  np.array([[2 ** 63] * 8] * 2, dtype=np.uint64), [[10 ** 30] * 8] * 2, object()])
def test_bad_previous_placement_is_a_value_error(prev):
    with pytest.raises(ValueError, match="previous_phy2log"):
        eplb.rebalance_experts(np.ones((2, 8)), 8, 1, 1, 2, previous_phy2log=prev)
