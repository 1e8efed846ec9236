"""moe-ep: expert-parallel inference with load balancing for MoE diffusion transformers.

`moe_ep.expert_parallel(pipe)` makes a diffusers pipeline (or transformer) expert-parallel
(docs/diffusers.md); `launch/infer.py` runs whole jobs from a config (docs/quickstart.md).
"""


def expert_parallel(*args, **kwargs):
    """See moe_ep.models.diffusers.pipeline.expert_parallel (imported on first use: diffusers is heavy)."""
    from .models.diffusers.pipeline import expert_parallel as impl

    return impl(*args, **kwargs)
