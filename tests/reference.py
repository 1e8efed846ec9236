"""Single-process references for the MoE layer, written from the definitions, in float64.

Nothing here calls moe_ep's router, experts or shared-expert modules: routing (softmax or sigmoid
scores, DeepSeek-V3 group limiting, top-k, renormalisation, route scale; expert choice), the
SwiGLU experts and the shared experts are computed again from their definitions, so a bug in the
runtime's routing cannot cancel out against its own reference. Only the weights are shared:
`logical_weights` uses moe_ep.experts.init_expert_weights, the runtime's seeded initialiser.

Definitions (docs/config.md, `model.moe`):
- scores s [T, E] = softmax(x @ W_gate^T) or sigmoid(x @ W_gate^T).
- group limiting (n_group > 1): experts 0..E-1 form n_group consecutive groups; a group's score is
  its largest expert score (softmax) or the sum of its two largest (sigmoid, DeepSeek-V3; the largest
  when a group has one expert); a token keeps its topk_group best groups and picks only there.
- the token's k experts are the k largest scores among those it may pick; weight = score;
  renormalize (and k > 1): weights divided by their sum; then times route_scale.
- expert choice: per sample, expert e takes the C tokens with the largest s[:, e],
  C = min(S, max(1, ceil(capacity_factor * S / E))); a chosen (token, expert) weighs
  s[t, e] / (sum of s[t, e'] over the experts e' that chose t + 1e-12) * route_scale; a token may be
  chosen by 0..E experts.
- SwiGLU expert: w13 [H, 2F] = [gate | up] fused, w2 [F, H]: y = (silu(x @ gate) * (x @ up)) @ w2.
"""
from __future__ import annotations

import math

import torch

from moe_ep.experts import init_expert_weights

# Two candidates whose (float64) scores differ by less than this fraction of the larger are a
# near-tie: float32 (relative precision 6e-8, a few roundings deep) may order them either way, so a
# token whose choice depends on one is left out of id comparisons.
TIE_GAP = 1e-5


def logical_weights(seed: int, layer: int, num_experts: int, hidden: int, inner: int):
    """w13 [E, H, 2F], w2 [E, F, H] as the runtime initialises them."""
    pairs = [init_expert_weights(seed, layer, e, hidden, inner) for e in range(num_experts)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def plain_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x [M, H], w13 [H, 2F] (gate columns first, then up), w2 [F, H] -> [M, H], in float64."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    inner = w2.shape[0]
    gate, up = x @ w13[:, :inner], x @ w13[:, inner:]                 # [M, F] each
    return (gate * torch.sigmoid(gate) * up) @ w2                     # silu(g) = g * sigmoid(g)


def reference_scores(x: torch.Tensor, gate_weight: torch.Tensor, score_func: str) -> torch.Tensor:
    """x [..., Hr], gate_weight [E, Hr] -> scores [..., E] float64."""
    logits = x.double() @ gate_weight.double().T
    if score_func == "softmax":
        z = torch.exp(logits - logits.max(-1, keepdim=True).values)
        return z / z.sum(-1, keepdim=True)
    if score_func == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-logits))
    raise ValueError(f"score_func {score_func!r}")


def _gap_at(sorted_desc: list[float], n: int) -> float:
    """Relative gap between the n-th and (n+1)-th largest of a descending list of non-negative
    numbers (inf when nothing is left out)."""
    if not 0 < n < len(sorted_desc):
        return math.inf
    a, b = sorted_desc[n - 1], sorted_desc[n]
    return (a - b) / max(abs(a), abs(b), 1e-300)


def route_one_token(s: list[float], cfg) -> tuple[list[int], list[float], bool]:
    """One token's scores s [E] (floats) -> (expert ids, weights, near_tie), by the definitions above."""
    E = len(s)
    allowed = list(range(E))
    near_tie = False
    if cfg.n_group > 1:
        size = E // cfg.n_group
        group_score = []
        for g in range(cfg.n_group):
            members = sorted(s[g * size:(g + 1) * size], reverse=True)
            if cfg.score_func == "sigmoid" and size >= 2:
                group_score.append(members[0] + members[1])
            else:
                group_score.append(members[0])
        best_groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[:cfg.topk_group]
        near_tie |= _gap_at(sorted(group_score, reverse=True), cfg.topk_group) < TIE_GAP
        allowed = [e for g in sorted(best_groups) for e in range(g * size, (g + 1) * size)]
    ranked = sorted(allowed, key=lambda e: -s[e])
    near_tie |= _gap_at([s[e] for e in ranked], cfg.top_k) < TIE_GAP
    ids = ranked[:cfg.top_k]
    weights = [s[e] for e in ids]
    if cfg.renormalize and cfg.top_k > 1:
        total = sum(weights)
        weights = [w / total for w in weights]
    weights = [w * cfg.route_scale for w in weights]
    return ids, weights, near_tie


def reference_token_choice(x: torch.Tensor, gate_weight: torch.Tensor, cfg) -> torch.Tensor:
    """Token choice. x [T, Hr] -> dense routing matrix [T, E] float64: entry (t, e) is the weight
    of expert e for token t (0 where t did not pick e). See `near_ties` for ambiguous tokens."""
    return _token_choice(x, gate_weight, cfg)[0]


def token_choice_with_ties(x: torch.Tensor, gate_weight: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dense routing [T, E] float64 as `reference_token_choice`, near_tie [T] bool: tokens whose
    choice of groups or experts hinges on two scores within TIE_GAP of each other, relative)."""
    return _token_choice(x, gate_weight, cfg)


def _token_choice(x, gate_weight, cfg):
    scores = reference_scores(x.reshape(-1, x.shape[-1]), gate_weight, cfg.score_func)   # [T, E]
    T, E = scores.shape
    dense = torch.zeros(T, E, dtype=torch.float64)                                      # [T, E]
    ties = torch.zeros(T, dtype=torch.bool)                                             # [T]
    for t in range(T):
        ids, weights, tie = route_one_token(scores[t].tolist(), cfg)
        for e, w in zip(ids, weights):
            dense[t, e] = w
        ties[t] = tie
    return dense, ties


def reference_expert_choice(scores: torch.Tensor, capacity_factor: float, route_scale: float = 1.0) -> torch.Tensor:
    """Expert choice. scores [B, S, E] -> dense routing matrix [B*S, E] float64: entry (b*S + s, e)
    is the weight of expert e for token s of sample b, 0 where e did not choose it."""
    B, S, E = scores.shape
    capacity = min(S, max(1, math.ceil(capacity_factor * S / E)))
    s = scores.double()
    chosen = torch.zeros(B, S, E, dtype=torch.bool)                                     # [B, S, E]
    for b in range(B):
        for e in range(E):
            column = s[b, :, e].tolist()
            for t in sorted(range(S), key=lambda t: -column[t])[:capacity]:
                chosen[b, t, e] = True
    picked = torch.where(chosen, s, torch.zeros_like(s))                                # [B, S, E]
    dense = picked / (picked.sum(-1, keepdim=True) + 1e-12) * route_scale               # [B, S, E]
    return dense.reshape(B * S, E)


def expert_choice_copies(scores: torch.Tensor, capacity_factor: float, route_scale: float = 1.0):
    """The same as a list of (token, expert, weight) triples (token = b*S + s), sorted."""
    dense = reference_expert_choice(scores, capacity_factor, route_scale)
    return [(t, e, float(dense[t, e])) for t, e in torch.nonzero(dense > 0).tolist()]


def reference_routing(x: torch.Tensor, gate_weight: torch.Tensor, cfg) -> torch.Tensor:
    """Either rule: router input x ([T, Hr] token choice, [B, S, Hr] either) -> dense [T, E] float64."""
    if getattr(cfg, "routing", "token_choice") == "expert_choice":
        scores = reference_scores(x, gate_weight, cfg.score_func)                       # [B, S, E]
        return reference_expert_choice(scores, cfg.capacity_factor, cfg.route_scale)
    return reference_token_choice(x.reshape(-1, x.shape[-1]), gate_weight, cfg)


@torch.no_grad()
def reference_moe(x, gate_weight, cfg, w13, w2, shared=None, router_input=None, routing=None):
    """x [..., H] -> [..., H] float64: every token through the experts the reference routing gives
    it, weighted, summed, plus the shared experts.

    gate_weight [E, Hr]; w13 [E, H, 2F], w2 [E, F, H] per logical expert; shared: None or
    (w13 [H, 2nF], w2 [nF, H]) of the shared experts; router_input [..., Hr] (default x);
    routing: a dense [T, E] routing matrix already computed by `reference_routing` (default: computed).
    """
    dense = routing if routing is not None else reference_routing(
        x if router_input is None else router_input, gate_weight, cfg)                         # [T, E]
    flat = x.reshape(-1, x.shape[-1])                                                          # [T, H]
    out = torch.zeros(flat.shape, dtype=torch.float64)                                         # [T, H]
    for e in range(w13.shape[0]):
        tok = torch.nonzero(dense[:, e]).flatten()
        if tok.numel():
            out[tok] += dense[tok, e, None] * plain_swiglu(flat[tok], w13[e], w2[e])
    if shared is not None:
        out += plain_swiglu(flat, shared[0], shared[1])
    return out.view(x.shape)
