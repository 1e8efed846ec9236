"""The parallel layout: rank order, group membership, and the config errors of impossible layouts."""
from __future__ import annotations

import pytest
import torch

from moe_ep import config as config_mod
from moe_ep.config import ConfigError, ParallelConfig, sequence_parallel_degrees
from moe_ep.parallel import ParallelContext, derive_ep_size, resolve_layout
from moe_ep.parallel_layout import ParallelLayout


def test_rank_order_puts_ulysses_innermost_then_ring_cfg_dp():
    """rank = ((dp_i * cfg + cfg_i) * ring + ring_i) * ulysses + ulysses_i, written out for
    dp 2 x cfg 2 x ring 2 x ulysses 2 = 16 ranks."""
    lay = ParallelLayout(world_size=16, dp=2, cfg=2, ring=2, ulysses=2)
    expected = {}
    r = 0
    for d in range(2):
        for c in range(2):
            for g in range(2):
                for u in range(2):
                    expected[r] = (d, c, g, u)
                    r += 1
    for rank, (d, c, g, u) in expected.items():
        assert tuple(lay.coords(rank)) == (d, c, g, u)
        assert lay.rank_at(dp=d, cfg=c, ring=g, ulysses=u) == rank
        assert lay.index("sp", rank) == g * 2 + u            # the token shard it holds


def test_groups_of_cfg2_ring2_ulysses2_on_eight_ranks():
    lay = ParallelLayout(world_size=8, dp=1, cfg=2, ring=2, ulysses=2, ep=4)
    assert lay.groups("ulysses") == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert lay.groups("ring") == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert lay.groups("sp") == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert lay.groups("cfg") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert lay.groups("dp") == tuple((r,) for r in range(8))
    assert lay.groups("ep") == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert lay.groups("ep_replica") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert lay.members("ring", 5) == (5, 7) and lay.index("ring", 7) == 1
    for axis in ("dp", "cfg", "sp", "ring", "ulysses", "ep", "ep_replica"):   # members: arithmetic, not a search
        for r in range(8):
            assert r in lay.members(axis, r) and lay.members(axis, r) in lay.groups(axis), (axis, r)
    assert [lay.size(a) for a in ("dp", "cfg", "sp", "ring", "ulysses", "ep", "ep_replica")] == [1, 2, 4, 2, 2, 4, 2]


def test_groups_of_dp2_ring2_ulysses2_on_eight_ranks_with_ep_across_axes():
    lay = ParallelLayout(world_size=8, dp=2, cfg=1, ring=2, ulysses=2, ep=2)
    assert lay.groups("dp") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert lay.groups("sp") == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert lay.groups("ring") == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert lay.groups("cfg") == tuple((r,) for r in range(8))
    # EP 2: consecutive pairs, whatever axes they lie on; the replicas share an EP rank
    assert lay.groups("ep") == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert lay.groups("ep_replica") == ((0, 2, 4, 6), (1, 3, 5, 7))


def test_groups_on_four_ranks():
    lay = ParallelLayout(world_size=4, dp=2, ulysses=2, ep=4)
    assert lay.groups("ulysses") == lay.groups("sp") == ((0, 1), (2, 3))
    assert lay.groups("dp") == ((0, 2), (1, 3))
    assert lay.groups("ring") == tuple((r,) for r in range(4))
    lay = ParallelLayout(world_size=4, cfg=2, ring=2, ep=4)
    assert lay.groups("ring") == ((0, 1), (2, 3)) and lay.groups("cfg") == ((0, 2), (1, 3))


def test_a_context_made_by_hand_is_data_parallel_without_process_groups():
    ctx = ParallelContext(rank=1, world_size=4, ep_size=2)
    assert (ctx.layout.dp, ctx.layout.sp, ctx.layout.cfg, ctx.layout.ep) == (4, 1, 1, 2)
    assert ctx.layout.group("sp") is None                    # one rank: no group needed
    with pytest.raises(RuntimeError, match="no process groups"):
        ctx.layout.group("dp")
    assert ParallelContext().layout.world_size == 1


# ---------------------------------------------------------------- config: sizes and their errors

@pytest.mark.parametrize("sizes,degrees", [
    ({}, (1, 1)),
    ({"sequence_parallel_size": 4}, (4, 1)),                 # alone: all Ulysses
    ({"ulysses_degree": 2, "ring_degree": 2}, (2, 2)),
    ({"ring_degree": 4}, (1, 4)),
    ({"sequence_parallel_size": 8, "ring_degree": 2}, (4, 2)),
    ({"sequence_parallel_size": 8, "ulysses_degree": 2}, (2, 4)),
    ({"sequence_parallel_size": 4, "ulysses_degree": 2, "ring_degree": 2}, (2, 2)),
])
def test_sequence_parallel_degrees(sizes, degrees):
    assert sequence_parallel_degrees(ParallelConfig(**sizes)) == degrees


@pytest.mark.parametrize("sizes,field,words", [
    ({"sequence_parallel_size": 4, "ulysses_degree": 2, "ring_degree": 3}, "parallel.sequence_parallel_size",
     "parallel.ulysses_degree x parallel.ring_degree (2 x 3 = 6)"),
    ({"sequence_parallel_size": 6, "ulysses_degree": 4}, "parallel.ulysses_degree", "must divide"),
    ({"sequence_parallel_size": 4, "ring_degree": 3}, "parallel.ring_degree", "must divide"),
    ({"tensor_parallel_size": 2}, "parallel.tensor_parallel_size", "not implemented"),
])
def test_inconsistent_sizes_are_refused_when_the_config_loads(sizes, field, words):
    with pytest.raises(ConfigError) as err:
        config_mod.from_dict({"parallel": sizes})
    assert err.value.field_name == field and words in str(err.value)


@pytest.mark.parametrize("sizes,world,field,words", [
    ({"sequence_parallel_size": 3}, 4, "parallel.sequence_parallel_size", "must divide the world size (4)"),
    # the key the user gave is named, not sequence_parallel_size they never set
    ({"ulysses_degree": 2, "ring_degree": 2}, 6, "parallel.ulysses_degree x parallel.ring_degree", "(1 x 4 = 4"),
    ({"ulysses_degree": 4}, 6, "parallel.ulysses_degree", "(1 x 4 = 4"),
    ({"ring_degree": 4, "ulysses_degree": 1}, 6, "parallel.ring_degree", "(1 x 4 = 4"),
    ({"cfg_parallel_size": 3}, 4, "parallel.cfg_parallel_size", "must divide the world size (4)"),
    ({"cfg_parallel_size": 2, "sequence_parallel_size": 2, "data_parallel_size": 1}, 8,
     "parallel.data_parallel_size", "(1 x 2 x 2) must equal the world size (8)"),
    ({"tensor_parallel_size": 2}, 4, "parallel.tensor_parallel_size", "not implemented"),
    ({"ep_size": 3}, 6 * 2, "parallel.ep_size", None),       # 3 divides 12: no error (control)
])
def test_layouts_that_do_not_fill_the_world_name_the_key(sizes, world, field, words):
    cfg = ParallelConfig(**sizes)
    if words is None:
        assert resolve_layout(cfg, world).ep == 3
        return
    with pytest.raises(ConfigError) as err:
        resolve_layout(cfg, world)
    assert err.value.field_name == field and words in str(err.value), str(err.value)


def test_data_parallel_size_given_or_implied():
    assert resolve_layout(ParallelConfig(), 4).dp == 4                  # today's runs: each rank its own
    lay = resolve_layout(ParallelConfig(cfg_parallel_size=2, ulysses_degree=2), 8)
    assert (lay.dp, lay.cfg, lay.ulysses, lay.ring, lay.ep) == (2, 2, 2, 1, 8)
    lay = resolve_layout(ParallelConfig(data_parallel_size=2, sequence_parallel_size=2), 4, rank=3)
    assert (lay.dp, lay.sp, lay.rank, tuple(lay.coords())) == (2, 2, 3, (1, 0, 0, 1))


def test_ep_rule_is_unchanged_and_counts_a_missing_data_parallel_size_as_one():
    cfg = ParallelConfig(enable_expert_parallel=True, sequence_parallel_size=2, cfg_parallel_size=2)
    assert derive_ep_size(cfg, 8) == 4                                  # dp implied 2, EP = sp x cfg
    cfg = ParallelConfig(enable_expert_parallel=True, ring_degree=2, data_parallel_size=2)
    assert derive_ep_size(cfg, 4) == 4


def test_preflight_refuses_a_bad_layout_before_any_work(tmp_path):
    """job.preflight derives the EP size first; that checks the whole layout."""
    from moe_ep.job import preflight

    cfg = config_mod.from_dict({"parallel": {"sequence_parallel_size": 3}, "output_dir": str(tmp_path / "o")})
    with pytest.raises(ConfigError, match="parallel.sequence_parallel_size"):
        preflight(cfg, 4)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sizes,field,value", [
    ({"ulysses_degree": 2}, "parallel.ulysses_degree", 2),
    ({"ring_degree": 2}, "parallel.ring_degree", 2),
    ({"sequence_parallel_size": 2}, "parallel.sequence_parallel_size", 2),
    ({"ulysses_degree": 2, "ring_degree": 2}, "parallel.ulysses_degree x parallel.ring_degree", 4),
])
def test_image_tokens_check_names_the_key_the_user_gave(sizes, field, value):
    """check_tokens (sp must divide a sample's image tokens) on a layout the config resolved names
    the key the config set, with its value."""
    from moe_ep.sequence_parallel import check_tokens

    lay = resolve_layout(ParallelConfig(**sizes), 4)
    with pytest.raises(ConfigError) as err:
        check_tokens(5, lay)
    assert (err.value.field_name, err.value.value) == (field, value), str(err.value)
