"""GPU self-check of online rebalancing: every control message and weight move of
`moe_ep.rebalance.Rebalancer` through NCCL, with bf16 MoE layers on the GPU.

    python benchmarks/gpu_rebalance_check.py                       # one GPU: world of one, NCCL groups
    torchrun --nproc_per_node 2 benchmarks/gpu_rebalance_check.py  # optional: EP over 2 GPUs (real P2P moves)
    python benchmarks/gpu_rebalance_check.py --device cpu          # the same checks over gloo (no GPU needed)

The EP and DP groups are made with `dist.new_group` even for a world of one, so the
rebalancer's broadcasts and all-reduces really go through NCCL. Checks: forced rebalances,
the skip / plan-fault / prepare-fault / send-fault paths, a placement file (good and bad),
timestep-aware phase planning and switching. After each, outputs must equal a never-rebalanced
copy of the same layers (bf16: relative error < 1e-2; bit-identity is reported) and every local
slot must hold exactly the weights of the expert its placement names.
Prints one PASS/FAIL line per check and `OK` at the end; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_ep.atomic import write_json_atomic  # noqa: E402
from moe_ep.config import EplbConfig, MoEConfig  # noqa: E402
from moe_ep.experts import init_expert_weights  # noqa: E402
from moe_ep.layer import MoELayer  # noqa: E402
from moe_ep.parallel import ParallelContext  # noqa: E402
from moe_ep.rebalance import Rebalancer  # noqa: E402
from moe_ep.stats import ExpertLoadStats  # noqa: E402

H, F, E, K, NL, T, SEED = 256, 512, 16, 4, 3, 384, 7
REL_TOL = 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device_kind: str) -> ParallelContext:
    """World from the environment (a world of one if unset); EP over the world, DP of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("FAIL setup: CUDA is not available (use --device cpu for the gloo variant)")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    # explicit groups even for a world of one: the rebalancer's collectives must go through `backend`
    ep_group = dist.new_group(list(range(world)))
    dp_group = None
    for r in range(world):                       # new_group is collective: every rank makes every group
        g = dist.new_group([r])
        if r == rank:
            dp_group = g
    return ParallelContext(rank=rank, world_size=world, ep_size=world, ep_rank=rank, ep_group=ep_group,
                           dp_size=1, dp_rank=0, dp_group=dp_group, ranks_per_node=world, device=device,
                           timeout_s=120.0)


def make_stack(ctx: ParallelContext, redundant: int) -> list[MoELayer]:
    layers = []
    cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden_size=F)
    for l in range(NL):
        torch.manual_seed(1234 + l)                  # the same router in every stack and on every rank
        layer = MoELayer(H, cfg, ctx, num_redundant=redundant, layer_idx=l, dtype=torch.bfloat16)
        with torch.no_grad():
            layer.router.gate.weight.normal_(std=0.5)
            layer.router.gate.weight[0] += 1.0       # some skew, so replicas matter
        layer.load_expert_weights(lambda e, l=l: expert_weights(ctx, l, e))
        layers.append(layer)
    return layers


def expert_weights(ctx, layer: int, expert: int):
    return init_expert_weights(SEED, layer, expert, H, F, torch.bfloat16, ctx.device)


def weights_follow_placement(ctx, layers) -> bool:
    for layer in layers:
        for s, e in enumerate(layer.local_experts):
            want, have = expert_weights(ctx, layer.layer_idx, e), layer.experts.slot_weights(s)
            if not all(torch.equal(a, b) for a, b in zip(have, want)):
                return False
    return True


def random_placement(R: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.cat([torch.arange(E), torch.randint(0, E, (R - E,), generator=gen)])
    return ids[torch.randperm(R, generator=gen)]


def random_planner(seed: int):
    gen = torch.Generator().manual_seed(seed)

    def plan(weight, num_replicas, num_groups, num_nodes, num_gpus, policy="default", previous_phy2log=None):
        return torch.stack([random_placement(num_replicas, gen) for _ in range(weight.shape[0])]), None, None
    return plan


def same_planner(weight, num_replicas, num_groups, num_nodes, num_gpus, policy="default", previous_phy2log=None):
    return previous_phy2log.clone(), None, None


class Checker:
    def __init__(self, ctx):
        self.ctx, self.failed, self.bit_identical = ctx, [], True

    def compare(self, base, live, x, what: str) -> None:
        ref, out = x, x
        for b, l in zip(base, live):
            ref = ref + b(ref)
            out = out + l(out)
        if not torch.isfinite(out).all():
            raise AssertionError(f"{what}: non-finite output")
        rel = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
        self.bit_identical &= torch.equal(out, ref)
        if rel >= REL_TOL:
            raise AssertionError(f"{what}: relative error {rel:.3e} >= {REL_TOL}")

    def run(self, name: str, fn) -> None:
        try:
            detail = fn() or ""
            ok = True
        except Exception as err:  # noqa: BLE001 - report every check
            ok, detail = False, f"{type(err).__name__}: {err}"
            traceback.print_exc()
        # every rank must pass: one all-reduce (also through the backend under test)
        flag = torch.tensor([0 if ok else 1], device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        ok_all = ok and int(flag.cpu()[0]) == 0
        if self.ctx.rank == 0 or not ok:
            print(f"{'PASS' if ok_all else 'FAIL'} {name}" + (f": {detail}" if detail else "")
                  + ("" if ok or ok_all else " (failed on another rank)"), flush=True)
        if not ok_all:
            self.failed.append(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--forwards", type=int, default=6)
    args = ap.parse_args()
    ctx = init(args.device)
    chk = Checker(ctx)
    red = 4 * ctx.ep_size
    base, live = make_stack(ctx, red), make_stack(ctx, red)
    fwd = [0]

    def x_for(i: int) -> torch.Tensor:
        g = torch.Generator(device=ctx.device).manual_seed(1000 * i + ctx.rank)
        return torch.randn(T, H, generator=g, device=ctx.device).to(torch.bfloat16)

    def forward(stats, t: float, what: str) -> None:
        stats.begin_forward(t, cond_rows=T // 2)
        chk.compare(base, live, x_for(fwd[0]), f"{what}, forward {fwd[0]}")
        fwd[0] += 1

    cfg = EplbConfig(enabled=True, num_redundant_experts=red, window_size=1, interval=1, min_gain=-1.0)
    stats = ExpertLoadStats(NL, E, ctx.device, cfg.window_size, cfg.timestep_buckets, top_k=K)
    fault = {"stage": None}

    def hook(stage):
        if stage == fault["stage"]:
            raise RuntimeError(f"injected fault at {stage}")

    reb = Rebalancer(live, ctx, cfg, stats, planner=random_planner(5), force=True, fault_hook=hook,
                     transfer_timeout_s=ctx.timeout_s)

    def forced():
        for _ in range(args.forwards):
            before = reb.current_phy2log()
            forward(stats, 0.5, "forced rebalance")
            ev = reb.after_forward(fwd[0] - 1, 0.5)
            assert ev is not None and ev["ok"], ev
            assert not torch.equal(reb.current_phy2log(), before), "placement did not change"
            assert weights_follow_placement(ctx, live), "weights do not match the placement"
        forward(stats, 0.5, "after the last rebalance")
        n = sum(e["ok"] for e in reb.events)
        return f"{n} rebalances, {sum(e['experts_moved'] for e in reb.events)} experts moved"

    def kept(stage: str, planner=None, want="failed"):
        def check():
            fault["stage"] = stage
            saved = reb.decider.planner
            if planner is not None:
                reb.decider.planner = planner
            try:
                before = reb.current_phy2log()
                forward(stats, 0.5, f"before {stage or 'skip'}")
                ev = reb.after_forward(fwd[0] - 1, 0.5)
            finally:
                fault["stage"], reb.decider.planner = None, saved
            assert ev is not None and ev["status"] == want and not ev["ok"], ev
            assert torch.equal(reb.current_phy2log(), before), "placement changed"
            assert weights_follow_placement(ctx, live)
            forward(stats, 0.5, f"after {stage or 'skip'}")
            return ev["reason"]
        return check

    def placement_file():
        R = live[0].num_slots
        gen = torch.Generator().manual_seed(77)
        good = torch.stack([random_placement(R, gen) for _ in range(NL)])
        doc = {"format": "moe-ep.placement", "version": 1, "num_layers": NL, "num_experts": E,
               "num_replicas": R, "num_gpus": ctx.ep_size, "num_nodes": 1, "phy2log": good.tolist()}
        with tempfile.TemporaryDirectory() as d:
            bad = os.path.join(d, "bad.json")
            write_json_atomic(bad, dict(doc, num_gpus=ctx.ep_size + 1))
            before = reb.current_phy2log()
            try:
                reb.load_placement_file(bad)
                raise AssertionError("a bad placement file was accepted")
            except ValueError as err:
                assert "num_gpus" in str(err), err
            assert torch.equal(reb.current_phy2log(), before)
            path = os.path.join(d, "good.json")
            write_json_atomic(path, doc)
            ev = reb.load_placement_file(path)
        assert ev["ok"], ev
        assert torch.equal(reb.current_phy2log(), good)
        assert weights_follow_placement(ctx, live)
        forward(stats, 0.5, "after the placement file")

    def phases():
        pcfg = EplbConfig(enabled=True, num_redundant_experts=red, window_size=4, interval=4, min_gain=-1.0,
                          timestep_buckets=2, timestep_aware=True)
        pstats = ExpertLoadStats(NL, E, ctx.device, pcfg.window_size, pcfg.timestep_buckets, top_k=K)
        for layer in live:
            layer.stats = None               # the new rebalancer attaches its own statistics
        preb = Rebalancer(live, ctx, pcfg, pstats, planner=random_planner(11), force=True,
                          transfer_timeout_s=ctx.timeout_s)
        steps = [0.9, 0.7, 0.3, 0.1] * 3
        for i, t in enumerate(steps):
            forward(pstats, t, f"timestep-aware t={t}")
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            preb.after_forward(fwd[0] - 1, t, next_timestep=nxt)
            if preb.phase_plans is not None and nxt is not None:
                assert torch.equal(preb.current_phy2log(), preb.phase_plans[pstats.bucket_of(nxt)])
            assert weights_follow_placement(ctx, live)
        forward(pstats, 0.1, "after the phases")
        switches = sum(e["ok"] for e in preb.events if e["trigger"].startswith("phase:"))
        assert preb.phase_plans is not None and switches >= 2, preb.events
        return f"{switches} phase switches"

    chk.run("forced rebalances keep outputs", forced)
    chk.run("unchanged plan is skipped", kept(None, planner=same_planner, want="skipped"))
    chk.run("planner fault keeps the placement", kept("plan"))
    chk.run("prepare fault keeps the placement", kept("prepare"))
    chk.run("send fault keeps the placement", kept("send"))
    chk.run("rebalance after faults", forced)
    chk.run("placement file", placement_file)
    chk.run("timestep-aware phases", phases)
    if ctx.rank == 0:
        print(f"INFO device={ctx.device} backend={dist.get_backend()} world={ctx.world_size} "
              f"outputs bit-identical to the reference: {'yes' if chk.bit_identical else 'no'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if chk.failed:
        if ctx.rank == 0:
            print(f"FAIL {len(chk.failed)} check(s): {', '.join(chk.failed)}", flush=True)
        return 1
    if ctx.rank == 0:
        print("OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
