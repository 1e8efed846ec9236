"""A transformer forward captured in a CUDA graph and replayed, expert-load statistics on.

At EP = 1 no step of a moe-ep forward reads a value back to the host (split sizes only exist at
EP > 1; the fused local path sizes its grids from static bounds), so the whole forward -- every
MoE layer included -- can be captured once per input signature and replayed, which removes the
CPU launch gaps between its small kernels (issue 31: NucleusMoE's transformer 102.7 ms eager,
49.7 ms compiled + graph on one H100).

One wrapper serves both model kinds: `GraphedForward(forward, moe_layers)` is a callable used in
place of a forward. It is installed as the module's `forward` instance attribute
(`install_cuda_graph`; diffusers: `expert_parallel(pipe, cuda_graph=True)`, config
`model.cuda_graph`), so the module's hooks -- the statistics' begin/end and the rebalancer --
run eagerly around every replay; or it stands in for the whole module where the caller drives
the hooks itself (the built-in model's pipeline: moedit/graphs.CudaGraphForward;
acceleration.CudaGraphTransformer).

What a graph bakes in, and therefore what picks a graph (`GraphedForward.key`):
  - the input signature: each tensor's shape, dtype and device, every other argument's value;
  - each statistics object's `graph_key()` (moe_ep/stats.py: the layers record into one
    persistent per-forward buffer and read branch labels from a persistent buffer, so only the
    label count or `cond_rows` is baked in);
and the state of the MoE layers (`layer_state`): per layer its Placement object (set_placement
installs a new one, with new routing tables), the addresses of its expert weights, its expert
backend, idle flag and path switches, and its statistics object. A change of that state (a
rebalance, weights moved to new tensors) drops every graph -- their memory is freed -- and the
next call captures afresh. Each placement change costs a capture and its warm-up forwards: with
`eplb.migration` "async" (one layer installed per forward) a rebalance recaptures once per MoE
layer, and a timestep-aware plan recaptures at each phase switch; prefer "sync" moves under a graph.
What the key does not see is baked in too: a change outside the MoE layers (new LoRA weights,
another attention processor, a replaced router or shared-expert parameter) needs `clear()` (or
`remove()` of the installed graph), and the inputs should be GPU tensors (a host tensor's value is
what it was at capture).

Capture: a few warm-up forwards on a side stream (kernels compiled, handles made), then the
capture; the statistics' pending rows are saved before and restored after, so warm-up forwards
are not counted and rows this forward recorded before the capture are kept. Phase timers are
refused (their host-side events cannot be replayed).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils import _pytree as pytree

from .config import ConfigError


def graph_refusal(ep_size: int, cfg_size: int, sp_size: int, device: torch.device | str) -> Optional[str]:
    """Why a forward under this layout cannot be captured, or None when it can."""
    if ep_size != 1:
        return f"needs EP = 1 (EP {ep_size} reads split sizes back to the host between kernels)"
    if cfg_size * sp_size > 1:
        return (f"needs one image on one rank (cfg_parallel_size {cfg_size}, sequence_parallel_size {sp_size}): "
                "the cfg / sequence-parallel collectives are not captured")
    if torch.device(device).type != "cuda":
        return f"needs a CUDA device (the model is on {torch.device(device)})"
    return None


def check_cuda_graph(ctx, key: str) -> None:
    """ConfigError naming `key` (the option that asked for a graph) when a forward under `ctx`
    cannot be captured."""
    why = graph_refusal(ctx.ep_size, ctx.layout.cfg, ctx.layout.sp, ctx.device)
    if why is not None:
        raise ConfigError(key, True, why)


def check_cuda_graph_device(device: torch.device, key: str) -> None:
    """ConfigError naming `key` when `device` cannot run a CUDA graph."""
    why = graph_refusal(1, 1, 1, device)
    if why is not None:
        raise ConfigError(key, True, why)


def check_cuda_graph_config(cfg, world_size: int) -> None:
    """`model.cuda_graph` against the config and the world size, before any process group
    (ConfigError naming model.cuda_graph): EP = 1, cfg = sp = 1, a CUDA device."""
    if not cfg.model.cuda_graph:
        return
    from .parallel import resolve_layout

    p = cfg.parallel
    if p.device == "cpu":
        raise ConfigError("model.cuda_graph", True, "needs a CUDA device (parallel.device is 'cpu')")
    lay = resolve_layout(p, world_size)
    why = graph_refusal(lay.ep, lay.cfg, lay.sp, "cuda")
    if why is not None:
        raise ConfigError("model.cuda_graph", True, why)
    if not torch.cuda.is_available():
        raise ConfigError("model.cuda_graph", True, f"needs a CUDA device (parallel.device {p.device!r}, and torch "
                                                    "sees no GPU)")


def check_graph_layers(moe_layers: Sequence, backend: "CudaGraphBackend") -> None:
    """The layers can be captured: EP = 1, sp = cfg = 1 (ConfigError naming the parallel key),
    on the backend's device kind, no phase timer (ValueError)."""
    if not moe_layers:
        raise ValueError("CUDA-graph capture: the model has no MoE layer")
    check_no_timers(moe_layers)
    check_graph_context(moe_layers[0].ctx, backend)


def check_graph_context(ctx, backend: "CudaGraphBackend") -> None:
    """EP = 1, sp = cfg = 1 (ConfigError naming the parallel key), the backend's device kind."""
    lay = ctx.layout
    if ctx.ep_size != 1:
        raise ConfigError("parallel.ep_size", ctx.ep_size, "CUDA-graph capture " + graph_refusal(ctx.ep_size, 1, 1, "cuda"))
    if lay.cfg * lay.sp > 1:
        key, value = ("parallel.sequence_parallel_size", lay.sp) if lay.sp > 1 else ("parallel.cfg_parallel_size", lay.cfg)
        raise ConfigError(key, value, "CUDA-graph capture " + graph_refusal(1, lay.cfg, lay.sp, "cuda"))
    backend.check_device(ctx.device)


def check_no_timers(moe_layers: Sequence) -> None:
    for layer in moe_layers:
        if layer.timer is not None:
            raise ValueError(f"MoE layer {layer.layer_idx}: phase timers must be off (timer None) to capture the "
                             "forward in a CUDA graph (their host-side events cannot be replayed)")


def layer_state(layer) -> tuple:
    """What a captured forward bakes in from one MoE layer besides its inputs (module doc)."""
    experts = layer.experts
    return (id(layer.placement), experts.w13.data_ptr(), experts.w2.data_ptr(), experts.backend, layer.idle,
            layer.fused_local, layer.batch_invariant, layer.shared_side_stream, id(layer.stats))


class CudaGraphBackend:
    """How graphs are made and replayed: torch.cuda (tests inject a stand-in with these methods)."""

    def check_device(self, device: torch.device) -> None:
        if torch.device(device).type != "cuda":
            raise ConfigError("parallel.device", str(device), "CUDA-graph capture needs a CUDA device")

    def new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def capture(self, run: Callable[[], Any], warmup: int, pool: Any, context: Callable) -> tuple[Any, Any]:
        """-> (graph, the static output structure replay writes). Warm-up on a side stream."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), context():          # warm-up: kernels compiled, handles made
            for _ in range(warmup):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with context(), torch.cuda.graph(graph, pool=pool):
            out = run()
        return graph, out

    def replay(self, graph: Any) -> None:
        graph.replay()


class RerunBackend(CudaGraphBackend):
    """A stand-in for torch.cuda's graphs on any device, for CPU rehearsals and tests: warm-up
    forwards run (and record), the "capture" runs the forward once more, and a replay runs it again
    on the static inputs and copies the result into the static output. It exercises the keys, the
    captures and the statistics' save/restore, not what a real graph bakes in."""

    def check_device(self, device: torch.device) -> None:
        pass

    def new_pool(self) -> Any:
        return None

    def capture(self, run: Callable[[], Any], warmup: int, pool: Any, context: Callable) -> tuple[Any, Any]:
        with context():
            for _ in range(warmup):
                run()
            out = run()
        return (run, out), out

    def replay(self, graph: Any) -> None:
        run, out = graph
        for dst, src in zip(pytree.tree_leaves(out), pytree.tree_leaves(run())):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)


@dataclass
class _Captured:
    graph: Any                              # torch.cuda.CUDAGraph (or a test backend's)
    inputs: list[torch.Tensor]              # static copies the graph reads (the flattened tensor args)
    output: Any                             # the static output structure the graph writes


def _signature(leaves: list) -> tuple:
    return tuple((tuple(x.shape), x.dtype, str(x.device)) if isinstance(x, torch.Tensor) else repr(x)
                 for x in leaves)


class GraphedForward:
    """Callable in place of `forward`; one CUDA graph per key (module doc). Each call copies its
    tensors into the graph's static inputs, replays, and returns the output as fresh tensors
    (no autograd: for sampling, as pipelines run under no_grad).
    `target`: attribute reads go to it (a stand-in for a whole module). `captures` counts the
    graphs captured, `drops` the times the layers' state changed and every graph was dropped."""

    def __init__(self, forward: Callable, moe_layers: Sequence, *, warmup: int = 2,
                 context: Optional[Callable] = None, backend: Optional[CudaGraphBackend] = None,
                 target: Any = None):
        self.__dict__["_target"] = target          # before anything __getattr__ could look for
        self._backend = backend or CudaGraphBackend()
        self._moe_layers = list(moe_layers)
        check_graph_layers(self._moe_layers, self._backend)
        self._forward, self._warmup = forward, warmup
        self._context = context or contextlib.nullcontext
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None
        self._state: Optional[tuple] = None
        self._held: list = []          # the Placement and statistics objects of `_state` (held: their ids stay unique)
        self.captures = self.drops = 0

    def __getattr__(self, name):
        target = self.__dict__.get("_target")
        if target is None:
            raise AttributeError(name)
        return getattr(target, name)

    def _stats(self) -> list:
        seen, out = set(), []
        for layer in self._moe_layers:
            if layer.stats is not None and id(layer.stats) not in seen:
                seen.add(id(layer.stats))
                out.append(layer.stats)
        return out

    def key(self, leaves: list, spec) -> tuple:
        """The graph a call with these flattened arguments replays (module doc); drops every graph
        when the layers' state changed since the last call."""
        check_no_timers(self._moe_layers)
        state = tuple(layer_state(layer) for layer in self._moe_layers)
        if state != self._state:
            if self._graphs:
                self.drops += 1
            self._graphs.clear()
            self._pool = None                    # a fresh pool: the old graphs' memory is freed
            self._state = state
            self._held = [layer.placement for layer in self._moe_layers] + [l.stats for l in self._moe_layers]
        return (_signature(leaves), str(spec), tuple(s.graph_key() for s in self._stats()))

    def _capture(self, leaves: list, spec) -> _Captured:
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = pytree.tree_unflatten(static, spec)
        if self._pool is None:
            self._pool = self._backend.new_pool()
        stats = self._stats()
        saved = [s.save_pending() for s in stats]           # warm-up rows must not count
        try:
            graph, out = self._backend.capture(lambda: self._forward(*args, **kwargs), self._warmup, self._pool,
                                               self._context)
        finally:                                            # also when the capture fails (a host sync)
            for s, pending in zip(stats, saved):
                s.restore_pending(pending)
        self.captures += 1
        return _Captured(graph, [x for x in static if isinstance(x, torch.Tensor)], out)

    @torch.no_grad()     # inference only: a replay's outputs have no autograd history
    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = self.key(leaves, spec)
        cap = self._graphs.get(key)
        if cap is None:
            cap = self._graphs[key] = self._capture(leaves, spec)
        for dst, src in zip(cap.inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
            dst.copy_(src)
        self._backend.replay(cap.graph)
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, cap.output)

    def clear(self) -> None:
        """Drop every graph (their memory is freed once no output refers to it)."""
        self._graphs.clear()
        self._pool, self._state, self._held = None, None, []


def install_cuda_graph(module: torch.nn.Module, moe_layers: Sequence, **kwargs) -> "InstalledGraph":
    """Replace `module.forward` (an instance attribute) by a GraphedForward around the forward it
    has now, so `module(...)` runs its hooks eagerly around each replay. -> a handle whose
    `remove()` gives the module its forward back. kwargs: GraphedForward's."""
    current = vars(module).get("forward")
    if isinstance(current, GraphedForward):
        raise ValueError(f"{type(module).__name__}.forward is a CUDA graph already")
    if current is not None:
        raise ValueError(f"{type(module).__name__}.forward was replaced already ({current!r}; cfg or sequence "
                         "parallel?): a CUDA graph wraps the module's own forward only")
    graph = GraphedForward(module.forward, moe_layers, **kwargs)
    module.forward = graph
    return InstalledGraph(module, graph)


@dataclass
class InstalledGraph:
    module: torch.nn.Module
    graph: GraphedForward

    def remove(self) -> None:
        """The module's own forward again; every graph dropped."""
        if vars(self.module).get("forward") is self.graph:
            del self.module.forward
        self.graph.clear()
