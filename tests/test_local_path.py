"""The EP = 1 fused path (moe_ep/local_path.py) and the expert row_index / row_scale arguments
equal plain references on CPU (fp32); the Triton kernels equal them under Triton's interpreter
(skipped where Triton is not installed)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_ep import local_path
from moe_ep.experts import GroupedExperts, swiglu
from moe_ep.local_path import counting_sort, local_combine, local_dispatch
from moe_ep.router import RoutedCopies


def _stable_positions(keys: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(keys, stable=True)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(keys.numel())
    return pos


@pytest.mark.parametrize("one_hot", [True, False])
@pytest.mark.parametrize("n,bins", [(0, 4), (1, 1), (50, 7), (300, 3)])
def test_counting_sort_is_a_stable_sort(n, bins, one_hot, monkeypatch):
    if not one_hot:
        monkeypatch.setattr(local_path, "_ONE_HOT_LIMIT", 0)     # the argsort fallback
    g = torch.Generator().manual_seed(n)
    keys = torch.randint(0, max(1, bins - 1), (n,), generator=g)  # the last bin stays empty
    pos, counts = counting_sort(keys, bins)
    assert torch.equal(pos, _stable_positions(keys))
    assert torch.equal(counts, torch.bincount(keys, minlength=bins))


def _copies(kind: str, T: int, E: int, k: int, g: torch.Generator) -> RoutedCopies:
    if kind == "token_choice":
        expert = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).flatten()
        return RoutedCopies(expert, torch.rand(T * k, generator=g), T, top_k=k)
    N = 3 * T                                                    # 0..many copies per token
    token = torch.randint(0, T - 1, (N,), generator=g)           # the last token gets none
    return RoutedCopies(torch.randint(0, E, (N,), generator=g), torch.rand(N, generator=g), T, token=token)


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("with_shared", [False, True])
def test_local_path_matches_per_copy_reference(kind, backend, with_shared):
    g = torch.Generator().manual_seed(1)
    T, H, Fh, E, k = 13, 16, 8, 5, 2
    experts = GroupedExperts(E, H, Fh)
    experts.w13.data.copy_(torch.randn(E, H, 2 * Fh, generator=g))
    experts.w2.data.copy_(torch.randn(E, Fh, H, generator=g))
    experts.backend = backend
    x = torch.randn(T, H, generator=g)
    copies = _copies(kind, T, E, k, g)
    shared = torch.randn(T, H, generator=g) if with_shared else None
    plan = local_dispatch(copies.expert, copies, E)
    y = experts(x, plan.counts, row_scale=plan.row_scale, row_index=plan.row_index)
    out = local_combine(y, copies, plan, shared)
    ref = torch.zeros(T, H) if shared is None else shared.clone()
    for i, (t, e, w) in enumerate(zip(copies.rows().tolist(), copies.expert.tolist(), copies.weight.tolist())):
        ref[t] += w * swiglu(x[t:t + 1], experts.w13[e], experts.w2[e])[0]
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()


def test_row_index_and_row_scale_match_explicit_gather_and_scale():
    g = torch.Generator().manual_seed(2)
    experts = GroupedExperts(3, 16, 8)
    experts.w13.data.normal_(generator=g)
    experts.w2.data.normal_(generator=g)
    x = torch.randn(10, 16, generator=g)
    idx = torch.randint(0, 10, (12,), generator=g)
    scale = torch.rand(12, generator=g)
    counts = torch.tensor([5, 0, 7])
    for backend in ("grouped_mm", "loop"):
        experts.backend = backend
        out = experts(x, counts, row_scale=scale, row_index=idx)
        ref = experts(x[idx], counts) * scale[:, None]
        assert torch.allclose(out, ref, atol=1e-5), backend


_INTERPRETED = textwrap.dedent("""
    import torch, torch.nn.functional as F
    import triton.runtime.interpreter as interp
    # Triton 3.6's interpreter turns a scalar argument into a 1-element array and int() of that
    # fails with NumPy >= 2.4 ("only 0-dimensional arrays can be converted"): index it instead.
    _patch = interp._patch_lang_tensor
    def _patch_index(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: _scalar(self.handle.data))
    def _scalar(data):
        assert data.size == 1, data.shape
        return int(data.reshape(-1)[0])
    interp._patch_lang_tensor = _patch_index
    from moe_ep.kernels.grouped_gemm import GemmConfig, grouped_gemm
    from moe_ep.kernels.combine import gather_sum
    from moe_ep.kernels.sort import counting_sort_cuda
    g = torch.Generator().manual_seed(0)
    S, K, Fh = 4, 32, 24
    counts = torch.tensor([5, 0, 21, 3])
    M = int(counts.sum())
    x = torch.randn(M, K, generator=g); w13 = torch.randn(S, K, 2 * Fh, generator=g)
    w2 = torch.randn(S, Fh, K, generator=g); scale = torch.rand(M, generator=g)
    perm = torch.randperm(M, generator=g)
    ref_h = torch.cat([F.silu(a) * b for a, b in
                       (torch.chunk(xs @ w13[s], 2, -1) for s, xs in enumerate(x[perm].split(counts.tolist())))])
    ref_y = torch.cat([hs @ w2[s] for s, hs in enumerate(ref_h.split(counts.tolist()))]) * scale[:, None]
    for desc, on_load, persistent in ((False, True, False), (True, True, False), (True, False, False),
                                      (True, False, True)):
        cfg = GemmConfig(BM=16, BN=16, BK=16, GROUP_M=2, num_warps=4, num_stages=1, desc=desc, gather_on_load=on_load,
                         persistent=persistent)
        h = grouped_gemm(x, w13, counts, swiglu=True, row_index=perm, config=cfg)
        y = grouped_gemm(h, w2, counts, row_scale=scale, config=cfg)
        assert torch.allclose(h, ref_h, atol=1e-3, rtol=1e-4), (desc, on_load, persistent, (h - ref_h).abs().max())
        assert torch.allclose(y, ref_y, atol=1e-3, rtol=1e-4), (desc, on_load, persistent, (y - ref_y).abs().max())
    # fewer tiles (1 x 3) than the persistent kernel's programs (4 under the interpreter)
    cfg = GemmConfig(BM=16, BN=16, BK=16, GROUP_M=2, num_warps=4, num_stages=1, desc=True, gather_on_load=False,
                     persistent=True)
    out = grouped_gemm(x[:3], w13[:1], torch.tensor([3]), config=cfg)
    assert torch.allclose(out, x[:3] @ w13[0], atol=1e-3, rtol=1e-4), (out - x[:3] @ w13[0]).abs().max()
    keys = torch.randint(0, 5, (700,), generator=g); w = torch.rand(700, generator=g)
    pos, c, ri, rs = counting_sort_cuda(keys, 6, top_k=3, weights=w, block=64)
    order = torch.argsort(keys, stable=True)
    assert torch.equal(pos[order], torch.arange(700)) and torch.equal(ri, order // 3) and torch.equal(rs, w[order])
    assert torch.equal(c, torch.bincount(keys, minlength=6))
    T = 9; y = torch.randn(20, K, generator=g); src = torch.randperm(20, generator=g)
    off = torch.tensor([0, 2, 2, 5, 9, 9, 12, 15, 20, 20]); init = torch.randn(T, K, generator=g)
    out = gather_sum(y, src, T, offsets=off, init=init, block_h=16)
    ref = init + torch.stack([y[src[off[t]:off[t + 1]]].sum(0) for t in range(T)])
    assert torch.allclose(out, ref, atol=1e-5)
    out = gather_sum(y, src, 5, top_k=4, weights=w[:20], block_h=16)
    assert torch.allclose(out, (y[src] * w[:20, None]).view(5, 4, K).sum(1), atol=1e-5)
    print("ok")
""")


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("ep_size,device,field", [(2, "cuda", "parallel.ep_size"), (1, "cpu", "parallel.device")])
def test_cuda_graph_forward_refuses_ep_above_one_and_cpu(ep_size, device, field):
    from types import SimpleNamespace

    from moe_ep.config import ConfigError
    from moe_ep.models.moedit.graphs import CudaGraphForward
    from moe_ep.parallel import ParallelContext
    model = SimpleNamespace(ctx=ParallelContext(ep_size=ep_size, device=torch.device(device)))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        CudaGraphForward(model)


def test_gemm_config_depends_on_the_weights_shape_dtype_and_gpu_only(monkeypatch):
    """kernels/gemm_configs.config_for: a tuned entry for (GEMM, K, Nb, dtype, GPU major) is taken
    whatever the slot count (EP size, redundant slots) and row count; other shapes, dtypes and GPUs
    get the defaults. A key on the slot count would make an image depend on the EP layout."""
    from moe_ep.kernels import gemm_configs as gc
    for (gemm, K, N, dtype, major), cfg in gc.TUNED_CONFIGS.items():   # the shipped table is well formed
        assert gemm in ("gate_up", "down") and K > 0 and N > 0 and major >= 8 and isinstance(cfg, gc.GemmConfig)
    picked = gc.GemmConfig(BM=64, BN=256, GROUP_M=4)
    monkeypatch.setitem(gc.TUNED_CONFIGS, ("down", 48, 32, torch.float32, 0), picked)
    for slots in (1, 3, 8):                                    # the same (K, Nb) at any slot count
        assert gc.config_for("down", torch.zeros(slots, 48, 32)) is picked
    assert gc.config_for("gate_up", torch.zeros(3, 48, 32)) is gc.GATE_UP_CONFIG       # another GEMM
    assert gc.config_for("down", torch.zeros(3, 32, 48)) is gc.DOWN_CONFIG            # another shape
    assert gc.config_for("down", torch.zeros(3, 48, 32, dtype=torch.bfloat16)) is gc.DOWN_CONFIG
    with pytest.raises(KeyError):                                                     # a misspelt GEMM
        gc.config_for("gateup", torch.zeros(3, 48, 32))
