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

import numpy as np
import pytest
import torch

from moe_ep.models.diffusers import acceleration as acc
from moe_ep.models.diffusers import tiny, wrap_transformer
from moe_ep.parallel import ParallelContext
from moe_ep.stats import ExpertLoadStats
from moe_ep.config import ConfigError
from moe_ep.timing import PhaseTimer

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
    # bounded: the least recently used shapes drop out, the ones in use stay
    cache = model.pos_embed.forward.cache
    for n in range(2, 2 + 2 * acc.ROPE_CACHE_ENTRIES):
        model.pos_embed([(1, 4, 4)] * 2, torch.device("cpu"), max_txt_seq_len=5)
        model.pos_embed([(1, n, n)], torch.device("cpu"), max_txt_seq_len=5)
    assert len(cache) == acc.ROPE_CACHE_ENTRIES
    assert model.pos_embed([(1, 4, 4)] * 2, torch.device("cpu"), max_txt_seq_len=5) is first


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


def recording_compile(monkeypatch) -> list:
    """compile_blocks with a backend that records each graph dynamo captures and runs it eagerly
    (bit-equal to eager, no inductor build) -> the list the graphs go to."""
    graphs, original = [], acc.compile_blocks

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(acc, "compile_blocks", lambda model, **kw: original(model, backend=recording, **kw))
    return graphs


def compiled_paths(model) -> list[str]:
    return [p for p, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]


# the tiny models' transformer blocks (tiny.py: HiDream 1 dual + 2 single stream, NucleusMoE 4)
BLOCKS = {"hidream": ["double_stream_blocks.0.block", "single_stream_blocks.0.block", "single_stream_blocks.1.block"],
          "nucleus": [f"transformer_blocks.{i}" for i in range(4)]}


@torch.no_grad()
@pytest.mark.parametrize("name", ["hidream", "nucleus"])
def test_expert_parallel_compile_route(monkeypatch, name):
    """`moe_ep.expert_parallel(model, compile=True)`: the blocks compiled and the host syncs removed,
    in place, statistics still counted, output as without compile (recording backend: eager ops).
    Without it nothing is compiled."""
    import moe_ep

    graphs = recording_compile(monkeypatch)
    make = (lambda: tiny.tiny_hidream(0)) if name == "hidream" else (lambda: tiny.tiny_nucleus(1))
    plain, fast = make(), make()
    moe_ep.expert_parallel(plain, ParallelContext())
    moe_ep.expert_parallel(fast, ParallelContext(), compile=True)
    assert compiled_paths(plain) == [] and not graphs
    assert compiled_paths(fast) == BLOCKS[name]
    assert acc.remove_host_syncs(fast) == []                                   # applied already
    kw = (tiny.hidream_inputs if name == "hidream" else tiny.nucleus_inputs)(fast, 1, 2, 0.5)
    assert torch.equal(fast(**kw)[0], plain(**kw)[0])
    assert graphs                                                              # the forward went through dynamo
    fast.moe_ep.finish(); plain.moe_ep.finish()
    assert fast.moe_ep.stats.total().sum() == plain.moe_ep.stats.total().sum() > 0     # hooks still fire


@torch.no_grad()
def test_config_model_compile_route(monkeypatch, tmp_path):
    """launch/infer.py's route: `model.compile: true` with model.type "diffusers" compiles the served
    transformer's blocks; false leaves it eager. The host syncs are removed either way."""
    from moe_ep import config as config_mod
    from moe_ep.models.base import NoHooks
    from moe_ep.models.diffusers import build_served_model

    graphs = recording_compile(monkeypatch)
    folder = tiny.save_tiny_folders(str(tmp_path))["hidream"]
    cfg_file = os.path.join(ROOT, "configs", "hidream_tiny.json")
    served, images = {}, {}
    for on in (False, True):
        cfg = config_mod.load(cfg_file, [f"model.path={folder}", f"model.compile={str(on).lower()}",
                                         "eplb.enabled=false", "eplb.num_redundant_experts=0",
                                         "sampling.num_inference_steps=2"])
        served[on] = build_served_model(cfg, ParallelContext())
        images[on] = served[on].sample(["a red circle"], [0], NoHooks())          # the job's call
    model = {on: s.loaded.model for on, s in served.items()}
    assert compiled_paths(model[False]) == [] and "patchify" in vars(model[False])
    assert compiled_paths(model[True]) == BLOCKS["hidream"] and "patchify" in vars(model[True])
    assert graphs and np.array_equal(images[True][0], images[False][0])


def test_bad_options_fail_early():
    model = wrapped("hidream")
    with pytest.raises(ValueError, match="attention backend 'fast'"):
        acc.accelerate(model, attention="fast")
    with pytest.raises(ValueError, match="host_syncs"):
        acc.accelerate(model, cuda_graph=True, host_syncs=False)
    with pytest.raises(ValueError, match="no module of class"):
        acc.compile_blocks(model, classes=["NoSuchBlock"])
    layer = model.double_stream_blocks[0].block.ff_i.moe
    layer.timer = PhaseTimer(torch.device("cpu"))
    with pytest.raises(ValueError, match="phase timers must be off"):
        acc.CudaGraphTransformer(model)
    layer.timer = None      # statistics are kept under a graph (tests/test_cuda_graph.py); a CPU is refused
    layer.stats = ExpertLoadStats(1, layer.cfg.num_experts, torch.device("cpu"))
    with pytest.raises(ConfigError, match="CUDA device") as err:
        acc.CudaGraphTransformer(model)
    assert err.value.field_name == "parallel.device"


def test_bench_transformer_small_runs_on_cpu(tmp_path):
    """Through `bench_diffusers.py --whole` (bench_transformer.py with the other arguments); the
    batch_invariant option adds the row with every MoE layer on the batch-invariant path (on a CPU
    "auto" has it on already: the same path, so bit-equal to moe-ep eager)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_diffusers
    finally:
        sys.path.pop(0)
    out = tmp_path / "small.json"
    assert bench_diffusers.main(["--whole", "--small", "--device", "cpu", "--options", "batch_invariant", "--reps",
                                 "1", "--warmup", "1", "--accuracy-layers", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert "--whole" not in data["meta"]["argv"]
    rows = {r["variant"]: r for r in data["rows"]}
    invariant = "moe-ep + host syncs removed, batch-invariant experts"
    assert list(rows) == ["diffusers", "moe-ep", "moe-ep + host syncs removed", invariant]
    assert all(r["median_ms"] > 0 for r in rows.values())
    assert rows["moe-ep + host syncs removed"]["max_abs_diff_vs_moe_ep_eager"] == 0.0
    assert rows[invariant]["max_abs_diff_vs_moe_ep_eager"] == 0.0
    acc_rows = {r["variant"]: r["rel_err_vs_fp32"] for r in data["accuracy"]}
    assert acc_rows["diffusers float32"] == 0.0                     # the reference itself
    assert 0 <= acc_rows["moe-ep float32"] < 1e-5 and acc_rows["moe-ep + host syncs removed"] < 1e-5
    assert data["meta"]["host_sync_fixes"]
    with pytest.raises(SystemExit):                                  # an unknown option: refused at once
        bench_diffusers.main(["--whole", "--small", "--device", "cpu", "--options", "compile,fast"])


def test_bench_parts_small_runs_on_cpu(tmp_path):
    """benchmarks/bench_parts.py end to end on a tiny HiDream: the parts are positive and add up to
    the marked forward (rest = total - attention - MoE)."""
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_parts.py")
    spec = importlib.util.spec_from_file_location("bench_parts", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "parts.json"
    assert mod.main(["--model", "hidream", "--small", "--device", "cpu", "--reps", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    med = res["median_ms"]
    assert med["attention"] > 0 and med["moe"] > 0 and med["rest"] > 0
    assert abs(med["attention"] + med["moe"] + med["rest"] - med["total"]) < 1e-6


@torch.no_grad()
def test_expert_parallel_compile_and_cuda_graph_route(monkeypatch):
    """docs/diffusers.md's `expert_parallel(pipe, compile=True, cuda_graph=True)`: on a CPU, with the
    device checks lifted and the stand-in graph backend, the graph is installed over the compiled
    blocks, its output equals the compiled route's without a graph, it captures once for one input
    signature, and the statistics count the same rows through the replays."""
    from types import SimpleNamespace

    import moe_ep
    from moe_ep import cuda_graph as cg
    from moe_ep.models.diffusers import pipeline as pipeline_mod

    graphs = recording_compile(monkeypatch)
    monkeypatch.setattr(pipeline_mod, "check_cuda_graph", lambda ctx, key: None)
    monkeypatch.setattr(pipeline_mod, "check_cuda_graph_device", lambda device, key: None)
    monkeypatch.setattr(cg, "CudaGraphBackend", cg.RerunBackend)
    pipes = {}
    for graph in (False, True):
        pipes[graph] = SimpleNamespace(transformer=tiny.tiny_nucleus(1), do_classifier_free_guidance=True)
        moe_ep.expert_parallel(pipes[graph], ParallelContext(), eplb={"enabled": False}, compile=True,
                               cuda_graph=graph)
    fast = pipes[True].transformer
    forward = vars(fast).get("forward")
    assert compiled_paths(fast) == BLOCKS["nucleus"] and isinstance(forward, cg.GraphedForward)
    for seed in (1, 2):                        # same signature: one capture, then replays
        kw = tiny.nucleus_inputs(fast, seed, 1, 0.5)
        assert torch.equal(fast(**kw)[0], pipes[False].transformer(**kw)[0])
    assert forward.captures == 1 and graphs
    for p in pipes.values():
        p.moe_ep.finish()
    assert pipes[True].moe_ep.stats.total().sum() == pipes[False].moe_ep.stats.total().sum() > 0
