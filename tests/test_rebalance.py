"""Online rebalancing on spawned gloo ranks: outputs never change, weights follow the
placement, failures keep the old placement, static placement files, timestep phases."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from moe_ep.config import MoEConfig
from moe_ep.parallel import context_for_tests
from eplb import gpu_load, minimize_movement
from moe_ep.rebalance import (Attempted, Balancedness, RebalanceRecord, Rebalancer, layer_balancedness,
                              read_placement_file)
from moe_ep.stats import ExpertLoadStats
from moe_ep.transfer import plan_transfers
from fake_quack import quack_on_cpu
from mp import run_ranks
from rebalance_helpers import (run_stack_checked, eplb_cfg, greedy_planner, input_planner, inputs, local_weights_ok,
                               random_placement, random_planner, run_stack, tokens, make_stack)

TOL = 1e-5
E, K, NL, FWD = 8, 2, 3, 6


# ------------------------------------------------------------ pure parts

def _apply(old, moves):
    new = old.clone()
    for m in moves:
        assert old[m.layer, m.src_slot] == m.expert
        new[m.layer, m.dst_slot] = m.expert
    return new


def test_plan_transfers_is_exact_and_keeps_experts_in_place():
    gen = torch.Generator().manual_seed(0)
    for ep in (1, 2, 4):
        R = 8 + 2 * ep
        per = R // ep
        for _ in range(20):
            old = torch.stack([random_placement(8, R, gen) for _ in range(3)])
            new = torch.stack([random_placement(8, R, gen) for _ in range(3)])
            moves = plan_transfers(old, new, ep)
            assert torch.equal(_apply(old, moves), new)
            assert len(moves) == int((old != new).sum())               # experts that stay do not move
            for m in moves:
                holders = [s for s in range(R) if old[m.layer, s] == m.expert]
                if any(s // per == m.dst_rank for s in holders):    # a local holder is always used
                    assert m.local
            assert moves == plan_transfers(old, new, ep)             # deterministic
    assert plan_transfers(old, old, 4) == []


def test_align_keeps_gpu_loads_and_reduces_moves():
    """The runtime relabels other planners' plans with eplb.minimize_movement (nodes kept whole)."""
    gen = torch.Generator().manual_seed(1)
    load = torch.rand(3, 8, generator=gen).numpy() * 100
    for ep, rpn in ((2, 2), (4, 4), (4, 2)):
        R = 8 + 2 * ep
        nodes = ep // rpn
        for _ in range(10):
            old = torch.stack([random_placement(8, R, gen) for _ in range(3)])
            new = torch.stack([random_placement(8, R, gen) for _ in range(3)])
            al = minimize_movement(new, old, ep, nodes)
            # GPU loads are a permutation that keeps each node's GPUs together (nodes may swap)
            g_new, g_al = gpu_load(load, new, ep), gpu_load(load, al, ep)  # [3, ep]
            for layer in range(3):
                node_loads = [sorted(sorted(g[layer, n * rpn:(n + 1) * rpn].round(decimals=6).tolist())
                                     for n in range(nodes)) for g in (g_new, g_al)]
                assert node_loads[0] == node_loads[1]
            assert abs(layer_balancedness(load, al, ep) - layer_balancedness(load, new, ep)).max() < 1e-12
            assert int((al != old).sum()) <= int((new != old).sum())
            assert minimize_movement(old, old, ep, nodes).equal(old)


def test_a_rebalance_record_is_frozen_and_reads_like_its_json():
    """A record never changes once made (a later outcome is a new record), and summary.json gets
    plain JSON with the keys of docs/eplb_runtime.md: optional ones only when set."""
    import dataclasses

    rec = RebalanceRecord(3, "interval", "ok", ok=True, balancedness_before=Balancedness(0.5, 0.25),
                          transfer_ms=2.0)
    for name, value in (("status", "failed"), ("measured_balancedness", Balancedness(1.0, 1.0))):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(rec, name, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.balancedness_before.mean = 1.0
    d = rec.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {"forward_idx", "trigger", "status", "ok", "reason", "experts_moved", "remote_moves",
                      "local_copies", "bytes_moved", "time_ms", "balancedness_before", "balancedness_after",
                      "measured_balancedness", "transfer_ms"}
    assert d["balancedness_before"] == {"mean": 0.5, "min": 0.25} and d["balancedness_after"] is None
    assert rec["ok"] is True and rec.get("migration") is None and "attempted" not in rec and dict(rec) == d
    failed = dataclasses.replace(rec, status="failed", ok=False, transfer_ms=None, attempted=Attempted(4, 64))
    assert failed.as_dict()["attempted"] == {"experts_moved": 4, "bytes_moved": 64} and "transfer_ms" not in failed
    assert rec.status == "ok"                                    # replace made a new record


# ------------------------------------------------------------ on ranks

def _setup(rank, world, ep_size, redundant_per_rank=2, **cfg_kw):
    ctx = context_for_tests(rank, world, ep_size)
    mcfg = MoEConfig(num_experts=E, top_k=K, expert_hidden_size=24)
    red = redundant_per_rank * ctx.ep_size
    base = make_stack(ctx, NL, mcfg, red)
    live = make_stack(ctx, NL, mcfg, red)
    cfg = eplb_cfg(num_redundant_experts=red, **cfg_kw)
    stats = ExpertLoadStats(NL, E, torch.device("cpu"), cfg.window_size, cfg.timestep_buckets, top_k=K)
    return ctx, base, live, cfg, stats


def _forward(stats, base, live, rank, fwd, what, t=0.5, same_input=False):
    x = inputs(rank, 0 if same_input else fwd)
    stats.begin_forward(t, cond_rows=x.shape[0] // 2)
    ref = run_stack(base, x)
    out = run_stack_checked(live, x, what)
    err = (out - ref).abs().max().item() if x.numel() else 0.0
    scale = max(1.0, ref.abs().max().item()) if x.numel() else 1.0
    assert err < TOL * scale, f"{what}: forward {fwd}: max abs diff {err} (output scale {scale:.1f})"


def _ranks_forced(rank, world, ep_size, paired_ranks=()):
    ctx, base, live, cfg, stats = _setup(rank, world, ep_size)
    if rank in paired_ranks:       # this rank stores w13 interleaved (the "quack" path, CPU stand-ins)
        for layer in live:
            layer.experts.backend = "quack"
    with quack_on_cpu():
        _forced_rebalances(rank, world, ctx, live, base, cfg, stats)


def _forced_rebalances(rank, world, ctx, live, base, cfg, stats):
    reb = Rebalancer(live, ctx, cfg, stats, planner=random_planner(5), force=True)
    for fwd in range(FWD):
        before = reb.current_phy2log()
        _forward(stats, base, live, rank, fwd, "forced rebalance")
        ev = reb.after_forward(fwd, 0.5)
        # stats: every layer's closed window sums to all tokens of the world x k
        total = sum(tokens(r, fwd) for r in range(world)) * K
        assert stats.windows[-1].sum(-1).tolist() == [total] * NL
        assert ev is not None and ev["ok"], ev
        assert not torch.equal(reb.current_phy2log(), before)
        assert ev["experts_moved"] == int((reb.current_phy2log() != before).sum())
        assert local_weights_ok(live), f"weights do not match the placement after forward {fwd}"
    # every rank (EP and DP) agrees on the placement
    p = reb.current_phy2log()
    allp = [torch.zeros_like(p) for _ in range(world)]
    dist.all_gather(allp, p)
    assert all(torch.equal(q, p) for q in allp)
    # measured balancedness was filled in for all but the last event
    assert all(e["measured_balancedness"] is not None for e in reb.events[:-1])
    for key in ("forward_idx", "experts_moved", "bytes_moved", "time_ms", "balancedness_before",
                "balancedness_after", "ok", "reason"):
        assert key in reb.events[0]


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2)])
def test_forced_rebalance_keeps_outputs(world, ep_size):
    run_ranks(world, _ranks_forced, ep_size)


def test_ranks_that_store_w13_differently_exchange_experts():
    """Rank 0 keeps w13 interleaved (QuACK's layout), rank 1 [gate | up]: experts travel as
    [gate | up], so each lands right whichever way either rank stores it."""
    run_ranks(2, _ranks_forced, 2, (0,))


def _ranks_faults(rank, world, ep_size, tmpdir):
    ctx, base, live, cfg, stats = _setup(rank, world, ep_size)
    last = world - 1
    fail = {"stage": None}

    def hook(stage):
        if stage == fail["stage"] and (fail.get("rank") is None or fail["rank"] == rank):
            raise RuntimeError(f"injected fault at {stage}")

    reb = Rebalancer(live, ctx, cfg, stats, planner=random_planner(3), force=True, fault_hook=hook)
    # "send" fails on one rank only: it runs before the go/no-go vote, so nobody posts a message
    cases = [("plan", None), ("prepare", 1), ("received", last), ("send", 0), ("isend", None), (None, None)]
    for fwd, (stage, frank) in enumerate(cases):
        fail.update(stage=stage, rank=frank)
        before = reb.current_phy2log()
        _forward(stats, base, live, rank, fwd, f"fault {stage}")
        orig = dist.batch_isend_irecv
        if stage == "isend":   # the P2P call itself fails (on every rank: gloo cannot recover a half-posted exchange)
            def broken(ops):
                raise RuntimeError("injected send failure")
            dist.batch_isend_irecv = broken
        try:
            ev = reb.after_forward(fwd, 0.5)
        finally:
            dist.batch_isend_irecv = orig
        if stage is None:
            assert ev["ok"], ev          # the job goes on: the next rebalance works
            assert not torch.equal(reb.current_phy2log(), before)
        else:
            assert not ev["ok"] and ev["status"] == "failed", (stage, ev)
            assert ev["reason"], ev
            assert torch.equal(reb.current_phy2log(), before), stage
        assert local_weights_ok(live), stage
    _forward(stats, base, live, rank, len(cases), "after faults")

    # static placement files: bad ones raise before any work, a good one is installed
    before = reb.current_phy2log()
    R = live[0].num_slots
    good = torch.stack([random_placement(E, R, torch.Generator().manual_seed(77 + l)) for l in range(NL)])
    doc = {"format": "moe-ep.placement", "version": 1, "num_layers": NL, "num_experts": E,
           "num_replicas": R, "num_gpus": ctx.ep_size, "num_nodes": 1, "phy2log": good.tolist()}
    bad_docs = {"num_gpus": dict(doc, num_gpus=ctx.ep_size * 2), "num_layers": dict(doc, num_layers=NL + 1),
                "num_replicas": dict(doc, num_replicas=R + 1), "phy2log[0]": dict(doc, phy2log=[[0] * R] * NL),
                "num_experts": dict(doc, num_experts=E * 2)}
    for name, bad in bad_docs.items():
        path = os.path.join(tmpdir, f"bad-{name}-{rank}.json")
        with open(path, "w") as f:
            json.dump(bad, f)
        try:
            reb.load_placement_file(path)
            raise AssertionError(f"{name}: no error")
        except ValueError as err:
            assert name in str(err), err
        assert torch.equal(reb.current_phy2log(), before)
    path = os.path.join(tmpdir, f"corrupt-{rank}.json")
    with open(path, "w") as f:
        f.write('{"format": "moe-ep.placement", "phy2log": [[1, 2')
    with pytest.raises(ValueError, match="not valid JSON"):
        reb.load_placement_file(path)
    if world > 1:  # bad on the last rank only: every rank refuses it, and the others name that rank
        path = os.path.join(tmpdir, f"last-bad-{rank}.json")
        with open(path, "w") as f:
            json.dump(bad_docs["num_layers"] if rank == world - 1 else doc, f)
        with pytest.raises(ValueError, match="num_layers") as err:
            reb.load_placement_file(path)
        if rank != world - 1:
            assert str(err.value).startswith(f"on rank {world - 1}: placement file"), err.value
        assert torch.equal(reb.current_phy2log(), before)
    path = os.path.join(tmpdir, f"good-{rank}.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    ev = reb.load_placement_file(path)
    assert ev["ok"], ev
    assert torch.equal(reb.current_phy2log(), good)
    assert local_weights_ok(live)
    _forward(stats, base, live, rank, 99, "after placement file")


@pytest.mark.parametrize("world", [2, 4])
def test_failures_keep_old_placement(world, tmp_path):
    run_ranks(world, _ranks_faults, world, str(tmp_path))


def _same_everywhere(p: torch.Tensor, world: int) -> bool:
    allp = [torch.zeros_like(p) for _ in range(world)]
    dist.all_gather(allp, p.contiguous())
    return all(torch.equal(q, p) for q in allp)


def _ranks_one_replica_fails(rank, world, ep_size):
    """ep 2 x dp 2: faults on ONE data-parallel replica (rank 2 = its EP rank 0) must not make the
    replicas run different collectives (a gloo mismatch or hang), and nobody may swap alone."""
    ctx, base, live, cfg, stats = _setup(rank, world, ep_size, window_size=4, interval=4, timestep_buckets=2,
                                         timestep_aware=True)
    assert (ctx.ep_size, ctx.dp_size) == (2, 2)
    fail = {"plan": 1}                                    # fail rank 2's next N "plan" stages

    def hook(stage):
        if stage == "plan" and rank == 2 and fail["plan"] > 0:
            fail["plan"] -= 1
            raise RuntimeError("injected planning fault on one replica")

    reb = Rebalancer(live, ctx, cfg, stats, planner=input_planner(11), force=True, fault_hook=hook)
    steps = [0.9, 0.7, 0.3, 0.1] * 3
    for fwd, t in enumerate(steps):
        _forward(stats, base, live, rank, fwd, "one replica fails", t=t)
        nxt = steps[fwd + 1] if fwd + 1 < len(steps) else None
        reb.after_forward(fwd, t, next_timestep=nxt)
        assert _same_everywhere(reb.current_phy2log(), world), f"placements differ after forward {fwd}"
        if fwd == 3:        # the first phase planning failed on replica 1 only: nobody installed plans
            assert reb.phase_plans is None
            ev = reb.events[-1]
            assert ev["trigger"] == "phase_plan" and ev["status"] == "failed" and ev["reason"], ev
    assert reb.phase_plans is not None and _same_everywhere(reb.phase_plans, world)
    assert sum(e["ok"] for e in reb.events if e["trigger"].startswith("phase:")) >= 1, reb.events
    assert local_weights_ok(live)

    # rebalance_now: planning fails on replica 1 only -> replica 0 moves, but nobody swaps
    load = stats.last_window_load()
    before = reb.current_phy2log()
    fail["plan"] = 1
    ev = reb.rebalance_now(100, load=load)
    assert ev["status"] == "failed" and not ev["ok"] and ev["reason"], ev
    assert torch.equal(reb.current_phy2log(), before) and local_weights_ok(live)

    # the replicas plan different placements: the exact agreement (min == max of every entry) refuses
    reb.decider.planner = random_planner(5 + ctx.dp_rank)
    ev = reb.rebalance_now(101, load=load)
    assert ev["status"] == "failed" and "different placements" in ev["reason"], ev
    assert torch.equal(reb.current_phy2log(), before) and local_weights_ok(live)

    # and the job goes on: the same planner everywhere moves again
    reb.decider.planner = input_planner(12)
    ev = reb.rebalance_now(102, load=load)
    assert ev["ok"], ev
    assert _same_everywhere(reb.current_phy2log(), world) and local_weights_ok(live)
    _forward(stats, base, live, rank, 103, "after replica faults")


def test_failure_on_one_replica_keeps_collectives_aligned():
    run_ranks(4, _ranks_one_replica_fails, 2)


def _ranks_min_gain_and_phases(rank, world, ep_size):
    # min_gain: a greedy planner on skewed load rebalances once; then the gain is ~0 and it skips
    ctx, base, live, cfg, stats = _setup(rank, world, ep_size, window_size=2, interval=2, min_gain=0.02)
    for layer in base + live:
        with torch.no_grad():
            layer.router.gate.weight[0] += 2.0           # skew towards expert 0
    reb = Rebalancer(live, ctx, cfg, stats, planner=greedy_planner)
    statuses = []
    for fwd in range(8):
        _forward(stats, base, live, rank, fwd, "min_gain", same_input=True)  # the same load every window
        ev = reb.after_forward(fwd, 0.5)
        if ev is not None:
            statuses.append(ev["status"])
            if ev["ok"]:
                assert ev["balancedness_after"]["mean"] >= ev["balancedness_before"]["mean"] + cfg.min_gain
    assert statuses[0] == "ok" and "skipped" in statuses[1:], statuses
    assert local_weights_ok(live)

    # timestep-aware: one placement per bucket, switched at bucket boundaries
    ctx, base, live, cfg, stats = _setup(rank, world, ep_size, window_size=4, interval=4, timestep_buckets=2,
                                         timestep_aware=True)
    reb = Rebalancer(live, ctx, cfg, stats, planner=random_planner(11), force=True)
    steps = [0.9, 0.7, 0.3, 0.1] * 3
    for fwd, t in enumerate(steps):
        _forward(stats, base, live, rank, fwd, "timestep-aware", t=t)
        nxt = steps[fwd + 1] if fwd + 1 < len(steps) else None
        reb.after_forward(fwd, t, next_timestep=nxt)
        if reb.phase_plans is not None and nxt is not None:
            assert torch.equal(reb.current_phy2log(), reb.phase_plans[stats.bucket_of(nxt)])
    assert sum(e["ok"] for e in reb.events if e["trigger"].startswith("phase:")) >= 3
    assert local_weights_ok(live)

    # timestep-aware, never worth switching (1 byte/s): the per-bucket terms are cached between
    # window closes and equal what a fresh computation gives; the decision collective still runs
    import moe_ep.rebalance.phases as R
    ctx, base, live, cfg, stats = _setup(rank, world, ep_size, window_size=4, interval=4, timestep_buckets=2,
                                         timestep_aware=True)
    reb = Rebalancer(live, ctx, cfg, stats, planner=random_planner(12), bandwidth_bytes_per_s=1.0)
    calls, real, in_after = [0], R.plan_transfers, [0]

    def counting(*a, **kw):
        calls[0] += in_after[0]
        return real(*a, **kw)

    R.plan_transfers = counting
    decisions = 0
    try:
        for fwd, t in enumerate(steps * 2):
            _forward(stats, base, live, rank, fwd, "timestep-aware cache", t=t)
            nxt = (steps * 2)[fwd + 1] if fwd + 1 < len(steps) * 2 else None
            in_after[0] = 1
            assert reb.after_forward(fwd, t, next_timestep=nxt) is None
            in_after[0] = 0
            if reb.phase_plans is None:
                continue
            b = stats.bucket_of(t if nxt is None else nxt)
            entry = reb.phases.cache[b]                    # what this forward's decision used
            cached = reb.phases.switch_terms(b)            # a hit: nothing changed since
            assert reb.phases.cache[b] is entry
            reb.phases.cache.pop(b)
            fresh = reb.phases.switch_terms(b)             # computed from scratch
            reb.phases.cache[b] = entry
            decisions += cached is not None
            assert (cached is None) == (fresh is None)
            if cached is not None:
                for x, y in zip(cached, fresh):
                    assert np.array_equal(np.asarray(x), np.asarray(y))
    finally:
        R.plan_transfers = real
    assert decisions >= 8                                  # forwards that ran the decision all-reduce
    assert 0 < calls[0] <= 2 * stats.num_windows < decisions   # per bucket and window, not per forward
    assert not any(e["trigger"].startswith("phase:") for e in reb.events)


def test_min_gain_and_timestep_phases():
    run_ranks(2, _ranks_min_gain_and_phases, 2)


def _ranks_eplb_planner(rank, world, ep_size):
    ctx, base, live, cfg, stats = _setup(rank, world, ep_size, window_size=2, interval=2, min_gain=0.0)
    for layer in base + live:
        with torch.no_grad():
            layer.router.gate.weight[3] += 2.0
    reb = Rebalancer(live, ctx, cfg, stats)              # the real eplb.rebalance_experts
    for fwd in range(4):
        _forward(stats, base, live, rank, fwd, "eplb planner")
        ev = reb.after_forward(fwd, 0.5)
        if ev is not None:
            assert ev["status"] in ("ok", "skipped"), ev
    assert any(e["ok"] for e in reb.events), reb.events
    assert local_weights_ok(live)


def test_with_eplb_planner():
    run_ranks(2, _ranks_eplb_planner, 2)


def test_read_placement_file_errors(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"format": "something-else", "phy2log": []}))
    with pytest.raises(ValueError, match="format"):
        read_placement_file(str(p), 1, 4, 4, 1)
    p.write_text(json.dumps({"format": "moe-ep.placement", "version": 1, "num_layers": 1, "num_experts": 4,
                             "num_replicas": 4, "num_gpus": 1, "phy2log": [[0, 1, 2, 9]]}))
    with pytest.raises(ValueError, match=r"phy2log\[0\]\[3\]"):
        read_placement_file(str(p), 1, 4, 4, 1)
    with pytest.raises(ValueError, match="not found"):
        read_placement_file(str(tmp_path / "missing.json"), 1, 4, 4, 1)


def test_balancedness_of_loads_near_the_float64_limit_is_a_number():
    """A stats file may hold loads near 1.8e308 (eplb plans them scaled, docs/reliability.md):
    the runtime's balancedness is then the same as for the loads scaled down, not NaN."""
    phy2log = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    small = np.array([[1.0, 3.0, 2.0, 2.0], [4.0, 1.0, 1.0, 2.0]])
    big = small * 4e307                                     # row sums overflow to inf
    with np.errstate(over="ignore"):
        assert not np.isfinite(big.sum(1)).all()
    got = layer_balancedness(big, phy2log, 2)
    assert np.allclose(got, layer_balancedness(small, phy2log, 2)) and np.isfinite(got).all()
    assert np.allclose(layer_balancedness(small, phy2log, 2), [(8 / 2) / 4, (8 / 2) / 5])   # mean / max GPU load
