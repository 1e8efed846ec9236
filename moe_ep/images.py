"""Latents -> RGB uint8 -> PNG files (a small, fixed, deterministic stand-in for a VAE decoder).

Decoder: a fixed linear map latent channels -> RGB (from `torch.Generator(DECODER_SEED)`, rows
scaled to norm DECODER_GAIN so guided latents, whose std is a few units, stay mostly out of
tanh saturation), bilinear upsampling by `vae_scale_factor` (in float64 on the CPU), then
`255 * (tanh(x) + 1) / 2` rounded to uint8. It depends on nothing
but the number of channels, so the same latents always give the same pixels.
"""
from __future__ import annotations


import numpy as np
import torch

from .atomic import atomic_write

DECODER_SEED = 1234
DECODER_GAIN = 0.3  # guided samples have latent std of a few units; keep tanh out of saturation


def decoder_matrix(channels: int) -> torch.Tensor:
    """[3, C] float64 latent -> RGB map."""
    g = torch.Generator().manual_seed(DECODER_SEED)
    m = torch.randn(3, channels, generator=g, dtype=torch.float64)
    return DECODER_GAIN * m / m.norm(dim=1, keepdim=True)


def decode_latents(latents: torch.Tensor, vae_scale_factor: int = 1) -> np.ndarray:
    """latents [B, C, h, w] -> images [B, h*f, w*f, 3] uint8 (computed in float64 on the CPU)."""
    x = latents.detach().to("cpu", torch.float64)
    rgb = torch.einsum("rc,bchw->brhw", decoder_matrix(x.shape[1]), x)      # [B, 3, h, w]
    if vae_scale_factor > 1:
        rgb = torch.nn.functional.interpolate(rgb, scale_factor=vae_scale_factor, mode="bilinear",
                                              align_corners=False)
    img = torch.round(127.5 * (torch.tanh(rgb) + 1.0)).clamp(0, 255).to(torch.uint8)
    return img.permute(0, 2, 3, 1).contiguous().numpy()                    # [B, H, W, 3]


def to_uint8(image) -> np.ndarray:
    """A pipeline's float image in [0, 1] (diffusers' output_type="np") -> uint8 [H, W, 3]."""
    return (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str) -> None:
    """Write [H, W, 3] uint8 to `path` atomically (moe_ep.atomic: temp file, fsync, os.replace)."""
    from PIL import Image

    with atomic_write(path, "wb") as f:
        Image.fromarray(np.ascontiguousarray(image)).save(f, format="PNG")
