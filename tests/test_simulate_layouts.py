"""eplb.simulate_layouts: one MoE DiT forward on 1-64 GPUs per layout (docs/simulator.md, "One image on many GPUs")."""
import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest

from eplb import simulate_layouts as SL
from eplb.cli import main as cli_main

MiB = 1 << 20
DOCS = Path(__file__).resolve().parents[1] / "docs" / "simulator.md"


def _compute(bd: SL.Breakdown) -> float:
    return bd.dense + bd.elementwise + bd.attention + bd.moe_compute


def test_one_gpu_calibration_against_measurements():
    """docs/anchors.md: HiDream-I1 1024x1024 batch 2 on one H100: 338.0 ms, 34.1 GiB, 17.1 B parameters;
    hunyuan_like 8192 rows (1024x1024, batch 2) on one H200: 64.9 ms, peak 22.1 GiB."""
    hd = SL.load_model("hidream", 1024)
    assert hd.params() == pytest.approx(17.1e9, rel=0.01)
    one = SL.forward(hd, SL.Layout("replicated"))
    assert abs(one.total / 0.338 - 1) < 0.30
    assert abs(one.memory / SL.GiB / 34.1 - 1) < 0.10
    hy = SL.load_model("hunyuan_like", 1024)
    assert hy.image_tokens == 4096 and hy.experts == 64 and hy.top_k == 8
    one = SL.forward(hy, SL.Layout("replicated"))
    assert abs(one.total / 0.0649 - 1) < 0.30
    assert abs(one.memory / SL.GiB / 22.1 - 1) < 0.10


@pytest.mark.parametrize("name", ["hidream", "hunyuan_like"])
def test_more_gpus_never_increase_compute_per_rank(name):
    model = SL.load_model(name, 1024)
    families = {
        "replicated": lambda P: SL.Layout("replicated", 1, P),
        "moe-ep": lambda P: SL.Layout("moe-ep", 1, P, 1, 1, P, False),
        "moe-ep+eplb": lambda P: SL.Layout("moe-ep", 1, P, 1, 1, P, P > 1),
        "moe-ep cfg": lambda P: SL.Layout("moe-ep", 1, max(1, P // 2), min(P, 2), 1, P, P > 1),
        "vllm-omni": lambda P: SL.Layout("vllm-omni", 1, max(1, P // 4), 1, min(P, 4), P),
    }
    for fam, make in families.items():
        comp = [_compute(SL.forward(model, make(P))) for P in (1, 2, 4, 8, 16, 32, 64)]
        assert all(b <= a * (1 + 1e-9) for a, b in zip(comp, comp[1:])), (fam, comp)
    # and the fastest layout of each kind never gets slower in compute either
    for kind in SL.KINDS:
        comp = [_compute(SL.best(model, P, kind, SL.Rates(), SL.Routing())[1]) for P in (1, 2, 4, 8, 16, 32, 64)]
        assert all(b <= a * (1 + 1e-9) for a, b in zip(comp, comp[1:])), (kind, comp)


@pytest.mark.parametrize("name", ["hidream", "hunyuan_like"])
def test_ep1_equals_replicated(name):
    model = SL.load_model(name, 1024)
    for u, r, cfg in ((1, 1, 1), (2, 1, 1), (1, 4, 2), (4, 2, 2)):
        ep1 = SL.forward(model, SL.Layout("moe-ep", u, r, cfg, 1, 1, False), routing=SL.Routing(1.2))
        rep = SL.forward(model, SL.Layout("replicated", u, r, cfg), routing=SL.Routing(1.2))
        assert dataclasses.asdict(ep1) == dataclasses.asdict(rep)
        assert ep1.moe_comm == 0 and not any(k.startswith("ep_") for k in ep1.comm_bytes)
    # EP over 2 ranks holds fewer experts and moves routed copies
    ep2 = SL.forward(model, SL.Layout("moe-ep", 2, 1, 1, 1, 2, False))
    assert ep2.memory < rep.memory and ep2.comm_bytes["ep_dispatch"] > 0


def _toy(layers=3, rows=8192, hidden=2048):
    """One kind of block: rows per sample through attention and a 4-expert top-2 MoE (expert width 128)."""
    b = SL.BlockKind("b", layers, rows=rows, gemms=(SL.Gemm(rows, hidden, hidden),), attns=(SL.Attn(rows, rows),),
                     tp_reduces=(rows,), moe_rows=rows)
    return SL.DiT("toy", hidden, 16, (b,), experts=4, top_k=2, expert_hidden=128, shared_hidden=0,
                  image_tokens=rows, text_tokens=0)


def _nvlink_by_hand(nbytes):
    """Anchors 16 MB at 111 GB/s and 64 MB at 215 GB/s (MB = 2^20), bandwidth linear in log(size) between."""
    assert 16 * MiB <= nbytes <= 64 * MiB
    return nbytes / (111e9 + (215e9 - 111e9) * math.log(nbytes / (16 * MiB)) / math.log(4))


def test_comm_bytes_and_times_match_hand_computation(monkeypatch):
    """3 layers, 8192 rows per sample, hidden 2048 (4 KiB a row), batch 2, 2 GPUs on one node, exactly
    uniform routing over 4 experts, top-2; experts 0,1 on rank 0 and 2,3 on rank 1 (no EPLB).

    moe-ep u2 ep2: each rank holds 8192 rows -> 16384 copies, half of them for the other rank.
      one row per copy: 8192 rows = 32 MiB per all-to-all (dispatch, and combine the same back);
      one row per (token, rank): a token skips the other rank only if both its copies stay,
      (1/2)^2, so 8192 x 3/4 = 6144 rows = 24 MiB.
    Ulysses: q,k,v buffer 3 x 32 MiB and output 32 MiB, half of each leaves: 64 MiB per layer.
    vLLM-Omni tp1 u2: all-gather and reduce-scatter each move the peer's 32 MiB shard.
    Ring u1 r2: one pass of K and V, 2 x 32 MiB."""
    uniform = lambda skew, layers, experts, top_k, tokens, seed: (np.ones((layers, experts)), np.ones((layers, experts)))
    monkeypatch.setattr(SL, "_trace", uniform)
    model = _toy()
    floor = SL.Rates().nvlink_anchors[0][0] / SL.Rates().nvlink_anchors[0][1]   # 62.5 us: the counts exchange
    t24, t32 = _nvlink_by_hand(24 * MiB), _nvlink_by_hand(32 * MiB)

    copies = SL.forward(model, SL.Layout("moe-ep", 2, 1, 1, 1, 2, False), SL.Rates(dedup_tokens=False, overlap_own_rows=False))
    assert copies.comm_bytes["ep_dispatch"] == pytest.approx(3 * 32 * MiB)
    assert copies.comm_bytes["ep_combine"] == pytest.approx(3 * 32 * MiB)
    assert copies.comm_bytes["ulysses"] == pytest.approx(3 * 64 * MiB)
    assert copies.moe_comm == pytest.approx(3 * (2 * t32 + floor))
    assert copies.moe_exposed == pytest.approx(copies.moe_comm)   # no shared expert to hide under
    assert copies.max_over_mean == pytest.approx(1.0)

    ep = SL.forward(model, SL.Layout("moe-ep", 2, 1, 1, 1, 2, False))
    assert ep.comm_bytes["ep_dispatch"] == pytest.approx(3 * 24 * MiB)
    assert ep.comm_bytes["ep_combine"] == pytest.approx(3 * 24 * MiB)
    assert ep.moe_comm == pytest.approx(3 * (2 * t24 + floor))
    # own rows (half of this rank's 16384 copies x 6 x 2048 x 128 FLOPs at 579 TFLOP/s) run during the dispatch
    own = 16384 * 6 * 2048 * 128 / 579e12 / 2
    assert ep.moe_exposed == pytest.approx(3 * (t24 + floor - own + t24))

    vl = SL.forward(model, SL.Layout("vllm-omni", 2, 1, 1, 1, 2))
    assert vl.comm_bytes["ag_dispatch"] == pytest.approx(3 * 32 * MiB)
    assert vl.comm_bytes["rs_combine"] == pytest.approx(3 * 32 * MiB)
    assert vl.moe_comm == pytest.approx(3 * 2 * t32)

    ring = SL.forward(model, SL.Layout("moe-ep", 1, 2, 1, 1, 1, False))
    assert ring.comm_bytes == {"ring": pytest.approx(3 * 64 * MiB)}
    assert ring.moe_comm == 0


def test_rates_floor_and_groups():
    r = SL.Rates()
    floor = r.nvlink_anchors[0][0] / r.nvlink_anchors[0][1]
    # never faster than 1 MB at 16 GB/s, even where the log-linear bandwidth would say so (2 MB)
    assert SL.nvlink(2 * MiB, r) == pytest.approx(floor) and SL.nvlink(0, r) == 0
    sizes = np.geomspace(1024, 1 << 30, 200)
    assert np.all(np.diff(SL.nvlink(sizes, r)) >= -1e-15)
    assert SL.on_node(4, 1, 8) == 4 and SL.on_node(8, 4, 8) == 2 and SL.on_node(64, 1, 8) == 8
    # a group spanning nodes pays the network for the off-node share
    assert SL.a2a_time(64 * MiB, 16, 1, r) == pytest.approx(r.net_latency + 64 * MiB * 8 / 16 / r.net_bw)
    assert SL.a2a_time(123.0, 1, 1, r) == 0 and SL.allreduce_time(1e6, 1, 1, r) == 0


def test_layout_checks_name_the_field():
    model = SL.load_model("hidream", 1024)
    with pytest.raises(ValueError, match="tp x ulysses"):
        SL.forward(model, SL.Layout("moe-ep", 8, 1, 1, 1, 8))          # 20 heads
    with pytest.raises(ValueError, match="layout ep"):
        SL.forward(model, SL.Layout("replicated", 1, 2, 1, 1, 2))
    with pytest.raises(ValueError, match="layout tp"):
        SL.forward(model, SL.Layout("moe-ep", 1, 1, 1, 2, 2))
    with pytest.raises(ValueError, match="cfg"):
        SL.forward(model, SL.Layout("replicated", 1, 1, 4))
    assert all(l.gpus == 8 for k in SL.KINDS for l in SL.layouts_for(model, 8, k))


def test_cli_prints_the_table(capsys):
    assert cli_main(["simulate-layouts", "--model", "hunyuan_like", "--gpus", "1,2,16", "--breakdown"]) == 0
    out = capsys.readouterr().out
    assert "| GPUs | best moe-ep layout | ms |" in out and "| layout | dense |" in out
    rows = [l for l in out.splitlines() if re.match(r"\| (1|2|16) \| ", l)]
    assert len(rows) == 6  # the table and the breakdown
    assert rows[0].split("|")[11].strip() == "1.00x"


@pytest.mark.parametrize("args, field", [
    (["--gpus", "3"], "--gpus"), (["--gpus", "2,x"], "--gpus"), (["--model", "nosuch"], "--model"),
    (["--size", "1000"], "--size"), (["--synthetic", "zipf:-1"], "synthetic"), (["--net-gbps", "0"], "--net-gbps"),
    (["--hbm-tbps", "nan"], "--hbm-tbps"), (["--redundant-per-gpu", "-1"], "--redundant-per-gpu"),
])
def test_cli_bad_args_one_clear_error(args, field, capsys):
    assert cli_main(["simulate-layouts", "--gpus", "1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and field in err[0], err


def test_cli_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"hidden_size": 64}}')
    assert cli_main(["simulate-layouts", "--model", str(bad), "--gpus", "1"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "num_layers" in err


def test_docs_table_is_what_the_cli_prints(capsys):
    """docs/simulator.md's hunyuan_like table rows are the CLI's output (the doc stays true to the code)."""
    assert cli_main(["simulate-layouts", "--model", "hunyuan_like", "--gpus", "1,8,64"]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if re.match(r"\| \d+ \| ", l)]
    doc = DOCS.read_text()
    assert "## One image on many GPUs" in doc
    for row in rows:
        assert row in doc, row


def test_module_names_in_from_config_docstring_import():
    """The docstring cites the model it describes by module path; the path must exist."""
    import importlib

    names = re.findall(r"``(moe_ep(?:\.\w+)+)``", SL.from_config.__doc__)
    assert names
    for name in names:
        importlib.import_module(name)
