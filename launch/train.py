"""Train the built-in MoE-DiT on the procedural shapes data set (moe_ep/demo/shapes.py).

    python launch/train.py --config configs/quickstart.json --out runs/shapes [--steps 8000 --batch 256]

One process, on the GPU when there is one (bf16 autocast), else the CPU (float32).
- model: the `model` section of --config (its `checkpoint` is ignored), built as MoEDiT at EP = 1;
  each MoELayer is swapped for moe_ep/demo/train_moe.py's TrainMoE (same parameters, autograd)
  and swapped back before saving, so the file is moe-ep's checkpoint format (moe_ep/models/moedit/checkpoint.py).
- loss: flow matching in the sampler's convention (moe_ep/models/moedit/sampler.py): x_t = (1 - t) x0 + t noise,
  t ~ U(0, 1), target velocity v = noise - x0, MSE; plus `--aux-coef` x the mean over MoE layers of
  the Switch load-balancing term (1.0 when balanced). The built-in text encoder is trained jointly.
- prompt dropout: a `--dropout` fraction of examples get the empty prompt "" (the sampler's default
  negative prompt), so classifier-free guidance has an unconditional model to push away from.
- AdamW, linear warm-up then cosine decay over the run's progress = max(step / steps, time / budget),
  so a `--time-budget-s` run ends on schedule; EMA of the weights (the EMA weights are saved).
- DiT's training init: adaLN modulations and the final projection start at zero (each block an identity).

Writes OUT/shapes_demo.safetensors and OUT/train_log.json (loss curve, per-expert routing counts,
timings, device, command line).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moe_ep import config as config_mod  # noqa: E402
from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.config import ConfigError  # noqa: E402
from moe_ep.demo import shapes  # noqa: E402
from moe_ep.demo.train_moe import swap_in, swap_out  # noqa: E402
from moe_ep.models.moedit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from moe_ep.models.moedit.dit import MoEDiT  # noqa: E402
from moe_ep.models.moedit.text import BuiltinTextEncoder  # noqa: E402
from moe_ep.parallel import ParallelContext  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/quickstart.json", help="its `model` section is the architecture")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="model.KEY=VALUE",
                   help="override the config's model fields (e.g. model.qk_norm=true)")
    p.add_argument("--out", required=True, help="output folder (checkpoint, train_log.json)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--dropout", type=float, default=0.1, help="fraction of examples trained with the empty prompt")
    p.add_argument("--aux-coef", type=float, default=0.003, help="load-balancing loss weight (DeepSeek-V2's expert-level 0.003)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--time-budget-s", type=float, default=0.0, help="stop on schedule after this long (0: no limit)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default=None, help="start from this moe-ep checkpoint (fine-tuning) instead of the seed")
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.dropout < 1.0:
        p.error("--dropout must be in [0, 1)")
    if not 0.0 <= args.ema < 1.0:
        p.error("--ema must be in [0, 1)")
    return args


def model_config(path: str, overrides=()):
    """The `model` section of a moe-ep config, checkpoint dropped; checked for what training needs."""
    cfg = config_mod.load(path, list(overrides)).model
    cfg.checkpoint = None
    if cfg.type != "moe_dit" or cfg.text_encoder != "builtin":
        raise ConfigError("model.type", cfg.type, "training needs the built-in moe_dit with the builtin text encoder")
    if cfg.in_channels != shapes.LATENT_CHANNELS or cfg.vae_scale_factor != 1:
        raise ConfigError("model.in_channels", cfg.in_channels, f"the shapes data set has {shapes.LATENT_CHANNELS} "
                          "latent channels at vae_scale_factor 1")
    if cfg.dtype != "float32":
        raise ConfigError("model.dtype", cfg.dtype, "training keeps float32 weights (bf16 only under autocast)")
    longest = max(len(p.encode()) for p in shapes.all_prompts()) + 1
    if cfg.max_prompt_tokens < longest:
        raise ConfigError("model.max_prompt_tokens", cfg.max_prompt_tokens, f"must be >= {longest} (BOS + the longest prompt)")
    return cfg


@torch.no_grad()
def training_init(model: MoEDiT) -> None:
    """Seeded init, then DiT's zero init of the adaLN modulations and the final projection."""
    model.init_from_seed()
    for block in list(model.blocks) + [model.final_layer]:
        block.adaLN_modulation[-1].weight.zero_()
        block.adaLN_modulation[-1].bias.zero_()
    model.final_layer.linear.weight.zero_()
    model.final_layer.linear.bias.zero_()


def lr_factor(progress: float, step: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0.05 over progress in [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(args) -> dict:
    cfg = model_config(args.config, args.set)
    dev = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    torch.manual_seed(args.seed)
    model = MoEDiT(cfg, ParallelContext(device=dev))
    if args.init_from:
        load_checkpoint(model, args.init_from)
    else:
        training_init(model)
    moes = swap_in(model)
    model.train()
    params = [p for p in model.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99),
                            fused=dev.type == "cuda")
    ema = [p.detach().clone() for p in params]
    amp = dev.type == "cuda"
    table = shapes.all_prompts() + [""]                     # 42 prompts, then the empty prompt (index 42)
    empty = len(table) - 1
    combos = len(shapes.BACKGROUNDS), len(shapes.SHAPES)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    encode_text = BuiltinTextEncoder.forward.__wrapped__   # the encoder's forward without its no_grad
    dit_forward = MoEDiT.forward.__wrapped__

    log = {"args": vars(args), "argv": sys.argv, "device": torch.cuda.get_device_name(dev) if amp else platform.processor() or "cpu",
           "torch": torch.__version__, "params": sum(p.numel() for p in params), "steps": [],
           "expert_counts": []}
    t0 = time.perf_counter()
    step = 0
    window = {"loss": 0.0, "aux": 0.0, "n": 0}
    counts = torch.zeros(len(moes), cfg.moe.num_experts, device=dev)          # [L, E] copies since last log
    while True:
        elapsed = time.perf_counter() - t0
        progress = max(step / args.steps, elapsed / args.time_budget_s if args.time_budget_s > 0 else 0.0)
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(progress, step, args.warmup)
        idx, images = shapes.sample_batch(args.batch, gen)                     # [B, 3], [B, 32, 32, 3]
        x0 = shapes.encode(images)                                             # [B, 4, 32, 32]
        pid = idx[:, 0] * (combos[0] * combos[1]) + idx[:, 1] * combos[0] + idx[:, 2]   # [B] index into table
        drop = torch.rand(args.batch, generator=gen, device=dev) < args.dropout
        pid = torch.where(drop, torch.full_like(pid, empty), pid)
        t = torch.rand(args.batch, generator=gen, device=dev)                  # [B]
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        target = noise - x0
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            emb, mask = encode_text(model.text_encoder, table)                 # [43, T, D], [43, T]
            v = dit_forward(model, xt, t, emb[pid], mask[pid])                 # [B, 4, 32, 32]
        flow = F.mse_loss(v.float(), target)
        aux = torch.stack([m.aux_loss for m in moes]).mean()
        loss = flow + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - min(args.ema, (1 + step) / (10 + step)))
            counts += torch.stack([m.counts.float() for m in moes])
        window["loss"] += flow.detach()
        window["aux"] += aux.detach()
        window["n"] += 1
        step += 1
        if step % args.log_every == 0 or step == 1:
            n = window["n"]
            rec = {"step": step, "time_s": time.perf_counter() - t0, "loss": float(window["loss"]) / n,
                   "aux": float(window["aux"]) / n, "lr": opt.param_groups[0]["lr"]}
            c = counts / counts.sum(1, keepdim=True)
            rec["max_over_mean"] = (c.max(1).values * c.shape[1]).tolist()     # per layer
            log["steps"].append(rec)
            log["expert_counts"].append({"step": step, "counts": counts.tolist()})
            print(json.dumps(rec), flush=True)
            window = {"loss": 0.0, "aux": 0.0, "n": 0}
            counts.zero_()
    log["train_s"] = time.perf_counter() - t0
    log["num_steps"] = step
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    swap_out(model)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "shapes_demo.safetensors")
    save_checkpoint(model, path)
    log["checkpoint"] = path
    log["checkpoint_bytes"] = os.path.getsize(path)
    write_json_atomic(os.path.join(args.out, "train_log.json"), log, indent=None)
    print(f"trained {step} steps in {log['train_s']:.0f} s on {log['device']}; wrote {path} "
          f"({log['checkpoint_bytes'] / 1e6:.1f} MB)", flush=True)
    return log


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
