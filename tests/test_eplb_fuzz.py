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


# (input, valid?): valid = a non-empty 2-D array of finite non-negative real numbers (eplb.md).
# Lists of bools are planned as 0/1 loads (numpy converts them) while bool tensors are refused:
# recorded as the current behaviour.
WEIRD_INPUTS = [
    (np.array([1.0, 2.0]), False), (np.zeros((0, 4)), False), (np.zeros((2, 0)), False), (np.zeros((2, 2, 2)), False),
    (np.array(3.0), False), ([[1, 2], [3]], False), ([["a", "b"]], False), ([[None, 1.0]], False),
    ([[True, False]], True), ({"a": 1}, False), ("1,2", False), (None, False),
    (torch.ones(2, 4, dtype=torch.bool), False), (torch.ones(2, 4, dtype=torch.complex64), False),
    (torch.ones(2, 4, dtype=torch.float16), True), (torch.ones(2, 4, dtype=torch.bfloat16), True),
    (torch.ones(2, 4, dtype=torch.int32), True), (torch.ones(2, 4, dtype=torch.uint8), True),
    (np.ones((2, 4), dtype=np.int64), True), (np.ones((2, 4), dtype=np.float32), True),
    (np.ones((2, 4), dtype=object), True), (np.array([[1, 2, 3, 4]], dtype=np.uint64) * (2 ** 63), True),
    (torch.full((2, 4), float("nan")), False), ([[1.0, -1.0, 2.0, 3.0]], False), ([[1.0, 2.0], [3.0, 4.0]], True),
]


@pytest.mark.parametrize("weight,valid", WEIRD_INPUTS, ids=range(len(WEIRD_INPUTS)))
@pytest.mark.parametrize("policy", ["default", "greedy"])
def test_rebalance_experts_weird_shapes_and_dtypes(weight, valid, policy):
    """Each input has its expected outcome: a valid plan (checked slot by slot) or a ValueError."""
    out = plan_or_value_error(weight, 4, 1, 1, 2, policy)
    if valid:
        assert out is not None, f"refused a valid load: {weight!r}"
        check_plan(as_load_tensor(weight).numpy(), out, 4, 1, 1, 2)
    else:
        assert out is None, f"accepted an invalid load: {weight!r}"


@FUZZ
@given(policy=st.sampled_from(["default", "greedy"]), prev=st.one_of(
    st.lists(st.lists(st.integers(-2, 9), min_size=0, max_size=9), min_size=0, max_size=3),
    st.lists(st.lists(st.integers(-2, 9), min_size=8, max_size=8), min_size=2, max_size=2),   # right shape
    st.lists(st.lists(st.integers(0, 7), min_size=8, max_size=8), min_size=2, max_size=2),    # valid
    st.sampled_from([None, [[0.5] * 8] * 2, np.zeros((2, 8), dtype=bool), [[0, 1, 2, 3, 4, 5, 6, 7]] * 2])))
def test_fuzz_previous_placement(policy, prev):
    """previous_phy2log of any shape/dtype/value: a valid plan exactly when it is a [2, 8] array of
    integer expert ids in [0, 8) (None: no previous placement), else ValueError naming it."""
    w = np.arange(1, 17, dtype=np.float64).reshape(2, 8)
    valid = prev is None or (isinstance(prev, list) and len(prev) == 2 and all(
        isinstance(row, list) and len(row) == 8 and all(type(v) is int and 0 <= v < 8 for v in row) for row in prev))
    try:
        out = eplb.rebalance_experts(w, 8, 1, 1, 2, policy=policy, previous_phy2log=prev)
    except ValueError as err:
        assert not valid, f"refused a valid previous placement {prev!r}: {err}"
        assert "previous_phy2log" in str(err), str(err)
        return
    assert valid, f"accepted an invalid previous placement {prev!r}"
    check_plan(w, out, 8, 1, 1, 2)
    if prev is not None:  # relabelled to keep experts in place: never fewer kept slots than a fresh plan
        fresh = eplb.rebalance_experts(w, 8, 1, 1, 2, policy=policy)[0]
        assert (out[0] == torch.tensor(prev)).sum() >= (fresh == torch.tensor(prev)).sum()


VALID_STATS = {"format": "moe-ep.expert-load", "version": 1, "num_layers": 2, "num_experts": 4, "top_k": 2,
               "load": [[1, 2, 3, 4], [4, 3, 2, 1]], "windows": [{"load": [[1, 2, 3, 4], [4, 3, 2, 1]]}]}
JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10 ** 400, 10 ** 400),
                                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4)),
                       lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=12)


EDGE_VALUES = [0, 1, 2, -1, -0.5, 1.0, 3.5, True, "x", None, math.nan, math.inf, 10 ** 400, [], [[1]], {}]


@st.composite
def stats_documents(draw):
    doc = json.loads(json.dumps(VALID_STATS))
    if draw(st.booleans()):  # one targeted change: a header field or one load entry to an edge value
        target = draw(st.sampled_from(["version", "format", "num_layers", "num_experts", "load", "windows"]))
        value = draw(st.sampled_from(EDGE_VALUES + ["moe-ep.expert-load"]))
        if target in ("load", "windows"):
            matrix = doc["load"] if target == "load" else doc["windows"][0]["load"]
            matrix[draw(st.integers(0, 1))][draw(st.integers(0, 3))] = value
        else:
            doc[target] = value
        return doc
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
    doc = json.loads(path.read_text())  # what the readers see (NaN as float nan)
    want = stats_doc_ok(doc)
    try:
        out = eplb.load_stats(str(path))
    except ValueError as err:
        assert not want, f"load_stats refused a valid file: {err}: {doc}"
        out = None
    if out is not None:
        assert want, f"load_stats accepted an invalid file: {doc}"
        load = out["load"]
        assert load.dtype == np.float64 and load.ndim == 2 and np.isfinite(load).all() and (load >= 0).all()
        assert np.array_equal(load, np.asarray(doc["load"], dtype=np.float64))
    want_run = stats_doc_ok(doc, (2, 4))
    try:
        run = read_stats_file(str(path), 2, 4)
    except ValueError as err:
        assert not want_run, f"read_stats_file refused a valid file for 2 x 4: {err}: {doc}"
        assert str(err).startswith(f"stats file {path}: "), str(err)
        return
    assert want_run, f"read_stats_file accepted a file that does not fit 2 layers x 4 experts: {doc}"
    assert np.array_equal(run["load"], out["load"])


def _matrix_ok(m, shape=None) -> bool:
    """A non-empty [L][E] list of lists of finite non-negative numbers (not bools), rectangular."""
    if not isinstance(m, list) or not m or not all(isinstance(r, list) and r for r in m):
        return False
    if len({len(r) for r in m}) != 1 or (shape is not None and (len(m), len(m[0])) != tuple(shape)):
        return False
    for x in (x for r in m for x in r):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        if isinstance(x, int) and abs(x) > 1.7976931348623157e308:
            return False
        if not math.isfinite(float(x)) or x < 0:
            return False
    return True


def stats_doc_ok(doc, run_shape=None) -> bool:
    """The stats format's rules (docs/formats.md), written plainly: an object; `format` and
    `version` (when present) the format's own; `num_layers` / `num_experts` (when present) positive
    ints equal to the shape of `load`, a required [L][E] matrix; `windows` and `timestep_buckets`
    (when present) lists of objects whose `load` has that shape; `branches` an object of such
    matrices. `run_shape`: the reading run's (layers, experts), which `load` must have too."""
    if not isinstance(doc, dict) or doc.get("format", "moe-ep.expert-load") != "moe-ep.expert-load":
        return False
    version = doc.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version != 1:
        return False
    for key in ("num_layers", "num_experts"):
        if key in doc and (isinstance(doc[key], bool) or not isinstance(doc[key], int) or doc[key] <= 0):
            return False
    if not _matrix_ok(doc.get("load"), run_shape):
        return False
    shape = (len(doc["load"]), len(doc["load"][0]))
    if doc.get("num_layers", shape[0]) != shape[0] or doc.get("num_experts", shape[1]) != shape[1]:
        return False
    for key in ("windows", "timestep_buckets"):
        if key in doc and not (isinstance(doc[key], list) and all(
                isinstance(e, dict) and _matrix_ok(e.get("load"), shape) for e in doc[key])):
            return False
    if "branches" in doc and not (isinstance(doc["branches"], dict)
                                  and all(_matrix_ok(m, shape) for m in doc["branches"].values())):
        return False
    return True


def _edited(target: str, value):
    doc = json.loads(json.dumps(VALID_STATS))
    if target in ("load", "windows"):
        (doc["load"] if target == "load" else doc["windows"][0]["load"])[1][2] = value
    elif target == "reshaped":  # a consistent file of another run's shape (value: (L, E))
        L, E = value
        m = [[float(e + layer) for e in range(E)] for layer in range(L)]
        doc.update(num_layers=L, num_experts=E, load=m, windows=[{"load": m}])
    else:
        doc[target] = value
    return doc


EDITS = [(t, v) for t in ("version", "format", "num_layers", "num_experts", "load", "windows")
         for v in EDGE_VALUES + ["moe-ep.expert-load"]] + [("reshaped", (3, 4)), ("reshaped", (2, 5)), ("reshaped", (2, 4))]


@pytest.mark.parametrize("target,value", EDITS, ids=[f"{t}={v!r}"[:40] for t, v in EDITS])
def test_load_stats_edge_values(tmp_path, target, value):
    """Every header field and one load entry set to each edge value, and files of other shapes:
    load_stats and the runtime's reader accept exactly what the format's rules allow."""
    from moe_ep.stats import read_stats_file

    doc = _edited(target, value)
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(doc))
    doc = json.loads(path.read_text())
    for want, read in ((stats_doc_ok(doc), lambda: eplb.load_stats(str(path))),
                       (stats_doc_ok(doc, (2, 4)), lambda: read_stats_file(str(path), 2, 4))):
        try:
            out = read()
        except ValueError as err:
            assert not want, f"refused a valid file ({err}): {doc}"
            continue
        assert want, f"accepted an invalid file: {doc}"
        assert np.array_equal(out["load"], np.asarray(doc["load"], dtype=np.float64))


def test_valid_stats_document_is_accepted(tmp_path):
    """The unmutated document (and the oracle's view of it) is valid: the fuzz starts from an accepted file."""
    from moe_ep.stats import read_stats_file

    path = tmp_path / "stats.json"
    path.write_text(json.dumps(VALID_STATS))
    assert stats_doc_ok(VALID_STATS, (2, 4))
    assert eplb.load_stats(str(path))["load"].tolist() == VALID_STATS["load"]
    assert read_stats_file(str(path), 2, 4)["load"].tolist() == VALID_STATS["load"]


CLI_STATS = [  # (file content, valid?)
    (b"", False), (b"{", False), (b"\xff\xfe\x00", False), (b"[]", False), (b"null", False), (b'{"load": "x"}', False),
    (b'{"load": [[NaN, 1]]}', False), (b'{"load": [[1e999, 1]]}', False), (b'{"load": [[-1, 1]]}', False),
    (b'{"load": [[0, 0], [0, 0]]}', True), (b'{"load": [[1, 2], [3]]}', False), (b'{"load": [[1, 2]], "num_layers": 5}', False),
    (b'{"load": [[1, 2]], "windows": [{"load": [[1]]}]}', False), (b'{"load": [[1, 2]], "format": "x"}', False),
    (b'{"load": [[' + str(10 ** 400).encode() + b', 1]]}', False), (b'{"load": [[1, 2], [3, 4]]}', True),
    (b'{"format": "moe-ep.expert-load", "version": 1, "num_layers": 1, "load": [[5, 1]], "windows": [{"load": [[5, 1]]}]}', True),
]


@pytest.mark.parametrize("content,valid", CLI_STATS, ids=range(len(CLI_STATS)))
def test_cli_plan_bad_stats_files(tmp_path, capsys, content, valid):
    """`python -m eplb plan`: a bad stats file is one `error:` line and exit 2 and writes nothing;
    a valid one (all zeros included) plans and writes a placement that loads back."""
    stats, out = tmp_path / "stats.json", tmp_path / "placement.json"
    stats.write_bytes(content)
    rc = eplb_main(["plan", "--stats", str(stats), "--replicas", "4", "--gpus", "2", "--out", str(out)])
    captured = capsys.readouterr()
    err = captured.err.strip()
    if valid:
        assert rc == 0, err
        load = np.asarray(json.loads(content)["load"], dtype=np.float64)
        placement = eplb.load_placement(str(out))
        assert placement.shape == (load.shape[0], 4)
        check_plan(load, eplb.rebalance_experts(load, 4, 1, 1, 2), 4, 1, 1, 2)
        assert "balancedness after (default)" in captured.out
    else:
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (rc, err)
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
