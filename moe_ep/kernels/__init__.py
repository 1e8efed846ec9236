"""GPU kernels (Triton) of the MoE forward. Import lazily: Triton is absent on CPU-only installs.

`available(device)` says whether these kernels can run on `device`; every caller keeps a
torch fallback (torch._grouped_mm, the per-slot loop on CPU).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(device: torch.device) -> bool:
    """Triton is importable and `device` is a CUDA GPU (or the Triton interpreter is on, for CPU tests).
    Called on every forward: the module lookup is cached (it cost tens of microseconds)."""
    if not _triton_installed():
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"
