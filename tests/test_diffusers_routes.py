"""Every route docs/diffusers.md shows for a transformer `load_transformer` made, end to end with
statistics, rebalancing, idle() and summary():

  1. `moe_ep.expert_parallel(loaded.model)`: the transformer alone (HiDream and NucleusMoE);
  2. `from_pretrained(folder, transformer=loaded.model)`, then `moe_ep.expert_parallel(pipe)`;
  3. `deepspeed launch/infer.py` with model.type = "diffusers" (slow: the real launcher).

References, independent of moe-ep: diffusers' own modules and pipeline from the same folder, and
the routed copies counted at diffusers' own MoE blocks (forward pre-hooks): token choice, every
token x top_k; expert choice, every sample x E experts x C = max(1, ceil(capacity_factor x S / E))
tokens (at most S).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import moe_ep
from moe_ep.config import ConfigError
from moe_ep.models.diffusers import load_transformer
from moe_ep.models.diffusers.tiny import hidream_inputs, nucleus_inputs, save_tiny_folders
from moe_ep.models.diffusers.tiny_pipeline import hidream_embeddings, sample, tiny_hidream_pipeline
from moe_ep.parallel import ParallelContext
from rebalance_helpers import random_planner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL_TOL = 1e-5
INPUTS = {"hidream": hidream_inputs, "nucleus": nucleus_inputs}
BLOCK = {"hidream": "MOEFeedForwardSwiGLU", "nucleus": "NucleusMoELayer"}
# a rebalance after every forward, forced, to a random placement
EPLB = {"enabled": True, "num_redundant_experts": 4, "window_size": 1, "interval": 1, "min_gain": -1.0}
NO_TEXT_ENCODERS = {f"{k}{s}": None for k in ("text_encoder", "tokenizer") for s in ("", "_2", "_3", "_4")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("routes")
    out = save_tiny_folders(str(root))
    tiny_hidream_pipeline(0).save_pretrained(str(root / "hidream_pipeline"))   # vae, scheduler, transformer
    out["hidream_pipeline"] = str(root / "hidream_pipeline")
    return out


def reference_model(name: str, folder: str):
    from diffusers import HiDreamImageTransformer2DModel, NucleusMoEImageTransformer2DModel

    if name == "hidream":
        return HiDreamImageTransformer2DModel.from_pretrained(folder).eval()
    return NucleusMoEImageTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()


def count_routed_copies(model, name: str) -> list[int]:
    """Per MoE layer (module order), the routed copies diffusers' own blocks make, counted on every
    call from their inputs (a list that grows as the model runs)."""
    counts = []
    blocks = [m for m in model.modules() if type(m).__name__ == BLOCK[name]]
    counts.extend([0] * len(blocks))

    def hook(i, block):
        def pre(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))                # [B, S, H]
            if name == "hidream":
                counts[i] += x.shape[:-1].numel() * block.gate.top_k            # every token, top_k experts
            else:
                B, S, _ = x.shape
                c = min(S, max(1, math.ceil(block.capacity_factor * S / block.num_experts)))
                counts[i] += B * block.num_experts * c                          # every expert, c tokens
        return pre
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(hook(i, b), with_kwargs=True)
    return counts


def placements(handle) -> list[list[int]]:
    return [m.placement.phy2log.tolist() for m in handle.moe_layers()]


def check_handle(handle, want_copies: list[int], forwards: int) -> np.ndarray:
    """summary(), statistics and rebalancing of a finished run; -> the totals [L, E]."""
    handle.finish()
    total = handle.stats.total().sum(axis=(0, 1))                                 # [L, E]
    assert total.sum(axis=1).tolist() == want_copies
    s = handle.summary()
    assert s["forwards"] == forwards and s["windows"] == forwards
    assert len(s["balancedness_windows"]) == forwards and 0 < s["balancedness"] <= 1
    moved = [e for e in s["rebalances"] if e["status"] == "ok" and e["experts_moved"]]
    assert moved, s["rebalances"]
    assert s["placement"] == placements(handle)
    return total


# ---------------------------------------------------------------- route 1: the transformer alone

@pytest.mark.parametrize("name", ["hidream", "nucleus"])
def test_expert_parallel_adopts_a_loaded_transformer(folders, name):
    ref = reference_model(name, folders[name])
    want = count_routed_copies(ref, name)
    ctx = ParallelContext()
    loaded = load_transformer(folders[name], ctx, num_redundant=EPLB["num_redundant_experts"])
    with pytest.raises(ConfigError, match="eplb.num_redundant_experts"):      # not what it was loaded with
        moe_ep.expert_parallel(loaded.model, ctx, eplb=dict(EPLB, num_redundant_experts=0))
    model = moe_ep.expert_parallel(loaded.model, eplb=EPLB)                    # ctx: the layers' own
    handle = model.moe_ep
    assert handle.wrappers == loaded.wrappers                                  # adopted, not wrapped again
    # the exact host-sync fix of the family is on (the comparisons below check it is exact)
    fixed = "patchify" in vars(model) if name == "hidream" else "forward" in vars(model.pos_embed)
    assert fixed and len(handle.host_sync_fixes) == 1, handle.host_sync_fixes
    handle.rebalancer.decider.planner, handle.rebalancer.force = random_planner(7), True
    start = placements(handle)
    with torch.no_grad():
        for step, t in enumerate((0.9, 0.5, 0.2)):
            inputs = INPUTS[name](ref, 30 + step, 2, t)
            expect = ref(**inputs)[0]
            got = model(**inputs)[0]
            err = float((got - expect).abs().max()) / max(1.0, float(expect.abs().max()))
            assert err <= REL_TOL, (step, err)        # also after the rebalances of earlier steps
        total = check_handle(handle, want, forwards=3)
        assert placements(handle) != start
        with handle.idle():                                                    # joins with no rows
            model(**inputs)
        handle.finish()
        assert np.array_equal(handle.stats.total().sum(axis=(0, 1)), total)
        assert handle.summary()["forwards"] == 4
    with pytest.raises(ValueError, match="expert-parallel already"):
        moe_ep.expert_parallel(model, eplb=EPLB)


# ---------------------------------------------------------------- route 2: a pipeline around it

def hidream_pipeline(folder: str, **components):
    from diffusers import HiDreamImagePipeline

    pipe = HiDreamImagePipeline.from_pretrained(folder, **NO_TEXT_ENCODERS, **components)
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = 8                 # as tiny_hidream_pipeline: 16 x 16 images
    return pipe


def test_pipeline_around_a_loaded_transformer(folders):
    folder = folders["hidream_pipeline"]
    ref = hidream_pipeline(folder)                                             # diffusers' own, all of it
    want = count_routed_copies(ref.transformer, "hidream")
    loaded = load_transformer(folder, ParallelContext(), num_redundant=EPLB["num_redundant_experts"])
    pipe = moe_ep.expert_parallel(hidream_pipeline(folder, transformer=loaded.model), eplb=EPLB)
    handle = pipe.moe_ep
    handle.rebalancer.decider.planner, handle.rebalancer.force = random_planner(3), True
    start = placements(handle)
    for call in range(2):
        emb = hidream_embeddings(ref, seed=call, batch=1)
        err = float(np.abs(sample(pipe, emb, [call]) - sample(ref, emb, [call])).max())
        assert err < REL_TOL, (call, err)
    total = check_handle(handle, want, forwards=2 * 2)
    branches = handle.stats.total().sum(axis=0)                                 # [2, L, E]
    assert branches[0].sum() == branches[1].sum() == sum(want) // 2             # [negative, positive] batches
    assert placements(handle) != start
    with handle.idle():
        sample(pipe, emb, [0])
    handle.finish()
    assert np.array_equal(handle.stats.total().sum(axis=(0, 1)), total)


# ---------------------------------------------------------------- route 3: launch/infer.py

@pytest.mark.slow   # the DeepSpeed launcher on 2 CPU ranks
def test_infer_script_on_a_diffusers_folder(folders, tmp_path):
    """`deepspeed --num_gpus 2 launch/infer.py --config configs/hidream_tiny.json`, as the docs
    show it: 3 prompts, one per rank per round (rank 1 idle in the second), rebalancing with async
    migration; images equal diffusers' own pipeline, statistics count every routed copy of the
    3 prompts (none of the idle stand-in), summary.json has the rebalances that moved experts."""
    from diffusers import HiDreamImageTransformer2DModel
    from PIL import Image

    from moe_ep import config as config_mod
    from moe_ep.models.diffusers.tiny_pipeline import hidream_pipeline_for

    out = str(tmp_path / "out")
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=ROOT)
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()), "launch/infer.py",
           "--config", "configs/hidream_tiny.json", "--no-progress",
           "--set", f"model.path={folders['hidream']}", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cfg = config_mod.load(os.path.join(ROOT, "configs", "hidream_tiny.json"))
    s = cfg.sampling
    own = hidream_pipeline_for(HiDreamImageTransformer2DModel.from_pretrained(folders["hidream"]).eval())
    want = count_routed_copies(own.pipe.transformer, "hidream")
    for i, prompt in enumerate(s.prompts):
        ref = own(prompt=[prompt], negative_prompt=s.negative_prompt, num_inference_steps=s.num_inference_steps,
                  guidance_scale=s.guidance_scale, generator=[torch.Generator().manual_seed(s.seed + i)],
                  output_type="np").images[0]
        ref = (np.clip(ref, 0, 1) * 255).round().astype(np.int16)
        got = np.asarray(Image.open(os.path.join(out, "images", f"{i:03d}.png"))).astype(np.int16)
        assert np.abs(got - ref).max() <= 1, prompt
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert np.asarray(stats["load"]).sum(axis=1).tolist() == want
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["ep_size"] == 2 and summary["model"]["type"] == "diffusers"
    assert any(e["status"] == "ok" and e["experts_moved"] > 0 for e in summary["rebalances"]), summary["rebalances"]
    assert "rebalances moved experts" in proc.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- what the routes must not ignore

def test_adopting_refuses_a_layout_the_transformer_was_not_loaded_with(folders):
    """expert_parallel on a load_transformer model checks `parallel` / `ctx` against the layout
    the layers were loaded with (they cannot be re-laid: their groups come from that context)."""
    from moe_ep.parallel_layout import ParallelLayout

    ctx = ParallelContext(world_size=2, rank=0)               # 2 ranks, EP 1: data parallel, no groups needed
    for parallel, key in (({"ulysses_degree": 2, "ep_size": 1}, "parallel.ulysses_degree"),
                          ({"sequence_parallel_size": 2, "ep_size": 1}, "parallel.sequence_parallel_size"),
                          ({"cfg_parallel_size": 2, "ep_size": 1}, "parallel.cfg_parallel_size"),
                          ({}, "parallel.ep_size")):                  # EP over the world of 2
        loaded = load_transformer(folders["nucleus"], ctx)
        with pytest.raises(ConfigError) as err:
            moe_ep.expert_parallel(loaded.model, parallel=parallel)
        assert err.value.field_name == key, str(err.value)
    other = ParallelContext(world_size=2, rank=0, layout=ParallelLayout(world_size=2, ulysses=2, dp=1))
    with pytest.raises(ValueError, match="ctx has world 2 = dp 1 x cfg 1 x sp 2"):
        moe_ep.expert_parallel(loaded.model, other)
    model = moe_ep.expert_parallel(loaded.model, parallel={"ep_size": 1})   # the loaded layout: adopted
    assert model.moe_ep.wrappers == loaded.wrappers and model.moe_ep.context_parallel is None


def _bi(layers) -> list[bool]:
    return [m.batch_invariant and m.experts.batch_invariant for m in layers]


def test_batch_invariant_reaches_the_layers_in_every_route(folders):
    """model.moe.batch_invariant / batch_invariant=: "auto" is on for these CPU ranks, "off" turns
    it off, in expert_parallel (wrapping, adopting), load_transformer and the job's served model."""
    from moe_ep import config as config_mod
    from moe_ep.models.diffusers import build_served_model
    from moe_ep.models.diffusers.tiny import tiny_nucleus

    ctx = ParallelContext()
    assert all(_bi(moe_ep.expert_parallel(tiny_nucleus(0), ctx).moe_ep.moe_layers()))         # auto on CPU
    assert not any(_bi(moe_ep.expert_parallel(tiny_nucleus(0), ctx, batch_invariant="off").moe_ep.moe_layers()))
    with pytest.raises(ConfigError, match="batch_invariant"):
        moe_ep.expert_parallel(tiny_nucleus(0), ctx, batch_invariant="maybe")
    loaded = load_transformer(folders["nucleus"], ctx, batch_invariant="off")
    assert not any(_bi(loaded.moe_layers))
    with pytest.raises(ValueError, match="loaded with 'off'"):
        moe_ep.expert_parallel(loaded.model, batch_invariant="on")
    assert not any(_bi(moe_ep.expert_parallel(loaded.model).moe_ep.moe_layers()))      # adopted as loaded
    config = os.path.join(ROOT, "configs", "hidream_tiny.json")
    for value, want in (("off", False), ("auto", True)):
        cfg = config_mod.load(config, [f"model.path={folders['hidream']}", f"model.moe.batch_invariant={value}"])
        assert _bi(build_served_model(cfg, ctx).moe_layers()) == [want] * 3, value


def test_sp_heads_preflight_falls_back_to_the_class_default(folders):
    """A config.json without num_attention_heads gets what diffusers builds then (the class's
    __init__ default: HiDream 20), not 1."""
    import dataclasses

    from moe_ep.models.diffusers import inspect_folder
    from moe_ep.models.diffusers.served import attention_heads

    info = inspect_folder(folders["hidream"])
    assert attention_heads(info) == info.config["num_attention_heads"]
    bare = dataclasses.replace(info, config={k: v for k, v in info.config.items() if k != "num_attention_heads"})
    assert attention_heads(bare) == 20
