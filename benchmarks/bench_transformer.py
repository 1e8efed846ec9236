"""One forward of a whole diffusers MoE transformer on one GPU: diffusers' own vs moe-ep, with speed options.

    # one H100 / H200, bf16, real sizes, random weights built on the meta device (no download)
    python benchmarks/bench_transformer.py --model hidream --out hidream.json
    python benchmarks/bench_transformer.py --model nucleus --out nucleus.json
    # tiny configs on the CPU (fp32, under a minute): the same code path end to end
    python benchmarks/bench_transformer.py --model hidream --small --device cpu

HiDream-I1 (17.1 B parameters) at 1024 x 1024 (4096 image tokens), batch 2 ([negative, positive]
in one forward, as its pipeline calls it), 128 T5 tokens and 128 Llama tokens per layer.
NucleusMoE-Image (diffusers' default config, `use_grouped_mm=True`) at 1024 x 1024, batch 1 (its
pipeline runs one forward per guidance branch), 128 text tokens.

Speed rows, one process, same weights: diffusers' own forward (torch's attention kernel, then
cuDNN attention); then the model made expert-parallel in place (`wrap_transformer`, EP = 1) and
moe-ep with each option of `moe_ep.models.diffusers.acceleration` and their combination, and the
compiled + CUDA-graph forward again through `expert_parallel(pipe, cuda_graph=True)` with expert-load
statistics on (the documented route; `route_row`). Each row:
CUDA-event median of `--reps` forwards after `--warmup`, peak memory over the row, host syncs in
one forward (torch's sync debug mode), and the largest difference from moe-ep eager's output.
Accuracy: the same at reduced depth (`--accuracy-layers`) against an fp32 run of diffusers' forward
(TF32 off): ||out - ref|| / ||ref|| for diffusers bf16, moe-ep bf16 and moe-ep with each option.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.config import ParallelConfig  # noqa: E402
from moe_ep.models.diffusers import NUCLEUS, spec_for, wrap_transformer  # noqa: E402
from moe_ep.models.diffusers import acceleration as acc  # noqa: E402
from moe_ep.models.diffusers import tiny  # noqa: E402
from moe_ep.models.diffusers.wrap import replace_module  # noqa: E402
from moe_ep.parallel import build_context  # noqa: E402

OPTIONS = {"compile", "batch_invariant"}
MODELS = {"hidream": "HiDreamImageTransformer2DModel", "nucleus": "NucleusMoEImageTransformer2DModel"}


# ---------------------------------------------------------------- configs and inputs

def real_config(name: str) -> dict:
    """HiDream-I1's transformer config; NucleusMoE-Image's (diffusers' defaults) with grouped mm."""
    if name == "hidream":
        return dict(patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32,
                    attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096],
                    text_emb_dim=2048, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32),
                    max_resolution=(128, 128), llama_layers=[min(i, 31) for i in range(48)])
    return dict(use_grouped_mm=True)


def small_config(name: str) -> dict:
    return tiny.hidream_config() if name == "hidream" else dict(tiny.nucleus_config(), use_grouped_mm=False)


def with_depth(name: str, cfg: dict, layers: Optional[int]) -> dict:
    """The config with `layers` blocks (HiDream: a third dual-stream, the rest single-stream)."""
    if layers is None:
        return cfg
    cfg = dict(cfg)
    if name == "hidream":
        cfg["num_layers"] = max(1, layers // 3)
        cfg["num_single_layers"] = layers - cfg["num_layers"]
        cfg["llama_layers"] = [min(i, max(cfg["llama_layers"])) for i in range(layers)]
    else:
        cfg["num_layers"] = layers
        factors = cfg.get("capacity_factors", 8.0)
        if isinstance(factors, list):
            cfg["capacity_factors"] = (factors * layers)[:layers]
    return cfg


def make_inputs(name: str, model: nn.Module, batch: int, latent_side: int, text_tokens: int,
                device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Forward kwargs. HiDream: latents [B, C, side, side], T5 [B, T, D5], Llama [L, B, T, Dl],
    pooled [B, Dp], timesteps [B] (x1000). NucleusMoE: packed latents [B, (side/2)^2, C],
    text [B, T, D], timestep [B] in [0, 1]."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    if name == "hidream":
        n_llama = max(c.llama_layers) + 1
        return dict(hidden_states=rnd(batch, c.in_channels, latent_side, latent_side),
                    timesteps=torch.full((batch,), 700.0, device=device),
                    encoder_hidden_states_t5=rnd(batch, text_tokens, c.caption_channels[0]),
                    encoder_hidden_states_llama3=rnd(n_llama, batch, text_tokens, c.caption_channels[1]),
                    pooled_embeds=rnd(batch, c.text_emb_dim), return_dict=False)
    side = latent_side // 2
    return dict(hidden_states=rnd(batch, side * side, c.in_channels), img_shapes=[(1, side, side)] * batch,
                encoder_hidden_states=rnd(batch, text_tokens, c.joint_attention_dim),
                timestep=torch.full((batch,), 0.7, device=device, dtype=dtype), return_dict=False)


# ---------------------------------------------------------------- the model, random weights, no download

@torch.no_grad()
def build(name: str, cfg: dict, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """The diffusers class built on the meta device, its rotary module re-created (spec.rebuild),
    cast, materialised on `device` and filled with N(0, 1/fan_in) (biases N(0, 0.02^2)) drawn there."""
    import diffusers

    cls = getattr(diffusers, MODELS[name])
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = cls.from_config(cfg)
    for path, mod in list(model.named_modules()):
        factory = spec_for(MODELS[name]).rebuild.get(type(mod).__name__)
        if factory is not None:
            with torch.device("cpu"):
                replace_module(model, path, factory(mod))
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for pname, p in model.named_parameters():
        if p.numel() == 0:
            continue
        if p.dim() == 1:
            std = 0.02
        elif pname.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3:
            std = p.shape[1] ** -0.5                                   # packed [E, in, out]
        else:
            std = p.shape[-1] ** -0.5                                  # Linear [out, in]
        p.normal_(0.0, std, generator=g)
    for bname, b in model.named_buffers():
        if b.is_meta:
            raise RuntimeError(f"buffer {bname} left on the meta device")
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: torch.device, reps: int, warmup: int) -> list[float]:
    """Milliseconds of each of `reps` calls after `warmup` (CUDA events, or the wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter(); fn(); out.append((time.perf_counter() - t0) * 1e3)
    return out


def host_syncs(fn: Callable, device: torch.device) -> Optional[int]:
    """Synchronising operations in one call, as torch's sync debug mode reports them (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def output(result) -> torch.Tensor:
    """The sample of a forward's (sample,) tuple, as float32."""
    return (result[0] if isinstance(result, (tuple, list)) else result.sample).float()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


class Recorder:
    """Rows of one run, written to JSON after each row (a run cut short keeps what it measured)."""

    def __init__(self, args, meta: dict):
        self.args, self.meta, self.rows, self.accuracy = args, meta, [], []
        self.t0 = time.perf_counter()

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.args.budget_s

    def save(self) -> None:
        if self.args.out:
            write_json_atomic(self.args.out, {"meta": self.meta, "rows": self.rows, "accuracy": self.accuracy})

    def add(self, table: list, row: dict) -> None:
        row["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        table.append(row)
        print(json.dumps(row), flush=True)
        self.save()


def speed_row(rec: Recorder, name: str, fn: Callable, device, ref_out: Optional[torch.Tensor]
              ) -> tuple[dict, Optional[torch.Tensor]]:
    """Time fn (a forward); -> (the row (error text instead of numbers if it failed), its output)."""
    row, out = {"variant": name}, None
    if rec.over_budget():
        row["skipped"] = "time budget"
        rec.add(rec.rows, row)
        return row, None
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = output(fn())                                   # first call: compiles / captures
        sync(device)
        row["first_call_s"] = round(time.perf_counter() - t0, 2)
        ts = timed(fn, device, rec.args.reps, rec.args.warmup)
        row.update(median_ms=statistics.median(ts), min_ms=min(ts), max_ms=max(ts))
        row["host_syncs"] = host_syncs(fn, device)
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        if ref_out is not None:
            row["max_abs_diff_vs_moe_ep_eager"] = float((out - ref_out).abs().max())
    except Exception as e:  # a variant that cannot run (capture, compile) is recorded, not fatal
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rec.add(rec.rows, row)
    return row, out


# ---------------------------------------------------------------- the two phases

def speed_phase(rec: Recorder, args, device, dtype) -> Optional[str]:
    """Full-depth model: diffusers, then moe-ep with each option. -> the faster attention kernel."""
    name = args.model
    cfg = with_depth(name, small_config(name) if args.small else real_config(name), args.layers)
    model = build(name, cfg, device, dtype, seed=0)
    rec.meta["params_billion"] = sum(p.numel() for p in model.parameters()) / 1e9
    rec.meta["config"] = {k: v for k, v in model.config.items() if not k.startswith("_")}
    kw = make_inputs(name, model, args.batch, args.latent_side, args.text_tokens, device, dtype, seed=1)
    call = lambda m: (lambda: m(**kw))  # noqa: E731
    cuda = device.type == "cuda"
    with torch.no_grad():
        speed_row(rec, "diffusers", call(model), device, None)
        kernels = ("flash", "cudnn") if cuda else ()
        for kernel in kernels:
            speed_row(rec, f"diffusers, {kernel} attention", _bound(acc.AcceleratedTransformer(model, kernel), kw),
                      device, None)
        ctx = build_context(ParallelConfig(device=device.type), 0, 1, device)
        try:
            wrap_transformer(model, ctx)                                         # in place, EP = 1
        except torch.OutOfMemoryError as e:                                      # recorded; the rows stop here
            rec.add(rec.rows, {"variant": "moe-ep", "error": f"wrap_transformer: {str(e)[:200]}"})
            return None
        base, ref = speed_row(rec, "moe-ep", call(model), device, None)
        synced = acc.remove_host_syncs(model)
        rec.meta["host_sync_fixes"] = synced
        fixed, _ = speed_row(rec, "moe-ep + host syncs removed", call(model), device, ref)
        best, attn = fixed.get("median_ms", float("inf")), None
        for kernel in kernels:                      # a max diff of 0 says it is torch's own choice here
            row, _ = speed_row(rec, f"moe-ep + host syncs removed + {kernel} attention",
                               _bound(acc.AcceleratedTransformer(model, kernel), kw), device, ref)
            if row.get("median_ms", float("inf")) < best:
                best, attn = row["median_ms"], kernel
        rec.meta["attention_chosen"] = attn
        label = f" + {attn} attention" if attn else ""
        if cuda:
            speed_row(rec, f"moe-ep + host syncs removed{label} + CUDA graph",
                      _bound(acc.AcceleratedTransformer(model, attn, cuda_graph=True), kw), device, ref)
        if "compile" in args.options:
            paths = acc.compile_blocks(model, **compile_kwargs(args))
            rec.meta["compiled_blocks"] = len(paths)
            speed_row(rec, f"moe-ep + host syncs removed{label} + compiled blocks",
                      _bound(acc.AcceleratedTransformer(model, attn), kw), device, ref)
            if cuda:
                speed_row(rec, f"moe-ep + host syncs removed{label} + compiled blocks + CUDA graph",
                          _bound(acc.AcceleratedTransformer(model, attn, cuda_graph=True), kw), device, ref)
                route_row(rec, model, kw, device, ref)
        if "batch_invariant" in args.options:
            batch_invariant_rows(rec, model, kw, attn, device, ref)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return attn


ROUTE_ROW = "moe-ep compiled + CUDA graph, stats on (expert_parallel route)"


def route_row(rec: Recorder, model: nn.Module, kw: dict, device, ref: Optional[torch.Tensor]) -> None:
    """The compiled + CUDA-graph forward through the documented route, expert-load statistics on:
    `moe_ep.expert_parallel(pipe, cuda_graph=True)` adopting the wrapped, compiled transformer (EP = 1,
    no rebalancing), a guided pipeline's branch labels; its hooks (statistics begin / end, a window
    closed every 8 forwards) run around every replay. torch's attention kernel. Taken off after."""
    from types import SimpleNamespace

    import moe_ep

    pipe = SimpleNamespace(transformer=model, do_classifier_free_guidance=True)
    try:
        moe_ep.expert_parallel(pipe, eplb={"enabled": False}, cuda_graph=True)
    except Exception as e:  # recorded, not fatal
        rec.add(rec.rows, {"variant": ROUTE_ROW, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        return
    handle = pipe.moe_ep
    try:
        row, _ = speed_row(rec, ROUTE_ROW, lambda: model(**kw), device, ref)
        if "median_ms" in row:
            rec.meta["route_row_stats"] = {"forwards": handle.stats.forwards, "windows": handle.stats.num_windows,
                                           "rows_counted": int(handle.stats.total().sum())
                                           + int(handle.stats.counts.sum()),          # closed + open window
                                           "captures": handle.cuda_graph.graph.captures}
            rec.save()
    finally:
        handle.remove_hooks()
        for layer in handle.moe_layers():
            layer.stats = None
        del model.moe_ep


def batch_invariant_rows(rec: Recorder, model: nn.Module, kw: dict, attn: Optional[str], device,
                         ref: Optional[torch.Tensor]) -> None:
    """The cost of model.moe.batch_invariant "on" (moe_ep/batch_invariant.py) in the whole forward:
    every MoE layer switched to the batch-invariant path, with the blocks as they are (compiled or
    not), then with the blocks eager; the layers switched back after."""
    layers = acc._moe_layers(model)
    before = [layer.batch_invariant for layer in layers]
    label = f" + {attn} attention" if attn else ""
    compiled = [p for p, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    try:
        for layer in layers:
            layer.batch_invariant = True
        if compiled:
            speed_row(rec, f"moe-ep + host syncs removed{label} + compiled blocks, batch-invariant experts",
                      _bound(acc.AcceleratedTransformer(model, attn), kw), device, ref)
            acc.uncompile_blocks(model, compiled)
        speed_row(rec, "moe-ep + host syncs removed, batch-invariant experts", lambda: model(**kw), device, ref)
    finally:
        for layer, on in zip(layers, before):
            layer.batch_invariant = on


def _bound(fn, kw):
    return lambda: fn(**kw)


def compile_kwargs(args) -> dict:
    return {"backend": args.compile_backend} if args.compile_backend else {}


def accuracy_phase(rec: Recorder, args, device, dtype, attn: Optional[str]) -> None:
    """Reduced depth: diffusers fp32 (TF32 off) is the reference; diffusers in `dtype`, moe-ep and
    moe-ep with each option against it."""
    name = args.model
    cfg = with_depth(name, small_config(name) if args.small else real_config(name), args.accuracy_layers)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        ref_model = build(name, cfg, device, torch.float32, seed=2)
        kw = make_inputs(name, ref_model, args.batch, args.latent_side, args.text_tokens, device, dtype, seed=3)
        kw32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
        grouped = [m for m in ref_model.modules() if getattr(m, "use_grouped_mm", False)]
        for m in grouped:        # NucleusMoE: torch's grouped mm is bf16-only; the fp32 reference loops
            m.use_grouped_mm = False
        ref = output(ref_model(**kw32))
        for m in grouped:
            m.use_grouped_mm = True
        model = ref_model.to(dtype)            # in place: no second copy of the weights (fp32 gone)
        del ref_model
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

        def check(label: str, fn: Callable) -> None:
            row = {"variant": label, "layers": args.accuracy_layers}
            try:
                row["rel_err_vs_fp32"] = rel_err(output(fn()), ref)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rec.add(rec.accuracy, row)

        check(f"diffusers {args.dtype}", lambda: model(**kw))
        try:
            wrap_transformer(model, build_context(ParallelConfig(device=device.type), 0, 1, device))
        except torch.OutOfMemoryError as e:
            rec.add(rec.accuracy, {"variant": "moe-ep", "layers": args.accuracy_layers,
                                   "error": f"wrap_transformer: {str(e)[:200]}"})
            return
        check(f"moe-ep {args.dtype}", lambda: model(**kw))
        acc.remove_host_syncs(model)
        check("moe-ep + host syncs removed", lambda: model(**kw))
        if device.type == "cuda":
            check("moe-ep + cudnn attention", lambda: acc.AcceleratedTransformer(model, "cudnn")(**kw))
            check("moe-ep + CUDA graph", lambda: acc.AcceleratedTransformer(model, None, cuda_graph=True)(**kw))
        if "compile" in args.options:
            acc.compile_blocks(model, **compile_kwargs(args))
            label = f" + {attn} attention" if attn else ""
            check(f"moe-ep{label} + compiled blocks", lambda: acc.AcceleratedTransformer(model, attn)(**kw))
            if device.type == "cuda":
                check(f"moe-ep{label} + compiled blocks + CUDA graph",
                      lambda: acc.AcceleratedTransformer(model, attn, cuda_graph=True)(**kw))


def print_table(rec: Recorder) -> None:
    base = next((r.get("median_ms") for r in rec.rows if r["variant"] == "diffusers"), None)
    print(f"\n{rec.meta['model']} {rec.meta['device_name']} {rec.meta['dtype']}")
    print(f"{'variant':70s} {'median ms':>10s} {'vs diffusers':>12s} {'peak GiB':>9s} {'syncs':>6s} {'max diff':>9s}")
    for r in rec.rows:
        if "median_ms" not in r:
            print(f"{r['variant']:70s} {r.get('error') or r.get('skipped')}")
            continue
        ratio = f"{base / r['median_ms']:.3f}x" if base else ""
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else ""
        syncs = "" if r.get("host_syncs") is None else str(r["host_syncs"])
        diff = f"{r['max_abs_diff_vs_moe_ep_eager']:.2e}" if "max_abs_diff_vs_moe_ep_eager" in r else ""
        print(f"{r['variant']:70s} {r['median_ms']:10.2f} {ratio:>12s} {peak:>9s} {syncs:>6s} {diff:>9s}")
    for r in rec.accuracy:
        val = f"{r['rel_err_vs_fp32']:.3e}" if "rel_err_vs_fp32" in r else r.get("error")
        print(f"accuracy ({r['layers']} layers) {r['variant']:50s} {val}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="hidream", choices=sorted(MODELS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bf16 (fp32 with --small)")
    p.add_argument("--small", action="store_true", help="tiny configs (CPU), same code path")
    p.add_argument("--batch", type=int, default=None, help="default: 2 (HiDream), 1 (NucleusMoE)")
    p.add_argument("--latent-side", type=int, default=None, help="latent height = width (default 128: 1024 px)")
    p.add_argument("--text-tokens", type=int, default=None, help="default 128 (5 with --small)")
    p.add_argument("--layers", type=int, default=None, help="blocks of the speed model (default: the config's)")
    p.add_argument("--accuracy-layers", type=int, default=None, help="blocks of the accuracy model (default 6; 3 small)")
    p.add_argument("--options", default="compile",
                   help="comma list: 'compile' (the compiled-blocks rows), 'batch_invariant' (rows with every MoE "
                        "layer on the batch-invariant path); '' neither")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--reps", type=int, default=None, help="timed forwards per row (default 10; 3 small)")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (1 small)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the speed rows left after this many seconds")
    p.add_argument("--out", default=None, help="write meta, rows and accuracy as JSON here")
    a = p.parse_args(argv)
    a.options = {o.strip() for o in a.options.split(",") if o.strip()}
    if a.options - OPTIONS:
        p.error(f"--options {sorted(a.options - OPTIONS)}: allowed {sorted(OPTIONS)}")
    a.dtype = a.dtype or ("float32" if a.small else "bfloat16")
    a.batch = a.batch or (2 if a.model == "hidream" else 1)
    a.latent_side = a.latent_side or (8 if a.small else 128)
    a.text_tokens = a.text_tokens or (5 if a.small else 128)
    a.accuracy_layers = a.accuracy_layers or (3 if a.small else 6)
    a.reps = a.reps or (3 if a.small else 10)
    a.warmup = a.warmup or (1 if a.small else 3)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --small)")
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    meta = {"model": a.model, "device_name": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
            "dtype": a.dtype, "batch": a.batch, "latent_side": a.latent_side, "text_tokens": a.text_tokens,
            "torch": torch.__version__, "argv": sys.argv[1:] if argv is None else list(argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import diffusers
        meta["diffusers"] = diffusers.__version__
    except ImportError:
        p.error("diffusers is not installed")
    rec = Recorder(a, meta)
    attn = speed_phase(rec, a, device, dtype)
    if not a.no_accuracy:
        accuracy_phase(rec, a, device, dtype, attn)
    rec.save()
    print_table(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
