"""A non-learned classifier of shapes images, written from the data set's definition (shapes.py).

1. background: each border pixel votes for the nearer of the BACKGROUNDS colours (the shape
   covers at most part of the border);
2. shape pixels: those farther than FG_DISTANCE (RGB, Euclidean) from that background colour;
   keep the largest 4-connected component (stray pixels of a sample do not count);
3. colour: the COLORS entry nearest to the component's median RGB;
4. shape kind, from the component's fill of its bounding box and how its width changes
   from the top to the bottom rows: square fills ~1.0 of its box, circle ~pi/4, triangle ~0.5
   and is much wider at the bottom than at the top.
An image with no shape pixels (fewer than MIN_PIXELS) gets color and shape None (counted wrong).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

from .shapes import BACKGROUNDS, COLORS

FG_DISTANCE = 60.0   # the closest shape colour to a background is 173 away (red on gray)
MIN_PIXELS = 12      # the smallest shape (triangle of side 10) has ~50 pixels
_BG = np.array(list(BACKGROUNDS.values()), dtype=np.float64)   # [2, 3]
_FG = np.array(list(COLORS.values()), dtype=np.float64)        # [7, 3]


def classify(image: np.ndarray) -> dict[str, Optional[str]]:
    """image [H, W, 3] uint8 -> {"color", "shape", "background"} (names from shapes.py, or None)."""
    img = image.astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])              # [P, 3]
    votes = np.linalg.norm(border[:, None] - _BG[None], axis=-1).argmin(1)              # [P]
    b = int(np.bincount(votes, minlength=len(_BG)).argmax())
    far = np.linalg.norm(img - _BG[b], axis=-1) > FG_DISTANCE                           # [H, W]
    labels, n = ndimage.label(far)                                                       # 4-connected
    out = {"color": None, "shape": None, "background": list(BACKGROUNDS)[b]}
    if n == 0:
        return out
    sizes = np.bincount(labels.ravel())[1:]
    comp = labels == (int(sizes.argmax()) + 1)                                           # [H, W]
    if comp.sum() < MIN_PIXELS:
        return out
    rgb = np.median(img[comp], axis=0)                                                   # [3]
    out["color"] = list(COLORS)[int(np.linalg.norm(_FG - rgb, axis=1).argmin())]
    out["shape"] = shape_kind(comp)
    return out


def shape_kind(mask: np.ndarray) -> str:
    """[H, W] bool of one component -> 'circle', 'square' or 'triangle'."""
    rows, cols = np.nonzero(mask)
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    fill = box.mean()
    widths = box.sum(1)                                    # [h] pixels per row, top to bottom
    q = max(1, len(widths) // 4)
    top, bottom = widths[:q].mean(), widths[-q:].mean()
    if fill > 0.9:
        return "square"
    if bottom > 2.0 * top and fill < 0.7:                  # a circle's top and bottom quarters match
        return "triangle"
    return "circle"


def accuracy(images, attributes) -> dict[str, float]:
    """images: iterable of [H, W, 3] uint8; attributes: matching (color, shape, background)
    -> {"color", "shape", "background", "all"} fractions correct."""
    hits = np.zeros(4)
    n = 0
    for image, (c, s, b) in zip(images, attributes):
        got = classify(image)
        ok = [got["color"] == c, got["shape"] == s, got["background"] == b]
        hits += ok + [all(ok)]
        n += 1
    if n == 0:
        raise ValueError("accuracy of no images")
    return dict(zip(("color", "shape", "background", "all"), (hits / n).tolist()))
