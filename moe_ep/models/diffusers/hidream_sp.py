"""HiDream-I1 sequence parallel: the transformer's forward on this rank's image-token shard.

Why a sharded forward (and not diffusers' forward on a sharded input, as for NucleusMoE):
HiDreamImageTransformer2DModel.forward patchifies the latents itself, builds one rotary table
for [image; text] positions, concatenates the image and text streams for the single-stream
blocks and unpatchifies at the end; sharding has to happen between those steps. So
`HiDreamPlan.sharded_forward` is that forward written out with the model's own submodules
(patchify, x_embedder, t/p embedders, caption projections, pe_embedder, the blocks, final_layer,
unpatchify) and three changes:
  - after patchify, each sample's N image tokens are cut to shard i = [i N/sp, (i+1) N/sp) on sp
    rank i (with their position ids and mask rows), and the rotary table is built for
    [shard positions; text positions];
  - every block's attention goes through `HiDreamSPAttnProcessor`: q/k/v and rope exactly as
    diffusers' HiDreamAttnProcessor computes them for [shard; text], then
    `sequence_parallel_attention` with the text tokens as the replicated joint block (text
    queries and keys: keys counted once; the text output is the same on every sp rank, so the
    replicated text stream stays identical);
  - the final layer's output [B, N/sp, p*p*C] is all-gathered along the sequence before
    unpatchify.
LoRA scaling (`attention_kwargs={"scale": ...}`, diffusers' @apply_lora_scale) is not applied on
this path.

Text tokens in the MoE: the dual-stream blocks' MoE (`ff_i`) sees image tokens only (the shard);
the single-stream blocks' MoE sees [image shard; all text tokens]. The text rows are the same on
every sp rank, so they are SPLIT over the sp ranks for the MoE (`TextRowSplit`, hooks on those
`ff_i`): sp rank i routes and computes text rows [i t, (i+1) t), t = ceil(T / sp), and the text
outputs are all-gathered back. Every text token is routed, computed and counted once per sample
(not sp times), and the work is even over the sp ranks. Token choice is per token, so the result
is the single-process one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as tdist
import torch.nn as nn

from ...parallel_layout import ParallelLayout
from ...sequence_parallel import check_heads, check_tokens, sequence_parallel_attention, unshard_sequence


@dataclass
class ShardState:
    """Per forward: image tokens of this rank's shard (the processors split [image; text] there)."""

    image_tokens: int = 0


class HiDreamSPAttnProcessor:
    """diffusers' HiDreamAttnProcessor over [image shard; text] (module docstring)."""

    def __init__(self, layout: ParallelLayout, state: ShardState):
        self.layout, self.state = layout, state

    def __call__(self, attn, hidden_states: torch.Tensor, hidden_states_masks: Optional[torch.Tensor] = None,
                 encoder_hidden_states: Optional[torch.Tensor] = None, image_rotary_emb: torch.Tensor = None,
                 *args, **kwargs):
        from diffusers.models.transformers.transformer_hidream_image import apply_rope

        dtype, B = hidden_states.dtype, hidden_states.shape[0]
        q = attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype)
        k = attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype)
        v = attn.to_v(hidden_states)
        D = k.shape[-1] // attn.heads
        q, k, v = (x.view(B, -1, attn.heads, D) for x in (q, k, v))            # [B, S, H, D]
        if hidden_states_masks is not None:
            k = k * hidden_states_masks.view(B, -1, 1, 1)
        if not attn.single:   # dual stream: hidden = image shard, encoder = text
            qt = attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)).to(dtype=dtype)
            kt = attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)).to(dtype=dtype)
            vt = attn.to_v_t(encoder_hidden_states)
            q, k, v = (torch.cat([a, b.view(B, -1, attn.heads, D)], dim=1) for a, b in ((q, qt), (k, kt), (v, vt)))
        # rope on [image shard; text], as diffusers on [image; text] (image_rotary_emb is built so)
        if q.shape[-1] == image_rotary_emb.shape[-3] * 2:
            q, k = apply_rope(q, k, image_rotary_emb)
        else:
            q1, q2 = q.chunk(2, dim=-1)
            k1, k2 = k.chunk(2, dim=-1)
            q1, k1 = apply_rope(q1, k1, image_rotary_emb)
            q, k = torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)
        n = self.state.image_tokens
        t = (lambda x: x.transpose(1, 2))                                         # [B, S, H, D] -> [B, H, S, D]
        img = [t(x[:, :n]) for x in (q, k, v)]
        txt = [t(x[:, n:]) for x in (q, k, v)]
        out_i, out_t = sequence_parallel_attention(*img, self.layout, *txt, scale=attn.scale)
        out = torch.cat([out_i, out_t], dim=2).transpose(1, 2).reshape(B, -1, attn.heads * D).to(q.dtype)
        if not attn.single:
            return attn.to_out(out[:, :n]), attn.to_out_t(out[:, n:])
        return attn.to_out(out)


class TextRowSplit:
    """Hooks on a single-stream block's MoE: its input [B, n + T, H] is [image shard; text]; the
    MoE gets [image shard; this sp rank's text rows], and the text outputs are all-gathered
    (module docstring). Collective over the sp group."""

    def __init__(self, layout: ParallelLayout, state: ShardState):
        self.layout, self.state = layout, state
        self._rows: Optional[tuple[int, int, int, int]] = None

    def before(self, module, args):
        x = args[0]                                                               # [B, n + T, H]
        n, sp = self.state.image_tokens, self.layout.sp
        T = x.shape[1] - n
        per = math.ceil(T / sp)
        lo = min(self.layout.index("sp") * per, T)
        hi = min(lo + per, T)
        self._rows = (n, T, per, hi - lo)
        return (torch.cat([x[:, :n], x[:, n + lo:n + hi]], dim=1),) + tuple(args[1:])

    def after(self, module, args, out):
        n, T, per, mine = self._rows
        text = out[:, n:]                                                         # [B, mine, H]
        if mine < per:
            text = torch.cat([text, text.new_zeros(text.shape[0], per - mine, text.shape[2])], dim=1)
        parts = [torch.empty_like(text) for _ in range(self.layout.sp)]
        tdist.all_gather(parts, text.contiguous(), group=self.layout.group("sp"))
        return torch.cat([out[:, :n]] + parts, dim=1)[:, :n + T]                  # [B, n + T, H]


class HiDreamPlan:
    """HiDream-I1 for context_parallel.ContextParallel (its guidance: [negative; positive] rows)."""

    def __init__(self):
        self.state = ShardState()
        self.handles: list = []                     # the TextRowSplit hooks
        self.replaced: list = []                    # (attention module, its own processor)

    def install(self, model: nn.Module, layout: ParallelLayout) -> None:
        blocks = list(model.double_stream_blocks) + list(model.single_stream_blocks)
        for wrapper in blocks:
            check_heads(wrapper.block.attn1.heads, layout)
        for wrapper in blocks:
            attn = wrapper.block.attn1
            self.replaced.append((attn, attn.processor))
            attn.set_processor(HiDreamSPAttnProcessor(layout, self.state))
        for wrapper in model.single_stream_blocks:
            ff = wrapper.block.ff_i
            if hasattr(ff, "moe"):   # an EPMoEBlock (a dense ff_i is per token: no split needed)
                split = TextRowSplit(layout, self.state)
                self.handles += [ff.register_forward_pre_hook(split.before), ff.register_forward_hook(split.after)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for attn, processor in self.replaced:
            attn.set_processor(processor)
        self.handles, self.replaced = [], []

    def batch_dims(self, kwargs: dict) -> dict[str, int]:
        return {"hidden_states": 0, "timesteps": 0, "encoder_hidden_states_t5": 0, "encoder_hidden_states_llama3": 1,
                "pooled_embeds": 0, "img_ids": 0, "img_sizes": 0, "hidden_states_masks": 0}

    def output_shape(self, model: nn.Module, kwargs: dict) -> tuple[int, ...]:
        return tuple(kwargs["hidden_states"].shape)

    def sharded_forward(self, model: nn.Module, original: Callable, kw: dict,
                        layout: ParallelLayout) -> torch.Tensor:
        """diffusers' HiDreamImageTransformer2DModel.forward (inference) on the image shard."""
        hidden_states, masks = kw["hidden_states"], kw.get("hidden_states_masks")
        img_ids, img_sizes = kw.get("img_ids"), kw.get("img_sizes")
        batch, dtype = hidden_states.shape[0], hidden_states.dtype
        if masks is None:
            hidden_states, masks, img_sizes, img_ids = model.patchify(hidden_states)   # [B, N, p*p*C]
        N = hidden_states.shape[1]
        check_tokens(N, layout)
        n = N // layout.sp
        lo = layout.index("sp") * n
        x = model.x_embedder(hidden_states[:, lo:lo + n])                         # [B, n, dim]
        masks = None if masks is None else masks[:, lo:lo + n]
        img_ids = img_ids[:, lo:lo + n]
        self.state.image_tokens = n

        temb = model.t_embedder(kw["timesteps"], dtype) + model.p_embedder(kw["pooled_embeds"])
        llama = kw["encoder_hidden_states_llama3"]
        enc = [llama[k] for k in model.config.llama_layers]
        t5 = kw["encoder_hidden_states_t5"]
        if model.caption_projection is not None:
            enc = [model.caption_projection[i](e).view(batch, -1, x.shape[-1]) for i, e in enumerate(enc)]
            enc.append(model.caption_projection[-1](t5).view(batch, -1, x.shape[-1]))
        text_len = enc[-1].shape[1] + enc[-2].shape[1] + enc[0].shape[1]
        txt_ids = torch.zeros(batch, text_len, 3, device=img_ids.device, dtype=img_ids.dtype)
        rope = model.pe_embedder(torch.cat((img_ids, txt_ids), dim=1))           # [shard; text] positions

        block_id = 0
        initial = torch.cat([enc[-1], enc[-2]], dim=1)                            # [B, T0, dim] replicated
        initial_len = initial.shape[1]
        for block in model.double_stream_blocks:
            cur = torch.cat([initial, enc[block_id]], dim=1)
            x, initial = block(hidden_states=x, hidden_states_masks=masks, encoder_hidden_states=cur, temb=temb,
                               image_rotary_emb=rope)
            initial = initial[:, :initial_len]
            block_id += 1

        x = torch.cat([x, initial], dim=1)                                        # [B, n + T0, dim]
        joint_len = x.shape[1]
        if masks is not None:
            ones = torch.ones(batch, initial.shape[1] + enc[block_id - 1].shape[1] if block_id else initial.shape[1],
                              device=masks.device, dtype=masks.dtype)
            masks = torch.cat([masks, ones], dim=1)
        for block in model.single_stream_blocks:
            x = torch.cat([x, enc[block_id]], dim=1)                              # [B, n + T, dim]
            x = block(hidden_states=x, hidden_states_masks=masks, encoder_hidden_states=None, temb=temb,
                      image_rotary_emb=rope)
            x = x[:, :joint_len]
            block_id += 1

        out = model.final_layer(x[:, :n], temb)                                   # [B, n, p*p*C]
        out = unshard_sequence(out, layout, dim=1)                                # [B, N, p*p*C]
        return model.unpatchify(out, img_sizes, model.training)
