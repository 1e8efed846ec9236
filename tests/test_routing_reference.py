"""moe_ep.router.Router against the routing reference written from the definitions (tests/reference.py):
ids (as sets per token, near-ties aside) and weights, for softmax and sigmoid scores, DeepSeek-V3
group limiting, renormalisation and route scale; expert choice against the same reference and
against diffusers' own NucleusMoELayer (its routing math, its experts, its shared expert)."""
from __future__ import annotations

import math

import pytest
import torch

from moe_ep.config import MoEConfig
from moe_ep.router import Router
from reference import (expert_choice_copies, plain_swiglu, reference_expert_choice, reference_routing,  # noqa: F401
                       reference_scores, token_choice_with_ties)

H = 24

TOKEN_CHOICE = {
    "softmax-top2": dict(num_experts=8, top_k=2),
    "softmax-top1": dict(num_experts=8, top_k=1),
    "softmax-top1-no-renorm": dict(num_experts=8, top_k=1, renormalize=False),
    "softmax-top4-no-renorm-scale": dict(num_experts=16, top_k=4, renormalize=False, route_scale=2.5),
    "softmax-groups": dict(num_experts=16, top_k=4, n_group=4, topk_group=2),
    "softmax-groups-one-group": dict(num_experts=12, top_k=3, n_group=4, topk_group=1, route_scale=0.5),
    "sigmoid-top2": dict(num_experts=8, top_k=2, score_func="sigmoid"),
    "sigmoid-groups": dict(num_experts=16, top_k=8, score_func="sigmoid", n_group=4, topk_group=2, route_scale=2.5),
    "sigmoid-groups-no-renorm": dict(num_experts=32, top_k=6, score_func="sigmoid", n_group=8, topk_group=3,
                                     renormalize=False),
    "sigmoid-groups-of-one": dict(num_experts=8, top_k=3, score_func="sigmoid", n_group=8, topk_group=4),
    "all-experts": dict(num_experts=6, top_k=6, score_func="sigmoid"),
}


def make_router(cfg: MoEConfig, seed: int = 0, std: float = 0.5) -> Router:
    torch.manual_seed(seed)
    router = Router(H, cfg)
    torch.nn.init.normal_(router.gate.weight, std=std)
    return router


def router_dense(weights: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Router output (weights [T, k], ids [T, k]) -> dense [T, E] float64 (ids must be distinct per token)."""
    T, k = ids.shape
    for t in range(T):
        assert len(set(ids[t].tolist())) == k, f"token {t}: repeated expert ids {ids[t].tolist()}"
    return torch.zeros(T, num_experts, dtype=torch.float64).scatter_(1, ids, weights.double())


@pytest.mark.parametrize("name", sorted(TOKEN_CHOICE))
def test_token_choice_ids_and_weights_match_reference(name):
    cfg = MoEConfig(**TOKEN_CHOICE[name])
    router = make_router(cfg, seed=len(name))
    x = torch.randn(300, H, generator=torch.Generator().manual_seed(1))                    # [T, H]
    weights, ids = router(x)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (300, cfg.top_k)
    want, ties = token_choice_with_ties(x, router.gate.weight, cfg)                        # [T, E], [T]
    assert ties.sum() <= 3, f"{int(ties.sum())} near-ties: pick other data"
    got = router_dense(weights, ids, cfg.num_experts)                                      # [T, E]
    keep = ~ties
    bad = ((got > 0) != (want > 0))[keep].any(-1)
    assert not bad.any(), f"{name}: expert sets differ for {int(bad.sum())} tokens, e.g. token " \
                          f"{int(torch.nonzero(keep).flatten()[bad][0])}"
    err = (got - want)[keep].abs().max().item()
    assert err < 1e-6 * (1 + cfg.route_scale), f"{name}: weights differ by {err}"   # float32 rounding


def test_group_limiting_changes_the_choice():
    """The group cases above are not vacuous: without the group limit, many tokens would pick
    experts outside their best groups (so a router that ignored groups, or kept the worst ones,
    fails the comparison)."""
    for name in ("softmax-groups", "sigmoid-groups", "softmax-groups-one-group"):
        cfg = MoEConfig(**TOKEN_CHOICE[name])
        router = make_router(cfg, seed=len(name))
        x = torch.randn(300, H, generator=torch.Generator().manual_seed(1))
        flat_cfg = MoEConfig(**dict(TOKEN_CHOICE[name], n_group=1, topk_group=1))
        limited = token_choice_with_ties(x, router.gate.weight, cfg)[0] > 0
        free = token_choice_with_ties(x, router.gate.weight, flat_cfg)[0] > 0
        assert (limited != free).any(-1).float().mean() > 0.2, name


def test_reference_definitions_by_hand():
    """The reference itself on one token worked out by hand: softmax groups of 2, group score =
    best expert; sigmoid, group score = sum of the two best."""
    s = [0.30, 0.01, 0.20, 0.19, 0.25, 0.05]          # groups (0,1) (2,3) (4,5): best 0.30, 0.20, 0.25
    from reference import route_one_token
    cfg = MoEConfig(num_experts=6, top_k=2, n_group=3, topk_group=2, route_scale=2.0)
    ids, w, _ = route_one_token(s, cfg)                # groups 0 and 2 kept -> experts 0 and 4
    assert ids == [0, 4] and w == pytest.approx([2 * 0.30 / 0.55, 2 * 0.25 / 0.55])
    cfg = MoEConfig(num_experts=6, top_k=2, n_group=3, topk_group=1, score_func="sigmoid")
    ids, w, _ = route_one_token(s, cfg)                # sums 0.31, 0.39, 0.30 -> group 1 only
    assert ids == [2, 3] and w == pytest.approx([0.20 / 0.39, 0.19 / 0.39])
    cfg = MoEConfig(num_experts=6, top_k=1, renormalize=True, route_scale=3.0)
    assert route_one_token(s, cfg)[:2] == ([0], [pytest.approx(0.90)])   # top-1 keeps its score


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_score_dtype_input_in_float32_is_the_float32_rule(score_func):
    cfg = MoEConfig(num_experts=8, top_k=2, score_func=score_func, score_dtype="input")
    router = make_router(cfg)
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(2))
    weights, ids = router(x)
    want, ties = token_choice_with_ties(x, router.gate.weight, cfg)
    got = router_dense(weights, ids, 8)
    assert ((got - want)[~ties].abs().max()) < 1e-6


# ---------------------------------------------------------------- expert choice

def test_expert_choice_reference_by_hand():
    """B=1, S=4, E=2, capacity_factor 1 -> C = 2 tokens per expert."""
    scores = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]]])   # [B, S, E]
    dense = reference_expert_choice(scores, 1.0, route_scale=2.0)
    # expert 0 takes tokens 0, 1; expert 1 takes tokens 2, 3: one expert each, weight = 2 x 1
    assert torch.allclose(dense, torch.tensor([[2.0, 0], [2.0, 0], [0, 2.0], [0, 2.0]], dtype=torch.float64))
    dense = reference_expert_choice(scores, 1.5)     # C = 3: expert 0 adds token 3, expert 1 adds token 1
    assert dense[3].tolist() == pytest.approx([0.3, 0.7])
    assert dense[1].tolist() == pytest.approx([0.6, 0.4])
    assert dense[0].tolist() == pytest.approx([1.0, 0.0]) and dense[2].tolist() == pytest.approx([0.0, 1.0])
    assert expert_choice_copies(scores, 0.1) == [(0, 0, pytest.approx(1.0)), (2, 1, pytest.approx(1.0))]  # C = 1
    assert reference_expert_choice(scores, 100.0).gt(0).all()                    # C capped at S: all chosen


def check_expert_choice_properties(dense: torch.Tensor, scores: torch.Tensor, cf: float, scale: float) -> None:
    """Every expert takes exactly C tokens of every sample; a chosen token's weights sum to scale."""
    B, S, E = scores.shape
    C = min(S, max(1, math.ceil(cf * S / E)))
    chosen = dense.view(B, S, E) > 0
    assert (chosen.sum(1) == C).all()
    sums = dense.sum(-1)[chosen.view(B * S, E).any(-1)]
    assert torch.allclose(sums, torch.full_like(sums, scale))


@pytest.mark.parametrize("score_func,cf,scale", [("sigmoid", 1.0, 1.0), ("softmax", 2.0, 2.5), ("sigmoid", 0.3, 1.0),
                                                 ("sigmoid", 40.0, 1.0)])
def test_expert_choice_router_matches_reference(score_func, cf, scale):
    """Router.route with routing = "expert_choice": the same (token, expert, weight) triples as the
    reference, sample by sample."""
    cfg = MoEConfig(num_experts=8, top_k=1, score_func=score_func, routing="expert_choice", capacity_factor=cf,
                    route_scale=scale)
    router = make_router(cfg)
    x = torch.randn(3, 20, H, generator=torch.Generator().manual_seed(3))               # [B, S, H]
    copies = router.route(x)
    got = torch.zeros(60, 8, dtype=torch.float64)
    got.index_put_((copies.rows(), copies.expert), copies.weight.double(), accumulate=True)   # [B*S, E]
    want = reference_routing(x, router.gate.weight, cfg)
    check_expert_choice_properties(want, reference_scores(x, router.gate.weight, score_func), cf, scale)
    assert torch.equal(got > 0, want > 0)
    assert (got - want).abs().max() < 1e-6


@pytest.mark.parametrize("use_sigmoid,cf,scale", [(True, 1.0, 1.0), (False, 2.0, 2.5), (True, 0.5, 1.5)])
def test_expert_choice_reference_matches_diffusers_nucleus_layer(use_sigmoid, cf, scale):
    """diffusers' NucleusMoELayer (float32): its output = its shared expert + the reference's routing
    applied to its own experts (gate_up_proj [E, H, 2F] gate|up, down_proj [E, F, H])."""
    from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoELayer

    torch.manual_seed(0)
    E, F, B, S = 4, 16, 2, 10
    layer = NucleusMoELayer(H, F, E, cf, use_sigmoid, scale).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    g = torch.Generator().manual_seed(4)
    x, unmod, temb = torch.randn(B, S, H, generator=g), torch.randn(B, S, H, generator=g), torch.randn(B, H, generator=g)
    with torch.no_grad():
        got = layer(x, unmod, temb).double()                                            # [B, S, H]
        router_input = torch.cat([temb.unsqueeze(1).expand(-1, S, -1), unmod], -1)      # [B, S, 2H]
        scores = reference_scores(router_input, layer.gate.weight, "sigmoid" if use_sigmoid else "softmax")
        dense = reference_expert_choice(scores, cf, scale)                              # [B*S, E]
        flat = x.reshape(B * S, H)
        want = torch.zeros(B * S, H, dtype=torch.float64)
        for e in range(E):
            want += dense[:, e:e + 1] * plain_swiglu(flat, layer.experts.gate_up_proj[e], layer.experts.down_proj[e])
        # the shared expert: diffusers' SwiGLU projects to [up | gate] (up first)
        up_w, gate_w = layer.shared_expert.net[0].proj.weight.chunk(2, 0)               # [F, H] each
        w13 = torch.cat([gate_w.T, up_w.T], 1)                                          # [H, 2F] gate | up
        want += plain_swiglu(flat, w13, layer.shared_expert.net[2].weight.T)
    err = (got.reshape(B * S, H) - want).abs().max().item()
    assert err < 1e-5 * max(1.0, want.abs().max().item()), err


def test_expert_choice_huge_capacity_factor_is_every_token():
    """capacity_factor 1e308 (finite, accepted by the config) caps at S tokens per expert, the
    same routing as capacity_factor = E, instead of an OverflowError at the first forward."""
    from moe_ep import config

    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    routed = []
    for cf in (1e308, 8.0):
        cfg = config.from_dict({"model": {"moe": {"num_experts": 8, "top_k": 2, "routing": "expert_choice",
                                                  "capacity_factor": cf}}}).model.moe
        torch.manual_seed(0)
        routed.append(Router(16, cfg).expert_choice(x))
    assert routed[0].token.numel() == 8 * 2 * 6                     # E x B x S copies
    assert torch.equal(routed[0].token, routed[1].token) and torch.equal(routed[0].weight, routed[1].weight)
