"""The EP = 1 denoising forward captured in a CUDA graph and replayed.

At EP = 1 no step of the forward reads a value back to the host (split sizes only exist at
EP > 1; the fused local path sizes its grids from static bounds), so the whole transformer
forward -- every MoE layer included -- can be captured once per input shape and replayed,
which removes the CPU launch gaps between its small kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import ConfigError


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]   # static copies the graph reads
    output: torch.Tensor               # static output the graph writes


class CudaGraphForward:
    """Callable like `MoEDiT.forward(x, t, text, text_mask)`; one graph per input shape/dtype.

    Attribute reads (cfg, dtype, ...) go to the wrapped model, so a pipeline can use it in
    place of the model. Expert-load statistics and phase timers must be off: a graph would
    replay their writes into whatever buffer was current at capture.
    """

    def __init__(self, model, warmup: int = 2):
        if model.ctx.ep_size != 1:
            raise ConfigError("parallel.ep_size", model.ctx.ep_size,
                              "CUDA-graph capture needs EP = 1 (EP > 1 reads split sizes back to the host)")
        lay = model.ctx.layout
        if lay.cfg * lay.sp > 1:
            raise ConfigError("parallel.sequence_parallel_size" if lay.sp > 1 else "parallel.cfg_parallel_size",
                              lay.sp if lay.sp > 1 else lay.cfg,
                              "CUDA-graph capture needs one image on one rank (sp = cfg = 1): the sp/cfg "
                              "collectives are not captured")
        if model.ctx.device.type != "cuda":
            raise ConfigError("parallel.device", str(model.ctx.device), "CUDA-graph capture needs a CUDA device")
        self.model, self.warmup = model, warmup
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _check_capturable(self) -> None:
        for layer in self.model.moe_layers():
            if layer.stats is not None or layer.timer is not None:
                raise ValueError(f"MoE layer {layer.layer_idx}: expert-load stats and phase timers must be off "
                                 f"(None) to capture the forward in a CUDA graph")

    def _capture(self, args: tuple[torch.Tensor, ...]) -> _Captured:
        self._check_capturable()
        static = tuple(a.clone() for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                 # warm-up: compiles kernels, makes handles
            for _ in range(self.warmup):
                self.model(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model(*static)
        return _Captured(graph, static, out)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """x [B, C, h, w], t [B], text [B, T, D], text_mask [B, T] -> velocity [B, C, h, w] (a fresh tensor)."""
        args = (x, t, text, text_mask)
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        cap = self._graphs.get(key)
        if cap is None:
            cap = self._graphs[key] = self._capture(args)
        for dst, src in zip(cap.inputs, args):
            dst.copy_(src)
        cap.graph.replay()
        return cap.output.clone()
