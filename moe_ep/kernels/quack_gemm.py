"""The experts' two GEMMs through QuACK (optional: `pip install moe-ep[quack]`, Hopper only).

QuACK (quack-kernels, Dao AI Lab; CuTe DSL) builds its Hopper GEMMs as cuBLAS does: ping-pong
consumer warpgroups, a persistent tile scheduler, and 2-CTA clusters that multicast the shared
operand by TMA. Its varlen-M GEMMs take the slot-grouped rows as they are (cu_seqlens_m), with
the epilogues moe-ep's Triton kernels have, and give the same output bit for bit:

    h = silu(x @ Wg_s) * (x @ Wu_s)   x [M, H] rows grouped by slot, W13 [S, H, 2F] -> h [M, F]
    y = (h @ W2_s) * row_scale[:, None]                        h [M, F], W2 [S, F, H] -> y [M, H]

The gated epilogue pairs neighbouring weight columns, so `gate_up_gemm` takes w13 with its
columns interleaved (g0, u0, g1, u1, ...: GroupedExperts stores it so for the "quack" backend,
moe_ep/experts.py). On the H200 QuACK ran gate/up 3% and down 6% faster than Triton sustained
(docs/benchmarks.md 1d, "Round 6").
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
    """QuACK's SM90 kernels can run the experts' GEMMs here: quack installed, a Hopper GPU (sm90:
    the one measured), bf16 or fp16, and 16-byte aligned rows for TMA (F and H multiples of 8)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or inner % 8 or hidden % 8:
        return False
    return installed() and torch.cuda.get_device_capability(device)[0] == 9 and builds()


@functools.lru_cache(maxsize=None)
def builds() -> bool:
    """quack imports and builds its epilogues here (False, with one warning, where an installed
    quack-kernels and nvidia-cutlass-dsl do not fit together: the Triton GEMMs run then)."""
    try:
        _kernels()
        return True
    except Exception as e:  # noqa: BLE001  (any failure of the optional package means: not used)
        warnings.warn(f"quack-kernels is installed but does not build ({type(e).__name__}: {e}); "
                      "the Triton GEMMs run instead", RuntimeWarning, stacklevel=2)
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
    """(gate/up with SwiGLU, its tile config, down with each output row times an fp32 scale, its
    tile config), built once."""
    _allow_unkeyed_dsl_globals()          # before quack builds its epilogues at import
    from quack.epilogue.library import norm_act_mod
    from quack.gemm_config import GemmConfig
    from quack.gemm_interface import gemm_act
    scaled = norm_act_mod(None, gated=False, has_c=False, has_rowvec=False, has_colvec=True)
    # 128 x 192 ping-pong tiles in 2-CTA clusters: the fastest sustained tiles measured on the
    # H200 (docs/benchmarks.md 1d, round 6; 128 x 256 is refused). Gate/up pairs the CTAs along M
    # (they share each weight tile), down along N (they share each h tile).
    gate_up_config = GemmConfig(tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1,
                                is_dynamic_persistent=False)
    down_config = GemmConfig(tile_m=128, tile_n=192, pingpong=True, cluster_m=1, cluster_n=2,
                             is_dynamic_persistent=False)
    return gemm_act, gate_up_config, scaled, down_config


def gate_up_gemm(x: torch.Tensor, w13_pairs: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """x [M, H] (rows grouped by slot, cu = cu_seqlens(counts)), w13_pairs [S, H, 2F] with its
    columns interleaved (g0, u0, g1, u1, ...) -> h = silu(gate) * up [M, F] in x's dtype. No host sync."""
    if x.shape[0] == 0:
        return x.new_empty(0, w13_pairs.shape[2] // 2)
    gemm_act, config, _, _ = _kernels()
    _, h = gemm_act(x.contiguous(), w13_pairs.contiguous(), activation="swiglu", cu_seqlens_m=cu,
                    store_preact=False, tuned=False, config=config)
    return h


def down_gemm(h: torch.Tensor, w2: torch.Tensor, cu: torch.Tensor,
              row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h [M, F] (rows grouped by slot, cu = cu_seqlens(counts)), w2 [S, F, H], row_scale [M] fp32
    or None -> y [M, H] in h's dtype. No host sync."""
    M = h.shape[0]
    out = h.new_empty(M, w2.shape[2])                                        # [M, H]
    if M == 0:
        return out
    _, _, scaled, config = _kernels()
    # without a routed weight every row is scaled by 1.0 (exact): one kernel for both cases
    scale = row_scale.float().contiguous() if row_scale is not None else h.new_ones(M, dtype=torch.float32)
    scaled(h.contiguous(), w2.contiguous(), None, out={"mAuxOut": out}, store_d=False, tuned=False,
           config=config, cu_seqlens_m=cu, mColVecBroadcast=scale)
    return out
