"""A diffusers script made expert-parallel with one call (docs/diffusers.md, way (b)), runnable here
on the tiny HiDream folder with no download:

    python -m moe_ep.models.diffusers.tiny_pipeline outputs/tiny_models
    deepspeed --num_gpus 2 launch/pipeline_example.py outputs/tiny_models/hidream --out outputs/pipeline_example

Every rank runs this same script. Prompts are split over the ranks; a rank without a prompt of
its own in a round samples a stand-in inside `pipe.moe_ep.idle()` so the all-to-alls pair up.
With your own model, replace `make_pipeline` by `HiDreamImagePipeline.from_pretrained(folder)`
(or NucleusMoE's) and call the pipeline with `prompt=`; the tiny pipeline has no text encoders,
so here prompts become fixed pseudo-random embeddings.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moe_ep  # noqa: E402
from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.images import save_png, to_uint8  # noqa: E402
from moe_ep.models.diffusers.tiny_pipeline import PromptEmbeddingPipeline, tiny_hidream_pipeline  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def make_pipeline(folder: str):
    """The tiny HiDream pipeline with the folder's transformer (the same weights on every rank)."""
    from diffusers import HiDreamImageTransformer2DModel

    pipe = tiny_hidream_pipeline(0)
    pipe.register_modules(transformer=HiDreamImageTransformer2DModel.from_pretrained(folder))
    return pipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="a HiDream transformer folder (python -m moe_ep.models.diffusers.tiny_pipeline)")
    p.add_argument("--out", default="outputs/pipeline_example")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)   # passed by the deepspeed launcher
    a = p.parse_args(argv)

    pipe = make_pipeline(a.folder)
    pipe = moe_ep.expert_parallel(pipe, eplb={"enabled": True, "num_redundant_experts": 2, "window_size": 2,
                                              "interval": 2, "migration": "async"})
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    prompt_pipe = PromptEmbeddingPipeline(pipe)        # prompt strings -> embeddings (no text encoder here)
    os.makedirs(os.path.join(a.out, "images"), exist_ok=True)
    rounds = (len(PROMPTS) + world - 1) // world
    for r in range(rounds):                            # every rank makes the same calls
        i = r * world + rank
        mine = i < len(PROMPTS)
        call = dict(prompt=[PROMPTS[i if mine else 0]], negative_prompt="", num_inference_steps=a.steps,
                    guidance_scale=4.0, output_type="np", generator=[torch.Generator().manual_seed(i)])
        if mine:
            image = prompt_pipe(**call).images[0]
            save_png(to_uint8(image), os.path.join(a.out, "images", f"{i:03d}.png"))
        else:
            with pipe.moe_ep.idle():                   # no prompt left: join the exchanges with no rows
                prompt_pipe(**call)
    pipe.moe_ep.finish()                               # completes a migration in flight, closes the last window
    summary = pipe.moe_ep.summary()
    if rank == 0:
        pipe.moe_ep.stats.save(os.path.join(a.out, "stats.json"))   # the job's stats format (docs/formats.md)
        write_json_atomic(os.path.join(a.out, "summary.json"), summary)
        moved = sum(1 for e in summary["rebalances"] if e["ok"])
        print(f"wrote {len(PROMPTS)} images, stats.json and summary.json to {a.out} (ranks {world}, "
              f"balancedness {summary['balancedness']:.3f}, {moved} of {len(summary['rebalances'])} "
              f"rebalances moved experts)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
