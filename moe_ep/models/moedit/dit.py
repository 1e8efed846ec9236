"""The MoE diffusion transformer (DiT with cross-attention to the prompt and MoE feed-forwards).

    latents [B, C, h, w] --patchify--> tokens [B, N, H] (+ fixed 2D sin-cos positions)
    c = MLP(sinusoidal(t)) + Linear(pooled prompt)                        [B, H]
    block:  x += gate1 * SelfAttn(modulate(LN(x), shift1, scale1))        adaLN from c
            x += CrossAttn(LN(x), prompt tokens)
            x += gate2 * FFN(modulate(LN(x), shift2, scale2))             FFN = MoELayer or dense SwiGLU
    final:  Linear(modulate(LN(x), shift, scale)) --unpatchify--> velocity [B, C, h, w]

Every `moe_every`-th block (the last of each group of `moe_every`) has an MoE feed-forward.
The MoE layer sees its input as [B, N, H] (rows batch-major), so with classifier-free
guidance the conditional half (samples first) is the first `B_cond*N` rows. Under cfg / sequence
parallelism (image_split.py) a rank's MoE layers see its guidance chunk and token shard,
[B/cfg, N/sp, H], and self-attention spans the sp ranks' shards.

Initialisation is deterministic and independent of the world and EP sizes: the
non-expert weights are drawn from one CPU `torch.Generator(model.seed)` in module order
(then cast and moved); expert weights come from `init_expert_weights(seed, moe_layer, expert)`
for the experts this rank's slots hold. adaLN is NOT zero-initialised (DiT does that for
training); with random weights that would make every block an identity and the images trivial.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...batch_invariant import resolve as resolve_batch_invariant
from ...config import ModelConfig
from ...experts import DenseMLP, GroupedExperts, init_expert_weights
from ...layer import MoELayer
from ...parallel import ParallelContext
from ...timing import PhaseTimer, maybe_phase
from .image_split import ImageSplit
from .text import BuiltinTextEncoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# layer_idx -> (expert -> (w13 [H, 2F], w2 [F, H])): where a layer's expert weights come from
LayerWeightSource = Callable[[int], Callable[[int], tuple[torch.Tensor, torch.Tensor]]]


def per_sample(fn: Callable, *tensors: torch.Tensor):
    """Batch invariance of the dense parts (model.moe.batch_invariant): fn on each sample alone (a
    batch of one: tensors[j][i:i+1]), the outputs (a tensor or a tuple of them) concatenated along
    dim 0. Every op of a sample then sees the same shapes and values whatever else is in the batch
    (GEMM blocking, SDPA's splits, vectorised loops' tails), so its result has the same bits."""
    B = tensors[0].shape[0]
    if B <= 1:
        return fn(*tensors)
    outs = [fn(*(x[i:i + 1] for x in tensors)) for i in range(B)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim: int, gh: int, gw: int) -> torch.Tensor:
    """Fixed 2D sin-cos positions (as in DiT/MAE): [gh*gw, dim], float32."""
    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.flatten().double()[:, None] * omega[None]                  # [M, d/2]
        return torch.cat([out.sin(), out.cos()], dim=1)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    half = dim // 2
    emb = torch.cat([one_axis(half - half % 2, ys), one_axis(dim - half - (dim - half) % 2, xs)], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()                       # [N, dim]


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000*t -> MLP -> [B, H]."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]                      # [B, half]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)          # [B, freq_dim]
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head attention with SDPA; self-attention when `context` is None.
    `qk_norm`: RMSNorm of each head's queries and keys (SD3 / Flux), which keeps the attention
    logits bounded; without it training at a useful learning rate diverges (docs/demo.md)."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool = False):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        d = hidden // heads
        self.q_norm = nn.RMSNorm(d, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(d, eps=1e-6) if qk_norm else None

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                key_mask: Optional[torch.Tensor] = None, split: Optional[ImageSplit] = None) -> torch.Tensor:
        """`split`: self-attention over an image whose tokens are sharded over the sp ranks (x is
        this rank's shard [B, N/sp, H]); None: every key is in x / context."""
        B, N, H = x.shape
        ctx = x if context is None else context
        d = H // self.heads
        q = self.q(x).view(B, N, self.heads, d).transpose(1, 2)                 # [B, h, N, d]
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, d).permute(2, 0, 3, 1, 4)  # [B, h, M, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if split is not None:                                                  # self-attention, sp shards
            out = split.self_attention(q, k, v)                                # [B, h, N, d]
        else:
            mask = None if key_mask is None else key_mask[:, None, None, :]    # [B, 1, 1, M]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)      # [B, h, N, d]
        return self.proj(out.transpose(1, 2).reshape(B, N, H))


class DiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, moe_layer_idx: Optional[int],
                 num_redundant: int, dtype: torch.dtype):
        super().__init__()
        H = cfg.hidden_size
        self.norm1 = nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(H, cfg.num_heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(H, eps=1e-6)
        self.cross_attn = Attention(H, cfg.num_heads, cfg.qk_norm)
        self.norm3 = nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
        if moe_layer_idx is None:
            self.ffn = DenseMLP(H, cfg.dense_hidden_size)
        else:
            self.ffn = MoELayer(H, cfg.moe, ctx, num_redundant=num_redundant, layer_idx=moe_layer_idx, dtype=dtype)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(H, 6 * H))
        self.timer: Optional[PhaseTimer] = None   # set by telemetry: times the "attention" phase
        # self-attention over the sp shards of one image (None at sp = 1: plain SDPA)
        self.split = ImageSplit(ctx.layout) if ctx.layout.sp > 1 else None
        # True: everything but the feed-forward runs sample by sample (per_sample; MoEDiT sets it)
        self.batch_invariant = False

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            x, h, gate2 = per_sample(self.before_ffn, x, c, text, text_mask)
        else:
            x, h, gate2 = self.before_ffn(x, c, text, text_mask)
        # elementwise * and + only over the whole batch: the same bits wherever a sample sits
        return x + gate2.unsqueeze(1) * self.ffn(h)                            # MoE sees [B, N, H]

    def before_ffn(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        """-> (x after the attentions [B, N, H], the feed-forward's input h [B, N, H], gate2 [B, H])."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # [B, H] each
        with maybe_phase(self.timer, "attention"):                             # self- and cross-attention
            x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), split=self.split)
            x = x + self.cross_attn(self.norm2(x), text, text_mask)           # text replicated: local
        return x, modulate(self.norm3(x), shift2, scale2), gate2


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class MoEDiT(nn.Module):
    """The MoE diffusion transformer. Build with `MoEDiT(cfg, ctx, num_redundant)`, then
    `init_from_seed()` or `checkpoint.load_checkpoint(model, path)`."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, num_redundant: int = 0):
        super().__init__()
        self.cfg, self.ctx, self.num_redundant = cfg, ctx, num_redundant
        self.dtype = DTYPES[cfg.dtype]
        H, C, p = cfg.hidden_size, cfg.in_channels, cfg.patch_size
        self.text_encoder = (BuiltinTextEncoder(cfg.text_dim, cfg.max_prompt_tokens)
                             if cfg.text_encoder == "builtin" else None)
        self.x_embedder = nn.Conv2d(C, H, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(H)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, H), nn.SiLU(), nn.Linear(H, H))
        self.pooled_proj = nn.Linear(cfg.text_dim, H)
        blocks, moe_idx = [], 0
        for i in range(cfg.num_layers):
            is_moe = (i + 1) % cfg.moe_every == 0
            blocks.append(DiTBlock(cfg, ctx, moe_idx if is_moe else None, num_redundant, self.dtype))
            moe_idx += int(is_moe)
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(H, p, C)
        # MoELayer puts its own parameters on ctx.device in the model dtype; the rest follows.
        self.to(device=ctx.device, dtype=self.dtype)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        self.split = ImageSplit(ctx.layout)   # this rank's guidance chunk and token shard of one image
        self.batch_invariant = resolve_batch_invariant(cfg.moe.batch_invariant, ctx.device)

    @property
    def batch_invariant(self) -> bool:
        """True: a sample's output does not depend on the other samples of its batch, bit for bit
        (model.moe.batch_invariant): the MoE layers' fixed row blocks (moe_ep/batch_invariant.py),
        the dense feed-forwards' too, and every other part run sample by sample (per_sample)."""
        return self._batch_invariant

    @batch_invariant.setter
    def batch_invariant(self, on: bool) -> None:
        self._batch_invariant = on
        for block in self.blocks:
            block.batch_invariant = on
            block.ffn.batch_invariant = on             # MoELayer or DenseMLP
        if self.text_encoder is not None:
            self.text_encoder.batch_invariant = on

    # ------------------------------------------------------------ structure
    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in order; `layer_idx` is the index in this list."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def non_expert_state(self) -> dict[str, torch.Tensor]:
        """Every weight except the expert slots (replicated on every rank), by name."""
        return {k: v for k, v in self.state_dict().items() if ".experts.w" not in k}

    # ------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_from_seed(self, seed: Optional[int] = None, expert_device: Optional[torch.device] = None) -> None:
        """Deterministic weights from `model.seed`, the same on every rank and for every EP size.
        `expert_device` draws expert weights with that device's generator (fast on a GPU, values
        differ from the CPU draw; benchmarks use it)."""
        seed = self.cfg.seed if seed is None else seed
        g = torch.Generator().manual_seed(seed)
        for module in self.modules():                      # registration order: fixed
            if isinstance(module, GroupedExperts):
                continue
            for name, param in module.named_parameters(recurse=False):
                param.copy_(_init_value(module, name, param, g).to(param.dtype))
        self.load_experts(lambda layer: lambda e: init_expert_weights(
            seed, layer, e, self.cfg.hidden_size, self.cfg.moe.expert_hidden_size, self.dtype, expert_device))

    def load_experts(self, source: LayerWeightSource) -> None:
        """Fill every MoE layer's local slots: `source(layer_idx)(expert) -> (w13, w2)`."""
        for layer in self.moe_layers():
            layer.load_expert_weights(source(layer.layer_idx))

    # ------------------------------------------------------------ forward
    def pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        if (gh, gw) not in self._pos_cache:
            self._pos_cache[(gh, gw)] = sincos_pos_embed(self.cfg.hidden_size, gh, gw).to(self.ctx.device, self.dtype)
        return self._pos_cache[(gh, gw)]

    def unpatchify(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, gh*p, gw*p]."""
        p, C = self.cfg.patch_size, self.cfg.in_channels
        x = x.view(x.shape[0], gh, gw, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, gh * p, gw * p)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """x [B, C, h, w], t [B] in [0, 1] (1 = noise), text [B, T, text_dim], text_mask [B, T] bool
        -> velocity [B, C, h, w] (noise - data direction).

        Under cfg / sp parallelism (self.split, image_split.py) every rank of the image's group
        passes the same whole batch and gets the same whole output; in between, this rank runs
        its cfg chunk b = B / cfg of the batch and its sp shard of the tokens."""
        split = self.split
        x, t, text, text_mask = split.split_batch(x, t, text, text_mask)          # [b, ...]: my branch
        _, _, h, w = x.shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        run = per_sample if self.batch_invariant else (lambda fn, *args: fn(*args))
        tokens, c, ctx_tokens = run(self.embed, x, t, text, text_mask)           # [b, N, H], [b, H], [b, T, H]
        tokens = split.shard_tokens(tokens)                                      # [b, N/sp, H]: my shard
        for block in self.blocks:
            tokens = block(tokens, c, ctx_tokens, text_mask)
        out = split.unshard_tokens(run(self.final_layer, tokens, c))             # [b, N, p*p*C]
        return split.join_batch(self.unpatchify(out, gh, gw))                    # [B, C, h, w]

    def embed(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor):
        """-> (image tokens with positions [B, N, H], conditioning c [B, H], prompt tokens [B, T, H])."""
        gh, gw = x.shape[2] // self.cfg.patch_size, x.shape[3] // self.cfg.patch_size
        tokens = self.x_embedder(x.to(self.dtype)).flatten(2).transpose(1, 2)   # [B, N, H]
        mask_f = text_mask.to(text.dtype).unsqueeze(-1)                          # [B, T, 1]
        pooled = (text * mask_f).sum(1) / mask_f.sum(1).clamp_min(1)             # [B, text_dim]
        c = self.t_embedder(t) + self.pooled_proj(pooled)                        # [B, H]
        return tokens + self.pos_embed(gh, gw), c, self.text_proj(text)


def _init_value(module: nn.Module, name: str, param: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The seeded initial value of one non-expert parameter (float32, CPU)."""
    shape = tuple(param.shape)
    if name == "bias" or (isinstance(module, nn.LayerNorm) and name == "bias"):
        return torch.zeros(shape)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return torch.ones(shape)
    if isinstance(module, nn.Embedding):
        return torch.randn(shape, generator=g)
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=g) * fan_in ** -0.5
    if isinstance(module, DenseMLP):  # dense feed-forward and shared experts: w13 [H, 2F], w2 [F, H]
        return torch.randn(shape, generator=g) * shape[0] ** -0.5
    return torch.randn(shape, generator=g) * 0.1  # learned positions and other free parameters
