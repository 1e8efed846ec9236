"""NucleusMoE-Image sequence parallel: diffusers' own forward on this rank's image-token shard.

Why no rewritten forward: every step of NucleusMoEImageTransformer2DModel.forward outside the
attention is per image token (img_in, the AdaLN modulation broadcast from temb, the norms, the
MoE and dense MLPs, norm_out, proj_out) or per text token (txt_norm, the per-block encoder_proj of
the text context), and the pipeline hands it packed latents [B, N, C]. So the forward runs as it
is on hidden_states [B, N/sp, C] (shard i = tokens [i N/sp, (i+1) N/sp) on sp rank i), and only
two things need to know about the shards:
  - the attention processor (`NucleusSPAttnProcessor`, replacing NucleusMoEAttnProcessor2_0 on
    every block): the rotary table the model builds for all N image tokens is cut to this shard's
    rows; the text keys/values (replicated: the text context is not split) join once; queries are
    image tokens only (NucleusMoE has no text queries); the joint attention mask the model builds
    for [shard; text] gives the text key mask (its last T columns);
  - the MoE layers: expert choice picks each expert's top-C tokens over the WHOLE sample
    (Router.sequence_layout gathers the scores; C from the whole N), keeping this shard's picks.
The output [B, N/sp, C'] is all-gathered along the sequence (before the pipeline unpacks it).

diffusers' own context parallelism (`_cp_plan`, ContextParallelConfig) does not serve: the model
has no `_cp_plan`, and its Ulysses/ring attention functions have no replicated text block (the
text keys would be split and exchanged like image keys) and its ring needs a log-sum-exp
returning attention op (moe_ep.sequence_parallel has both).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ...parallel_layout import ParallelLayout
from ...sequence_parallel import check_heads, check_tokens, sequence_parallel_attention, shard_sequence, \
    unshard_sequence


class NucleusSPAttnProcessor:
    """NucleusMoEAttnProcessor2_0 over this rank's image-token shard (module docstring).
    Called as diffusers calls the processor; hidden_states [B, n, dim], n = N / sp."""

    def __init__(self, layout: ParallelLayout):
        self.layout = layout

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor = None, image_rotary_emb=None, cached_txt_key=None,
                 cached_txt_value=None) -> torch.Tensor:
        from diffusers.models.transformers.transformer_nucleusmoe_image import _apply_rotary_emb_nucleus

        lay = self.layout
        head_dim = attn.inner_dim // attn.heads
        num_kv_heads = attn.inner_kv_dim // head_dim
        groups = attn.heads // num_kv_heads
        n = hidden_states.shape[1]
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))          # [B, n, H, D]
        k = attn.to_k(hidden_states).unflatten(-1, (num_kv_heads, -1))        # [B, n, Hkv, D]
        v = attn.to_v(hidden_states).unflatten(-1, (num_kv_heads, -1))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        txt_freqs = None
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb                            # [N, D/2] complex, [T, D/2]
            start = lay.index("sp") * n
            img_freqs = img_freqs[start:start + n]                             # this shard's positions
            q = _apply_rotary_emb_nucleus(q, img_freqs, use_real=False)
            k = _apply_rotary_emb_nucleus(k, img_freqs, use_real=False)
        tk = tv = None
        if cached_txt_key is not None and cached_txt_value is not None:
            tk, tv = cached_txt_key, cached_txt_value
        elif encoder_hidden_states is not None:
            tk = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (num_kv_heads, -1))   # [B, T, Hkv, D]
            tv = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (num_kv_heads, -1))
            if attn.norm_added_k is not None:
                tk = attn.norm_added_k(tk)
            if image_rotary_emb is not None:
                tk = _apply_rotary_emb_nucleus(tk, txt_freqs, use_real=False)
        if groups > 1:   # grouped-query attention: every query head its key/value head
            k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
            if tk is not None:
                tk, tv = tk.repeat_interleave(groups, dim=2), tv.repeat_interleave(groups, dim=2)
        text_mask = None
        if attention_mask is not None and tk is not None:                      # [B, n + T] bool, text last
            text_mask = attention_mask[:, -tk.shape[1]:].to(torch.bool)
        t = (lambda x: None if x is None else x.transpose(1, 2))              # [B, S, H, D] -> [B, H, S, D]
        out, _ = sequence_parallel_attention(t(q), t(k), t(v), lay, None, t(tk), t(tv), text_key_mask=text_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)                   # [B, n, H*D]
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


class NucleusPlan:
    """NucleusMoE-Image for context_parallel.ContextParallel (its guidance: two calls per step)."""

    def __init__(self):
        self.replaced: list = []                     # (attention module, its own processor)

    def install(self, model: nn.Module, layout: ParallelLayout) -> None:
        for block in model.transformer_blocks:
            check_heads(block.attn.heads, layout)
        for block in model.transformer_blocks:
            self.replaced.append((block.attn, block.attn.processor))
            block.attn.set_processor(NucleusSPAttnProcessor(layout))

    def remove(self) -> None:
        for attn, processor in self.replaced:
            attn.set_processor(processor)
        self.replaced = []

    def sharded_forward(self, model: nn.Module, original: Callable, kwargs: dict,
                        layout: ParallelLayout) -> torch.Tensor:
        x = kwargs["hidden_states"]                                            # [B, N, C] packed latents
        check_tokens(x.shape[1], layout)
        out = original(**dict(kwargs, hidden_states=shard_sequence(x, layout, dim=1)), return_dict=False)[0]
        return unshard_sequence(out, layout, dim=1)                            # [B, N, C']

    def batch_dims(self, kwargs: dict) -> dict[str, int]:
        return {"hidden_states": 0, "encoder_hidden_states": 0, "encoder_hidden_states_mask": 0, "timestep": 0,
                "img_shapes": 0}

    def output_shape(self, model: nn.Module, kwargs: dict) -> tuple[int, ...]:
        B, N, _ = kwargs["hidden_states"].shape
        return (B, N, model.proj_out.out_features)
