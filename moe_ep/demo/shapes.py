"""The procedural, text-conditioned shapes data set the demo checkpoint is trained on.

Prompt: ``a {color} {shape} on a {background} background`` (7 colours x 3 shapes x 2
backgrounds = 42 prompts). Image: 32 x 32 RGB, one filled shape of a random size (side or
diameter SIZE_MIN..SIZE_MAX pixels, not in the prompt) at a random position fully inside
the image, hard edges, flat colours from PALETTE.

Latent space: the model works in the latents of moe-ep's fixed, non-learned stand-in decoder
(moe_ep/images.py, ``in_channels = 4``, ``vae_scale_factor = 1``): pixel = 127.5 * (tanh(M z) + 1)
with M = ``decoder_matrix(4)`` [3, 4]. ``encode`` inverts it exactly: z = pinv(M) atanh(pixel/127.5 - 1),
the minimum-norm latent (the 4th direction, M's null space, is 0 in the data). The palette keeps every
channel in 15..240 so atanh stays finite (|atanh| <= 1.39). ``decode_latents(encode(img))`` gives
``img`` back to within one grey level (tests/test_demo.py).
"""
from __future__ import annotations

import functools
import itertools

import torch

from ..images import decoder_matrix

COLORS = {  # shape colours, RGB 0..255
    "red": (220, 20, 20), "green": (20, 180, 20), "blue": (30, 60, 230), "yellow": (235, 220, 20),
    "purple": (150, 30, 180), "orange": (240, 130, 15), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"black": (15, 15, 15), "gray": (120, 120, 120)}
SIZE = 32                # image side, pixels
SIZE_MIN, SIZE_MAX = 10, 20   # shape side / diameter, pixels (inclusive)
LATENT_CHANNELS = 4


def prompt(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def all_attributes() -> list[tuple[str, str, str]]:
    """Every (color, shape, background), in a fixed order (42 combinations)."""
    return list(itertools.product(COLORS, SHAPES, BACKGROUNDS))


def all_prompts() -> list[str]:
    return [prompt(*a) for a in all_attributes()]


def parse_prompt(text: str) -> tuple[str, str, str]:
    """'a red circle on a gray background' -> ('red', 'circle', 'gray'); ValueError otherwise."""
    words = text.split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background" \
            or words[1] not in COLORS or words[2] not in SHAPES or words[5] not in BACKGROUNDS:
        raise ValueError(f"not a shapes prompt: {text!r} (expected 'a {{color}} {{shape}} on a {{background}} "
                         f"background' with color in {list(COLORS)}, shape in {list(SHAPES)}, "
                         f"background in {list(BACKGROUNDS)})")
    return words[1], words[2], words[5]


def render(color: torch.Tensor, shape: torch.Tensor, background: torch.Tensor, size: torch.Tensor,
           x0: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """Draw a batch: every argument [B] int64 (indices into COLORS / SHAPES / BACKGROUNDS, the
    shape's side, its top-left corner) -> images [B, 32, 32, 3] uint8 on their device.

    A pixel belongs to the shape when its centre is inside: square [x0, x0+s) x [y0, y0+s);
    circle of diameter s in that box; triangle pointing up, apex at the top centre, base the
    box's bottom edge."""
    dev = color.device
    c = (torch.arange(SIZE, device=dev, dtype=torch.float32) + 0.5)                 # [32] pixel centres
    py, px = c.view(1, SIZE, 1), c.view(1, 1, SIZE)
    s = size.float().view(-1, 1, 1)
    u = (px - x0.float().view(-1, 1, 1)) / s                                       # [B, 1, 32] in [0, 1) inside
    v = (py - y0.float().view(-1, 1, 1)) / s                                       # [B, 32, 1]
    inside_box = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)                          # [B, 32, 32]
    circle = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    triangle = inside_box & ((u - 0.5).abs() <= 0.5 * v)
    kind = shape.view(-1, 1, 1)
    mask = torch.where(kind == 0, circle, torch.where(kind == 1, inside_box, triangle))   # [B, 32, 32]
    fg = torch.tensor(list(COLORS.values()), device=dev, dtype=torch.uint8)[color]          # [B, 3]
    bg = torch.tensor(list(BACKGROUNDS.values()), device=dev, dtype=torch.uint8)[background]  # [B, 3]
    return torch.where(mask.unsqueeze(-1), fg[:, None, None, :], bg[:, None, None, :])  # [B, 32, 32, 3]


def sample_batch(n: int, generator: torch.Generator, device=None):
    """n random examples -> (attribute indices [n, 3] int64 (color, shape, background),
    images [n, 32, 32, 3] uint8). Drawn on the generator's device, then moved."""
    gdev = generator.device
    idx = torch.stack([torch.randint(len(COLORS), (n,), generator=generator, device=gdev),
                       torch.randint(len(SHAPES), (n,), generator=generator, device=gdev),
                       torch.randint(len(BACKGROUNDS), (n,), generator=generator, device=gdev)], 1)  # [n, 3]
    size = torch.randint(SIZE_MIN, SIZE_MAX + 1, (n,), generator=generator, device=gdev)        # [n]
    room = (SIZE - size + 1).float()
    x0 = (torch.rand(n, generator=generator, device=gdev) * room).long()                         # [n]
    y0 = (torch.rand(n, generator=generator, device=gdev) * room).long()
    images = render(idx[:, 0], idx[:, 1], idx[:, 2], size, x0, y0)
    dev = device or gdev
    return idx.to(dev), images.to(dev)


def attribute_prompts(idx: torch.Tensor) -> list[str]:
    """[n, 3] attribute indices -> n prompts."""
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    return [prompt(colors[c], SHAPES[s], backgrounds[b]) for c, s, b in idx.tolist()]


@functools.lru_cache(maxsize=None)
def encoder_matrix(device=None) -> torch.Tensor:
    """[4, 3] float32: pinv of the stand-in decoder's [3, 4] latent -> RGB map (cached per device)."""
    return torch.linalg.pinv(decoder_matrix(LATENT_CHANNELS)).float().to(device)


def encode(images: torch.Tensor) -> torch.Tensor:
    """images [B, H, W, 3] uint8 -> latents [B, 4, H, W] float32 that moe_ep.images.decode_latents
    maps back to the same pixels (see the module docstring)."""
    y = images.float() / 127.5 - 1.0                                               # [B, H, W, 3] in (-1, 1)
    pre = torch.atanh(y.clamp(-0.999, 0.999))
    return torch.einsum("cr,bhwr->bchw", encoder_matrix(images.device), pre).contiguous()
