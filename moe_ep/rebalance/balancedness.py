"""Balancedness of a placement on a load (`eplb.plan_balancedness`, per layer)."""
from __future__ import annotations

import numpy as np

import eplb


def layer_balancedness(load, phy2log, ep_size: int) -> np.ndarray:
    """load [L, E], phy2log [L, R] -> [L] mean / max GPU load per layer (`eplb.plan_balancedness`).

    Each layer is divided by its largest load first (the ratio does not change), so loads near
    the float64 limit, which a stats file may hold, give a number instead of inf / inf = NaN."""
    load = np.asarray(load, dtype=np.float64)
    top = load.max(axis=1, keepdims=True) if load.size else np.ones((load.shape[0], 1))
    return eplb.plan_balancedness(load / np.where(top > 0, top, 1.0), phy2log, ep_size, per_layer=True).numpy()
