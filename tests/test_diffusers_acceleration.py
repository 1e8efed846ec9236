"""The speed options of moe_ep.models.diffusers.acceleration on tiny HiDream / NucleusMoE transformers
(CPU), and benchmarks/bench_transformer.py --small end to end.

Reference for each exact option: the same model's eager forward before the option (fp32, bit-equal).
Not testable here: CUDA-graph replay and the cuDNN attention kernel (CUDA only; the GPU run of
bench_transformer.py compares both with moe-ep eager and with an fp32 run). Regional compile is
checked with dynamo and a recording backend (no inductor: a C++ build per test is too slow on 2 cores):
the MoE layers' weights must appear in no compiled graph.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from moe_ep.models.diffusers import acceleration as acc
from moe_ep.models.diffusers import tiny, wrap_transformer
from moe_ep.parallel import ParallelContext
from moe_ep.stats import ExpertLoadStats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wrapped(name: str):
    model = tiny.tiny_hidream(0) if name == "hidream" else tiny.tiny_nucleus(1)
    wrap_transformer(model, ParallelContext())
    return model


@torch.no_grad()
def test_hidream_host_sync_fix_is_exact():
    model = wrapped("hidream")
    kw = tiny.hidream_inputs(model, 1, 2, 0.5)
    ref = model(**kw)[0]
    orig = model.patchify(kw["hidden_states"])
    assert acc.remove_host_syncs(model) and acc.remove_host_syncs(model) == []     # once only
    mine = model.patchify(kw["hidden_states"])
    assert mine[1] is None and orig[1] is None
    assert torch.equal(mine[0], orig[0]) and torch.equal(mine[3], orig[3])        # hidden [B, S, C], ids [B, S, 3]
    assert mine[2] == [tuple(int(v) for v in row) for row in orig[2]]             # python ints, same sizes
    assert all(isinstance(v, int) for hw in mine[2] for v in hw)
    assert torch.equal(model(**kw)[0], ref)
    rect = torch.randn(2, 4, 8, 4)                                                 # non-square: diffusers' own
    assert torch.is_tensor(model.patchify(rect)[2])


@torch.no_grad()
def test_nucleus_rope_cache_is_exact():
    model = wrapped("nucleus")
    kw = tiny.nucleus_inputs(model, 1, 2, 0.5)
    ref = model(**kw)[0]
    assert acc.remove_host_syncs(model)
    first = model.pos_embed([(1, 4, 4)] * 2, torch.device("cpu"), max_txt_seq_len=5)
    assert model.pos_embed([(1, 4, 4)] * 2, torch.device("cpu"), max_txt_seq_len=5) is first    # cached
    assert torch.equal(model(**kw)[0], ref)
    plain = wrapped("nucleus")                                      # same weights, no fix
    kw2 = tiny.nucleus_inputs(model, 2, 2, 0.3)                     # other inputs, same shapes: cache hit
    assert torch.equal(model(**kw2)[0], plain(**kw2)[0])


@torch.no_grad()
def test_compiled_blocks_leave_moe_layers_eager():
    model = wrapped("hidream")
    kw = tiny.hidream_inputs(model, 1, 2, 0.5)
    ref = model(**kw)[0]
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    paths = acc.compile_blocks(model, backend=recording)
    assert paths == ["double_stream_blocks.0.block", "single_stream_blocks.0.block", "single_stream_blocks.1.block"]
    assert torch.equal(model(**kw)[0], ref)
    inputs = [n.target for g in graphs for n in g.graph.nodes if n.op == "placeholder"]
    assert any("attn1" in name for name in inputs)                 # the blocks' own weights are compiled
    assert not [name for name in inputs if "ff_i" in name]          # the MoE block's (gate, experts, shared) not
    acc.uncompile_blocks(model, paths)
    n = len(graphs)
    assert torch.equal(model(**kw)[0], ref) and len(graphs) == n    # eager again


def test_bad_options_fail_early():
    model = wrapped("hidream")
    with pytest.raises(ValueError, match="attention backend 'fast'"):
        acc.accelerate(model, attention="fast")
    with pytest.raises(ValueError, match="host_syncs"):
        acc.accelerate(model, cuda_graph=True, host_syncs=False)
    with pytest.raises(ValueError, match="no module of class"):
        acc.compile_blocks(model, classes=["NoSuchBlock"])
    layer = model.double_stream_blocks[0].block.ff_i.moe
    layer.stats = ExpertLoadStats(1, layer.cfg.num_experts, torch.device("cpu"))
    with pytest.raises(ValueError, match="stats and phase timers must be off"):
        acc.CudaGraphTransformer(model)


def test_bench_transformer_small_runs_on_cpu(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_transformer
    finally:
        sys.path.pop(0)
    out = tmp_path / "small.json"
    assert bench_transformer.main(["--small", "--device", "cpu", "--options", "", "--reps", "1", "--warmup", "1",
                                   "--accuracy-layers", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["diffusers", "moe-ep", "moe-ep + host syncs removed"]
    assert all(r["median_ms"] > 0 for r in rows.values())
    assert rows["moe-ep + host syncs removed"]["max_abs_diff_vs_moe_ep_eager"] == 0.0
    acc_rows = {r["variant"]: r["rel_err_vs_fp32"] for r in data["accuracy"]}
    assert acc_rows["diffusers float32"] == 0.0                     # the reference itself
    assert 0 <= acc_rows["moe-ep float32"] < 1e-5 and acc_rows["moe-ep + host syncs removed"] < 1e-5
    assert data["meta"]["host_sync_fixes"]
