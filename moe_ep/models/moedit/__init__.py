"""The built-in MoE-DiT ("moe_dit"), one model family behind moe_ep/models/base.py:

    dit.py         the transformer (MoEDiT): patch embedding, blocks with MoE feed-forwards
    text.py        prompt encoders: the built-in byte-level encoder or a user's (`model.text_encoder`)
    sampler.py     MoEDiTPipeline on diffusers' flow-matching Euler scheduler, classifier-free guidance
    graphs.py      one forward captured in a CUDA graph (EP = 1)
    checkpoint.py  its safetensors checkpoint format (`model.checkpoint`), each rank reading its experts
    served.py      MoEDiTModel, the ServedModel the job runs; preflight and the memory check

docs/model.md describes it all.
"""
from __future__ import annotations

from .served import (MoEDiTModel, check_expert_memory, expert_slot_bytes, memory_per_rank, moe_shape, preflight,
                     slots_per_rank)

__all__ = ["MoEDiTModel", "check_expert_memory", "expert_slot_bytes", "memory_per_rank", "moe_shape", "preflight",
           "slots_per_rank"]
