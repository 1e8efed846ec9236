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


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm runs on CPU, and on CUDA for bf16 on sm90+ with 16-byte aligned dims."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x.device)
        return (major >= 9 and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
                and x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0)
    return False


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of group s (x[offsets[s-1]:offsets[s]]) times w[s]: x [M, K], w [S, K, N] -> [M, N]."""
    if grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w, offs=offsets)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()   # host sync: fallback only
    return torch.cat([xs @ w[s] for s, xs in enumerate(x.split(counts))])


class GroupedExperts(nn.Module):
    """SwiGLU experts of `num_slots` physical slots: w13 [S, H, 2F] (gate and up fused), w2 [S, F, H]."""

    def __init__(self, num_slots: int, hidden: int, inner: int, dtype=torch.float32, device=None):
        super().__init__()
        self.num_slots, self.hidden, self.inner = num_slots, hidden, inner
        self.w13 = nn.Parameter(torch.zeros(num_slots, hidden, 2 * inner, dtype=dtype, device=device),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(num_slots, inner, hidden, dtype=dtype, device=device),
                               requires_grad=False)
        # On a GPU the activation as separate kernels costs 1.25 ms per 65536 x 6144 bf16 rows
        # (H200); one fused kernel from torch.compile takes 0.31 ms (launch/gpu_grouped_variants.py).
        on_gpu = device is not None and torch.device(device).type == "cuda"
        self.activation = torch.compile(silu_gate, dynamic=True) if on_gpu else silu_gate

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, H] grouped by slot (counts[s] rows for slot s; counts [S] on x's device) -> [M, H]."""
        if x.shape[0] == 0:
            return x.new_empty(0, self.hidden)
        offsets = counts.cumsum(0).to(torch.int32)                                  # [S]
        h = self.activation(grouped_mm(x, self.w13, offsets))                       # [M, F]
        return grouped_mm(h, self.w2, offsets)                                     # [M, H]


class DenseMLP(nn.Module):
    """The shared experts: one SwiGLU of width num_shared x F that every token goes through."""

    def __init__(self, hidden: int, inner: int, dtype=torch.float32, device=None):
        super().__init__()
        self.w13 = nn.Parameter(torch.zeros(hidden, 2 * inner, dtype=dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(inner, hidden, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w13, self.w2)
