"""The experts' down GEMM through QuACK (optional: `pip install moe-ep[quack]`, Hopper only).

QuACK (quack-kernels, Dao AI Lab; CuTe DSL) builds its Hopper GEMMs as cuBLAS does: ping-pong
consumer warpgroups, a persistent tile scheduler, and 2-CTA clusters that multicast the shared
operand by TMA. Its varlen-M GEMM takes the slot-grouped rows as they are (cu_seqlens_m) and
an epilogue that multiplies each row by its routed weight in fp32 before rounding, as the
Triton down kernel does. On the H200 it runs the layer's down GEMM 6% faster sustained
(2.71 vs 2.88 ms) with bit-identical output; in place the layer gains 1% (docs/benchmarks.md 1d,
"Round 6").

Only the down GEMM goes through QuACK: its gated gate/up GEMM pairs neighbouring weight columns
(g0, u0, g1, u1, ...), and moe-ep stores w13 as [gate | up] wherever it is read (loaders,
checkpoints, migration, references), so gate/up stays on Triton.

    y = (h @ W2_s) * row_scale[:, None]     h [M, F] rows grouped by slot, W2 [S, F, H] -> [M, H]
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Optional

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def installed() -> bool:
    return importlib.util.find_spec("quack") is not None


@functools.lru_cache(maxsize=None)
def supported(device: torch.device, dtype: torch.dtype, hidden: int, inner: int) -> bool:
    """QuACK's SM90 kernel can run the down GEMM here: quack installed, a Hopper GPU (sm90: the
    one measured), bf16 or fp16, and 16-byte aligned rows for TMA (F and H multiples of 8)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or inner % 8 or hidden % 8:
        return False
    return installed() and torch.cuda.get_device_capability(device)[0] == 9 and builds()


@functools.lru_cache(maxsize=None)
def builds() -> bool:
    """quack imports and builds its epilogue here (False, with one warning, where an installed
    quack-kernels and nvidia-cutlass-dsl do not fit together: the Triton down GEMM runs then)."""
    try:
        _kernels()
        return True
    except Exception as e:  # noqa: BLE001  (any failure of the optional package means: not used)
        warnings.warn(f"quack-kernels is installed but does not build ({type(e).__name__}: {e}); "
                      "the Triton down GEMM runs instead", RuntimeWarning, stacklevel=2)
        return False


def _allow_unkeyed_dsl_globals() -> None:
    """QuACK keys its compile cache by a fingerprint of everything an epilogue depends on, and it
    follows functions into their globals, down into nvidia-cutlass-dsl's own code. There,
    cutlass-dsl 4.8.1 (newer than quack-kernels 0.6.5) holds runtime state the fingerprint refuses
    (a ContextVar of source locations, code-object methods, a logger, weak tables, counters), so
    building any epilogue raises TypeError. cutlass-dsl's functions are library code: key them by
    module, name and the installed cutlass-dsl version instead of walking their globals, as quack
    keys modules and classes. Everything else is keyed by quack as before (and where it still
    refuses a value, `builds()` turns QuACK off)."""
    import importlib.metadata

    from quack.gemm_runtime import identity
    if getattr(identity.function_semantic_key, "_moe_ep_shim", False):
        return
    strict = identity.function_semantic_key
    try:
        version = importlib.metadata.version("nvidia-cutlass-dsl")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"

    def key(fn, *args, **kwargs):          # the same arguments as quack's (fn, seen=None)
        module = getattr(fn, "__module__", None) or ""
        if module.split(".")[0] == "cutlass":
            return ("cutlass_fn", module, getattr(fn, "__qualname__", repr(fn)), version)
        return strict(fn, *args, **kwargs)
    key._moe_ep_shim = True
    identity.function_semantic_key = key     # identity's own calls look the name up here


def cu_seqlens(counts: torch.Tensor) -> torch.Tensor:
    """counts [S] rows per slot -> [S + 1] int32 row offsets (QuACK's cu_seqlens_m)."""
    return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


@functools.lru_cache(maxsize=None)
def _kernels():
    """(the GEMM with each output row times an fp32 scale, its tile config), built once."""
    _allow_unkeyed_dsl_globals()          # before quack builds its epilogues at import
    from quack.epilogue.library import norm_act_mod
    from quack.gemm_config import GemmConfig
    scaled = norm_act_mod(None, gated=False, has_c=False, has_rowvec=False, has_colvec=True)
    # 128 x 192 ping-pong tiles, 2 CTAs along N sharing each h tile by multicast: the fastest
    # sustained of the down tiles measured on the H200 (launch/gpu_quack_probe.py; 128 x 256 is refused).
    config = GemmConfig(tile_m=128, tile_n=192, pingpong=True, cluster_m=1, cluster_n=2, is_dynamic_persistent=False)
    return scaled, config


def down_gemm(h: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
              row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h [M, F] (rows grouped by slot, counts [S] rows per slot on h's device, sum = M),
    w2 [S, F, H], row_scale [M] fp32 or None -> y [M, H] in h's dtype. No host sync."""
    M = h.shape[0]
    out = h.new_empty(M, w2.shape[2])                                        # [M, H]
    if M == 0:
        return out
    scaled, config = _kernels()
    # without a routed weight every row is scaled by 1.0 (exact): one kernel for both cases
    scale = row_scale.float().contiguous() if row_scale is not None else h.new_ones(M, dtype=torch.float32)
    scaled(h.contiguous(), w2.contiguous(), None, out={"mAuxOut": out}, store_d=False, tuned=False,
           config=config, cu_seqlens_m=cu_seqlens(counts), mColVecBroadcast=scale)
    return out
