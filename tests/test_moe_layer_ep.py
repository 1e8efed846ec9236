"""EP = 1, 2, 4 (and EP 2 x DP 2) against the single-process dense reference (tests/reference.py),
which routes, runs the experts and the shared experts itself from the definitions, in float64;
and the layer in bfloat16 (CPU, EP = 1 and 2) against that float64 reference."""
from __future__ import annotations


import pytest
import torch

from moe_ep.config import MoEConfig
from moe_ep.experts import init_expert_weights
from moe_ep.layer import MoELayer
from moe_ep.parallel import context_for_tests
from moe_ep.stats import ExpertLoadStats
from mp import run_ranks
from exchange_modes import exchange_modes
from reference import logical_weights, reference_moe, token_choice_with_ties

H, F, SEED = 32, 24, 7
TOL = 2e-5


def make_layer(cfg: MoEConfig, ctx, redundant: int, layer_idx: int = 0) -> MoELayer:
    torch.manual_seed(1234)  # the same router and shared weights on every rank
    layer = MoELayer(H, cfg, ctx, num_redundant=redundant, layer_idx=layer_idx)
    torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    if layer.shared is not None:
        torch.nn.init.normal_(layer.shared.w13, std=H ** -0.5)
        torch.nn.init.normal_(layer.shared.w2, std=F ** -0.5)
    layer.load_expert_weights(lambda e: init_expert_weights(SEED, layer_idx, e, H, F))
    return layer


def random_placement(E: int, R: int, gen: torch.Generator) -> torch.Tensor:
    """Every expert once, the redundant slots random experts, all shuffled."""
    extra = torch.randint(0, E, (R - E,), generator=gen)
    ids = torch.cat([torch.arange(E), extra])
    return ids[torch.randperm(R, generator=gen)]


def shared_weights(layer: MoELayer):
    """(w13 [H, 2nF], w2 [nF, H]) of the layer's shared experts, or None."""
    return None if layer.shared is None else (layer.shared.w13, layer.shared.w2)


def check(layer: MoELayer, x: torch.Tensor, what: str, tol: float = TOL) -> None:
    """The layer's output against the float64 reference (tokens at a routing near-tie left out:
    float32 may break such a tie either way). `tol` is relative to the reference's largest value."""
    w13, w2 = logical_weights(SEED, layer.layer_idx, layer.cfg.num_experts, H, F)
    gate = layer.router.gate.weight
    routing, ties = token_choice_with_ties(x, gate, layer.cfg)                          # [T, E], [T]
    ref = reference_moe(x, gate, layer.cfg, w13.to(x.dtype), w2.to(x.dtype), shared_weights(layer), routing=routing)
    outs = {mode: layer(x) for mode in exchange_modes(layer)}                          # every path at this EP size
    for mode, out in outs.items():
        assert out.shape == x.shape and out.dtype == x.dtype, (what, mode)
        assert torch.isfinite(out).all(), (what, mode)
    if not x.numel():
        return
    keep = ~ties
    assert keep.float().mean() > 0.9, f"{what}: too many near-ties for a useful check"
    # the routing itself: float32 scores of the (possibly bf16) inputs, whatever the layer's dtype
    weights, ids = layer.router(x.reshape(-1, H))                                        # [T, k]
    got = torch.zeros_like(routing).scatter_(1, ids, weights.double())                  # [T, E]
    assert torch.equal((got > 0)[keep], (routing > 0)[keep]), f"{what}: routed experts differ"
    assert (got - routing)[keep].abs().max() < 1e-6 * (1 + layer.cfg.route_scale), f"{what}: router weights"
    scale = max(1.0, ref.abs().max().item())
    for mode, out in outs.items():
        err = (out.double() - ref)[keep].abs().max().item()
        assert err < tol * scale, f"{what} ({mode}): max abs diff {err} (reference max {scale})"


CASES = [
    # name, MoEConfig kwargs, tokens per rank (by rank; 0: a rank with nothing to route)
    ("top2-shared", dict(num_experts=8, top_k=2, num_shared_experts=1), [37, 64, 5, 11]),
    ("top1", dict(num_experts=8, top_k=1), [13, 7, 29, 3]),
    ("top8-sigmoid-groups", dict(num_experts=16, top_k=8, score_func="sigmoid", n_group=4, topk_group=2,
                                 route_scale=2.5), [17, 0, 23, 1]),
    ("top4-no-renorm", dict(num_experts=16, top_k=4, renormalize=False), [31, 0, 9, 50]),
]


def _ranks_equivalence(rank: int, world: int, ep_size: int) -> None:
    ctx = context_for_tests(rank, world, ep_size)
    gen = torch.Generator().manual_seed(99)
    for name, kw, tokens in CASES:
        cfg = MoEConfig(expert_hidden_size=F, **kw)
        for redundant in (0, ep_size, 2 * ep_size):
            layer = make_layer(cfg, ctx, redundant)
            x = torch.randn(tokens[rank % len(tokens)], H, generator=torch.Generator().manual_seed(rank))
            check(layer, x, f"{name} contiguous R+{redundant}")
            for trial in range(2):  # random placements, including replicas, installed at run time
                phy2log = random_placement(cfg.num_experts, layer.num_slots, gen)
                layer.set_placement(phy2log, lambda e: init_expert_weights(SEED, 0, e, H, F))
                check(layer, x, f"{name} random placement {trial} R+{redundant} {phy2log.tolist()}")


def _ranks_edge_cases(rank: int, world: int, ep_size: int) -> None:
    ctx = context_for_tests(rank, world, ep_size)
    cfg = MoEConfig(num_experts=8, top_k=1, expert_hidden_size=F, num_shared_experts=1)
    layer = make_layer(cfg, ctx, redundant=0)
    # All tokens to expert 0: only rank 0's slot gets work; the other ranks receive nothing.
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 10.0
    x = torch.rand(23 + rank, H, generator=torch.Generator().manual_seed(rank)) + 0.1
    check(layer, x, "all tokens to one expert")
    counter = ExpertLoadStats(1, cfg.num_experts, torch.device("cpu"))
    layer.stats = counter
    layer(x)
    assert counter.counts.sum(dim=(0, 1))[0].tolist() == [x.shape[0]] + [0] * 7
    # The hot expert replicated on every rank: each rank keeps its tokens local.
    if ctx.ep_size > 1:
        layer2 = make_layer(cfg, ctx, redundant=ctx.ep_size)
        layer2.router.gate.weight.data.copy_(layer.router.gate.weight)
        phy2log = torch.arange(8 + ctx.ep_size) % 8
        per = layer2.slots_per_rank
        for r in range(ctx.ep_size):  # put a replica of expert 0 on every rank
            phy2log[r * per], phy2log[8 + r] = 0, phy2log[r * per].item()
        layer2.set_placement(phy2log, lambda e: init_expert_weights(SEED, 0, e, H, F))
        check(layer2, x, "hot expert replicated on every rank")
        assert layer2.wire_rows == 0, f"rank {rank} sent {layer2.wire_rows} rows: its local replica should serve them"
        if 0 not in layer.local_experts:   # the same tokens, no replica here: they travelled
            assert layer.wire_rows == x.shape[0], (rank, layer.wire_rows)
    # Skewed top-2 with expert groups: every token picks experts 0 and 1 of group 0 (the other
    # ranks' experts get nothing), with and without a replica of each on every rank.
    cfg2 = MoEConfig(num_experts=8, top_k=2, expert_hidden_size=F, n_group=4, topk_group=1)
    for redundant in (0, 2 * ctx.ep_size):
        hot = make_layer(cfg2, ctx, redundant=redundant)
        with torch.no_grad():
            hot.router.gate.weight.zero_()
            hot.router.gate.weight[0], hot.router.gate.weight[1] = 10.0, 8.0
        check(hot, x, f"all tokens to experts 0 and 1 (groups), R+{redundant}")
    # Zero tokens on this rank only, then on every rank (positive inputs: expert 0 wins, no ties
    # among the experts with zero gate rows).
    check(layer, torch.rand(0 if rank == 1 else 9, H) + 0.1, "zero tokens on rank 1")
    check(layer, torch.randn(0, H), "zero tokens everywhere")


@pytest.mark.parametrize("world,ep_size", [(1, 1), (2, 2), (4, 4), (4, 2)])
def test_ep_matches_dense_reference(world, ep_size):
    run_ranks(world, _ranks_equivalence, ep_size)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_edge_cases(world):
    run_ranks(world, _ranks_edge_cases, world)


# bfloat16 on the CPU: weights, activations and the exchange in bf16, router scores in float32.
# Against the float64 reference (same bf16 weights and inputs, upcast) the error is bf16 rounding
# of the activations (8 bits of mantissa, a few roundings deep): measured max 0.006 x the
# reference's largest value at EP = 1; a routing or combine bug gives errors of order 1.
BF16_TOL = 0.02


def _ranks_bf16(rank: int, world: int, ep_size: int) -> None:
    ctx = context_for_tests(rank, world, ep_size)
    for name, kw, tokens in CASES:
        cfg = MoEConfig(expert_hidden_size=F, **kw)
        for redundant in (0, ep_size):
            torch.manual_seed(1234)
            layer = MoELayer(H, cfg, ctx, num_redundant=redundant, dtype=torch.bfloat16)
            torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
            if layer.shared is not None:
                torch.nn.init.normal_(layer.shared.w13, std=H ** -0.5)
                torch.nn.init.normal_(layer.shared.w2, std=F ** -0.5)
            source = lambda e: tuple(w.to(torch.bfloat16) for w in init_expert_weights(SEED, 0, e, H, F))
            layer.load_expert_weights(source)
            x = torch.randn(tokens[rank % len(tokens)], H, generator=torch.Generator().manual_seed(rank))
            x = x.to(torch.bfloat16)                                                     # [T, H]
            check(layer, x, f"bf16 {name} R+{redundant}", BF16_TOL)
            if redundant:
                phy2log = random_placement(cfg.num_experts, layer.num_slots, torch.Generator().manual_seed(5))
                layer.set_placement(phy2log, source)
                check(layer, x, f"bf16 {name} random placement {phy2log.tolist()}", BF16_TOL)


@pytest.mark.parametrize("world,ep_size", [(1, 1), (2, 2), (4, 4), (4, 2)])
def test_bf16_matches_float64_reference(world, ep_size):
    run_ranks(world, _ranks_bf16, ep_size)


def _ranks_expert_choice(rank: int, world: int, ep_size: int) -> None:
    """Expert choice (each expert takes its top-C tokens of every sample): the layer, on samples of
    different counts per rank, against the float64 reference's own expert-choice routing."""
    ctx = context_for_tests(rank, world, ep_size)
    for cf, score_func, scale in ((1.0, "sigmoid", 1.0), (2.0, "softmax", 2.5), (0.3, "sigmoid", 1.0)):
        cfg = MoEConfig(num_experts=8, top_k=1, expert_hidden_size=F, num_shared_experts=1, routing="expert_choice",
                        capacity_factor=cf, score_func=score_func, route_scale=scale)
        for redundant in (0, 2 * ep_size):
            layer = make_layer(cfg, ctx, redundant)
            if redundant:
                layer.set_placement(random_placement(8, layer.num_slots, torch.Generator().manual_seed(3)),
                                    lambda e: init_expert_weights(SEED, 0, e, H, F))
            x = torch.randn(1 + rank, 12, H, generator=torch.Generator().manual_seed(10 + rank))   # [B, S, H]
            w13, w2 = logical_weights(SEED, 0, 8, H, F)
            ref = reference_moe(x, layer.router.gate.weight, cfg, w13, w2, shared_weights(layer))  # [B, S, H] f64
            out = layer(x)
            err = (out.double() - ref).abs().max().item()
            assert out.shape == x.shape and err < TOL * max(1.0, ref.abs().max().item()), \
                f"expert choice cf={cf} {score_func} R+{redundant}: max abs diff {err}"


@pytest.mark.parametrize("world,ep_size", [(1, 1), (2, 2), (4, 4), (4, 2)])
def test_expert_choice_matches_dense_reference(world, ep_size):
    run_ranks(world, _ranks_expert_choice, ep_size)
