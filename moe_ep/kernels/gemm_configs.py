"""Tile configurations of the Triton grouped GEMMs (kernels/grouped_gemm.py), and which one runs where.

A plain module (no Triton import), so the choice can be read and tested on any machine. The choice
depends on the GEMM, the weights' shape (K, Nb), their dtype and the GPU's major compute capability,
never on the row count: a configuration picked per token count would make a row's result depend on
the batch and the EP size (grouped_gemm.py's batch-invariance argument).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and pipelining of one grouped GEMM launch."""

    BM: int = 128
    BN: int = 128
    BK: int = 64
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 4
    desc: bool = False     # TMA descriptors for the tiles (Hopper), else pointer loads
    gather_on_load: bool = True   # with a row index: gather A rows while loading (else copy x[idx] first)
    warp_specialize: bool = False  # TMA kernel: Triton's warp-specialised K loop (producer/consumer warps)
    persistent: bool = False   # one program per SM looping over tiles; applies where the TMA kernel
                               # runs with A not gathered on load (else ignored), never warp-specialised


# Chosen on one H200 (kernel variants, docs/benchmarks.md section 1d): TMA for the
# weights (and for A where it is not gathered); on GPUs before Hopper the pointer-load kernel runs.
# Gate/up: copying the gathered rows first and loading A by TMA (4.99 ms) beat gathering A by
# pointer loads inside the kernel (5.15-5.52 ms) although the copy costs 0.27 ms.
GATE_UP_CONFIG = GemmConfig(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4, desc=True,
                            gather_on_load=False)
DOWN_CONFIG = GemmConfig(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3, desc=True)

# Per-shape picks of benchmarks/gemm_sweep.py: (GEMM, K, weight columns, dtype, GPU major) -> config.
# The key holds the weights' shape and the GPU only, never the row count (batch invariance, above).
TUNED_CONFIGS: dict[tuple[str, int, int, torch.dtype, int], GemmConfig] = {}


DEFAULTS = {"gate_up": GATE_UP_CONFIG, "down": DOWN_CONFIG}


def config_for(gemm: str, weights: torch.Tensor) -> GemmConfig:
    """The configuration of one grouped GEMM ("gate_up" or "down") over `weights` [S, K, Nb]: the
    sweep's pick for this (K, Nb, dtype, GPU) where there is one, else GATE_UP_CONFIG / DOWN_CONFIG."""
    default = DEFAULTS[gemm]
    if not TUNED_CONFIGS:                  # the shipped table: no lookup on the launch path
        return default
    major = capability(weights.device)[0] if weights.is_cuda else 0
    return TUNED_CONFIGS.get((gemm, weights.shape[1], weights.shape[2], weights.dtype, major), default)


@functools.lru_cache(maxsize=None)
def capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability (cached: it is asked on the launch path)."""
    return torch.cuda.get_device_capability(device)
