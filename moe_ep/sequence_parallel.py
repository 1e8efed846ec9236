"""Sequence-parallel attention: one image's tokens split over the sp ranks of a ParallelLayout.

Each sample's N image tokens are cut into sp contiguous shards in sp-rank order (sp rank
= ring_i * ulysses + ulysses_i, `layout.index("sp")`). Attention over them:

- Ulysses (DeepSpeed-Ulysses): an all-to-all over the ulysses group trades "my tokens, all
  heads" for "the group's tokens, my heads", attention runs locally, and a second all-to-all
  trades back. Heads must divide by the Ulysses degree.
- Ring (ring attention): each ring rank keeps its queries and passes its key/value block to
  the next ring rank, R steps; the partial results are merged with their log-sum-exp
  (online softmax). P2P send/recv, overlapped with the block's compute.
- USP (unified sequence parallelism): Ulysses inside ring. After the Ulysses all-to-all a rank
  holds the tokens of its whole ring block (its Ulysses group's shards, which are consecutive)
  for its head slice; the ring then runs over the ring group with those.

Joint attention (HiDream, NucleusMoE): text tokens, replicated on every sp rank, are queries
and keys together with the image tokens. Text keys/values take part once, as their own block
(never once per ring step); text queries use this rank's head slice and their output is
all-gathered over the ulysses group's heads. The text output's partial results are merged in
one fixed order (text block, then ring blocks 0..R-1), so it is bitwise the same on every sp
rank, as the replicated text stream must stay.

Tensors are laid out as SDPA's [B, heads, tokens, head_dim]. Inference only: the collectives
are not differentiable. The model-facing wiring (which tensors are sharded where) is phase 2.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from .config import ConfigError
from .parallel_layout import ParallelLayout


# ---------------------------------------------------------------- checks

def check_heads(num_heads: int, layout: ParallelLayout) -> None:
    """Ulysses splits the heads: ConfigError naming parallel.ulysses_degree unless it divides them."""
    if num_heads % layout.ulysses:
        raise ConfigError("parallel.ulysses_degree", layout.ulysses,
                          f"must divide the model's attention heads ({num_heads})")


def check_tokens(num_tokens: int, layout: ParallelLayout) -> None:
    """Every sp rank gets an equal shard: ConfigError naming the key that set the sp size
    (layout.sp_key(): sequence_parallel_size, or the degree the user gave) unless it divides the
    image tokens of a sample (no padding)."""
    if num_tokens % layout.sp:
        name, value = layout.sp_key()
        raise ConfigError(name, value, f"sequence parallel size {layout.sp} (ulysses {layout.ulysses} x ring "
                                       f"{layout.ring}) must divide the image tokens per sample ({num_tokens}; "
                                       f"height/width and patch size set them)")


# ---------------------------------------------------------------- sharding a sequence

def shard_sequence(x: torch.Tensor, layout: ParallelLayout, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous shard of `x` along `dim` (e.g. [B, N, C] -> [B, N/sp, C]),
    shard i for sp rank i. Every sp rank must hold the same full `x`."""
    check_tokens(x.shape[dim], layout)
    return x.chunk(layout.sp, dim=dim)[layout.index("sp")].contiguous()


def unshard_sequence(x: torch.Tensor, layout: ParallelLayout, dim: int = 1) -> torch.Tensor:
    """The full sequence from every sp rank's shard (all-gather along `dim`, in sp-rank order):
    [B, N/sp, C] -> [B, N, C] on every sp rank. Collective over the sp group."""
    if layout.sp == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(layout.sp)]
    tdist.all_gather(parts, x, group=layout.group("sp"))
    return torch.cat(parts, dim=dim)


# ---------------------------------------------------------------- Ulysses all-to-all

def _seq_to_heads(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """[B, H, n, D] (my tokens, all heads) -> [B, H/U, U*n, D] (the ulysses group's tokens in
    ulysses-rank order, my head slice)."""
    U = layout.ulysses
    if U == 1:
        return x
    B, H, n, D = x.shape
    send = x.reshape(B, U, H // U, n, D).transpose(0, 1).contiguous()      # [U dest, B, H/U, n, D]
    recv = torch.empty_like(send)                                           # [U source, B, H/U, n, D]
    tdist.all_to_all_single(recv, send, group=layout.group("ulysses"))
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // U, U * n, D)


def _heads_to_seq(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Inverse of _seq_to_heads: [B, H/U, U*n, D] -> [B, H, n, D]."""
    U = layout.ulysses
    if U == 1:
        return x
    B, h, Un, D = x.shape
    send = x.reshape(B, h, U, Un // U, D).permute(2, 0, 1, 3, 4).contiguous()  # [U dest, B, H/U, n, D]
    recv = torch.empty_like(send)                                               # [U source head slice, ...]
    tdist.all_to_all_single(recv, send, group=layout.group("ulysses"))
    return recv.transpose(0, 1).reshape(B, U * h, Un // U, D)


def _head_slice(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """This rank's heads of a replicated [B, H, T, D] tensor (the slice _seq_to_heads gives it)."""
    if layout.ulysses == 1:
        return x
    h = x.shape[1] // layout.ulysses
    i = layout.index("ulysses")
    return x[:, i * h:(i + 1) * h]


def _gather_heads(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """[B, H/U, T, D] per ulysses rank -> [B, H, T, D] on each (all-gather, heads in rank order)."""
    if layout.ulysses == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(layout.ulysses)]
    tdist.all_gather(parts, x, group=layout.group("ulysses"))
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------- blocks with log-sum-exp

def attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    key_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over one block of keys, with the block's log-sum-exp, in float32.

    q [B, h, M, D], k/v [B, h, K, D], key_mask [B, K] bool (True: attend) -> out [B, h, M, D]
    (float32, normalised within the block) and lse [B, h, M, 1]. A query with no unmasked key
    in the block gets out 0 and lse -inf, so merging it changes nothing.
    """
    if q.device.type == "cpu" and (key_mask is None or bool(key_mask.any(-1).all())):
        # torch's fused CPU kernel returns the log-sum-exp too: no [B, h, M, K] scores in memory
        # (4-5x faster than the plain form below at 512 keys); every query sees a key, so no -inf rows
        bias = None
        if key_mask is not None:
            B, h, M, K = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            bias = torch.zeros(key_mask.shape, dtype=torch.float32).masked_fill(~key_mask, float("-inf"))
            bias = bias[:, None, None, :].expand(B, h, M, K)                   # [B, h, M, K] view
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.float(), k.float(), v.float(), 0.0, False, attn_mask=bias, scale=scale)
        return out, lse.unsqueeze(-1)                                          # [B, h, M, D], [B, h, M, 1]
    # the plain form (GPU, or a block where some query has no key): explicit float32 scores
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale      # [B, h, M, K]
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)                          # [B, h, M, 1]
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
    return torch.matmul(p, v.float()), lse


def merge_blocks(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys A u B from the results over A and over B (online softmax)."""
    lse = torch.logaddexp(lse_a, lse_b)                                    # [B, h, M, 1]
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)       # both blocks empty: stay 0
    return out_a * torch.exp(lse_a - safe) + out_b * torch.exp(lse_b - safe), lse


# ---------------------------------------------------------------- the ring

def _ring_peers(layout: ParallelLayout) -> tuple[int, int]:
    """Global ranks of the next and previous member of this rank's ring group."""
    ring = layout.members("ring")
    i = layout.index("ring")
    return ring[(i + 1) % len(ring)], ring[(i - 1) % len(ring)]


def _ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ParallelLayout, scale: float,
                    text: Optional[tuple], text_mask: Optional[torch.Tensor]):
    """Ring attention over the ring group. q/k/v [B, h, n, D] are this rank's block; `text`
    (tq, tk, tv) [B, h, T, D] replicated over the ring, or None. -> (image out [B, h, n, D]
    float32, text out [B, h, T, D] float32 or None)."""
    R, me = layout.ring, layout.index("ring")
    nxt, prev = _ring_peers(layout)
    group = layout.group("ring")
    out = lse = None
    text_parts = [None] * R          # text queries' partial per ring block, merged in block order
    if text is not None:
        tq, tk, tv = text
        out, lse = attention_block(q, tk, tv, scale, text_mask)               # text keys: once, here
        if tq is not None:
            text_only = attention_block(tq, tk, tv, scale, text_mask)
    kv = torch.stack([k, v]).contiguous()                                    # [2, B, h, n, D]
    for step in range(R):
        source = (me - step) % R                                              # ring block held now
        if step < R - 1:   # pass this block on while computing with it
            incoming = torch.empty_like(kv)
            reqs = tdist.batch_isend_irecv([tdist.P2POp(tdist.isend, kv, nxt, group),
                                            tdist.P2POp(tdist.irecv, incoming, prev, group)])
        o, l = attention_block(q, kv[0], kv[1], scale)
        out, lse = (o, l) if out is None else merge_blocks(out, lse, o, l)
        if text is not None and tq is not None:
            text_parts[source] = attention_block(tq, kv[0], kv[1], scale)
        if step < R - 1:
            for r in reqs:
                r.wait()
            kv = incoming
    text_out = None
    if text is not None and tq is not None:
        text_out, text_lse = text_only
        for o, l in text_parts:
            text_out, text_lse = merge_blocks(text_out, text_lse, o, l)
    return out, text_out


# ---------------------------------------------------------------- the entry point

def sequence_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ParallelLayout,
                                text_q: Optional[torch.Tensor] = None, text_k: Optional[torch.Tensor] = None,
                                text_v: Optional[torch.Tensor] = None,
                                text_key_mask: Optional[torch.Tensor] = None,
                                scale: Optional[float] = None):
    """Attention of every token over every token of one image split over the sp ranks (USP:
    Ulysses inside ring; Ulysses alone at ring 1, ring alone at ulysses 1).

    q/k/v [B, H, n, D]: this rank's image-token shard (n = N / sp, shard `layout.index("sp")`).
    text_q/text_k/text_v [B, H, T, D]: joint text tokens, the same on every sp rank, or None;
    text_q None with text_k/text_v: text keys only (NucleusMoE: image queries over image and
    text keys, no text queries), text out None.
    text_key_mask [B, T] bool, True where a text key is attended (padding False), or None.
    -> (image out [B, H, n, D], text out [B, H, T, D] or None), in q's dtype; the text output is
    the same on every sp rank. Collective over the sp group (every sp rank calls it).
    """
    B, H, n, D = q.shape
    check_heads(H, layout)
    joint = text_k is not None
    if (text_k is None) != (text_v is None) or (text_q is not None and not joint):
        raise ValueError("joint attention needs text_k and text_v together (text_q optional: keys only)")
    if text_key_mask is not None and not joint:
        raise ValueError("text_key_mask without text tokens")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v = (_seq_to_heads(x, layout) for x in (q, k, v))                   # [B, H/U, U*n, D]
    text = tuple(None if x is None else _head_slice(x, layout) for x in (text_q, text_k, text_v)) if joint else None
    if layout.ring == 1:
        out, text_out = _local_attention(q, k, v, text, text_key_mask, scale)
    else:
        out, text_out = _ring_attention(q, k, v, layout, scale, text, text_key_mask)
    out = _heads_to_seq(out.to(q.dtype).contiguous(), layout)                # [B, H, n, D]
    if text_out is not None:
        text_out = _gather_heads(text_out.to(q.dtype), layout)              # [B, H, T, D]
    return out, text_out


def _local_attention(q, k, v, text, text_mask, scale):
    """Everything on this rank (ring 1): one SDPA call over [image; text] queries and keys."""
    if text is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None
    tq, tk, tv = text
    n, B = q.shape[2], q.shape[0]
    mask = None
    if text_mask is not None:   # [B, 1, 1, n + T]: every image key, the unpadded text keys
        mask = torch.cat([torch.ones(B, k.shape[2], dtype=torch.bool, device=q.device), text_mask], dim=1)
        mask = mask[:, None, None, :]
    queries = q if tq is None else torch.cat([q, tq], 2)                  # text keys only: image queries
    out = F.scaled_dot_product_attention(queries, torch.cat([k, tk], 2), torch.cat([v, tv], 2),
                                         attn_mask=mask, scale=scale)
    return out[:, :, :n], (None if tq is None else out[:, :, n:])
