"""The built-in model's EP = 1 denoising forward captured in a CUDA graph and replayed.

`CudaGraphForward(model)` stands in for the MoEDiT module (attribute reads go to it): its
pipeline drives the statistics' hooks itself, around each call, so the whole module call --
compiled or not -- is what is captured. The capture, the keys and the statistics rules are
moe_ep/cuda_graph.py's (`GraphedForward`), shared with the diffusers models.
"""
from __future__ import annotations

from ...cuda_graph import CudaGraphBackend, GraphedForward, check_graph_context


class CudaGraphForward(GraphedForward):
    """Callable like `MoEDiT.forward(x, t, text, text_mask)` -> velocity (a fresh tensor); one
    graph per input signature, statistics state and placement (moe_ep/cuda_graph.py).

    Refuses EP > 1, cfg / sequence parallel and a non-CUDA device (ConfigError naming the
    parallel key) and phase timers (ValueError); expert-load statistics are kept."""

    def __init__(self, model, warmup: int = 2, backend=None):
        backend = backend or CudaGraphBackend()
        check_graph_context(model.ctx, backend)            # before asking the model for anything else
        super().__init__(model, model.moe_layers(), warmup=warmup, backend=backend, target=model)
