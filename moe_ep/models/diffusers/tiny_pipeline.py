"""A tiny HiDream-I1 pipeline built from diffusers' own classes (no download): the tiny transformer
of moe_ep.models.diffusers.tiny, a 2-block AutoencoderKL, FlowMatchEulerDiscreteScheduler, and no
text encoders -- prompts are given as prompt embeddings (`hidream_embeddings`)."""
from __future__ import annotations

import torch

from .tiny import save_tiny_folders, tiny_hidream


def tiny_hidream_pipeline(seed: int = 0, **transformer_kw):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline

    transformer = tiny_hidream(seed, **transformer_kw)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=32, shift_factor=0.1,
                        scaling_factor=1.5).eval()
    pipe = HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, transformer=transformer,
                                text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                text_encoder_3=None, tokenizer_3=None, text_encoder_4=None, tokenizer_4=None)
    pipe.set_progress_bar_config(disable=True)
    # HiDream rescales every request to (default_sample_size * vae_scale_factor)^2 pixels: 16 x 16 here
    pipe.default_sample_size = 8
    return pipe


def hidream_embeddings(pipe, seed: int, batch: int) -> dict:
    """Prompt and negative-prompt embeddings for `batch` prompts (T5 [B, 5, 16], Llama [layers, B, 3, 8],
    pooled [B, 16]), as the pipeline's text encoders would give them."""
    g = torch.Generator().manual_seed(seed)
    n = len(pipe.transformer.config.llama_layers)
    out = {}
    for prefix in ("", "negative_"):
        out[f"{prefix}prompt_embeds_t5"] = torch.randn(batch, 5, 16, generator=g)
        out[f"{prefix}prompt_embeds_llama3"] = torch.randn(n, batch, 3, 8, generator=g)
        out[f"{prefix}pooled_prompt_embeds"] = torch.randn(batch, 16, generator=g)
    return out


def sample(pipe, emb: dict, seeds, steps: int = 2):
    """Images [B, 16, 16, 3] float in [0, 1] (numpy)."""
    return pipe(height=16, width=16, num_inference_steps=steps, guidance_scale=4.0, output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in seeds], **emb).images


class PromptEmbeddingPipeline:
    """A HiDream pipeline whose text encoders are replaced by a fixed, deterministic map from a prompt
    string to its embeddings (a seed from the prompt's bytes): what `model.text_encoder =
    "moe_ep.models.diffusers.tiny_pipeline:hidream_pipeline_for"` gives the job, since no real text encoder can be loaded here."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):          # do_classifier_free_guidance, vae_scale_factor, ...
        return getattr(self.pipe, name)

    @staticmethod
    def _seed(text: str) -> int:
        return sum((i + 1) * b for i, b in enumerate(text.encode())) % (1 << 31)

    def _embed(self, texts) -> dict:
        parts = [hidream_embeddings(self.pipe, self._seed(t), 1) for t in texts]
        cat = {k: torch.cat([p[k] for p in parts], dim=1 if "llama3" in k else 0) for k in parts[0]}
        return {k: v for k, v in cat.items() if not k.startswith("negative_")}

    def __call__(self, prompt, negative_prompt=None, **kw):
        emb = self._embed(prompt)
        neg = self._embed([negative_prompt or ""] * len(prompt))
        emb.update({f"negative_{k}": v for k, v in neg.items()})
        kw.pop("height", None), kw.pop("width", None)      # the tiny model draws 16 x 16
        return self.pipe(height=16, width=16, **emb, **kw)


def hidream_pipeline_for(transformer):
    """model.text_encoder factory for the job: the tiny pipeline around `transformer`."""
    pipe = tiny_hidream_pipeline(0)
    pipe.transformer = transformer
    pipe.register_modules(transformer=transformer)
    return PromptEmbeddingPipeline(pipe)


if __name__ == "__main__":
    # python -m moe_ep.models.diffusers.tiny_pipeline [ROOT]: writes ROOT/hidream and ROOT/nucleus
    # (default outputs/tiny_models), the folders configs/hidream_tiny.json reads
    import sys

    folders = save_tiny_folders(sys.argv[1] if len(sys.argv) > 1 else "outputs/tiny_models")
    print(f"wrote a tiny HiDream-I1 transformer to {folders['hidream']} (configs/hidream_tiny.json reads it) "
          f"and a tiny NucleusMoE-Image pipeline folder, its transformer only, to {folders['nucleus']}")
