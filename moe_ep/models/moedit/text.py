"""Prompt encoders: a small built-in byte-level encoder, or the user's own (`module:function`).

No pretrained text encoder can be downloaded here, so the built-in one is a seeded toy:
UTF-8 bytes -> learned embedding table + learned positions -> two pre-norm transformer
layers -> LayerNorm. Its weights are part of the model (initialised from `model.seed`,
stored in checkpoints). Any encoder returns `(tokens [B, T, text_dim], mask [B, T] bool)`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import ConfigError, ModelConfig
from ...paths import import_function

BOS, PAD = 256, 257
VOCAB = 258  # 256 byte values + BOS + PAD


def tokenize(prompts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> (ids [B, T] int64, mask [B, T] bool). BOS first, bytes truncated to fit."""
    ids = torch.full((len(prompts), max_tokens), PAD, dtype=torch.int64)       # [B, T]
    mask = torch.zeros(len(prompts), max_tokens, dtype=torch.bool)             # [B, T]
    for i, text in enumerate(prompts):
        toks = [BOS] + list(text.encode("utf-8"))[: max_tokens - 1]
        ids[i, : len(toks)] = torch.tensor(toks)
        mask[i, : len(toks)] = True
    return ids, mask


def heads_for(dim: int) -> int:
    return next(h for h in (8, 4, 2, 1) if dim % h == 0 and dim // h >= 8) if dim >= 8 else 1


class TextBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)      # [B, heads, T, d]
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class BuiltinTextEncoder(nn.Module):
    """Byte tokens -> [B, max_prompt_tokens, text_dim]. Weights come from the model's seed."""

    def __init__(self, text_dim: int, max_tokens: int, num_layers: int = 2):
        super().__init__()
        self.max_tokens = max_tokens
        self.embed = nn.Embedding(VOCAB, text_dim)
        self.pos = nn.Parameter(torch.zeros(max_tokens, text_dim))
        self.blocks = nn.ModuleList(TextBlock(text_dim, heads_for(text_dim)) for _ in range(num_layers))
        self.norm = nn.LayerNorm(text_dim)
        # True: one prompt at a time, so a prompt's embedding does not depend on the others
        # (model.moe.batch_invariant; MoEDiT sets it)
        self.batch_invariant = False

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_invariant and len(prompts) > 1:
            embs, masks = zip(*(self.forward([p]) for p in prompts))
            return torch.cat(embs), torch.cat(masks)                           # [B, T, D], [B, T]
        dev = self.pos.device
        ids, mask = tokenize(prompts, self.max_tokens)
        ids, mask = ids.to(dev), mask.to(dev)
        x = self.embed(ids) + self.pos                                          # [B, T, D]
        attn_mask = mask[:, None, None, :]                                      # [B, 1, 1, T] keys
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x), mask


def load_user_encoder(spec: str) -> Callable:
    """'package.module:function' -> the function; raises ConfigError naming model.text_encoder."""
    return import_function("model.text_encoder", spec)


class PromptEncoder:
    """Calls the configured encoder and checks what it returns.

    A user encoder is called as `fn(prompts, max_tokens=..., text_dim=..., device=...)` and
    returns `[B, T, text_dim]` embeddings, or `(embeddings, mask [B, T] bool)` when some of
    the T tokens are padding (T <= max_tokens; missing mask: all tokens valid).
    """

    def __init__(self, cfg: ModelConfig, builtin: "BuiltinTextEncoder | None", device: torch.device,
                 dtype: torch.dtype):
        self.cfg, self.builtin, self.device, self.dtype = cfg, builtin, device, dtype
        self.user_fn = None if cfg.text_encoder == "builtin" else load_user_encoder(cfg.text_encoder)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (emb [B, T, text_dim] in the model dtype, mask [B, T] bool) on the device."""
        if self.user_fn is None:
            emb, mask = self.builtin(prompts)
        else:
            out = self.user_fn(list(prompts), max_tokens=self.cfg.max_prompt_tokens, text_dim=self.cfg.text_dim,
                               device=self.device)
            emb, mask = out if isinstance(out, tuple) else (out, None)
            if not torch.is_tensor(emb) or emb.dim() != 3 or emb.shape[0] != len(prompts) \
                    or emb.shape[2] != self.cfg.text_dim:
                got = tuple(emb.shape) if torch.is_tensor(emb) else type(emb).__name__
                raise ConfigError("model.text_encoder", self.cfg.text_encoder,
                                  f"must return [batch={len(prompts)}, tokens, text_dim={self.cfg.text_dim}] "
                                  f"embeddings, got {got}")
            if mask is None:
                mask = torch.ones(emb.shape[:2], dtype=torch.bool)
            emb, mask = emb.to(self.device), mask.to(self.device, torch.bool)
        return emb.to(self.dtype), mask
