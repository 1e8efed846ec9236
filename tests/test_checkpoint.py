"""Checkpoints: save from the seed or from a running EP model, load with each rank reading only
its experts, same outputs as seed initialisation; broken or mismatched files give clear errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe_ep import config as config_mod
from moe_ep.models.moedit.checkpoint import (CheckpointError, expected_tensors, inspect_checkpoint, load_checkpoint,
                               save_checkpoint, save_from_seed)
from mp import run_ranks
from tiny_job import QUICKSTART, TINY_MODEL_SET

# the tiny model of tests/tiny_job.py, not the demo model
SMALL = [TINY_MODEL_SET, "sampling.num_inference_steps=2", "sampling.height=16", "sampling.width=16", "telemetry.wandb=false",
         'sampling.prompts=["a red fox", "a blue lake"]', "sampling.batch_size=1", "eplb.enabled=false",
         "model.num_layers=2", "eplb.num_redundant_experts=2"]


def small_cfg(extra=()):
    return config_mod.load(QUICKSTART, SMALL + list(extra))


def _ranks_load(rank: int, world: int, path: str, out: str) -> None:
    from moe_ep.models.moedit.dit import MoEDiT
    from moe_ep.job import run
    from moe_ep.parallel import context_for_tests

    cfg = small_cfg()
    ctx = context_for_tests(rank, world)
    seeded = MoEDiT(cfg.model, ctx, cfg.eplb.num_redundant_experts)
    seeded.init_from_seed()
    loaded = MoEDiT(cfg.model, ctx, cfg.eplb.num_redundant_experts)
    reader = load_checkpoint(loaded, path)
    # each rank read the non-expert weights and exactly the experts its slots hold
    read_experts = {k for k in reader.keys_read if k.startswith("experts.")}
    want = {f"experts.{l.layer_idx}.{e}.{w}" for l in loaded.moe_layers() for e in l.local_experts for w in ("w13", "w2")}
    assert read_experts == want, (rank, sorted(read_experts))
    assert len(want) < 2 * 2 * 8  # not every expert
    for (k, a), (k2, b) in zip(seeded.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(rank))
    text, mask = loaded.text_encoder(["a fox", "b"])
    t = torch.tensor([0.7, 0.2])
    assert torch.equal(seeded(x, t, text, mask), loaded(x, t, text, mask))

    # save from a running model after a placement change with replicas; equal to the seed file
    # (rank 1 stores w13 interleaved, as the "quack" expert path does: the file is the same)
    phy2log = torch.tensor([7, 3, 0, 5, 1, 2, 4, 6, 3, 7])
    for layer in loaded.moe_layers():
        if rank == 1:
            layer.experts.backend = "quack"
        layer.set_placement(phy2log, reader.layer_source(layer.layer_idx))
    path2 = os.path.join(out, "saved.safetensors")
    save_checkpoint(loaded, path2)
    torch.distributed.barrier()
    if rank == 0:
        a, b = load_file(path), load_file(path2)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)

    # the whole job: same images from the checkpoint as from the seed
    run(small_cfg([f"output_dir={out}/seed"]), ctx, progress=False)
    run(small_cfg([f"output_dir={out}/ckpt", f'model.checkpoint="{path}"']), ctx, progress=False)
    torch.distributed.barrier()
    if rank == 0:
        for name in ("000.png", "001.png"):
            a = np.asarray(Image.open(f"{out}/seed/images/{name}"))
            b = np.asarray(Image.open(f"{out}/ckpt/images/{name}"))
            assert np.array_equal(a, b), name
        assert json.load(open(f"{out}/ckpt/summary.json"))["checkpoint"] == path


def test_round_trip_two_ranks(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_from_seed(small_cfg().model, path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "moe-ep.checkpoint" and json.loads(meta["model_config"])["hidden_size"] == 64
        assert set(f.keys()) == set(expected_tensors(small_cfg().model))
    run_ranks(2, _ranks_load, path, str(tmp_path))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "model.safetensors")
    save_from_seed(small_cfg().model, path)
    return path


def _rewrite(src: str, dst: str, edit) -> str:
    tensors = load_file(src)
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    edit(tensors, meta)
    save_file(tensors, dst, metadata=meta)
    return dst


def expect_error(cfg, path, *words):
    with pytest.raises(CheckpointError) as info:
        inspect_checkpoint(path, cfg.model)
    msg = str(info.value)
    assert msg.startswith("config field 'model.checkpoint' = "), msg
    for w in words:
        assert w in msg, msg


def test_missing_expert(ckpt, tmp_path):
    p = _rewrite(ckpt, str(tmp_path / "a.safetensors"), lambda t, m: t.pop("experts.1.5.w2"))
    expect_error(small_cfg(), p, "missing tensor 'experts.1.5.w2'", "expert 5 of MoE layer 1")


def test_wrong_shape(ckpt, tmp_path):
    def edit(t, m):
        t["experts.0.2.w13"] = t["experts.0.2.w13"][:, :10].contiguous()
    p = _rewrite(ckpt, str(tmp_path / "b.safetensors"), edit)
    expect_error(small_cfg(), p, "'experts.0.2.w13' has shape [64, 10]", "needs [64, 128]")


def test_wrong_dtype(ckpt, tmp_path):
    def edit(t, m):
        t["model.x_embedder.weight"] = t["model.x_embedder.weight"].half()
    p = _rewrite(ckpt, str(tmp_path / "c.safetensors"), edit)
    expect_error(small_cfg(), p, "'model.x_embedder.weight' has dtype F16")


def test_wrong_model_config(ckpt):
    expect_error(small_cfg(["model.moe.expert_hidden_size=32", "model.num_heads=8"]), ckpt,
                 "different model", "model.moe.expert_hidden_size = 64 in the checkpoint, 32 in the config",
                 "model.num_heads = 4 in the checkpoint, 8 in the config")
    # seed, dtype and compile are not part of the architecture: a checkpoint loads into any of them
    inspect_checkpoint(ckpt, small_cfg(["model.seed=5"]).model)
    inspect_checkpoint(ckpt, small_cfg(["model.compile=true"]).model)


def test_field_added_after_saving_reads_as_its_default(ckpt, tmp_path):
    """A checkpoint saved before `model.qk_norm` existed (no such key in its metadata) loads as
    qk_norm = false, and is refused for qk_norm = true, naming the field."""
    def drop_field(t, m):
        saved = json.loads(m["model_config"])
        saved.pop("qk_norm")
        m["model_config"] = json.dumps(saved)
    p = _rewrite(ckpt, str(tmp_path / "old.safetensors"), drop_field)
    inspect_checkpoint(p, small_cfg().model)
    expect_error(small_cfg(["model.qk_norm=true"]), p, "model.qk_norm = False in the checkpoint, True in the config")


def test_qk_norm_round_trip(tmp_path):
    """A qk_norm model stores its q/k norm scales and loads them back."""
    from moe_ep.models.moedit.dit import MoEDiT
    from moe_ep.parallel import ParallelContext

    cfg = small_cfg(["model.qk_norm=true"]).model
    model = MoEDiT(cfg, ParallelContext())
    model.init_from_seed()
    with torch.no_grad():
        model.blocks[0].attn.q_norm.weight.fill_(0.5)
    path = str(tmp_path / "qk.safetensors")
    save_checkpoint(model, path)
    assert "model.blocks.0.attn.q_norm.weight" in expected_tensors(cfg)
    again = MoEDiT(cfg, ParallelContext())
    load_checkpoint(again, path)
    assert torch.equal(again.blocks[0].attn.q_norm.weight, torch.full((16,), 0.5))
    assert torch.equal(again.blocks[1].cross_attn.k_norm.weight, torch.ones(16))


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    expect_error(small_cfg(), str(bad), "cannot be read as safetensors")
    other = str(tmp_path / "other.safetensors")
    save_file({"w": torch.zeros(2)}, other)
    expect_error(small_cfg(), other, "not a moe-ep checkpoint")
    expect_error(small_cfg(), str(tmp_path / "nope.safetensors"), "file not found")


def test_bf16_streaming_writer_round_trip(tmp_path):
    cfg = small_cfg(["model.dtype=\"bfloat16\""])
    path = str(tmp_path / "bf16.safetensors")
    save_from_seed(cfg.model, path)
    inspect_checkpoint(path, cfg.model)
    from moe_ep.experts import init_expert_weights
    t = load_file(path)
    assert t["experts.1.3.w13"].dtype == torch.bfloat16
    assert torch.equal(t["experts.1.3.w13"], init_expert_weights(0, 1, 3, 64, 64, torch.bfloat16)[0])
