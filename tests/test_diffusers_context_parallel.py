"""One image on many ranks for the diffusers families (context_parallel.py, nucleus_sp.py,
hidream_sp.py): sequence parallel (Ulysses, ring, both) and CFG parallel composed with EP and
EPLB, against diffusers' own pipeline in one process with the same weights (the reference).

Every layout runs diffusers' own pipeline loop (NucleusMoEImagePipeline with prompt embeddings
and no VAE; the tiny HiDreamImagePipeline), EP over all ranks, redundant experts and a forced
rebalance every forward. Checked: the latents equal the reference's (1e-5 relative), and the
expert statistics summed over the world equal the single-process routing's, per guidance
branch: every token counted once (expert choice: E x C per sample and layer; token choice:
tokens x k)."""
from __future__ import annotations

import os

import pytest
import torch

import moe_ep
from moe_ep.config import ConfigError, MoEConfig, ParallelConfig
from moe_ep.parallel import ParallelContext, build_context
from moe_ep.router import Router, expert_choice_copies
from mp import run_ranks
from rebalance_helpers import random_planner

RTOL = 1e-5


# ---------------------------------------------------------------- expert choice over shards

def _copies_set(c, rows_from_local=None):
    rows = c.rows().tolist() if rows_from_local is None else [rows_from_local(r) for r in c.rows().tolist()]
    return sorted(zip(rows, c.expert.tolist(), [round(w, 6) for w in c.weight.tolist()]))


@pytest.mark.parametrize("ties", [False, True])
def test_expert_choice_shards_are_the_whole_sample_choice(ties):
    """Keeping shard i's picks of the whole-sample choice, over all shards, is exactly the
    single-process choice (same copies, weights), ties included; choosing per shard is not."""
    B, S, E, sp = 2, 12, 4, 3
    cfg = MoEConfig(num_experts=E, top_k=1, routing="expert_choice", capacity_factor=1.5, route_scale=2.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, 6, generator=g)
    router = Router(6, cfg)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(E, 6, generator=g))
        scores = router.scores(x)                                           # [B, S, E]
    if ties:   # whole groups of equal scores straddling the shard borders
        scores = (scores * 4).round() / 4
    want = _copies_set(expert_choice_copies(scores, cfg))
    n = S // sp
    got, per_shard = [], []
    for i in range(sp):
        c = expert_choice_copies(scores, cfg, shard=(i * n, n))
        assert c.num_tokens == B * n and int(c.rows().max()) < B * n
        got += _copies_set(c, lambda r, i=i: (r // n) * S + i * n + r % n)
        alone = expert_choice_copies(scores[:, i * n:(i + 1) * n].contiguous(), cfg)   # mutation: per shard
        per_shard += _copies_set(alone, lambda r, i=i: (r // n) * S + i * n + r % n)
    assert sorted(got) == want
    assert sorted(per_shard) != want
    # the router on a whole sample is the same rule
    assert _copies_set(router.expert_choice(x)) == _copies_set(expert_choice_copies(router.scores(x), cfg))


# ---------------------------------------------------------------- pipelines

def _nucleus_pipe(seed=0):
    from diffusers import FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline, NucleusMoEImageTransformer2DModel

    from moe_ep.models.diffusers.tiny import init_random, nucleus_config

    # out_channels 4: the pipeline's packed latents (16 channels = 2 x 2 patches of 4) in and out
    tr = init_random(NucleusMoEImageTransformer2DModel.from_config({**nucleus_config(), "out_channels": 4}), seed)
    with torch.no_grad():   # make the attention matter: open the blocks' gates (about 0.02 at this init)
        for block in tr.transformer_blocks:   # and give q/k their unit norms (init_random: 0.02), so the
            block.img_mod[1].weight.mul_(30.0)   # softmax is not flat and the shards and rotary table
            block.img_mod[1].bias.mul_(30.0)     # change the latents
            for norm in (block.attn.norm_q, block.attn.norm_k, block.attn.norm_added_k):
                norm.weight.fill_(1.0)
    pipe = NucleusMoEImagePipeline(transformer=tr.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                   text_encoder=None, processor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _nucleus_latents(pipe, seed=3, guidance=4.0):
    """Packed latents [1, 16 tokens, 16] after 2 steps; the prompt's last text token is padding."""
    g = torch.Generator().manual_seed(seed)
    pe, ne = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    mask = torch.tensor([[True, True, True, True, False]])
    return pipe(prompt_embeds=pe, prompt_embeds_mask=mask, negative_prompt_embeds=ne,
                negative_prompt_embeds_mask=torch.ones(1, 5, dtype=torch.bool), height=64, width=64,
                num_inference_steps=2, guidance_scale=guidance, output_type="latent",
                generator=torch.Generator().manual_seed(seed + 1)).images


def _hidream_latents(pipe, seed=3):
    from moe_ep.models.diffusers.tiny_pipeline import hidream_embeddings

    return pipe(height=16, width=16, num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                generator=[torch.Generator().manual_seed(seed + 1)], **hidream_embeddings(pipe, seed, 1)).images


LATENTS = {"nucleus": _nucleus_latents, "hidream": _hidream_latents}


def _pipe(family):
    if family == "nucleus":
        return _nucleus_pipe(0)
    from moe_ep.models.diffusers.tiny_pipeline import tiny_hidream_pipeline

    pipe = tiny_hidream_pipeline(0)
    with torch.no_grad():   # as for NucleusMoE: unit q/k norms (init_random: 0.02), so attention is not flat
        for name, mod in pipe.transformer.named_modules():
            if type(mod).__name__ == "RMSNorm" and ".attn1." in f".{name}":
                mod.weight.fill_(1.0)
    return pipe


def _reference(family):
    """diffusers' pipeline alone (latents), and the single-process moe-ep stats of the same run."""
    run = LATENTS[family]
    want = run(_pipe(family))
    one = _pipe(family)
    moe_ep.expert_parallel(one, ParallelContext(), eplb={"enabled": False, "window_size": 1})
    run(one)
    return want, one.moe_ep.stats.total()


def _check_layout(rank, world, family, layout, reference, migration="sync", timestep_aware=False):
    want, want_stats = reference
    ctx = build_context(ParallelConfig(timeout_s=60, **layout), rank, world, torch.device("cpu"))
    pipe = _pipe(family)
    moe_ep.expert_parallel(pipe, ctx, eplb={"enabled": True, "num_redundant_experts": world, "window_size": 1,
                                            "interval": 1, "min_gain": -1.0, "migration": migration,
                                            "timestep_buckets": 2, "timestep_aware": timestep_aware})
    handle = pipe.moe_ep
    handle.rebalancer._planner, handle.rebalancer.force = random_planner(5), True
    got = LATENTS[family](pipe)
    handle.finish()
    err = float(((got - want).abs().max() / want.abs().max()))
    assert err < RTOL, f"{family} {layout}: latents differ from the single-process pipeline by {err:.2e} (relative)"
    moved = [e for e in handle.summary()["rebalances"] if e["status"] == "ok" and e["experts_moved"]]
    assert moved, f"{family} {layout}: no rebalance moved an expert"
    total = handle.stats.total().sum(axis=0, keepdims=True)                 # [1, 2, L, E], summed over the world
    assert (total == want_stats).all(), (f"{family} {layout}: stats differ from the single-process routing: "
                                         f"per branch {total.sum(axis=(0, 2, 3))} vs {want_stats.sum(axis=(0, 2, 3))}")
    handle.remove_hooks()


def _ranks(rank, world, family, layouts):
    torch.set_num_threads(1)
    reference = _reference(family)
    for i, layout in enumerate(layouts):
        # sync and async migration in turn; timestep-aware placements (one per timestep half) in the first
        _check_layout(rank, world, family, layout, reference, migration="async" if i % 2 else "sync",
                      timestep_aware=i == 0)


LAYOUTS = {2: [dict(ulysses_degree=2), dict(ring_degree=2), dict(cfg_parallel_size=2)],
           4: [dict(ulysses_degree=2, cfg_parallel_size=2), dict(ulysses_degree=2, ring_degree=2)]}


# the 4-rank layouts and the served model are slow-marked (about 25 s each on 2 busy cores)
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_nucleus_layouts_match_one_process(world):
    run_ranks(world, _ranks, "nucleus", LAYOUTS[world])


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_hidream_layouts_match_one_process(world):
    run_ranks(world, _ranks, "hidream", LAYOUTS[world])


def test_hidream_stats_rule_every_token_once():
    """Token choice, top-2: every image token of every MoE layer and every text token of the
    single-stream layers counted k times per forward (16 image tokens; 5 T5 + 3 + 3 Llama text
    tokens), 2 steps of one [negative; positive] forward."""
    _, stats = _reference("hidream")
    dual, single, k = 1, 2, 2
    per_forward = [16 * k] * dual + [(16 + 5 + 3 + 3) * k] * single          # per sample
    for branch in (0, 1):
        assert stats[:, branch].sum(axis=(0, 2)).tolist() == [2 * c for c in per_forward]


def test_nucleus_stats_rule_every_token_once():
    """The reference statistics themselves, by the plain rule: expert choice counts E x C copies per
    sample, layer and forward; 2 steps x (cond, uncond) forwards of 1 sample, 16 tokens."""
    import math

    from moe_ep.models.diffusers.tiny import nucleus_config

    _, stats = _reference("nucleus")
    conf = nucleus_config()
    E, S = conf["num_experts"], 16
    caps = [max(1, math.ceil(cf * S / E)) for cf in conf["capacity_factors"][1:]]   # first block dense
    for branch in (0, 1):
        assert stats[:, branch].sum(axis=(0, 2)).tolist() == [2 * E * c for c in caps]


# ---------------------------------------------------------------- bad layouts

def _ranks_cfg_rules(rank, world):
    torch.set_num_threads(1)
    ctx = build_context(ParallelConfig(timeout_s=60, cfg_parallel_size=2), rank, world, torch.device("cpu"))
    # guidance off with cfg 2: nothing to split
    pipe = moe_ep.expert_parallel(_nucleus_pipe(0), ctx)
    with pytest.raises(ConfigError, match="parallel.cfg_parallel_size"):
        _nucleus_latents(pipe, guidance=1.0)
    # two-call guidance: cfg rank 0 runs the conditional forward, rank 1 the unconditional one,
    # and the statistics label the rows so (expert choice counts are the same in both branches,
    # so the pipeline test cannot see these labels)
    pipe = moe_ep.expert_parallel(_nucleus_pipe(0), ctx)
    stats, seen = pipe.moe_ep.stats, []
    record = stats.record_copies
    stats.record_copies = lambda *a, **k: (seen.append(tuple(stats.sample_branch)), record(*a, **k))[1]
    want = _nucleus_latents(pipe)
    assert seen and set(seen) == {(rank,)}, f"cfg rank {rank} labelled its rows {set(seen)}"
    # the transformer called alone while the pipeline's guidance is on: no partner call comes, so
    # it fails on every rank instead of returning an output nobody fills
    from moe_ep.models.diffusers.tiny import nucleus_inputs

    kw = nucleus_inputs(pipe.transformer, 0, 1, 0.5)
    with pytest.raises(RuntimeError, match="outside its denoising loop"):
        pipe.transformer(**kw)
    # a pipeline call that stopped after the first forward of a step: the next call does not pair
    # with that stale forward (same latents as a clean call)
    pipe._current_timestep = torch.tensor(0.5)
    pipe.transformer(**kw)
    got = _nucleus_latents(pipe)
    assert torch.equal(got, want), "a pipeline call paired with a stale forward of an earlier call"

    # sequence parallel: heads that ulysses does not divide, image tokens that sp does not divide
    from moe_ep.models.diffusers.tiny import nucleus_inputs, tiny_hidream, tiny_nucleus

    ctx = build_context(ParallelConfig(timeout_s=60, ulysses_degree=2), rank, world, torch.device("cpu"))
    with pytest.raises(ConfigError, match="parallel.ulysses_degree"):
        moe_ep.expert_parallel(tiny_hidream(0, heads=3), ctx)
    model = moe_ep.expert_parallel(tiny_nucleus(0), ctx)
    kw = nucleus_inputs(model, 0, 1, 0.5)
    kw.update(hidden_states=kw["hidden_states"][:, :15], img_shapes=[(1, 3, 5)])
    with pytest.raises(ConfigError, match="parallel.ulysses_degree"):       # the key this layout was given
        model(**kw)
    # remove_hooks undoes context parallel: the model's own forward and processors, no hooks, and
    # the whole-sample output of the model alone
    kw = nucleus_inputs(model, 0, 1, 0.5)
    with torch.no_grad():
        sharded = model(**kw)[0]
    model.moe_ep.remove_hooks()
    assert "forward" not in model.__dict__ and not model._forward_hooks and not model._forward_pre_hooks
    assert {type(b.attn.processor).__name__ for b in model.transformer_blocks} == {"NucleusMoEAttnProcessor2_0"}
    assert all(m.router.sequence_layout is None for m in model.moe_ep.moe_layers())
    alone = moe_ep.expert_parallel(tiny_nucleus(0), ParallelContext())
    with torch.no_grad():
        got, want = model(**kw)[0], alone(**kw)[0]
    assert torch.allclose(sharded, want, rtol=RTOL, atol=1e-6) and torch.allclose(got, want, rtol=RTOL, atol=1e-6)
    hd = moe_ep.expert_parallel(tiny_hidream(0), ctx)
    hd.moe_ep.remove_hooks()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hd.modules())
    assert "forward" not in hd.__dict__
    assert {type(w.block.attn1.processor).__name__ for w in list(hd.double_stream_blocks) + list(hd.single_stream_blocks)} \
        == {"HiDreamAttnProcessor"}


def test_cfg_rules_and_bad_layouts():
    run_ranks(2, _ranks_cfg_rules)


def test_a_family_without_a_plan_names_the_key_the_user_gave():
    from moe_ep.models.diffusers.context_parallel import family_plan
    from moe_ep.parallel import resolve_layout

    for sizes, key in (({"cfg_parallel_size": 2}, "parallel.cfg_parallel_size"),
                       ({"ulysses_degree": 2}, "parallel.ulysses_degree"),
                       ({"ring_degree": 2}, "parallel.ring_degree")):
        with pytest.raises(ConfigError) as err:
            family_plan("somefamily", resolve_layout(ParallelConfig(**sizes), 2))
        assert (err.value.field_name, err.value.value) == (key, 2) and "'somefamily'" in str(err.value)


# ---------------------------------------------------------------- the served model (launch/infer.py's)

def _ranks_served(rank, world, folder):
    import numpy as np

    from moe_ep import config as config_mod
    from moe_ep.models.base import NoHooks
    from moe_ep.models.diffusers import build_served_model

    torch.set_num_threads(1)
    base = [f"model.path={folder}", "sampling.num_inference_steps=2"]
    cfg = config_mod.load(CONFIG, base)
    want = build_served_model(cfg, ParallelContext()).sample(["a red fox"], [7], NoHooks())
    for layout in (["parallel.ulysses_degree=2"], ["parallel.cfg_parallel_size=2"]):
        cfg = config_mod.load(CONFIG, base + layout)
        ctx = build_context(cfg.parallel, rank, world, torch.device("cpu"))
        got = build_served_model(cfg, ctx).sample(["a red fox"], [7], NoHooks())   # same prompt on every rank
        diff = int(np.abs(got[0].astype(int) - want[0].astype(int)).max())
        assert diff <= 1, f"served model under {layout}: image differs from one process by {diff} (uint8)"


CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "hidream_tiny.json")


@pytest.mark.slow
def test_served_model_under_sp_and_cfg(tmp_path):
    from moe_ep.models.diffusers.tiny import save_tiny_folders

    run_ranks(2, _ranks_served, save_tiny_folders(str(tmp_path))["hidream"])
