"""The whole job (moe_ep.job.run, as launch/infer.py runs it) on a diffusers HiDream folder: images
identical at EP = 1, 2 and with async rebalancing, equal to diffusers' own pipeline, and the
outputs folder as for the built-in model."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

from moe_ep import config as config_mod
from moe_ep.models.diffusers.tiny import save_tiny_folders
from mp import run_ranks
from moe_ep.models.diffusers.tiny_pipeline import hidream_pipeline_for
import pytest

pytestmark = pytest.mark.slow   # spawned ranks or launchers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "hidream_tiny.json")


def _ranks_job(rank, world, overrides):
    from moe_ep.job import run
    from moe_ep.parallel import context_for_tests

    torch.set_num_threads(1)
    cfg = config_mod.load(CONFIG, overrides)
    run(cfg, context_for_tests(rank, world, world), progress=False)


def _images(out):
    d = os.path.join(out, "images")
    return {n: np.asarray(Image.open(os.path.join(d, n))) for n in sorted(os.listdir(d)) if n.endswith(".png")}


def test_job_on_a_diffusers_folder(tmp_path):
    folder = save_tiny_folders(str(tmp_path))["hidream"]
    runs = {}
    for world, eplb in ((1, "false"), (2, "true")):
        out = str(tmp_path / f"ep{world}")
        run_ranks(world, _ranks_job, [f"model.path={folder}", f"output_dir={out}", f"eplb.enabled={eplb}"])
        runs[world] = out
    a, b = _images(runs[1]), _images(runs[2])
    assert sorted(a) == ["000.png", "001.png", "002.png"]
    for name in a:
        assert np.array_equal(a[name], b[name]), f"EP 2 (rebalancing) vs EP 1: {name} differs"
    # the same prompt through diffusers' own pipeline and transformer (no moe-ep at all)
    from diffusers import HiDreamImageTransformer2DModel

    own = hidream_pipeline_for(HiDreamImageTransformer2DModel.from_pretrained(folder).eval())
    for i, prompt in enumerate(["a red circle", "a blue square", "a green triangle"]):   # the config's prompts
        ref = own(prompt=[prompt], negative_prompt="", num_inference_steps=3, guidance_scale=4.0,
                  generator=[torch.Generator().manual_seed(i)], output_type="np").images[0]
        ref = (np.clip(ref, 0, 1) * 255).round().astype(np.uint8)
        assert np.abs(ref.astype(int) - a[f"{i:03d}.png"].astype(int)).max() <= 1, prompt
    s = json.load(open(os.path.join(runs[2], "summary.json")))
    assert s["ep_size"] == 2 and s["model"]["type"] == "diffusers" and s["model"]["spec"] == "hidream"
    assert s["rebalances"] and all(e["status"] in ("ok", "skipped") for e in s["rebalances"]), s["rebalances"]
    # and weights really moved while sampling (the images above were made across those moves)
    assert any(e["status"] == "ok" and e["experts_moved"] > 0 for e in s["rebalances"]), s["rebalances"]
    stats = json.load(open(os.path.join(runs[2], "stats.json")))
    cond, uncond = np.asarray(stats["branches"]["cond"]), np.asarray(stats["branches"]["uncond"])
    assert cond.sum() == uncond.sum() > 0                    # [negative, positive] batches: both counted
    assert np.asarray(stats["load"]).shape == (3, 4)          # 1 dual + 2 single blocks x 4 experts
