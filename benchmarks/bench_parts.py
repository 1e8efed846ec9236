"""Where one forward of a whole diffusers MoE transformer spends its time on one GPU: attention,
MoE layers (router + experts + combine; the EP exchange is nil at EP = 1), and the rest (dense
projections, norms, modulation, embedders), after `wrap_transformer` at EP = 1.

    # one GPU, bf16, HiDream-I1 at 1024 x 1024 (docs/benchmarks.md 1j)
    python benchmarks/bench_parts.py --model hidream --out parts.json
    # CPU: the same code path on a tiny config
    python benchmarks/bench_parts.py --model hidream --small --device cpu

Each part is timed with CUDA events (wall clock on the CPU) around the forward of its modules:
every diffusers attention module (class name ending in "Attention") and every moe-ep MoE block
(`EPMoEBlock`). "rest" is the whole forward minus those. The events themselves cost a little, so the
whole forward is also timed without them; the parts are shares of the timed forward.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_transformer import build, make_inputs, real_config, small_config, timed  # noqa: E402
from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.config import ParallelConfig  # noqa: E402
from moe_ep.models.diffusers.wrap import EPMoEBlock, wrap_transformer  # noqa: E402
from moe_ep.parallel import build_context  # noqa: E402


class PartClock:
    """Start/stop marks around the forwards of a set of modules, summed per part and per forward."""

    def __init__(self, device: torch.device):
        self.device, self.marks, self.handles = device, {}, []

    def _now(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def watch(self, part: str, module: torch.nn.Module) -> None:
        def pre(mod, args):
            self.marks.setdefault(part, []).append([self._now(), None])

        def post(mod, args, out):
            self.marks[part][-1][1] = self._now()
        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def reset(self) -> None:
        self.marks = {}

    def totals_ms(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            span = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            span = lambda a, b: (b - a) * 1e3  # noqa: E731
        return {part: sum(span(a, b) for a, b in marks) for part, marks in self.marks.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="hidream", choices=["hidream", "nucleus"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny config (CPU), same code path")
    p.add_argument("--reps", type=int, default=None, help="forwards per figure (default 10; 3 small)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --small)")
    device = torch.device(a.device)
    dtype = torch.float32 if a.small else torch.bfloat16
    reps = a.reps or (3 if a.small else 10)
    side, text = (8, 5) if a.small else (128, 128)
    batch = 2 if a.model == "hidream" else 1
    model = build(a.model, small_config(a.model) if a.small else real_config(a.model), device, dtype, seed=0)
    wrap_transformer(model, build_context(ParallelConfig(device=device.type), 0, 1, device))   # EP = 1, in place
    kw = make_inputs(a.model, model, batch, side, text, device, dtype, seed=1)
    with torch.no_grad():
        plain_ms = statistics.median(timed(lambda: model(**kw), device, reps, warmup=2))
        clock = PartClock(device)
        for name, mod in model.named_modules():
            if isinstance(mod, EPMoEBlock):
                clock.watch("moe", mod)
            elif type(mod).__name__.endswith("Attention"):
                clock.watch("attention", mod)
        rows = []
        for _ in range(reps + 1):
            clock.reset()
            total = timed(lambda: model(**kw), device, 1, warmup=0)[0]
            rows.append({"total": total, **clock.totals_ms()})
        clock.remove()
    rows = rows[1:]                                                  # the first forward warms the hooks
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in ("total", "attention", "moe")}
    med["rest"] = med["total"] - med["attention"] - med["moe"]
    result = {"model": a.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": str(dtype).split(".")[-1], "batch": batch, "latent_side": side, "text_tokens": text,
              "forward_ms_without_marks": plain_ms, "median_ms": med,
              "share": {k: med[k] / med["total"] for k in ("attention", "moe", "rest")},
              "exchange_ms": 0.0, "note": "EP = 1 on one GPU: no exchange", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"{a.model}: forward {plain_ms:.2f} ms (without marks); with marks {med['total']:.2f} ms = "
          f"attention {med['attention']:.2f} + MoE {med['moe']:.2f} + rest {med['rest']:.2f} ms "
          f"({100 * result['share']['attention']:.0f}% / {100 * result['share']['moe']:.0f}% / "
          f"{100 * result['share']['rest']:.0f}%); exchange 0 at EP = 1", flush=True)
    if a.out:
        write_json_atomic(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
