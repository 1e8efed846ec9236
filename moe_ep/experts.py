"""The experts of this rank's physical slots, stacked, run with one grouped GEMM."""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batch_invariant import blocked_swiglu


def expert_seed(seed: int, layer: int, expert: int) -> int:
    """A seed for one logical expert's weights, independent of where it is placed."""
    digest = hashlib.sha256(f"moe-ep/{seed}/{layer}/{expert}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_expert_weights(seed: int, layer: int, expert: int, hidden: int, inner: int,
                        dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic weights of one logical expert: (w13 [H, 2F], w2 [F, H]).

    Any rank can make any expert's weights without holding the others, so a run is
    reproducible for every placement and EP size. `device` (default CPU) picks the random
    generator: values made on a GPU differ from the CPU ones but are as reproducible.
    """
    g = torch.Generator(device=device or "cpu").manual_seed(expert_seed(seed, layer, expert))
    w13 = torch.randn(hidden, 2 * inner, generator=g, device=device) * hidden ** -0.5   # [H, 2F]
    w2 = torch.randn(inner, hidden, generator=g, device=device) * inner ** -0.5         # [F, H]
    return w13.to(dtype), w2.to(dtype)


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Reference SwiGLU of one expert: x [M, H] -> [M, H]."""
    gate, up = (x @ w13).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2


def silu_gate(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation of fused gate/up rows: h [M, 2F] -> silu(gate) * up [M, F]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def interleave_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """[..., 2F] columns [gate | up] -> the same weights with columns g0, u0, g1, u1, ... (a copy)."""
    return w13.unflatten(-1, (2, w13.shape[-1] // 2)).transpose(-1, -2).flatten(-2)


def gate_up_blocks(w13_pairs: torch.Tensor) -> torch.Tensor:
    """The inverse of `interleave_gate_up`: columns g0, u0, g1, u1, ... -> [gate | up] (a copy)."""
    return w13_pairs.unflatten(-1, (w13_pairs.shape[-1] // 2, 2)).transpose(-1, -2).flatten(-2)


def triton_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                  row_scale: Optional[torch.Tensor] = None, row_index: Optional[torch.Tensor] = None,
                  quack_down: bool = False) -> torch.Tensor:
    """SwiGLU experts through moe_ep.kernels' two grouped GEMMs: SwiGLU in the first one's
    epilogue, the row scale in the second's. x [Ma, H] (row i is x[row_index[i]] with a row
    index), w13 [S, H, 2F], w2 [S, F, H], counts [S] rows per slot -> [M, H].
    quack_down: the down GEMM through QuACK (kernels/quack_gemm.py) instead of Triton."""
    from .kernels.gemm_configs import config_for
    from .kernels.grouped_gemm import grouped_gemm
    h = grouped_gemm(x, w13, counts, swiglu=True, row_index=row_index, config=config_for("gate_up", w13))  # [M, F]
    if quack_down:
        from .kernels.quack_gemm import cu_seqlens, down_gemm
        return down_gemm(h, w2, cu_seqlens(counts), row_scale)                               # [M, H]
    return grouped_gemm(h, w2, counts, row_scale=row_scale, config=config_for("down", w2))      # [M, H]


def quack_swiglu(x: torch.Tensor, w13_pairs: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                 row_scale: Optional[torch.Tensor] = None, row_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SwiGLU experts with both GEMMs through QuACK (kernels/quack_gemm.py): the same epilogues
    and the same output as `triton_swiglu`. w13_pairs [S, H, 2F] has its columns interleaved
    (`interleave_gate_up`); the other arguments are as there."""
    from .kernels.quack_gemm import cu_seqlens, down_gemm, gate_up_gemm
    cu = cu_seqlens(counts)                                                    # [S + 1] int32
    rows = x[row_index] if row_index is not None else x   # copied first: TMA loads (faster than a gather)
    return down_gemm(gate_up_gemm(rows, w13_pairs, cu), w2, cu, row_scale)    # [M, F] -> [M, H]


def quack_supported(device: torch.device, dtype: torch.dtype, hidden: int, inner: int) -> bool:
    """The experts' GEMMs can go through QuACK here (quack-kernels installed, Hopper, bf16/fp16)."""
    from .kernels import quack_gemm
    return triton_supported(device, dtype) and quack_gemm.supported(device, dtype, hidden, inner)


def triton_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """moe_ep.kernels' grouped GEMMs: Triton installed, a CUDA GPU of sm80+, bf16 or fp16."""
    from . import kernels
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not kernels.available(device):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def default_backend(device: torch.device, dtype: torch.dtype, hidden: int, inner: int) -> str:
    """The fastest expert path that runs here: "quack", "triton", "grouped_mm" or "loop"."""
    if triton_supported(device, dtype):   # the Triton kernels beat torch._grouped_mm (docs/benchmarks.md 1d)
        return "quack" if quack_supported(device, dtype, hidden, inner) else "triton"
    return "grouped_mm" if grouped_mm_supported(device, dtype, hidden, inner) else "loop"


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, hidden: int, inner: int) -> bool:
    """torch._grouped_mm runs on CPU, and on CUDA for bf16 on sm90+ with 16-byte aligned dims."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 9 and dtype == torch.bfloat16 and hidden % 8 == 0 and inner % 8 == 0
    return False


# The expert paths GroupedExperts can take (see its `backend`).
BACKENDS = ("quack", "triton+quack", "triton", "grouped_mm", "loop")
# ... and those that store w13's columns interleaved (g0, u0, g1, u1, ...) instead of [gate | up]
PAIRED_BACKENDS = ("quack",)


class GroupedExperts(nn.Module):
    """SwiGLU experts of `num_slots` physical slots: w13 [S, H, 2F] (gate and up fused), w2 [S, F, H].

    w13's columns are [gate | up], except with the "quack" backend, whose gated epilogue pairs
    neighbouring columns: there they are stored interleaved (g0, u0, g1, u1, ...). Read and write
    one slot's weights through `slot_weights` / `set_slot`, which always speak [gate | up].
    """

    def __init__(self, num_slots: int, hidden: int, inner: int, dtype=torch.float32, device=None):
        super().__init__()
        self.num_slots, self.hidden, self.inner = num_slots, hidden, inner
        self.w13 = nn.Parameter(torch.zeros(num_slots, hidden, 2 * inner, dtype=dtype, device=device),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(num_slots, inner, hidden, dtype=dtype, device=device),
                               requires_grad=False)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        # "quack": both GEMMs through QuACK's CuTe-DSL kernels (Hopper, when quack-kernels is
        # installed; the same output; w13 stored interleaved); "triton+quack": Triton gate/up,
        # QuACK down; "triton": moe_ep.kernels' grouped GEMMs with SwiGLU and the row scale fused
        # into their epilogues; "grouped_mm": torch._grouped_mm + a separate activation; "loop":
        # one matmul pair per slot (CPU, fp32 on CUDA). See docs/benchmarks.md section 1d.
        self._backend = default_backend(dev, dtype, hidden, inner)   # the weights are zeros: no relayout
        # On a GPU the activation as separate kernels costs 1.25 ms per 65536 x 6144 bf16 rows
        # (H200); one fused kernel from torch.compile takes 0.31 ms (docs/benchmarks.md 1b),
        # 0.3 ms of the layer's 10 ms measured in place (benchmarks/gpu_check.py).
        self.activation = torch.compile(silu_gate, dynamic=True) if dev.type == "cuda" else silu_gate
        # True: a row's output does not depend on the other rows (moe_ep/batch_invariant.py): the
        # "grouped_mm" and "loop" paths run fixed-size row blocks instead; the Triton paths already
        # do (one tile configuration per GEMM). Set by MoELayer from model.moe.batch_invariant.
        self.batch_invariant = False

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        """Switch the expert path; the weights are re-laid out in place (slot by slot) where the
        new path wants w13's columns ordered otherwise."""
        if name not in BACKENDS:
            raise ValueError(f"experts.backend must be one of {', '.join(BACKENDS)}, got {name!r}")
        if (name in PAIRED_BACKENDS) != self.paired:
            relayout = gate_up_blocks if self.paired else interleave_gate_up
            for slot in self.w13.data:
                slot.copy_(relayout(slot))
        self._backend = name

    @property
    def paired(self) -> bool:
        """True while w13's columns are stored interleaved (g0, u0, g1, u1, ...)."""
        return self._backend in PAIRED_BACKENDS

    def set_slot(self, slot: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Write one slot's expert: w13 [H, 2F] ([gate | up]), w2 [F, H]."""
        self.w13.data[slot].copy_(interleave_gate_up(w13) if self.paired else w13)
        self.w2.data[slot].copy_(w2)

    def adopt(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Take over stacked weights as this module's own, without copying them: w13 [S, H, 2F]
        ([gate | up] columns), w2 [S, F, H], contiguous, of this module's dtype and device (a
        model's packed experts, e.g. NucleusMoE's gate_up_proj / down_proj). The zeros allocated
        in __init__ are freed. Where the backend stores w13 interleaved it is re-laid out in place,
        slot by slot (one slot's copy at a time): the caller gives the tensors up."""
        want13 = (self.num_slots, self.hidden, 2 * self.inner)
        want2 = (self.num_slots, self.inner, self.hidden)
        for name, t, want in (("w13", w13, want13), ("w2", w2, want2)):
            if tuple(t.shape) != want or t.dtype != self.w13.dtype or t.device != self.w13.device \
                    or not t.is_contiguous():
                raise ValueError(f"cannot adopt {name} {tuple(t.shape)} {t.dtype} on {t.device}: needs a contiguous "
                                 f"{want} {self.w13.dtype} tensor on {self.w13.device}")
        self.w13 = nn.Parameter(w13.detach(), requires_grad=False)
        self.w2 = nn.Parameter(w2.detach(), requires_grad=False)
        if self.paired:
            for slot in self.w13.data:
                slot.copy_(interleave_gate_up(slot))

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's expert as (w13 [H, 2F] with [gate | up] columns, w2 [F, H]): views of the
        live weights, or (w13, when stored interleaved) a copy."""
        w13 = self.w13.data[slot]
        return (gate_up_blocks(w13) if self.paired else w13), self.w2.data[slot]

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_scale: Optional[torch.Tensor] = None,
                row_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run every row through its slot's expert.

        x [M, H] grouped by slot (counts[s] rows for slot s; counts [S] on x's device) -> [M, H].
        row_index [M] (optional): row i of the grouped input is x[row_index[i]] (x is then
        [T, H], e.g. the tokens themselves: the Triton path gathers on load and never writes
        the permuted copy). row_scale [M] fp32 (optional): output row i is multiplied by it
        (the routed weight), in fp32 before rounding on the QuACK and Triton paths.
        """
        M = row_index.numel() if row_index is not None else x.shape[0]
        if M == 0:
            return x.new_empty(0, self.hidden)
        if self.backend == "quack":
            return quack_swiglu(x, self.w13, self.w2, counts, row_scale=row_scale, row_index=row_index)
        if self.backend in ("triton", "triton+quack"):
            return triton_swiglu(x, self.w13, self.w2, counts, row_scale=row_scale, row_index=row_index,
                                 quack_down=self.backend == "triton+quack")
        if row_index is not None:
            x = x[row_index]                                                       # [M, H]
        if self.batch_invariant:
            y = blocked_swiglu(x, self.w13, self.w2, counts)                       # [M, H]
        elif self.backend == "grouped_mm":
            offsets = counts.cumsum(0).to(torch.int32)                               # [S]
            h = self.activation(torch._grouped_mm(x, self.w13, offs=offsets))       # [M, F]
            y = torch._grouped_mm(h, self.w2, offs=offsets)                        # [M, H]
        else:
            # A correct loop over slots where the grouped GEMM is not supported (one host sync).
            rows = x.split(counts.tolist())
            y = torch.cat([swiglu(xs, self.w13[s], self.w2[s]) for s, xs in enumerate(rows)])
        if row_scale is not None:
            y = (y * row_scale.unsqueeze(1)).to(y.dtype)                           # fp32 product, then round
        return y


class DenseMLP(nn.Module):
    """The shared experts (and the dense feed-forward of non-MoE blocks): one SwiGLU of width
    num_shared x F that every token goes through. w13 [H, 2F] (gate | up), w2 [F, H]."""

    def __init__(self, hidden: int, inner: int, dtype=torch.float32, device=None):
        super().__init__()
        self.w13 = nn.Parameter(torch.zeros(hidden, 2 * inner, dtype=dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(inner, hidden, dtype=dtype, device=device), requires_grad=False)
        # CUDA: the routed experts' grouped kernels with one slot, SwiGLU fused into the first
        # GEMM's epilogue (no [T, 2F] intermediate, no elementwise pass; docs/benchmarks.md 1d);
        # False or elsewhere: two matmuls and an elementwise SwiGLU.
        self.fused = True
        # ... and its down GEMM through QuACK where that runs (kernels/quack_gemm.py); False: Triton.
        # (Its gate/up stays on Triton: QuACK's would need w13 interleaved, and this w13 is a
        # plain parameter that checkpoints and state dicts read as [gate | up].)
        self.quack_down = True
        # True: off the fused Triton path, rows in fixed-size blocks (moe_ep/batch_invariant.py), so
        # a token's output does not depend on the other tokens (MoELayer sets it for its shared expert)
        self.batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        if self.fused and x.dtype == self.w13.dtype and triton_supported(x.device, x.dtype):
            return self._fused_forward(x)
        if self.batch_invariant:
            rows = x.reshape(-1, x.shape[-1])                                      # [T, H]
            one_slot = torch.full((1,), rows.shape[0], dtype=torch.int64, device=x.device)
            return blocked_swiglu(rows, self.w13[None], self.w2[None], one_slot).view(x.shape)
        return swiglu(x, self.w13, self.w2)

    # Inside a compiled model (a dense block with model.compile) the Triton launches run eagerly.
    @torch.compiler.disable
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])                                          # [T, H]
        one_slot = torch.full((1,), rows.shape[0], dtype=torch.int64, device=x.device)   # no host sync
        from .kernels import quack_gemm           # forward() checked the Triton side already
        quack = self.quack_down and quack_gemm.supported(x.device, x.dtype, self.w2.shape[1], self.w2.shape[0])
        return triton_swiglu(rows, self.w13[None], self.w2[None], one_slot, quack_down=quack).view(x.shape)
