"""Two nodes x two ranks through DeepSpeed's launcher, on one machine (docs/multinode.md).

Each "node" is its own launcher process, started the way a cluster without ssh between its nodes
starts a job: `deepspeed --hostfile H --no_ssh --node_rank R --master_addr A --master_port P ...`
on every node, all pointing at node 0. The launcher of node R starts the ranks the hostfile gives
node R (here ranks 2R and 2R+1) and tells them LOCAL_SIZE=2, CROSS_RANK=R, CROSS_SIZE=2.

Checked: ranks per node come from the launcher (not the world size), one EP group of 4 spans both
nodes, the hierarchical planner (eplb.num_groups=2) keeps each expert group on one node, the images
equal those of the same config on one node (4 ranks of one process group), and a node that stops
answering ends the job on the other node within parallel.timeout_s with one error line per rank and
exit 1. The one-node run goes through job.run on 4 gloo ranks of the test harness (tests/mp.py):
starting it under a third launcher cost 30 s more on 2 cores and checks nothing the two-node run and
test_image_parallel's 4-rank launcher job (its ranks_per_node from one launcher) do not.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from mp import run_ranks
from tiny_job import ROOT, QUICKSTART, TINY_MODEL_SET, free_port, job_rank

pytestmark = pytest.mark.slow   # spawned ranks or launchers

BINDIR = os.path.dirname(sys.executable)
NODES, RANKS_PER_NODE = 2, 2
WORLD = NODES * RANKS_PER_NODE
GROUPS = 2                           # eplb.num_groups: one expert group per node
# the tiny model of tests/tiny_job.py keeps the test small and fast
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen", "a city of glass towers"]
# 4 prompts, one per batch: one round of 4 forwards, one batch per rank (ranks 2 and 3 sample on
# node 1); eplb windows of 2 forwards, a rebalance attempt after forwards 1 and 3 (min_gain 0: the
# planned placement is installed whenever it is better); 8 experts + 4 redundant = 3 slots per rank
SMALL = [TINY_MODEL_SET, f"sampling.prompts={json.dumps(PROMPTS)}",
         "sampling.num_inference_steps=4", "sampling.height=16", "sampling.width=16", "sampling.batch_size=1",
         "sampling.guidance_scale=4.0", "telemetry.wandb=false", "eplb.enabled=true", "eplb.num_redundant_experts=4",
         "eplb.window_size=2", "eplb.interval=2", f"eplb.num_groups={GROUPS}", "eplb.min_gain=0"]
# variables a launcher sets for its ranks; one leaked from the test process would override them
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "MOE_EP_TEST_DIE_AT_STEP")



def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PATH"] = BINDIR + os.pathsep + env.get("PATH", "")
    return dict(env, **(extra or {}))


def node_command(hostfile: str, node_rank: int, port: int, out: str, sets=()) -> list[str]:
    """What a user runs on node `node_rank` (docs/multinode.md)."""
    return [os.path.join(BINDIR, "deepspeed"), "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node_rank),
            "--num_nodes", str(NODES), "--num_gpus", str(RANKS_PER_NODE),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "launch/infer.py", "--config", QUICKSTART, "--no-progress", "--set", *SMALL, f"output_dir={out}", *sets]


class Nodes:
    """The launchers of both nodes, each in its own session (process group), so that one whole
    node (launcher and ranks) can be stopped or killed at once; logs go to files."""

    def __init__(self, tmp, out: str, sets=(), node_env: dict | None = None):
        hostfile = tmp / "hostfile"
        hostfile.write_text("".join(f"node{n} slots={RANKS_PER_NODE}\n" for n in range(NODES)))
        port = free_port()
        self.logs = [str(tmp / f"node{n}.log") for n in range(NODES)]
        self.procs = []
        for n in range(NODES):
            with open(self.logs[n], "w") as log:
                self.procs.append(subprocess.Popen(
                    node_command(str(hostfile), n, port, out, sets), cwd=ROOT, env=_env((node_env or {}).get(n)),
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def log(self, n: int) -> str:
        with open(self.logs[n], errors="replace") as f:
            return f.read()

    def wait(self, n: int, timeout: float) -> int:
        return self.procs[n].wait(timeout=timeout)

    def signal(self, n: int, sig: int) -> None:
        try:
            os.killpg(self.procs[n].pid, sig)
        except ProcessLookupError:
            pass

    def kill_all(self) -> None:
        """SIGKILL every process group this object started (SIGKILL ends stopped processes too)."""
        for n, p in enumerate(self.procs):
            self.signal(n, signal.SIGKILL)
            p.wait(timeout=30)


def read_images(folder: str) -> dict[str, np.ndarray]:
    d = os.path.join(folder, "images")
    return {n: np.asarray(Image.open(os.path.join(d, n))) for n in sorted(os.listdir(d)) if n.endswith(".png")}




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-node run (two launchers) and the one-node run of the same config (4 ranks of one
    process group on one machine). -> {"two": (out, logs, summary), "one": (out, summary)}."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    out2 = str(tmp / "out")
    nodes = Nodes(tmp, out2)
    try:
        rcs = [nodes.wait(n, timeout=180) for n in range(NODES)]
    finally:
        nodes.kill_all()
    logs = [nodes.log(n) for n in range(NODES)]
    assert rcs == [0, 0], "\n".join(log[-3000:] for log in logs)

    out1 = str(tmp_path_factory.mktemp("one_node") / "out")
    run_ranks(WORLD, job_rank, QUICKSTART, SMALL + [f"output_dir={out1}"])   # tests/mp.py: LOCAL_WORLD_SIZE = world, one node
    load = lambda out: json.load(open(os.path.join(out, "summary.json")))  # noqa: E731
    return {"two": (out2, logs, load(out2)), "one": (out1, load(out1))}


def test_ranks_per_node_come_from_the_launcher(runs):
    """parallel.ranks_per_node is null: each rank takes it from its node's launcher (LOCAL_SIZE),
    2 on each of the two nodes (not the world size, 4), 4 when 4 ranks run on one machine (one
    launcher starting all 4: test_image_parallel's launcher job checks that one)."""
    _, logs, summary = runs["two"]
    assert summary["config"]["parallel"]["ranks_per_node"] is None
    assert summary["world_size"] == WORLD and summary["ranks_per_node"] == RANKS_PER_NODE
    for n, log in enumerate(logs):  # each launcher started its own two ranks
        assert f"nnodes={NODES}, num_local_procs={RANKS_PER_NODE}, node_rank={n}" in log, log[-3000:]
    assert runs["one"][1]["ranks_per_node"] == WORLD


def test_ep_group_spans_both_nodes(runs):
    """One EP group of all 4 ranks (no data parallelism), and the launchers put ranks 0, 1 on
    node 0 and ranks 2, 3 on node 1: every all-to-all crosses the node boundary."""
    out, logs, summary = runs["two"]
    assert (summary["world_size"], summary["ep_size"], summary["dp_size"]) == (WORLD, WORLD, 1)
    for log in logs:
        m = re.search(r"global_rank_mapping=.*?(\{.*\})", log)
        assert m and m.group(1) == "{'node0': [0, 1], 'node1': [2, 3]}", log[-3000:]
    # images 2 and 3 were sampled by ranks 2 and 3 (batch j on rank j), i.e. on node 1
    assert sorted(read_images(out)) == ["000.png", "001.png", "002.png", "003.png"]


def node_groups(phy2log: list[int], num_experts: int, num_nodes: int) -> list[set[int]]:
    """The expert groups (logical id // experts per group) each node's slots hold; phy2log [R]."""
    per_node, per_group = len(phy2log) // num_nodes, num_experts // GROUPS
    return [{e // per_group for e in phy2log[n * per_node:(n + 1) * per_node]} for n in range(num_nodes)]


def test_hierarchical_planner_keeps_each_expert_group_on_one_node(runs):
    """With eplb.num_groups=2 on 2 nodes, every layer's placement after a rebalance puts all
    replicas of group 0's experts on one node and all of group 1's on the other."""
    _, _, summary = runs["two"]
    E = summary["config"]["model"]["moe"]["num_experts"]
    R = E + summary["config"]["eplb"]["num_redundant_experts"]    # physical slots per layer
    assert any(ev["status"] == "ok" for ev in summary["rebalances"]), summary["rebalances"]
    for layer, phy2log in enumerate(summary["placement"]):
        assert len(phy2log) == R and sorted(set(phy2log)) == list(range(E)), (layer, phy2log)
        groups = node_groups(phy2log, E, NODES)
        assert all(len(g) == 1 for g in groups) and groups[0] != groups[1], (layer, phy2log, groups)


def test_images_identical_to_the_one_node_run(runs):
    """Same config and seed on 2 nodes x 2 ranks and on 1 node x 4 ranks: identical pixels (the
    placements differ: one planner packs onto 2 nodes, the other onto 1)."""
    assert runs["one"][1]["placement"] != runs["two"][2]["placement"]   # two different layouts were compared
    two, one = read_images(runs["two"][0]), read_images(runs["one"][0])
    assert sorted(two) == sorted(one) == ["000.png", "001.png", "002.png", "003.png"]
    for name in two:
        assert two[name].std() > 10, f"{name} is (nearly) constant"
        diff = np.abs(two[name].astype(int) - one[name].astype(int)).max()
        assert diff == 0, f"2 nodes vs 1 node: {name} differs by {diff}"


DEAD_TIMEOUT_S = 8   # parallel.timeout_s of the dead-node run


def test_a_node_that_stops_answering_ends_the_job_on_the_other(tmp_path):
    """Node 1 dies while sampling: rank 2 stops before forward 2 (MOE_EP_TEST_DIE_AT_STEP, set on
    node 1 only), then all of node 1's processes (launcher and ranks) are frozen with SIGSTOP, so
    no FIN or RST reaches node 0, as when a machine loses power or network. Node 0's ranks stop
    within parallel.timeout_s with one line each naming the rank and the phase, write no
    summary.json, and node 0's launcher exits 1."""
    out = str(tmp_path / "out")
    nodes = Nodes(tmp_path, out, [f"parallel.timeout_s={DEAD_TIMEOUT_S}"],
                  node_env={1: {"MOE_EP_TEST_DIE_AT_STEP": "2:2:hang"}})
    try:
        deadline = time.monotonic() + 120
        while "MOE_EP_TEST_DIE_AT_STEP: rank 2 hangs before forward 2" not in nodes.log(1):
            assert time.monotonic() < deadline and nodes.procs[0].poll() is None, nodes.log(0)[-3000:]
            time.sleep(0.05)
        nodes.signal(1, signal.SIGSTOP)
        t_dead = time.monotonic()
        rc = nodes.wait(0, timeout=DEAD_TIMEOUT_S + 60)
        took = time.monotonic() - t_dead
    finally:
        nodes.kill_all()
    log = nodes.log(0)
    print(f"node 0 stopped {took:.1f} s after node 1 died (parallel.timeout_s={DEAD_TIMEOUT_S})")
    assert rc == 1, log[-3000:]
    assert took < DEAD_TIMEOUT_S + 20, log[-3000:]
    errors = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert errors and all(re.match(r"error: rank [01] lost contact with its peers during forward 2 \(round 0, "
                                   r"step 2\): ", ln) for ln in errors), log[-3000:]
    # the one that notices first names the timeout; the other one may be stopped by its launcher
    assert any(re.search(r"[Tt]imed out", ln) for ln in errors), errors
    assert not os.path.exists(os.path.join(out, "summary.json"))
