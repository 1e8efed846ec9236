"""CUDA-graph forward with expert-load statistics (moe_ep/cuda_graph.py, moe_ep/stats.py), on the CPU.

The statistics' recording that a graph can replay (one persistent per-forward buffer flushed into
the bucket by the host, persistent branch-label buffers) counts exactly what the plain rule says;
the graph wrapper's keys and capture bookkeeping are checked with a stand-in backend (no CUDA
here, cuda_graph.RerunBackend) whose "replay" runs the forward again on the static inputs; the routes' refusals on a CPU.
The graph itself runs on a GPU: benchmarks/gpu_graph_check.py (gpu_runs.sh part graph-stats)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_ep
from moe_ep import config as config_mod
from moe_ep.config import ConfigError, MoEConfig
from moe_ep.cuda_graph import GraphedForward, RerunBackend, check_cuda_graph_config, install_cuda_graph
from moe_ep.parallel import ParallelContext
from moe_ep.router import RoutedCopies
from moe_ep.stats import ExpertLoadStats
from rebalance_helpers import H, make_stack, random_planner

L, E = 3, 5


# ---------------------------------------------------------------- statistics

def _plain_counts(events, buckets: int) -> np.ndarray:
    """The rule written out: every routed copy adds 1 at [bucket, branch of its row, layer, expert];
    a row's branch is its sample's label (sample = row // rows per sample), else row >= cond_rows,
    else conditional."""
    out = np.zeros((buckets, 2, L, E), dtype=np.int64)
    for bucket, layer, experts, rows, labels, cond_rows, per_sample in events:
        for e, r in zip(experts, rows):
            if labels is not None:
                branch = labels[min(r // per_sample, len(labels) - 1)]
            elif cond_rows is not None:
                branch = int(r >= cond_rows)
            else:
                branch = 0
            out[bucket, branch, layer, e] += 1
    return out


def _copies(gen, routing: str, T: int, k: int) -> tuple[RoutedCopies, list, list]:
    expert = torch.randint(0, E, (T * k,), generator=gen)
    if routing == "token_choice":                       # regular layout: copy i is row i // k
        return RoutedCopies(expert, torch.empty(0), T, top_k=k), expert.tolist(), [i // k for i in range(T * k)]
    token = torch.randint(0, T, (T * k,), generator=gen)   # expert choice: any row per copy
    return RoutedCopies(expert, torch.empty(0), T, token=token), expert.tolist(), token.tolist()


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_flushed_counts_equal_the_plain_rule(routing):
    """Per bucket and branch, over closed windows and the open one; a forward whose rows come in two
    calls (relabelled between them, as cfg parallel does); a window closed directly, mid-forward."""
    gen = torch.Generator().manual_seed(3)
    stats = ExpertLoadStats(L, E, torch.device("cpu"), window_size=3, timestep_buckets=4, top_k=2)
    events, closed = [], []
    forwards = [  # (t, cond_rows, sample_branch per call of the forward)
        (0.9, None, [[0, 0, 1, 1]]), (0.6, 4, [None]), (0.1, None, [[1, 0, 1, 0]]),
        (0.35, None, [[0, 0], [1, 1]]), (0.35, None, [None]), (0.8, None, [[1, 1, 0, 0]]), (0.2, 2, [None])]
    for f, (t, cond_rows, calls) in enumerate(forwards):
        stats.begin_forward(t, cond_rows=cond_rows, sample_branch=calls[0])
        for branch in calls:
            if branch is not None:
                stats.set_sample_branch(branch)
            for layer in range(L):
                T = 8
                copies, experts, rows = _copies(gen, routing, T, 2)
                per_sample = T // len(branch) if branch else None
                stats.record_copies(layer, copies, rows_per_sample=per_sample)
                events.append((stats.bucket_of(t), layer, experts, rows, branch, cond_rows, per_sample))
        if f == 4:                                   # the last, partial window closed by the caller
            stats.close_window()
            closed.append(_plain_counts(events, 4))
            events = []
        else:
            assert np.array_equal(stats.counts.numpy(), _plain_counts(events, 4)), f"forward {f}"
            if stats.end_forward():
                closed.append(_plain_counts(events, 4))
                events = []
    assert len(closed) == stats.num_windows == 2
    assert np.array_equal(stats.last_window, closed[-1])
    assert np.array_equal(stats.total(), sum(closed))
    assert np.array_equal(stats.counts.numpy(), _plain_counts(events, 4))        # the open window


def test_save_restore_pending_keeps_earlier_rows_and_drops_later_ones():
    stats = ExpertLoadStats(L, E, torch.device("cpu"))
    stats.begin_forward(0.5, cond_rows=1)
    stats.record(0, torch.tensor([[1], [2]]))                  # before a capture: kept
    saved = stats.save_pending()
    stats.record(1, torch.tensor([[3], [3], [4]]))             # warm-up forwards: dropped
    stats.restore_pending(saved)
    stats.record(2, torch.tensor([[0], [0]]))                  # the replay
    stats.end_forward()
    stats.close_window()
    want = np.zeros((1, 2, L, E), dtype=np.int64)
    want[0, 0, 0, 1] = want[0, 1, 0, 2] = 1
    want[0, 0, 2, 0] = want[0, 1, 2, 0] = 1
    assert np.array_equal(stats.total(), want)


def test_a_new_bucket_flushes_rows_of_a_forward_left_open():
    """begin_forward without end_forward before it (a forward abandoned): its rows stay in its bucket."""
    stats = ExpertLoadStats(L, E, torch.device("cpu"), timestep_buckets=2)
    stats.begin_forward(0.9)
    stats.record(1, torch.tensor([[3]]))
    stats.begin_forward(0.1)
    stats.record(2, torch.tensor([[4]]))
    stats.close_window()
    total = stats.total()
    assert total[1, 0, 1, 3] == 1 and total[0, 0, 2, 4] == 1 and total.sum() == 2


def test_label_buffer_is_one_tensor_per_batch_length_and_graph_key():
    stats = ExpertLoadStats(L, E, torch.device("cpu"))
    stats.begin_forward(0.1, sample_branch=[0, 0, 1, 1])
    first = stats._sample_branch
    assert stats.graph_key() == ("sample_branch", 4)
    stats.begin_forward(0.2, sample_branch=[1, 1, 0, 0])
    assert stats._sample_branch is first and first.tolist() == [1, 1, 0, 0]
    stats.begin_forward(0.2, sample_branch=[1, 0])
    assert stats._sample_branch is not first and stats.graph_key() == ("sample_branch", 2)
    stats.set_sample_branch([0, 1, 0, 1])
    assert stats._sample_branch is first and first.tolist() == [0, 1, 0, 1]
    stats.begin_forward(0.3, cond_rows=6)
    assert stats._sample_branch is None and stats.graph_key() == ("cond_rows", 6)
    stats.begin_forward(0.3)
    assert stats.graph_key() == ("cond_rows", None)


# ---------------------------------------------------------------- the graph wrapper

def _stack_with_stats(redundant: int = 2):
    layers = make_stack(ParallelContext(), L, MoEConfig(num_experts=E, top_k=2, expert_hidden_size=24), redundant)
    stats = ExpertLoadStats(L, E, torch.device("cpu"), window_size=2, timestep_buckets=2, top_k=2)
    for layer in layers:
        layer.stats = stats
    return layers, stats


def _forward(layers):
    def run(x):                                          # x [B, S, H]
        for layer in layers:
            x = x + layer(x)
        return x
    return run


def test_graph_wrapper_keys_captures_and_counts_like_eager():
    """Eager and graphed stacks (the same weights) see the same forwards: outputs and every count
    equal (warm-up and capture forwards not counted, rows recorded before a capture kept); a new
    capture per input shape and per statistics key, none for a repeated one; set_placement drops
    every graph and captures afresh; a phase timer is refused."""
    eager_layers, eager_stats = _stack_with_stats()
    layers, stats = _stack_with_stats()
    backend = RerunBackend()
    graph = GraphedForward(_forward(layers), layers, backend=backend)
    eager = _forward(eager_layers)
    gen = torch.Generator().manual_seed(0)
    pending = stats.pending              # a real graph writes this tensor by address: never replaced
    plan = [  # (t, batch, cond_rows, sample_branch) -> captures expected after it
        (0.9, 2, None, [0, 1], 1), (0.7, 2, None, [1, 0], 1), (0.4, 2, 4, None, 2), (0.2, 2, 4, None, 2),
        (0.1, 3, None, [0, 0, 1], 3), (0.6, 2, None, [1, 1], 3)]
    for i, (t, B, cond_rows, branch, captures) in enumerate(plan):
        x = torch.randn(B, 4, H, generator=gen)
        for st, lay in ((eager_stats, eager_layers), (stats, layers)):
            st.begin_forward(t, cond_rows=cond_rows, sample_branch=branch)
            if i == 4:            # rows this forward recorded before the call that captures
                st.record(0, torch.tensor([[1, 2]]))
        y_eager, y = eager(x), graph(x)
        assert torch.equal(y, y_eager) and graph.captures == captures, i
        eager_stats.end_forward(), stats.end_forward()
        assert torch.equal(stats.counts, eager_stats.counts), i
        assert stats.pending is pending, i
    assert np.array_equal(stats.total(), eager_stats.total()) and stats.num_windows == 3
    # a new placement (a rebalance): every graph dropped, the next call captures afresh
    new = torch.tensor([4, 3, 2, 1, 0, 0, 1])
    for lay in (layers[1], eager_layers[1]):
        lay.set_placement(new, weights=None)
        lay.experts.w13.data.copy_(lay.experts.w13.data.flip(0)), lay.experts.w2.data.copy_(lay.experts.w2.data.flip(0))
    x = torch.randn(2, 4, H, generator=gen)
    for st in (eager_stats, stats):
        st.begin_forward(0.9, sample_branch=[0, 1])
    assert torch.equal(graph(x), eager(x)) and graph.captures == 4 and graph.drops == 1
    assert torch.equal(stats.counts, eager_stats.counts)
    assert graph(x) is not None and graph.captures == 4                 # same placement: replayed
    # expert weights moved to new tensors: a fresh capture too
    layers[2].experts.w2 = torch.nn.Parameter(layers[2].experts.w2.data.clone(), requires_grad=False)
    graph(x)
    assert graph.captures == 5 and graph.drops == 2
    from moe_ep.timing import PhaseTimer
    layers[0].timer = PhaseTimer(torch.device("cpu"))
    with pytest.raises(ValueError, match="phase timers must be off"):
        graph(x)


def test_a_failed_capture_counts_none_of_its_warm_up_forwards():
    """A capture that raises (e.g. a host sync in the forward) after its warm-up forwards ran:
    the statistics hold what this forward recorded before the call, nothing of the warm-ups."""
    class FailingCapture(RerunBackend):
        def capture(self, run, warmup, pool, context):
            for _ in range(warmup):
                run()
            raise RuntimeError("operation not permitted when stream is capturing")

    layers, stats = _stack_with_stats()
    graph = GraphedForward(_forward(layers), layers, backend=FailingCapture())
    stats.begin_forward(0.9, sample_branch=[0, 1])
    stats.record(0, torch.tensor([[1, 2]]))
    before = stats.pending.clone()
    with pytest.raises(RuntimeError, match="capturing"):
        graph(torch.randn(2, 4, H))
    assert torch.equal(stats.pending, before) and int(before.sum()) == 2


def test_graph_route_with_forced_rebalance_equals_eager():
    """The expert_parallel route's pieces on a CPU (the graph installed with the stand-in backend as
    expert_parallel(cuda_graph=True) installs it): a tiny HiDream pipeline with forced rebalancing
    every forward gives the same images, statistics and placements as the eager one, and each
    rebalance leads to a fresh capture; remove_hooks gives the transformer its forward back."""
    from moe_ep.models.diffusers.tiny_pipeline import hidream_embeddings, sample, tiny_hidream_pipeline

    eplb = {"enabled": True, "num_redundant_experts": 2, "window_size": 1, "interval": 1, "min_gain": -1.0}
    pipes = [tiny_hidream_pipeline(0), tiny_hidream_pipeline(0)]
    for pipe in pipes:
        moe_ep.expert_parallel(pipe, ParallelContext(), eplb=eplb)
        pipe.moe_ep.rebalancer.decider.planner, pipe.moe_ep.rebalancer.force = random_planner(3), True
    eager, graphed = pipes
    handle = graphed.moe_ep
    handle.cuda_graph = install_cuda_graph(graphed.transformer, handle.moe_layers(), backend=RerunBackend())
    emb = hidream_embeddings(eager, seed=10, batch=1)
    assert np.array_equal(sample(graphed, emb, [100], steps=3), sample(eager, emb, [100], steps=3))
    for pipe in pipes:
        pipe.moe_ep.finish()
    a, b = eager.moe_ep.summary(), handle.summary()
    assert a["placement"] == b["placement"] and a["balancedness_windows"] == b["balancedness_windows"]
    assert np.array_equal(eager.moe_ep.stats.total(), handle.stats.total())
    assert handle.stats.total()[:, 0].sum() == handle.stats.total()[:, 1].sum() > 0   # both branches counted
    moved = [r for r in b["rebalances"] if r["status"] == "ok" and r["experts_moved"]]
    assert moved and handle.cuda_graph.graph.drops >= 1
    assert handle.cuda_graph.graph.captures == handle.cuda_graph.graph.drops + 1
    handle.remove_hooks()
    assert "forward" not in vars(graphed.transformer) and handle.cuda_graph is None


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("overrides,why", [
    ({"parallel": {"device": "cpu"}}, "CUDA device"),
    ({"parallel": {"ep_size": 2}}, "EP = 1"),
    ({"parallel": {"sequence_parallel_size": 2}}, "one image on one rank"),
    ({"parallel": {"cfg_parallel_size": 2}}, "one image on one rank")])
def test_config_model_cuda_graph_refusals(overrides, why):
    with pytest.raises(ConfigError, match=why) as err:
        config_mod.from_dict({"model": {"cuda_graph": True}, **overrides})
    assert err.value.field_name == "model.cuda_graph"
    config_mod.from_dict(overrides)                     # the same layout without the graph: fine


def test_config_model_cuda_graph_needs_ep_one_at_the_world_size_and_a_gpu():
    cfg = config_mod.from_dict({"model": {"cuda_graph": True}})
    with pytest.raises(ConfigError, match="EP = 1") as err:
        check_cuda_graph_config(cfg, 2)                 # EP spans the world: 2
    assert err.value.field_name == "model.cuda_graph"
    if not torch.cuda.is_available():                # this machine: device "auto" finds no GPU
        with pytest.raises(ConfigError, match="no GPU") as err:
            check_cuda_graph_config(cfg, 1)
        assert err.value.field_name == "model.cuda_graph"
    check_cuda_graph_config(config_mod.from_dict({}), 4)      # off: nothing checked


def test_expert_parallel_cuda_graph_refused_on_cpu_before_wrapping():
    from moe_ep.models.diffusers.tiny import tiny_nucleus
    from moe_ep.models.diffusers.wrap import find_wrapped

    import torch.distributed as dist

    model = tiny_nucleus(0)
    started = dist.is_initialized()
    with pytest.raises(ConfigError, match="needs a CUDA device") as err:
        moe_ep.expert_parallel(model, cuda_graph=True)
    assert err.value.field_name == "cuda_graph"
    assert not find_wrapped(model) and not hasattr(model, "moe_ep")
    assert dist.is_initialized() == started              # refused before any process group starts
    with pytest.raises(ConfigError, match="CUDA device") as err:    # a CPU context given: refused too
        moe_ep.expert_parallel(model, ParallelContext(), cuda_graph=True)
    assert err.value.field_name == "cuda_graph" and not find_wrapped(model)


@pytest.mark.parametrize("kind", ["moe_dit", "diffusers"])
def test_config_model_cuda_graph_reaches_the_served_model(kind, monkeypatch, tmp_path):
    """The job's served model under model.cuda_graph: on a CPU its build refuses, naming the key;
    with the device check lifted and the stand-in backend, the pipeline's forwards go through the
    graph (the module's forward for diffusers, the pipeline's transformer for the built-in model),
    the images equal the eager ones, and telemetry puts no phase timer on it."""
    import os

    from moe_ep import cuda_graph as cg
    from moe_ep.models import build_served_model
    from moe_ep.models.base import NoHooks
    from moe_ep.models.diffusers import served as diffusers_served, tiny
    from moe_ep.models.moedit import graphs, served as moedit_served

    def config(on: bool):
        over = {"model.cuda_graph": str(on).lower(), "sampling.num_inference_steps": "2", "eplb.enabled": "false",
                "telemetry.wandb": "false"}            # no wandb run left open in this process
        if kind == "diffusers":
            folder = tiny.save_tiny_folders(str(tmp_path))["hidream"]
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            over.update({"model.path": folder, "eplb.num_redundant_experts": "0"})
            return config_mod.load(os.path.join(root, "configs", "hidream_tiny.json"), [f"{k}={v}" for k, v in over.items()])
        return config_mod.from_dict({"model": {"cuda_graph": on}, "sampling": {"num_inference_steps": 2},
                                     "telemetry": {"wandb": False}})

    with pytest.raises(ConfigError, match="CUDA device") as err:
        build_served_model(config(True), ParallelContext())
    assert err.value.field_name == "model.cuda_graph"
    for module in (diffusers_served, moedit_served):
        monkeypatch.setattr(module, "check_cuda_graph", lambda ctx, key: None)
    monkeypatch.setattr(cg, "CudaGraphBackend", RerunBackend)
    monkeypatch.setattr(graphs, "CudaGraphBackend", RerunBackend)
    served = {on: build_served_model(config(on), ParallelContext()) for on in (False, True)}
    images = {on: s.sample(["a red circle"], [0], NoHooks()) for on, s in served.items()}
    assert np.array_equal(images[True][0], images[False][0])
    if kind == "diffusers":     # the exact host-sync fix is on with or without the graph (HiDream: patchify)
        assert all("patchify" in vars(s.loaded.model) for s in served.values())
    graph = (vars(served[True].loaded.model).get("forward") if kind == "diffusers"
             else served[True].pipe.transformer)
    assert isinstance(graph, GraphedForward) and graph.captures >= 1
    assert served[True].phase_timing() is False and served[False].phase_timing() is True
    from moe_ep.telemetry import Telemetry
    telemetry = Telemetry(served[True].cfg, ParallelContext(), str(tmp_path))
    telemetry.attach(served[True])
    assert telemetry.timer is None and all(layer.timer is None for layer in served[True].moe_layers())
    assert served[True].sample(["a red circle"], [0], NoHooks())[0].shape == images[True][0].shape   # still runs


def test_gpu_graph_check_rehearses_on_the_cpu(capsys):
    """benchmarks/gpu_graph_check.py (gpu_runs.sh part graph-stats): its arguments, a refusal without
    CUDA, and one part rehearsed with the stand-in backend through the same route and comparisons."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        import gpu_graph_check
    finally:
        sys.path.pop(0)
    for bad in (["--parts", "nucleusmoe,bogus"], ["--steps", "2"]):
        with pytest.raises(SystemExit) as err:
            gpu_graph_check.main(bad)
        assert err.value.code == 2
    if not torch.cuda.is_available():
        assert gpu_graph_check.main(["--device", "cuda"]) == 1
        assert "FAIL setup: CUDA is not available" in capsys.readouterr().out
    assert gpu_graph_check.main(["--device", "cpu", "--parts", "hidream", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count("PASS hidream") == 4 and "rehearsal" in out

    # the output verdict where eager is not reproducible: the graph may drift as far as eager's own
    # control does (doubled) or REL_TOL, not further; bit-identical passes, drift with a reproducible eager fails
    base = torch.ones(8)
    outputs = gpu_graph_check.Outputs()
    outputs.add(base, base * (1 + 4e-2), base * (1 + 7e-2))
    assert outputs.verdict()[0] and "control vs eager max relative 4.00e-02" in outputs.verdict()[1]
    assert "control/graph per forward: 4.0e-02/7.0e-02" in outputs.verdict()[1]
    outputs.add(base, base, base * (1 + 9e-2))
    assert not outputs.verdict()[0]                       # 9e-2 > 2 x 4e-2
    floor = gpu_graph_check.Outputs()
    floor.add(base, base * (1 + 1e-3), base * (1 + 1.1e-2))
    assert floor.verdict()[0] and gpu_graph_check.REL_TOL == 3e-2   # the measured near-tie event passes
    floor.add(base, base, base * 1.5)
    assert not floor.verdict()[0]                         # a stale graph's O(1) does not
    wild = gpu_graph_check.Outputs()
    wild.add(base, base * 1.4, base * 1.5)
    assert not wild.verdict()[0]                          # the limit stops at MAX_TOL, whatever the control does
    lucky = gpu_graph_check.Outputs(nondeterministic=True)   # NucleusMoE on CUDA: the control happened to match
    lucky.add(base, base, base * (1 + 1.1e-2))
    assert lucky.verdict()[0] and "limit 3.00e-02" in lucky.verdict()[1]
    strict = gpu_graph_check.Outputs()
    strict.add(base, base, base * (1 + 1e-4))
    assert not strict.verdict()[0] and "though eager is bit-reproducible" in strict.verdict()[1]
    strict = gpu_graph_check.Outputs()
    strict.add(base, base, base.clone())
    assert strict.verdict() == (True, "bit-identical to eager at all 1 comparisons")
