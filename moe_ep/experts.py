"""The experts of this rank's physical slots, stacked, run with one grouped GEMM."""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def triton_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                  row_scale: Optional[torch.Tensor] = None, row_index: Optional[torch.Tensor] = None,
                  quack_down: bool = False) -> torch.Tensor:
    """SwiGLU experts through moe_ep.kernels' two grouped GEMMs: SwiGLU in the first one's
    epilogue, the row scale in the second's. x [Ma, H] (row i is x[row_index[i]] with a row
    index), w13 [S, H, 2F], w2 [S, F, H], counts [S] rows per slot -> [M, H].
    quack_down: the down GEMM through QuACK (kernels/quack_down.py) instead of Triton."""
    from .kernels.grouped_gemm import DOWN_CONFIG, GATE_UP_CONFIG, grouped_gemm
    h = grouped_gemm(x, w13, counts, swiglu=True, row_index=row_index, config=GATE_UP_CONFIG)   # [M, F]
    if quack_down:
        from .kernels.quack_down import down_gemm
        return down_gemm(h, w2, counts, row_scale)                                            # [M, H]
    return grouped_gemm(h, w2, counts, row_scale=row_scale, config=DOWN_CONFIG)                # [M, H]


def quack_down_supported(device: torch.device, dtype: torch.dtype, hidden: int, inner: int) -> bool:
    """The down GEMM can go through QuACK here (quack-kernels installed, Hopper, bf16/fp16)."""
    from .kernels import quack_down
    return triton_supported(device, dtype) and quack_down.supported(device, dtype, hidden, inner)


def triton_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """moe_ep.kernels' grouped GEMMs: Triton installed, a CUDA GPU of sm80+, bf16 or fp16."""
    from . import kernels
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not kernels.available(device):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def default_backend(device: torch.device, dtype: torch.dtype, hidden: int, inner: int) -> str:
    """The fastest expert path that runs here: "triton+quack", "triton", "grouped_mm" or "loop"."""
    if PREFER_TRITON and triton_supported(device, dtype):
        return "triton+quack" if quack_down_supported(device, dtype, hidden, inner) else "triton"
    return "grouped_mm" if grouped_mm_supported(device, dtype, hidden, inner) else "loop"


# Whether the Triton grouped GEMMs beat torch._grouped_mm where both run (set from the
# H200 measurement in docs/benchmarks.md section 1d).
PREFER_TRITON = True


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


class GroupedExperts(nn.Module):
    """SwiGLU experts of `num_slots` physical slots: w13 [S, H, 2F] (gate and up fused), w2 [S, F, H]."""

    def __init__(self, num_slots: int, hidden: int, inner: int, dtype=torch.float32, device=None):
        super().__init__()
        self.num_slots, self.hidden, self.inner = num_slots, hidden, inner
        self.w13 = nn.Parameter(torch.zeros(num_slots, hidden, 2 * inner, dtype=dtype, device=device),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(num_slots, inner, hidden, dtype=dtype, device=device),
                               requires_grad=False)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        # "triton": moe_ep.kernels' grouped GEMMs with SwiGLU and the row scale fused into their
        # epilogues; "triton+quack": the same with the down GEMM through QuACK (Hopper, when
        # quack-kernels is installed; the same output, the down GEMM 6% and the layer 1% faster);
        # "grouped_mm": torch._grouped_mm + a separate activation; "loop": one matmul pair per
        # slot (CPU, fp32 on CUDA). See docs/benchmarks.md section 1d.
        self.backend = default_backend(dev, dtype, hidden, inner)
        # On a GPU the activation as separate kernels costs 1.25 ms per 65536 x 6144 bf16 rows
        # (H200); one fused kernel from torch.compile takes 0.31 ms (launch/gpu_grouped_variants.py),
        # 0.3 ms of the layer's 10 ms measured in place (launch/gpu_check.py).
        self.activation = torch.compile(silu_gate, dynamic=True) if dev.type == "cuda" else silu_gate

    @property
    def use_grouped_mm(self) -> bool:
        """True when a grouped-GEMM path runs (Triton or torch._grouped_mm), False for the loop."""
        return self.backend != "loop"

    @use_grouped_mm.setter
    def use_grouped_mm(self, value: bool) -> None:
        self.backend = "grouped_mm" if value else "loop"

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_scale: Optional[torch.Tensor] = None,
                row_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run every row through its slot's expert.

        x [M, H] grouped by slot (counts[s] rows for slot s; counts [S] on x's device) -> [M, H].
        row_index [M] (optional): row i of the grouped input is x[row_index[i]] (x is then
        [T, H], e.g. the tokens themselves: the Triton path gathers on load and never writes
        the permuted copy). row_scale [M] fp32 (optional): output row i is multiplied by it
        (the routed weight), in fp32 before rounding on the Triton path.
        """
        M = row_index.numel() if row_index is not None else x.shape[0]
        if M == 0:
            return x.new_empty(0, self.hidden)
        if self.backend in ("triton", "triton+quack"):
            return triton_swiglu(x, self.w13, self.w2, counts, row_scale=row_scale, row_index=row_index,
                                 quack_down=self.backend == "triton+quack")
        if row_index is not None:
            x = x[row_index]                                                       # [M, H]
        if self.backend == "grouped_mm":
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
        # ... and its down GEMM through QuACK where that runs (kernels/quack_down.py); False: Triton.
        self.quack_down = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        if self.fused and x.dtype == self.w13.dtype and triton_supported(x.device, x.dtype):
            return self._fused_forward(x)
        return swiglu(x, self.w13, self.w2)

    # Inside a compiled model (a dense block with model.compile) the Triton launches run eagerly.
    @torch.compiler.disable
    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])                                          # [T, H]
        one_slot = torch.full((1,), rows.shape[0], dtype=torch.int64, device=x.device)   # no host sync
        from .kernels import quack_down           # forward() checked the Triton side already
        quack = self.quack_down and quack_down.supported(x.device, x.dtype, self.w2.shape[1], self.w2.shape[0])
        return triton_swiglu(rows, self.w13[None], self.w2[None], one_slot, quack_down=quack).view(x.shape)
