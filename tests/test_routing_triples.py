"""Expert-choice routing and a separate router input, EP = 1, 2, 4 and EP 2 x DP 2, against a
plain single-process reference written from the rule's definition (not from moe_ep.router)."""
from __future__ import annotations

import math

import pytest
import torch

from moe_ep.config import MoEConfig
from moe_ep.experts import init_expert_weights
from moe_ep.layer import MoELayer
from moe_ep.parallel import context_for_tests
from moe_ep.stats import ExpertLoadStats
from exchange_modes import exchange_modes
from mp import run_ranks
from reference import logical_weights, plain_swiglu, reference_moe, token_choice_with_ties

H, HR, F, SEED, E = 16, 24, 12, 3, 8
TOL = 2e-5


def expert_choice_reference(x, r_in, gate, w13, w2, capacity_factor, route_scale, score_func):
    """x [B, S, H], r_in [B, S, Hr], gate [E, Hr] -> [B, S, H], by the rule's definition:
    in every sample, expert e takes its C highest-scoring tokens; a token's output is the sum
    over the experts that took it of score / (sum of those experts' scores) * route_scale *
    expert(x)."""
    B, S, _ = x.shape
    out = torch.zeros_like(x)
    C = min(S, max(1, math.ceil(capacity_factor * S / E)))
    for b in range(B):
        logits = r_in[b].double() @ gate.double().t()                              # [S, E]
        scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
        chosen = [[] for _ in range(S)]                                            # token -> [(e, score)]
        for e in range(E):
            for s in sorted(range(S), key=lambda s: -scores[s, e].item())[:C]:
                chosen[s].append((e, scores[s, e].item()))
        for s in range(S):
            total = sum(v for _, v in chosen[s])
            for e, v in chosen[s]:
                y = plain_swiglu(x[b, s:s + 1], w13[e], w2[e])[0]                  # [H] float64
                out[b, s] += (v / (total + 1e-12) * route_scale * y).to(out.dtype)
    return out


def _layer(ctx, redundant, score_func, capacity_factor):
    cfg = MoEConfig(num_experts=E, expert_hidden_size=F, routing="expert_choice", capacity_factor=capacity_factor,
                    route_scale=2.5, score_func=score_func)
    torch.manual_seed(5)
    layer = MoELayer(H, cfg, ctx, num_redundant=redundant, router_input_size=HR)
    torch.nn.init.normal_(layer.router.gate.weight, std=0.7)
    layer.load_expert_weights(lambda e: init_expert_weights(SEED, 0, e, H, F))
    return layer


def _check(layer, x, r_in, what):
    w13, w2 = logical_weights(SEED, 0, E, H, F)
    cfg = layer.cfg
    ref = expert_choice_reference(x, r_in, layer.router.gate.weight, w13, w2, cfg.capacity_factor,
                                  cfg.route_scale, cfg.score_func)
    for mode in exchange_modes(layer):                  # every path at this EP size
        out = layer(x, router_input=r_in)
        assert out.shape == x.shape, (what, mode)
        err = (out - ref).abs().max().item() if x.numel() else 0.0
        assert err < TOL, f"{what} ({mode}): max abs diff {err}"


def _ranks_expert_choice(rank, world, ep_size):
    ctx = context_for_tests(rank, world, ep_size)
    gen = torch.Generator().manual_seed(11 + rank)
    samples = [2, 0, 1, 3][rank % 4]                      # rank 1 has no samples at all
    for score_func, cf in (("softmax", 2.0), ("sigmoid", 0.5), ("softmax", 40.0)):   # 40: C = S
        for redundant in (0, 2 * ep_size):
            layer = _layer(ctx, redundant, score_func, cf)
            x = torch.randn(samples, 7, H, generator=gen)
            r_in = torch.randn(samples, 7, HR, generator=gen)
            _check(layer, x, r_in, f"{score_func} cf={cf} R+{redundant}")
            # random placement with replicas, installed at run time
            extra = torch.randint(0, E, (layer.num_slots - E,), generator=torch.Generator().manual_seed(7))
            phy2log = torch.cat([torch.arange(E), extra])[torch.randperm(layer.num_slots,
                                                                          generator=torch.Generator().manual_seed(8))]
            layer.set_placement(phy2log, lambda e: init_expert_weights(SEED, 0, e, H, F))
            _check(layer, x, r_in, f"{score_func} cf={cf} R+{redundant} placed {phy2log.tolist()}")
    # no samples, and samples with no tokens, on every rank at once
    layer = _layer(ctx, 2 * ep_size, "softmax", 2.0)
    for shape in ((0, 7), (3, 0)):
        _check(layer, torch.randn(*shape, H), torch.randn(*shape, HR), f"empty batch {shape}")
    # stats: expert choice gives every expert exactly samples * C copies, split by sample branch
    layer = _layer(ctx, 0, "softmax", 2.0)
    stats = ExpertLoadStats(1, E, torch.device("cpu"))
    layer.stats = stats
    x = torch.randn(4, 6, H, generator=gen)
    stats.begin_forward(0.5, sample_branch=[1, 0, 0, 1])
    layer(x, router_input=torch.randn(4, 6, HR, generator=gen))
    C = math.ceil(2.0 * 6 / E)
    assert stats.counts[0, 0, 0].tolist() == [2 * C] * E      # samples 1, 2: conditional
    assert stats.counts[0, 1, 0].tolist() == [2 * C] * E      # samples 0, 3: unconditional


@pytest.mark.parametrize("world,ep_size", [(1, 1), (2, 2), (4, 4), (4, 2)])
def test_expert_choice_matches_reference(world, ep_size):
    run_ranks(world, _ranks_expert_choice, ep_size)


def test_expert_choice_needs_samples():
    layer = _layer(context_for_tests(0, 1, 1), 0, "softmax", 1.0)
    with pytest.raises(ValueError, match="samples, tokens, features"):
        layer(torch.randn(5, H))


def test_sample_branch_splits_token_choice_counts():
    """Each row's branch comes from its sample's label, whatever order the samples are in."""
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden_size=F)
    layer = MoELayer(H, cfg, context_for_tests(0, 1, 1))
    stats = ExpertLoadStats(1, 4, torch.device("cpu"))
    layer.stats = stats
    stats.begin_forward(0.0, sample_branch=[1, 0, 1])
    layer(torch.randn(3, 5, H))
    assert stats.counts[0, 0].sum().item() == 1 * 5 * 2
    assert stats.counts[0, 1].sum().item() == 2 * 5 * 2


def _dense_token_choice(x, layer):
    """The float64 reference (tests/reference.py: the routing rule written out, plain SwiGLU) with
    the layer's gate -> ([T, H] in x's dtype, near_tie [T]: tokens whose choice float32 may flip)."""
    w13, w2 = logical_weights(SEED, 0, layer.cfg.num_experts, H, F)
    routing, ties = token_choice_with_ties(x, layer.router.gate.weight, layer.cfg)     # [T, E], [T]
    return reference_moe(x, layer.router.gate.weight, layer.cfg, w13, w2, routing=routing).to(x.dtype), ties


def _ranks_dedup(rank, world, ep_size):
    ctx = context_for_tests(rank, world, ep_size)
    cfg = MoEConfig(num_experts=16, top_k=8, expert_hidden_size=F)
    torch.manual_seed(5)
    layer = MoELayer(H, cfg, ctx, num_redundant=ep_size)
    layer.batch_invariant = False      # the pair exchange (the batch-invariant path sends one row per copy)
    torch.nn.init.normal_(layer.router.gate.weight, std=0.05)      # near-uniform routing
    layer.load_expert_weights(lambda e: init_expert_weights(SEED, 0, e, H, F))
    x = torch.randn(0 if rank == 1 else 64, H, generator=torch.Generator().manual_seed(rank))
    ref, ties = _dense_token_choice(x, layer)
    sent = {}
    for dedup, overlap in ((True, False), (False, False), (True, True)):
        layer.dedup_tokens, layer.overlap_own_rows = dedup, overlap
        out = layer(x)
        err = (out - ref)[~ties].abs().max().item() if x.numel() else 0.0
        assert err < TOL, f"dedup={dedup} overlap={overlap}: max abs diff {err}"
        sent.setdefault(dedup, layer.wire_rows)
        if overlap:
            assert layer.wire_rows == sent[True]       # the same pairs leave this rank
    # expert choice through the overlapped exchange, with this rank's own pairs and no-token ranks
    ec = MoELayer(H, MoEConfig(num_experts=E, expert_hidden_size=F, routing="expert_choice", capacity_factor=2.0),
                  ctx, num_redundant=2 * ep_size)
    torch.nn.init.normal_(ec.router.gate.weight, std=0.7)
    ec.load_expert_weights(lambda e: init_expert_weights(SEED, 0, e, H, F))
    xe = torch.randn(0 if rank == 1 else 2, 7, H, generator=torch.Generator().manual_seed(50 + rank))
    w13, w2 = logical_weights(SEED, 0, E, H, F)
    ref_e = expert_choice_reference(xe, xe, ec.router.gate.weight, w13, w2, 2.0, 1.0, "softmax")
    ec.batch_invariant, ec.overlap_own_rows = False, True
    out_e = ec(xe)
    assert (out_e - ref_e).abs().max().item() < TOL if xe.numel() else out_e.shape == xe.shape
    if x.numel():
        # top-8 of 16 over `ep_size` ranks: 8 * (ep - 1) / ep copies leave per token, but at most
        # ep - 1 pairs (1/4 of the copies at EP 2)
        assert sent[False] > 0
        ratio = sent[True] / sent[False]
        expected = (ep_size - 1) / (8 * (ep_size - 1) / ep_size)
        assert abs(ratio - expected) < 0.08, (ratio, expected, sent)


@pytest.mark.parametrize("world", [2, 4])
def test_token_dedup_matches_reference_and_sends_less(world):
    run_ranks(world, _ranks_dedup, world)


def test_per_copy_combine_weights_in_float32():
    """The combine of one row per routed copy multiplies in float32, as the other combines do: three
    bf16 rows of 1.0 with weights 0.3 sum to bf16(0.9) = 0.8984375, where weights rounded to bf16
    first (0.30078125 each) would give 0.90234375."""
    from moe_ep.dispatch import DispatchPlan, combine
    from moe_ep.router import RoutedCopies

    T, k, H = 4, 3, 8
    copies = RoutedCopies(expert=torch.zeros(T * k, dtype=torch.int64), weight=torch.full((T * k,), 0.3),
                          num_tokens=T, top_k=k)
    plan = DispatchPlan(unsort=torch.arange(T * k), send_splits=[T * k], recv_splits=[T * k], ungroup=None,
                        local_counts=torch.tensor([T * k]))
    out = combine(torch.ones(T * k, H, dtype=torch.bfloat16), copies, plan, group=None)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.full((T, H), 0.9).to(torch.bfloat16)), out[0]
