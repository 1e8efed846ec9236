"""The batch-invariant expert path (model.moe.batch_invariant, moe_ep/batch_invariant.py): a
token's MoE output, bit for bit, does not depend on the other tokens of its forward, the EP size,
the placement (redundant slots, a rebalance) or the thread count.

The rule these tests hold the code to: a token's expert output is
    sum over its copies j = 0..k-1, in that order, in float32, of  dtype(fp32(SwiGLU_e(x)) * w_j)
plus the shared expert, where every SwiGLU product is a GEMM of one fixed row-block shape. The
float64 references of tests/reference.py check the values; here only equality across settings is
checked, so the layer's own EP = 1 output on a batch of one rank is the reference for the rest.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_ep.batch_invariant import BLOCK_ROWS, blocked_swiglu, silu_mul
from moe_ep.config import MoEConfig
from moe_ep.experts import DenseMLP, GroupedExperts, init_expert_weights
from moe_ep.layer import MoELayer
from moe_ep.parallel import context_for_tests
from mp import run_ranks
from reference import logical_weights, plain_swiglu
from tiny_job import QUICKSTART, TINY_MODEL

H, FF, SEED = 32, 24, 11


def _rows(n: int, seed: int, width: int = H) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_silu_mul_does_not_depend_on_where_an_element_sits():
    """An element's activation is the same alone, in a short tensor (the scalar tail loop) and in a
    long one (the vectorised body), and it is silu(gate) * up."""
    h = _rows(3000, 1, 2 * 40) * 4                                        # [M, 2F], F = 40 (not a multiple of 16)
    full = silu_mul(h)                                                    # [M, F]
    gate, up = h.chunk(2, dim=-1)
    assert torch.allclose(full.double(), (F.silu(gate.double()) * up.double()), rtol=1e-6, atol=1e-7)
    for lo, hi in [(0, 1), (5, 6), (17, 20), (100, 133), (2999, 3000), (1000, 2999)]:
        assert torch.equal(silu_mul(h[lo:hi]), full[lo:hi]), (lo, hi)
    flat = h.reshape(-1, 2)                                               # F = 1: every element a tail
    assert torch.equal(silu_mul(flat).view(-1), silu_mul(flat.contiguous().view(-1, 2)).view(-1))
    column = silu_mul(h.t().contiguous().t())                             # strided: the scalar loop everywhere
    assert torch.equal(column, full)


def _experts(num_slots: int, seed: int = SEED) -> GroupedExperts:
    ex = GroupedExperts(num_slots, H, FF)
    for s in range(num_slots):
        ex.set_slot(s, *init_expert_weights(seed, 0, s, H, FF))
    ex.batch_invariant = True
    return ex


@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_experts_rows_ignore_the_other_rows(threads):
    """Slot s's rows of a forward give the same bits whatever else is in the forward: other
    slots' rows, more rows of the same slot (before or after them), a row count that crosses a
    block boundary, a lone row; on one or two threads. And the values are SwiGLU's (float64)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ex = _experts(4)
        mine = _rows(7, 2)                                                 # 7 rows of slot 2
        alone = ex(mine, torch.tensor([0, 0, 7, 0]))
        w13, w2 = ex.slot_weights(2)
        ref = plain_swiglu(mine, w13, w2)
        assert (alone.double() - ref).abs().max() < 1e-5 * ref.abs().max()
        for before, after, others in [(0, 0, (33, 0, 5)), (9, 0, (1, 2, 3)), (BLOCK_ROWS - 7, 40, (0, 0, 0)),
                                      (BLOCK_ROWS * 3 + 1, 1, (70, 16, 17))]:
            o0, o1, o3 = others
            x = torch.cat([_rows(o0, 3), _rows(o1, 4), _rows(before, 5), mine, _rows(after, 6), _rows(o3, 7)])
            out = ex(x, torch.tensor([o0, o1, before + 7 + after, o3]))
            start = o0 + o1 + before
            assert torch.equal(out[start:start + 7], alone), (before, after, others)
        for i in range(7):                                                 # each row on its own
            assert torch.equal(ex(mine[i:i + 1], torch.tensor([0, 0, 1, 0])), alone[i:i + 1]), i
    finally:
        torch.set_num_threads(old)


def test_blocked_gemm_is_one_bmm_shape():
    """The fact rule 1 stands on (torch 2.13's CPU bmm): a [B, K] @ [K, N] block's result is the
    same for any number of blocks beside it and any content of its other rows."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, H, 2 * FF, generator=g)
    x = torch.randn(40, BLOCK_ROWS, H, generator=g)
    first = torch.bmm(x[:1], w[:1])[0]
    for nb in (2, 3, 17, 40):
        assert torch.equal(torch.bmm(x[:nb], w[:nb])[0], first), nb
    other = x.clone()
    other[0, 1:] = torch.randn(BLOCK_ROWS - 1, H, generator=g)
    assert torch.equal(torch.bmm(other[:5], w[:5])[0, 0], first[0])


def test_dense_mlp_rows_ignore_the_batch():
    """The shared expert (moe-ep's DenseMLP) in batch-invariant mode: a token's row is the same
    alone and among 50 others."""
    mlp = DenseMLP(H, FF)
    torch.nn.init.normal_(mlp.w13, std=0.3, generator=torch.Generator().manual_seed(4))
    torch.nn.init.normal_(mlp.w2, std=0.3, generator=torch.Generator().manual_seed(5))
    mlp.batch_invariant = True
    x = _rows(51, 6)
    full = mlp(x.view(3, 17, H))                                            # [B, S, H]
    assert full.shape == (3, 17, H)
    assert torch.equal(mlp(x[20:21]), full.view(51, H)[20:21])
    assert torch.equal(mlp(x[:3]), full.view(51, H)[:3])


# ---------------------------------------------------------------- the MoE layer over gloo ranks

E, TOP_K, REDUNDANT = 8, 4, 4
TOKENS = [23, 40, 0, 9]             # per rank; rank 2 routes nothing


def _layer(ctx, cfg: MoEConfig, placement: torch.Tensor) -> MoELayer:
    torch.manual_seed(1234)         # the same router and shared weights on every rank
    layer = MoELayer(H, cfg, ctx, num_redundant=REDUNDANT)
    torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    if layer.shared is not None:
        torch.nn.init.normal_(layer.shared.w13, std=H ** -0.5)
        torch.nn.init.normal_(layer.shared.w2, std=FF ** -0.5)
    layer.set_placement(placement, lambda e: init_expert_weights(SEED, 0, e, H, FF))
    return layer


def _placements() -> list[torch.Tensor]:
    """Contiguous, then two shuffles with replicas of hot and random experts (R = 12 slots)."""
    g = torch.Generator().manual_seed(9)
    out = [torch.cat([torch.arange(E), torch.arange(REDUNDANT)])]
    for _ in range(2):
        ids = torch.cat([torch.arange(E), torch.randint(0, E, (REDUNDANT,), generator=g)])
        out.append(ids[torch.randperm(E + REDUNDANT, generator=g)])
    return out


CONFIGS = {"top4-shared": dict(num_experts=E, top_k=TOP_K, expert_hidden_size=FF, num_shared_experts=1),
           "expert-choice": dict(num_experts=E, expert_hidden_size=FF, routing="expert_choice",
                                 capacity_factor=2.0)}


def _ranks_layer(rank: int, world: int, out_dir: str) -> None:
    """Every rank: its batch through the layer at EP 1, 2 and 4 (EP x DP = 4), under three
    placements (the third installed by moving weights in place, as a rebalance does), batch
    invariance on. EP 1 also runs this rank's tokens among every rank's tokens."""
    xs = [_rows(n, 100 + r).view(1, n, H) if n else torch.zeros(1, 0, H) for r, n in enumerate(TOKENS)]
    results = {}
    for ep in (1, 2, 4):
        ctx = context_for_tests(rank, world, ep)
        for name, kw in CONFIGS.items():
            cfg = MoEConfig(**kw)
            for p, placement in enumerate(_placements()):
                layer = _layer(ctx, cfg, placement)
                assert layer.batch_invariant           # the default
                results[(name, ep, p)] = layer(xs[rank])
                if ep == 1 and p == 0:
                    # this rank's tokens among others: top-4 after every rank's tokens in one sample;
                    # expert choice (it picks per sample) as sample 1 of 2
                    if name == "expert-choice":
                        every = torch.cat([_rows(TOKENS[rank], 200).view(1, -1, H), xs[rank]])
                    else:
                        every = torch.cat([_rows(5, 201).view(1, 5, H)] + xs, dim=1)
                    results[(name, "among others")] = layer(every)
                    layer.batch_invariant = False
                    results[(name, "plain")] = layer(xs[rank])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_layer_output_is_the_same_at_every_ep_size_placement_and_batch(tmp_path):
    run_ranks(4, _ranks_layer, str(tmp_path))
    for rank in range(4):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        n = TOKENS[rank]
        for name in CONFIGS:
            ref = res[(name, 1, 0)]
            assert ref.shape == (1, n, H)
            if n:   # batch invariance does not change the values beyond float32 rounding
                assert (res[(name, "plain")] - ref).abs().max() < 1e-5, name
            for key, out in res.items():
                if key[0] == name and len(key) == 3:
                    assert torch.equal(out, ref), f"{name}: EP {key[1]}, placement {key[2]} differs on rank {rank}"
            # the same tokens inside a batch of others
            among = res[(name, "among others")]
            mine = among[1:] if name == "expert-choice" else among[:, 5 + sum(TOKENS[:rank]):][:, :n]
            assert torch.equal(mine, ref), f"{name}: rank {rank}'s tokens among others differ"


# ---------------------------------------------------------------- whole jobs: the same latents

PROMPTS = ["a red fox", "a blue lake", "a green hill"]
JOB = [f"model={json.dumps(dict(TINY_MODEL, moe=dict(TINY_MODEL['moe'], top_k=4)))}",   # top-4: 3+ terms
       "sampling.num_inference_steps=4", "sampling.height=16", "sampling.width=16", "telemetry.wandb=false", "sampling.batch_size=2"]
FORCED = ["eplb.enabled=true", "eplb.num_redundant_experts=4", "eplb.min_gain=-1", "eplb.window_size=2",
          "eplb.interval=2"]


def _with_latent_bytes(decode):
    """decode_latents, each image followed by its latents' float32 bytes as extra pixel rows, so the
    PNG files the job writes (one per prompt index) compare the latents bit for bit too."""
    def wrapped(latents, factor=1):
        images = decode(latents, factor)                                   # [B, H, W, 3] uint8
        B, _, W, _ = images.shape
        raw = latents.detach().cpu().float().contiguous().numpy().view(np.uint8)
        raw = raw.reshape(B, 4 * latents[0].numel() if B else 0)
        rows = -(-raw.shape[1] // (W * 3))
        raw = np.pad(raw, ((0, 0), (0, rows * W * 3 - raw.shape[1]))).reshape(B, rows, W, 3)
        return np.concatenate([images, raw], axis=1)
    return wrapped


def _ranks_job(rank: int, world: int, overrides: list[str]) -> None:
    import sys
    from moe_ep import config as config_mod
    from moe_ep import job

    build = job.build_served_model

    def build_recording(cfg, ctx):
        model = build(cfg, ctx)
        module = sys.modules[type(model).__module__]      # where the model's sample() finds decode_latents
        module.decode_latents = _with_latent_bytes(module.decode_latents)
        return model

    job.build_served_model = build_recording
    cfg = config_mod.load(QUICKSTART, overrides)
    job.run(cfg, context_for_tests(rank, world, cfg.parallel.ep_size), progress=False)


def _job(tmp_path, name: str, world: int, prompts: list[str], extra: list[str]) -> dict[str, bytes]:
    """Run the job; -> prompt text -> its PNG's bytes (pixels, then the latents' bits)."""
    out = tmp_path / name
    run_ranks(world, _ranks_job, JOB + [f"output_dir={out}", f"sampling.prompts={json.dumps(prompts)}"] + extra)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ep_size"] == world
    return {x["prompt"]: (out / x["path"]).read_bytes() for x in summary["images"]}, summary


def test_job_latents_are_the_same_at_ep_1_2_4_with_rebalancing(tmp_path):
    """Three prompts, bit for bit: in batches of two at EP 1 (no redundant slots, no rebalancing);
    at EP 2 (4 redundant slots, rebalanced synchronously every 2 forwards: the expert GEMMs mix
    both ranks' prompts); at EP 4 (rebalanced asynchronously, two ranks idle). And with other
    prompts in the batch or none: each prompt alone (batch size 1) at EP 1 and at EP 2
    (rebalanced), all three in one batch at EP 1 (the dense parts run sample by sample)."""
    ep1, _ = _job(tmp_path, "ep1", 1, PROMPTS, [])
    ep2, s2 = _job(tmp_path, "ep2", 2, PROMPTS, ["eplb.migration=sync"] + FORCED)
    ep4, s4 = _job(tmp_path, "ep4", 4, PROMPTS, ["eplb.migration=async"] + FORCED)
    alone1, _ = _job(tmp_path, "alone1", 1, PROMPTS, ["sampling.batch_size=1"])
    alone2, sa = _job(tmp_path, "alone2", 2, PROMPTS, ["sampling.batch_size=1", "eplb.migration=sync"] + FORCED)
    three1, _ = _job(tmp_path, "three1", 1, PROMPTS, ["sampling.batch_size=3"])
    for s in (s2, s4, sa):                                  # experts did move mid-run
        assert sum(r["experts_moved"] for r in s["rebalances"]) > 0, s["rebalances"]
    for p in PROMPTS:
        assert ep2[p] == ep1[p], f"{p}: EP 2 vs EP 1"
        assert ep4[p] == ep1[p], f"{p}: EP 4 vs EP 1"
        assert alone1[p] == ep1[p], f"{p}: alone in its batch vs beside another, EP 1"
        assert alone2[p] == ep1[p], f"{p}: alone in its batch at EP 2 vs beside another at EP 1"
        assert three1[p] == ep1[p], f"{p}: in a batch of three vs of two, EP 1"


# ---------------------------------------------------------------- the built-in model's dense parts

def _model_outputs(batch_invariant: bool, latent: int, prompt_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A MoE-DiT with a dense block (moe_every 2) and the built-in text encoder, one thread,
    latents [4, latent, latent], prompts of `prompt_tokens` tokens:
    -> (sample 0's velocity alone [C, h, w], its velocity in batches of 2, 3 and 4 where it sits
    at another place each time)."""
    from moe_ep import config as config_mod
    from moe_ep.models.moedit.dit import MoEDiT
    from moe_ep.models.moedit.text import PromptEncoder
    from moe_ep.parallel import ParallelContext

    model_cfg = dict(TINY_MODEL, num_layers=2, moe_every=2, qk_norm=True, max_prompt_tokens=prompt_tokens)
    cfg = config_mod.load(QUICKSTART, [f"model={json.dumps(model_cfg)}"])
    model = MoEDiT(cfg.model, ParallelContext(), 0)
    model.init_from_seed()
    assert model.batch_invariant                                       # "auto" on the CPU
    model.batch_invariant = batch_invariant
    encode = PromptEncoder(cfg.model, model.text_encoder, torch.device("cpu"), model.dtype)
    x = torch.randn(4, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    prompts = ["a red fox", "a blue lake", "", "a green hill on a gray background"]

    def velocity(order: list[int]) -> torch.Tensor:
        text, mask = encode([prompts[i] for i in order])
        return model(x[order], torch.tensor([0.7, 0.3, 0.9, 0.5])[order], text, mask)[order.index(0)]

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return velocity([0]), [velocity(o) for o in ([1, 0], [2, 3, 0], [0, 1, 2, 3])]
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("latent,prompt_tokens", [(16, 32), (2, 3)])
def test_model_sample_ignores_the_other_samples_of_its_batch(latent, prompt_tokens):
    """The whole built-in model (text encoder, embedders, attention, adaLN, a dense and an MoE
    feed-forward with its router, the final layer): a sample's velocity alone has the same bits as
    in a batch of 2, 3 or 4. Off, the same comparison differs (so the test sees what it checks), by
    float32 rounding only. A 2 x 2 latent is one image token and 3 prompt tokens are 3 rows: a
    sample alone is then a GEMM of 1 to 3 rows, which MKL computes another way (batch_invariant.py)."""
    alone, in_batches = _model_outputs(True, latent, prompt_tokens)
    for i, v in enumerate(in_batches):
        assert torch.equal(v, alone), f"batch {i}: differs by {(v - alone).abs().max().item()}"
    plain_alone, plain = _model_outputs(False, latent, prompt_tokens)
    assert (plain_alone - alone).abs().max() < 1e-4 * alone.abs().max()
    assert any(not torch.equal(v, plain_alone) for v in plain)
