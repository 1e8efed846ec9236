"""The experts of this rank's physical slots, stacked, run with one grouped GEMM."""
from __future__ import annotations

import hashlib

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
        self.use_grouped_mm = grouped_mm_supported(dev, dtype, hidden, inner)
        # On a GPU the activation as separate kernels costs 1.25 ms per 65536 x 6144 bf16 rows
        # (H200); one fused kernel from torch.compile takes 0.31 ms (launch/gpu_grouped_variants.py),
        # 0.3 ms of the layer's 10 ms measured in place (launch/gpu_check.py).
        self.activation = torch.compile(silu_gate, dynamic=True) if dev.type == "cuda" else silu_gate

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, H] grouped by slot (counts[s] rows for slot s; counts [S] on x's device) -> [M, H]."""
        if x.shape[0] == 0:
            return x.new_empty(0, self.hidden)
        if self.use_grouped_mm:
            offsets = counts.cumsum(0).to(torch.int32)                               # [S]
            h = self.activation(torch._grouped_mm(x, self.w13, offs=offsets))       # [M, F]
            return torch._grouped_mm(h, self.w2, offs=offsets)                     # [M, H]
        # A correct loop over slots where the grouped GEMM is not supported (one host sync).
        rows = x.split(counts.tolist())
        return torch.cat([swiglu(xs, self.w13[s], self.w2[s]) for s, xs in enumerate(rows)])


class DenseMLP(nn.Module):
    """The shared experts: one SwiGLU of width num_shared x F that every token goes through."""

    def __init__(self, hidden: int, inner: int, dtype=torch.float32, device=None):
        super().__init__()
        self.w13 = nn.Parameter(torch.zeros(hidden, 2 * inner, dtype=dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(inner, hidden, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w13, self.w2)
