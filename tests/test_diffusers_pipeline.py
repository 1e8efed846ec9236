"""The one-call pipeline API (moe_ep.expert_parallel) on a tiny HiDream-I1 pipeline: images equal
diffusers' own pipeline at EP = 1, 2, 4, with forced rebalancing (sync and async migration), with a
rank that has no prompt (idle layers), and the statistics know each row's guidance branch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_ep
from moe_ep.parallel import context_for_tests
from mp import run_ranks
from rebalance_helpers import random_planner
from moe_ep.models.diffusers.tiny_pipeline import hidream_embeddings, sample, tiny_hidream_pipeline

pytestmark = pytest.mark.slow   # spawned ranks or launchers

TOL = 1e-5


def _ranks_pipeline(rank, world, migration):
    torch.set_num_threads(1)
    ctx = context_for_tests(rank, world, world)
    ref_pipe, ep_pipe = tiny_hidream_pipeline(0), tiny_hidream_pipeline(0)
    moe_ep.expert_parallel(ep_pipe, ctx, eplb={"enabled": True, "num_redundant_experts": world, "window_size": 1,
                                               "interval": 1, "min_gain": -1.0, "migration": migration})
    handle = ep_pipe.moe_ep
    handle.rebalancer.decider.planner, handle.rebalancer.force = random_planner(3), True
    emb = hidream_embeddings(ref_pipe, seed=10 + rank, batch=1)
    seeds = [100 + rank]
    for call in range(2):
        want = sample(ref_pipe, emb, seeds)
        got = sample(ep_pipe, emb, seeds)
        err = float(np.abs(got - want).max())
        assert err < TOL, f"call {call}: max abs pixel diff {err}"
    handle.finish()
    s = handle.summary()
    moved = [e for e in s["rebalances"] if e["status"] == "ok" and e["experts_moved"]]
    assert moved, s["rebalances"]
    # every MoE layer is expert-parallel: this rank holds only its slots
    assert all(len(w.moe.local_experts) == w.moe.slots_per_rank for w in handle.wrappers)
    # guidance: [negative, positive] in one batch -> equal counts per branch, all rows counted
    total = handle.stats.total()                                   # [buckets, 2, L, E]
    assert total[:, 0].sum() == total[:, 1].sum() > 0
    # a rank with no prompt: its layers go idle (no rows in the exchange), the others are unchanged
    if rank == world - 1:
        with handle.idle():
            sample(ep_pipe, emb, seeds)
        assert not any(w.moe.idle for w in handle.wrappers)
    else:
        got = sample(ep_pipe, emb, seeds)
        assert float(np.abs(got - sample(ref_pipe, emb, seeds)).max()) < TOL


@pytest.mark.parametrize("world,migration", [(1, "sync"), (2, "async"), (4, "sync")])
def test_pipeline_api_matches_diffusers(world, migration):
    run_ranks(world, _ranks_pipeline, migration)


def _ranks_partial_window(rank, world):
    torch.set_num_threads(1)
    ctx = context_for_tests(rank, world, world)
    pipe = tiny_hidream_pipeline(0)
    moe_ep.expert_parallel(pipe, ctx, eplb={"enabled": False, "window_size": 5})
    handle = pipe.moe_ep
    sample(pipe, hidream_embeddings(pipe, seed=1, batch=1), [7], steps=2)     # 2 forwards: no window closed
    assert handle.summary()["windows"] == 0 and handle.summary()["balancedness_windows"] == []
    handle.finish()
    s = handle.summary()
    assert s["windows"] == 1 and len(s["balancedness_windows"]) == 1
    assert len(s["balancedness_windows"][0]) == len(handle.wrappers)
    assert 0 < s["balancedness"] <= 1 and s["balancedness"] == pytest.approx(np.mean(s["balancedness_windows"][0]))


def _ranks_partial_window_measures(rank, world):
    torch.set_num_threads(1)
    ctx = context_for_tests(rank, world, world)
    pipe = tiny_hidream_pipeline(0)
    moe_ep.expert_parallel(pipe, ctx, eplb={"enabled": True, "num_redundant_experts": world, "window_size": 2,
                                            "interval": 2, "min_gain": -1.0})
    pipe.moe_ep.rebalancer.decider.planner, pipe.moe_ep.rebalancer.force = random_planner(5), True
    sample(pipe, hidream_embeddings(pipe, seed=1, batch=1), [7], steps=3)     # rebalance after forward 1
    moved = [e for e in pipe.moe_ep.rebalancer.events if e["ok"]]
    assert moved and moved[0]["measured_balancedness"] is None               # forward 2: a partial window
    pipe.moe_ep.finish()
    m = pipe.moe_ep.summary()["rebalances"][0]["measured_balancedness"]
    assert m is not None and 0 < m["min"] <= m["mean"] <= 1


def test_finish_counts_the_last_partial_window():
    """finish() closes the last, partial statistics window: its balancedness enters summary(), as
    the job's last window does (it was dropped before), and a rebalance waiting for a window under
    its placement is measured on it."""
    run_ranks(2, _ranks_partial_window)
    run_ranks(2, _ranks_partial_window_measures)


def _ranks_example(rank, world, folder, out):
    import os
    import sys

    torch.set_num_threads(1)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))
    import pipeline_example   # launch/pipeline_example.py

    assert pipeline_example.main([folder, "--out", out, "--steps", "2"]) == 0


def test_shipped_example_script_gives_diffusers_images(tmp_path):
    """launch/pipeline_example.py (docs/diffusers.md, way (b)) on 2 ranks: 3 prompts over 2 ranks
    (one rank idle in the second round), rebalancing with async migration; its images equal
    diffusers' own pipeline on the same weights, prompts and seeds, and its summary.json and
    stats.json are written."""
    import json
    import os
    import sys

    from PIL import Image

    from moe_ep.models.diffusers.tiny import save_tiny_folders
    from moe_ep.models.diffusers.tiny_pipeline import PromptEmbeddingPipeline

    folder = save_tiny_folders(str(tmp_path / "models"))["hidream"]
    out = str(tmp_path / "out")
    run_ranks(2, _ranks_example, folder, out)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))
    import pipeline_example

    ref = PromptEmbeddingPipeline(pipeline_example.make_pipeline(folder))     # diffusers' own blocks
    for i, prompt in enumerate(pipeline_example.PROMPTS):
        want = ref(prompt=[prompt], negative_prompt="", num_inference_steps=2, guidance_scale=4.0,
                   output_type="np", generator=[torch.Generator().manual_seed(i)]).images[0]
        want = (np.clip(want, 0, 1) * 255).round().astype(np.int16)
        got = np.asarray(Image.open(os.path.join(out, "images", f"{i:03d}.png"))).astype(np.int16)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1, (i, np.abs(got - want).max())
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["forwards"] == 2 * 2                                      # 2 rounds x 2 steps, every rank
    assert any(e["ok"] and e.get("migration") == "async" and e["experts_moved"] for e in summary["rebalances"])
    assert os.path.isfile(os.path.join(out, "stats.json"))
