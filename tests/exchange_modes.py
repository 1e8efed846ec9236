"""The forward paths a MoELayer can take at its EP size, for tests that check each of them.

EP = 1: the fused local path (default) and the generic dispatch / combine. EP > 1: one row per
(token, destination rank) with this rank's own rows computed during the exchange (default), the
same without the overlap, and one row per routed copy. At every EP size also the batch-invariant
path (model.moe.batch_invariant, moe_ep/batch_invariant.py); the others run with it off.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

OFF = {"batch_invariant": False}
MODES_EP1 = {"fused local": {**OFF, "fused_local": True}, "generic dispatch": {**OFF, "fused_local": False},
             "batch invariant": {"batch_invariant": True}}
MODES_EP = {"pairs, overlapped": {**OFF, "dedup_tokens": True, "overlap_own_rows": True},
            "pairs": {**OFF, "dedup_tokens": True, "overlap_own_rows": False},
            "one row per copy": {**OFF, "dedup_tokens": False, "overlap_own_rows": False},
            "batch invariant": {"batch_invariant": True}}


@contextmanager
def _set(layer, attrs: dict):
    old = {k: getattr(layer, k) for k in attrs}
    for k, v in attrs.items():
        setattr(layer, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(layer, k, v)


def exchange_modes(layer) -> Iterator[str]:
    """Yields each mode's name with `layer` set to it (the layer's own settings restored after)."""
    for name, attrs in (MODES_EP1 if layer.ctx.ep_size == 1 else MODES_EP).items():
        with _set(layer, attrs):
            yield name
