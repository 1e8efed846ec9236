"""The MoE DiT, prompt encoders, sampler and decoder on one process."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from moe_ep import config as config_mod
from moe_ep.config import ConfigError
from moe_ep.images import decode_latents, save_png
from moe_ep.layer import MoELayer
from moe_ep.models.moedit.dit import MoEDiT
from moe_ep.models.moedit.sampler import FlowMatchEulerScheduler, MoEDiTPipeline, set_flux_timesteps
from moe_ep.models.moedit.text import PromptEncoder, tokenize
from moe_ep.parallel import ParallelContext
from moe_ep.stats import ExpertLoadStats
from tiny_job import QUICKSTART, TINY_MODEL_SET



def make(overrides=()):
    cfg = config_mod.load(QUICKSTART, [TINY_MODEL_SET, "sampling.height=16", "sampling.width=16", *overrides])
    model = MoEDiT(cfg.model, ParallelContext(), cfg.eplb.num_redundant_experts)
    model.init_from_seed()
    pipe = MoEDiTPipeline(model, PromptEncoder(cfg.model, model.text_encoder, torch.device("cpu"), model.dtype),
                          FlowMatchEulerScheduler(cfg.sampling.shift))
    return cfg, model, pipe


def my_encoder(prompts, max_tokens, text_dim, device):
    """A user encoder for `model.text_encoder = "test_model:my_encoder"`: 5 tokens, no mask."""
    g = torch.Generator().manual_seed(len(prompts))
    return torch.randn(len(prompts), 5, text_dim, generator=g).to(device)


def test_structure_and_seeded_init():
    cfg, model, _ = make(["model.num_layers=4", "model.moe_every=2"])
    moe = model.moe_layers()
    assert [type(b.ffn).__name__ for b in model.blocks] == ["DenseMLP", "MoELayer", "DenseMLP", "MoELayer"]
    assert [l.layer_idx for l in moe] == [0, 1] and all(isinstance(l, MoELayer) for l in moe)
    _, again, _ = make(["model.num_layers=4", "model.moe_every=2"])
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    _, other, _ = make(["model.num_layers=4", "model.moe_every=2", "model.seed=1"])
    assert not torch.equal(model.blocks[0].attn.q.weight, other.blocks[0].attn.q.weight)
    # adaLN is not zero-initialised: gates are non-trivial, and the output depends on the prompt
    assert model.blocks[0].adaLN_modulation[1].weight.abs().sum() > 0
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text, mask = model.text_encoder(["a fox", "a boat on a lake"])
    v = model(x, torch.tensor([0.9, 0.9]), text, mask)
    v2 = model(x, torch.tensor([0.9, 0.9]), text.flip(0), mask.flip(0))
    assert v.shape == x.shape and torch.isfinite(v).all() and v.std() > 0.1
    assert (v - v2).abs().max() > 1e-3


def test_tokenizer_and_builtin_encoder():
    ids, mask = tokenize(["ab", "", "é" * 40], 8)
    assert ids[0, :3].tolist() == [256, 97, 98] and mask.sum(1).tolist() == [3, 1, 8]
    _, model, pipe = make()
    emb, m = pipe.encode_prompt(["a", "b"], "", do_cfg=True)
    assert emb.shape == (4, 32, 64) and m.shape == (4, 32) and torch.equal(emb[2], emb[3])


def test_user_text_encoder():
    cfg, model, pipe = make(["model.text_encoder=test_model:my_encoder"])
    assert model.text_encoder is None
    emb, mask = pipe.encode_prompt(["x", "y"], "", do_cfg=False)
    assert emb.shape == (2, 5, 64) and mask.all()
    lat = pipe(["x", "y"], num_inference_steps=2, height=16, width=16, seeds=[0, 1])
    assert torch.isfinite(lat).all()
    with pytest.raises(ConfigError, match="model.text_encoder"):
        make(["model.text_encoder=test_model:no_such_function"])
    with pytest.raises(ConfigError, match="model.text_encoder"):
        make(["model.text_encoder=builtin_but_wrong"])


def test_sampler_hooks_and_cfg_rows():
    cfg, model, pipe = make()
    stats = ExpertLoadStats(len(model.moe_layers()), 8, torch.device("cpu"), window_size=100, top_k=2)
    for layer in model.moe_layers():
        layer.stats = stats
    calls = []

    def begin(i, t, info):
        calls.append(("begin", i, t, info["cond_rows"], info["rows"]))
        assert info["sample_branch"] == [0, 0, 0, 1, 1, 1]   # conditional samples first
        stats.begin_forward(t, info["cond_rows"])

    def end(i, t, info):
        calls.append(("end", i, t))
        stats.end_forward()

    pipe(["a", "b", "c"], num_inference_steps=3, guidance_scale=3.0, height=16, width=16, seeds=[0, 1, 2],
         callback_on_forward_begin=begin, callback_on_forward_end=end)
    n = 3 * 8 * 8  # prompts x tokens of the conditional half
    assert calls[0] == ("begin", 0, 1.0, n, 2 * n)
    assert [c[1] for c in calls if c[0] == "end"] == [0, 1, 2]
    ts = [c[2] for c in calls if c[0] == "begin"]
    assert pipe.timesteps == ts                              # t in [0, 1] (not diffusers' 1000 t)
    assert ts[0] == 1.0 and ts == sorted(ts, reverse=True) and ts[-1] > 0
    counts = stats.counts.sum(0)                             # [branch, L, E]
    assert (counts[0].sum(-1) == n * 3 * 2).all() and (counts[1].sum(-1) == n * 3 * 2).all()


def test_scheduler_is_diffusers_flow_match_euler():
    """The sampler steps with diffusers' FlowMatchEulerDiscreteScheduler on FLUX's schedule:
    forward i sees t_i = shift u / (1 + (shift - 1) u), u = 1 - i/N (closed form here), diffusers'
    timesteps are 1000 t, and a step is x + (t_{i+1} - t_i) v with t_N = 0."""
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerScheduler(shift=3.0)
    assert isinstance(s, FlowMatchEulerDiscreteScheduler)
    ts = set_flux_timesteps(s, 4)
    u = np.linspace(1.0, 0.0, 5)[:-1]
    want = 3.0 * u / (1 + 2.0 * u)
    assert ts[0] == 1.0 and len(ts) == 4 and np.allclose(ts, want, rtol=0, atol=1e-7), ts
    assert ts[1] > 0.75  # shift > 1 spends more steps at high noise
    assert torch.equal(s.timesteps, torch.tensor(ts) * 1000) and s.sigmas[-1] == 0.0
    x, v = torch.ones(2), torch.full((2,), 2.0)
    for i, t_next in enumerate(ts[1:] + [0.0]):
        expect = x + (torch.tensor(t_next) - torch.tensor(ts[i])) * v
        x = s.step(v, s.timesteps[i], x, return_dict=False)[0]
        assert torch.allclose(x, expect, rtol=0, atol=1e-6), i
    # shift 1 (the quickstart before the demo): exactly the hand-written schedule of earlier versions
    assert set_flux_timesteps(FlowMatchEulerScheduler(1.0), 4) == [1.0, 0.75, 0.5, 0.25]


def test_images_independent_of_batching():
    """Noise per prompt from its own seed: prompt 2 alone gives the same pixels as in a batch."""
    _, _, pipe = make()
    kw = dict(num_inference_steps=3, guidance_scale=4.0, height=16, width=16)
    together = decode_latents(pipe(["a", "b", "c"], seeds=[10, 11, 12], **kw))
    alone = decode_latents(pipe(["c"], seeds=[12], **kw))
    assert np.array_equal(together[2], alone[0])
    assert together.std() > 10 and not np.array_equal(together[0], together[1])
    empty = pipe([], seeds=[], **kw)
    assert empty.shape == (0, 4, 16, 16)


def test_decoder_and_png(tmp_path):
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    img = decode_latents(lat, vae_scale_factor=2)
    assert img.shape == (2, 16, 16, 3) and img.dtype == np.uint8
    assert np.array_equal(img, decode_latents(lat.clone(), vae_scale_factor=2))
    # Bilinear upsampling: pooled back to latent resolution it stays near the 1x image, and it is
    # smoother than repeating pixels (nearest) would be.
    small = decode_latents(lat).astype(float)
    pooled = img.astype(float).reshape(2, 8, 2, 8, 2, 3).mean((2, 4))
    assert np.abs(pooled - small).mean() < 20
    assert np.abs(np.diff(img.astype(float), axis=1)).mean() < np.abs(np.diff(np.repeat(small, 2, 1), axis=1)).mean()
    path = tmp_path / "sub" / "x.png"
    save_png(img[0], str(path))
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(path)), img[0])
    assert os.listdir(tmp_path / "sub") == ["x.png"]


def test_compiled_forward_equals_eager():
    """model.compile: the forward through torch.compile (the aot_eager backend here: the same
    dynamo trace and graph breaks as inductor, no C compiler needed) gives the eager latents,
    with the MoE layers run eagerly between the compiled pieces (one graph per stretch between
    two MoE layers, at least)."""
    from torch._dynamo.utils import counters

    _, model, pipe = make()
    kw = dict(num_inference_steps=2, guidance_scale=4.0, height=16, width=16)
    eager = pipe(["a", "b"], seeds=[1, 2], **kw)
    torch._dynamo.reset()
    counters.clear()
    moe_calls = []
    for layer in model.moe_layers():
        layer.register_forward_hook(lambda mod, args, out: moe_calls.append(mod.layer_idx))
    model.compile(backend="aot_eager")
    try:
        compiled = pipe(["a", "b"], seeds=[1, 2], **kw)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs >= len(model.moe_layers()) + 1
    assert moe_calls[:3] == [0, 1, 2] and len(moe_calls) == 2 * 3      # every MoE layer ran, each forward
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert not torch.equal(eager, torch.zeros_like(eager))


def test_compile_config_builds_a_compiled_model_and_keeps_compiling_out_of_the_speed_figures():
    """model.compile = true: the served model's transformer is compiled (nn.Module.compile, traced
    at its first call), no attention phase timer is attached, and summary.json leaves the first
    forward (the warm-up: the compile) out of latency_ms and tokens_per_s, as it does eager."""
    from types import SimpleNamespace

    from moe_ep.job import build_summary
    from moe_ep.models.moedit import MoEDiTModel

    cfg = config_mod.load(QUICKSTART, [TINY_MODEL_SET, "sampling.height=16",
                                       "sampling.width=16", "model.compile=true"])
    served = MoEDiTModel.build(cfg, ParallelContext())
    assert served.transformer._compiled_call_impl is not None
    assert served.attention_blocks() == []
    steps = [{"latency_ms": 9000.0, "tokens": 64}, {"latency_ms": 10.0, "tokens": 64}, {"latency_ms": 30.0, "tokens": 64}]
    recorder = SimpleNamespace(steps=steps, window_balance=[])
    summary = build_summary(cfg, ParallelContext(), served, recorder, None, "", 9.04)
    assert summary["first_forward_ms"] == 9000.0
    assert summary["latency_ms"]["max"] == 30.0 and summary["latency_ms"]["mean"] == 20.0
    assert summary["tokens_per_s"] == pytest.approx(128 / 0.040)
    eager = config_mod.load(QUICKSTART, [TINY_MODEL_SET, "sampling.height=16", "sampling.width=16"])
    eager_model = MoEDiTModel.build(eager, ParallelContext())
    assert build_summary(eager, ParallelContext(), eager_model, recorder, None, "", 9.04)["latency_ms"]["max"] == 30.0
    only = SimpleNamespace(steps=steps[:1], window_balance=[])   # a single forward is not left out
    assert build_summary(eager, ParallelContext(), eager_model, only, None, "", 9.0)["latency_ms"]["max"] == 9000.0
