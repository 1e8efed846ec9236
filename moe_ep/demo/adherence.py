"""Prompt adherence of the demo model: sample shapes prompts, classify the images (classify.py).

    python -m moe_ep.demo.adherence --config configs/quickstart.json --prompts 64   # sample at EP = 1, in process
    python -m moe_ep.demo.adherence --run-dir outputs/quickstart                  # score a launch/infer.py run
    python -m moe_ep.demo.adherence --data 2000                                   # the classifier on training images

A run's images are matched to their prompts through its summary.json; every prompt must be a
shapes prompt (shapes.parse_prompt). `eval_prompts(n)` is the fixed evaluation set: the 42
prompts in order, repeated, prompt i with seed `seed + i` (the runtime's rule).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from . import classify, shapes


def eval_prompts(n: int) -> list[str]:
    """n prompts cycling through the 42 combinations (n >= 42 covers each at least once)."""
    table = shapes.all_prompts()
    return [table[i % len(table)] for i in range(n)]


def sample_ep1(cfg, prompts: list[str], seed: int = 0, batch_size: int = 16, device: str = "cpu") -> np.ndarray:
    """Sample with cfg (a moe_ep Config, model.checkpoint set) at EP = 1 in this process:
    prompt i with seed `seed + i` -> images [n, H, W, 3] uint8 (what launch/infer.py writes)."""
    from ..images import decode_latents
    from ..models.moedit.checkpoint import load_checkpoint
    from ..models.moedit.dit import MoEDiT
    from ..models.moedit.sampler import FlowMatchEulerScheduler, MoEDiTPipeline
    from ..models.moedit.text import PromptEncoder
    from ..parallel import ParallelContext

    ctx = ParallelContext(device=torch.device(device))
    model = MoEDiT(cfg.model, ctx)
    load_checkpoint(model, cfg.model.checkpoint)
    s = cfg.sampling
    pipe = MoEDiTPipeline(model, PromptEncoder(cfg.model, model.text_encoder, ctx.device, model.dtype),
                          FlowMatchEulerScheduler(s.shift))
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        lat = pipe(chunk, negative_prompt=s.negative_prompt, num_inference_steps=s.num_inference_steps,
                   guidance_scale=s.guidance_scale, height=s.height, width=s.width,
                   seeds=[seed + i + j for j in range(len(chunk))])
        out.append(decode_latents(lat, cfg.model.vae_scale_factor))
    return np.concatenate(out)


def score(images, prompts: list[str]) -> dict[str, float]:
    """Accuracy per attribute of images against the prompts they were sampled for."""
    return classify.accuracy(images, [shapes.parse_prompt(p) for p in prompts])


def run_images(run_dir: str) -> tuple[np.ndarray, list[str]]:
    """A launch/infer.py run's images, in prompt order, and their prompts (from its summary.json)
    -> ([n, H, W, 3] uint8, n prompts)."""
    from PIL import Image

    with open(os.path.join(run_dir, "summary.json")) as f:
        items = json.load(f)["images"]
    images = np.stack([np.asarray(Image.open(os.path.join(run_dir, x["path"])).convert("RGB")) for x in items])
    return images, [x["prompt"] for x in items]


def score_run(run_dir: str) -> dict[str, float]:
    """Score the images of a launch/infer.py run against the prompts they were sampled for."""
    return score(*run_images(run_dir))


def data_accuracy(n: int, seed: int = 0) -> dict[str, float]:
    """The classifier on n training images drawn from the data set."""
    idx, images = shapes.sample_batch(n, torch.Generator().manual_seed(seed))
    return score(list(images.numpy()), shapes.attribute_prompts(idx))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/quickstart.json")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--prompts", type=int, default=64, help="evaluation prompts (eval_prompts)")
    p.add_argument("--run-dir", help="score this launch/infer.py output folder instead of sampling")
    p.add_argument("--data", type=int, default=0, help="score the classifier on this many training images")
    p.add_argument("--grid", help="also write the sampled images as a PNG grid here")
    p.add_argument("--device", default="cpu", help="where to sample (the runtime's CPU result is the reference)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.data:
        res = data_accuracy(args.data)
    elif args.run_dir:
        res = score_run(args.run_dir)
    else:
        from .. import config as config_mod

        cfg = config_mod.load(args.config, args.set)
        prompts = eval_prompts(args.prompts)
        images = sample_ep1(cfg, prompts, cfg.sampling.seed, device=args.device)
        res = score(images, prompts)
        if args.grid:
            save_grid(images, args.grid)
    print(json.dumps({k: round(v, 4) for k, v in res.items()}))
    return 0


def save_grid(images, path: str, cols: int = 14, scale: int = 3) -> None:
    """images [n, h, w, 3] uint8 -> one PNG, `cols` per row, 2-pixel white gaps, upscaled `scale`x."""
    from PIL import Image

    images = np.asarray(images)
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = im
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


if __name__ == "__main__":
    sys.exit(main())
