"""Synthetic expert loads for benchmarks and tests (seeded, numpy only)."""
from __future__ import annotations

import numpy as np


def zipf_windows(seed: int, num_layers: int, num_experts: int, skew: float, num_hot: int = 2,
                 tokens_per_layer: int = 65536, noise: float = 0.2, rotate: float = 0.1):
    """Two consecutive windows of token counts, ``(w1 [L, E], w2 [L, E])`` float64 (integer-valued).

    Window 1: Zipf(``skew``) popularity over a random expert order per layer, ``num_hot`` random
    experts boosted 2-5x, sampled as ``tokens_per_layer`` token copies (multinomial).
    Window 2 (drift): window-1 popularity times lognormal(0, ``noise``) noise per expert, and each
    of the ``num_hot`` hottest experts hands a fraction ``rotate`` of its popularity to a random
    other expert (a slow rotation of hot experts); sampled again.
    """
    rng = np.random.default_rng(seed)
    L, E = num_layers, num_experts
    base = np.arange(1, E + 1, dtype=np.float64) ** -skew  # [E]
    pop = np.empty((L, E))  # [L, E]
    for layer in range(L):
        pop[layer, rng.permutation(E)] = base
    if num_hot:
        hot = rng.integers(0, E, size=(L, num_hot))  # [L, hot]
        np.multiply.at(pop, (np.arange(L)[:, None], hot), rng.uniform(2.0, 5.0, size=(L, num_hot)))
    pop /= pop.sum(1, keepdims=True)
    pop2 = pop * rng.lognormal(0.0, noise, size=(L, E))  # [L, E]
    if num_hot:
        top = np.argsort(-pop, axis=1)[:, :num_hot]  # [L, hot]
        dest = rng.integers(0, E, size=(L, num_hot))
        rows = np.arange(L)[:, None]
        moved = pop2[rows, top] * rotate
        pop2[rows, top] -= moved
        np.add.at(pop2, (np.broadcast_to(rows, dest.shape), dest), moved)
    pop2 /= pop2.sum(1, keepdims=True)
    w1 = np.stack([rng.multinomial(tokens_per_layer, p) for p in pop]).astype(np.float64)
    w2 = np.stack([rng.multinomial(tokens_per_layer, p) for p in pop2]).astype(np.float64)
    return w1, w2
