"""EP / DP groups, EP-size derivation, node topology and the layout errors."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_ep.config import ConfigError, MoEConfig, ParallelConfig
from moe_ep.layer import MoELayer
from moe_ep.parallel import ParallelContext, build_context, check_layout, derive_ep_size
from mp import run_ranks


def test_ep_size_explicit_derived_and_whole_world():
    assert derive_ep_size(ParallelConfig(ep_size=2), 8) == 2
    assert derive_ep_size(ParallelConfig(), 4) == 4
    cfg = ParallelConfig(enable_expert_parallel=True, sequence_parallel_size=2, cfg_parallel_size=2)
    assert derive_ep_size(cfg, 8) == 4           # vLLM-Omni: EP = tp x sp x cfg x dp


@pytest.mark.parametrize("cfg,world,field", [
    (ParallelConfig(ep_size=3), 4, "parallel.ep_size"),
    (ParallelConfig(enable_expert_parallel=True, tensor_parallel_size=3), 4, "parallel.enable_expert_parallel"),
])
def test_ep_size_must_divide_world(cfg, world, field):
    with pytest.raises(ConfigError) as err:
        derive_ep_size(cfg, world)
    assert field in str(err.value) and str(world) in str(err.value)


def test_layout_errors_name_the_setting():
    with pytest.raises(ConfigError, match="model.moe.num_experts"):
        check_layout(num_experts=6, num_redundant=0, ep_size=4)
    with pytest.raises(ConfigError, match="eplb.num_redundant_experts"):
        check_layout(num_experts=8, num_redundant=3, ep_size=4)
    check_layout(num_experts=8, num_redundant=4, ep_size=4)
    with pytest.raises(ConfigError, match="model.moe.top_k"):
        MoELayer(16, MoEConfig(num_experts=4, top_k=5, expert_hidden_size=8), ParallelContext())


@pytest.mark.parametrize("ep,rpn,nodes", [(8, 8, 1), (16, 8, 2), (64, 8, 8), (4, 2, 2), (2, 8, 1)])
def test_nodes_spanned_by_an_ep_group(ep, rpn, nodes):
    assert ParallelContext(ep_size=ep, ranks_per_node=rpn).num_nodes == nodes


def _ranks_groups(rank: int, world: int) -> None:
    ctx = build_context(ParallelConfig(ep_size=2, ranks_per_node=2, timeout_s=30), rank, world, torch.device("cpu"))
    assert (ctx.ep_size, ctx.dp_size, ctx.ep_rank, ctx.dp_rank) == (2, 2, rank % 2, rank // 2)
    assert ctx.num_nodes == 1
    # EP groups are consecutive ranks {0,1}, {2,3}; DP groups are {0,2}, {1,3}.
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=ctx.ep_group)
    assert t.item() == {0: 1.0, 1: 1.0, 2: 5.0, 3: 5.0}[rank]
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=ctx.dp_group)
    assert t.item() == {0: 2.0, 1: 4.0, 2: 2.0, 3: 4.0}[rank]


def test_ep_and_dp_groups_on_four_ranks():
    run_ranks(4, _ranks_groups)


def test_more_ranks_on_a_node_than_gpus_is_a_config_error(monkeypatch):
    """Local rank 2 on a node with 2 GPUs: a ConfigError naming parallel.device before the process
    group, not two ranks sharing a GPU until NCCL refuses them. A rank that sees one GPU uses it."""
    from moe_ep.parallel import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="local rank 2 has no GPU of its own") as err:
        pick_device("auto", 2)
    assert err.value.field_name == "parallel.device"
    assert pick_device("cpu", 5) == torch.device("cpu")
    # one visible GPU per rank (a scheduler that isolates them): every local rank takes GPU 0
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1])
    assert pick_device("cuda", 3) == torch.device("cuda", 0) and chosen == [0]


def test_more_ranks_than_gpus_is_refused_in_preflight(monkeypatch):
    """The launcher started 4 ranks on a node with 2 GPUs: preflight (where rank 0 prints) refuses
    it; 2 ranks, or 4 ranks that each see one GPU, pass."""
    from moe_ep import config as config_mod
    from moe_ep.job import check_gpus_per_node

    cfg = config_mod.from_dict({"parallel": {"device": "auto"}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for gpus, ranks, refused in ((2, 4, True), (2, 2, False), (1, 4, False)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda g=gpus: g)
        monkeypatch.setenv("LOCAL_SIZE", str(ranks))
        if refused:
            with pytest.raises(ConfigError, match="started 4 ranks on this node, which has 2 GPUs"):
                check_gpus_per_node(cfg)
        else:
            check_gpus_per_node(cfg)
    cfg.parallel.device = "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_gpus_per_node(cfg)                                   # CPU ranks: any number
