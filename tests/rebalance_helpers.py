"""Shared pieces of the rebalancing tests: a stack of MoE layers and test planners."""
from __future__ import annotations

import torch

from moe_ep.config import EplbConfig, MoEConfig
from moe_ep.experts import init_expert_weights
from moe_ep.layer import MoELayer
from reference import logical_weights, reference_moe, token_choice_with_ties

H, F, SEED = 32, 24, 7


def make_stack(ctx, num_layers: int, cfg: MoEConfig, redundant: int) -> list[MoELayer]:
    layers = []
    for l in range(num_layers):
        torch.manual_seed(1234 + l)  # the same router on every rank and in every stack
        layer = MoELayer(H, cfg, ctx, num_redundant=redundant, layer_idx=l)
        torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
        layer.load_expert_weights(lambda e, l=l: init_expert_weights(SEED, l, e, H, F))
        layers.append(layer)
    return layers


def run_stack(layers, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = x + layer(x)
    return x


def run_stack_checked(layers, x: torch.Tensor, what: str, tol: float = 1e-5) -> torch.Tensor:
    """run_stack, with every layer's output compared to the float64 reference (tests/reference.py:
    the routing rule written out, each logical expert's seeded weights) on that layer's input, so
    a placement, replica or weight-move bug shows whatever the other stack does. Tokens at a
    routing near-tie are left out (float32 may break such a tie either way)."""
    for layer in layers:
        cfg = layer.cfg
        w13, w2 = logical_weights(SEED, layer.layer_idx, cfg.num_experts, H, F)
        gate = layer.router.gate.weight
        routing, ties = token_choice_with_ties(x, gate, cfg)                           # [T, E], [T]
        ref = reference_moe(x, gate, cfg, w13, w2, routing=routing)                    # [T, H] f64
        y = layer(x)
        if x.numel():
            err = (y.double() - ref)[~ties].abs().max().item() if (~ties).any() else 0.0
            scale = max(1.0, ref.abs().max().item())
            assert err < tol * scale, f"{what}: layer {layer.layer_idx}: max abs diff {err} from the reference"
        x = x + y
    return x


def tokens(rank: int, fwd: int) -> int:
    """Token rows of rank `rank` in forward `fwd`: uneven, and none at all on rank 1 in every
    fourth forward (a rank with nothing routed, before, during and after the moves)."""
    if rank == 1 and fwd % 4 == 2:
        return 0
    return 5 + (7 * rank + 11 * fwd) % 23


def inputs(rank: int, fwd: int) -> torch.Tensor:
    return torch.randn(tokens(rank, fwd), H, generator=torch.Generator().manual_seed(1000 * fwd + rank))


def random_placement(E: int, R: int, gen: torch.Generator) -> torch.Tensor:
    extra = torch.randint(0, E, (R - E,), generator=gen)
    ids = torch.cat([torch.arange(E), extra])
    return ids[torch.randperm(R, generator=gen)]


def random_planner(seed: int):
    """A planner that returns random valid placements (deterministic in its call count)."""
    gen = torch.Generator().manual_seed(seed)

    def plan(weight, num_replicas, num_groups, num_nodes, num_gpus, policy="default", previous_phy2log=None):
        L, E = weight.shape
        p = torch.stack([random_placement(E, num_replicas, gen) for _ in range(L)])
        return p, None, None
    return plan


def input_planner(seed: int):
    """Random valid placements that depend only on the planner's inputs (load, previous placement),
    so DP replicas agree even when one of them skipped a call (e.g. after an injected fault)."""
    def plan(weight, num_replicas, num_groups, num_nodes, num_gpus, policy="default", previous_phy2log=None):
        weight = torch.as_tensor(weight, dtype=torch.float64)
        L, E = weight.shape
        key = int(weight.sum().item()) * 31 + int(torch.as_tensor(previous_phy2log).sum().item())
        gen = torch.Generator().manual_seed(seed * 1000003 + key % (1 << 31))
        return torch.stack([random_placement(E, num_replicas, gen) for _ in range(L)]), None, None
    return plan


def greedy_planner(weight, num_replicas, num_groups, num_nodes, num_gpus, policy="default", previous_phy2log=None):
    """A small load-aware planner (replicate the heaviest, pack greedily) for tests."""
    weight = torch.as_tensor(weight, dtype=torch.float64)
    L, E = weight.shape
    per = num_replicas // num_gpus
    out = []
    for l in range(L):
        cnt = [1] * E
        w = weight[l].tolist()
        for _ in range(num_replicas - E):
            e = max(range(E), key=lambda i: w[i] / cnt[i])
            cnt[e] += 1
        items = sorted(((w[e] / cnt[e], e) for e in range(E) for _ in range(cnt[e])), reverse=True)
        loads, slots = [0.0] * num_gpus, [[] for _ in range(num_gpus)]
        for v, e in items:
            g = min((g for g in range(num_gpus) if len(slots[g]) < per), key=lambda g: loads[g])
            loads[g] += v
            slots[g].append(e)
        out.append(torch.tensor([e for s in slots for e in s]))
    return torch.stack(out), None, None


def local_weights_ok(layers) -> bool:
    """Each slot of this rank holds exactly the weights of the expert the placement names."""
    for layer in layers:
        for s, e in enumerate(layer.local_experts):
            want, have = init_expert_weights(SEED, layer.layer_idx, e, H, F), layer.experts.slot_weights(s)
            if not all(torch.equal(a, b) for a, b in zip(have, want)):
                return False
    return True


def eplb_cfg(**kw) -> EplbConfig:
    base = dict(enabled=True, window_size=1, interval=1, min_gain=-1.0)
    base.update(kw)
    return EplbConfig(**base)
