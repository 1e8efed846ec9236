"""Config loading: unknown keys, wrong types, ranges and impossible combinations name the field."""
from __future__ import annotations

import json

import pytest

from moe_ep import config
from moe_ep.config import ConfigError


@pytest.mark.parametrize("patch,field", [
    ({"model": {"hidden_sise": 64}}, "model.hidden_sise"),
    ({"model": {"moe": {"top_k": "2"}}}, "model.moe.top_k"),
    ({"model": {"moe": {"top_k": 9, "num_experts": 8}}}, "model.moe.top_k"),
    ({"model": {"moe": {"num_experts": 12, "n_group": 5}}}, "model.moe.n_group"),
    ({"model": {"moe": {"score_func": "relu"}}}, "model.moe.score_func"),
    ({"model": {"hidden_size": 0}}, "model.hidden_size"),
    ({"model": {"hidden_size": 60, "num_heads": 7}}, "model.num_heads"),
    ({"eplb": {"num_redundant_experts": -1}}, "eplb.num_redundant_experts"),
    ({"parallel": {"ep_size": True}}, "parallel.ep_size"),
    ({"sampling": {"height": 31}}, "sampling.height"),
    ({"sampling": {"prompts": []}}, "sampling.prompts"),
    ({"bogus": 1}, "bogus"),
    ({"model": {"compile": "yes"}}, "model.compile"),
    ({"model": {"type": "diffusers", "path": "somewhere", "checkpoint": "x.safetensors"}}, "model.checkpoint"),
    ({"eplb": {"enabled": True, "timestep_aware": True}}, "eplb.timestep_aware"),   # 1 bucket: one phase
    ({"parallel": {"timeout_s": 0.5}}, "parallel.timeout_s"),
])
def test_bad_fields_are_named(patch, field):
    with pytest.raises(ConfigError) as err:
        config.from_dict(patch)
    assert err.value.field_name == field
    assert f"'{field}'" in str(err.value)


@pytest.mark.parametrize("model_type,extra", [("moe_dit", {}), ("diffusers", {"path": "somewhere"})])
def test_model_compile_is_for_both_model_types(model_type, extra):
    """model.compile: the built-in model compiles its forward, a diffusers transformer its
    non-MoE blocks (acceleration.compile_transformer); the key is read by both, on any device."""
    for device in ("cpu", "auto"):
        cfg = config.from_dict({"model": {"type": model_type, "compile": True, **extra},
                                "parallel": {"device": device}})
        assert cfg.model.compile is True and cfg.model.type == model_type


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"moe": {"num_experts": 16}}}))
    cfg = config.load(str(path), ["model.moe.top_k=4", "sampling.prompts=[\"a\", \"b\"]", "output_dir=x"])
    assert (cfg.model.moe.num_experts, cfg.model.moe.top_k, cfg.sampling.prompts, cfg.output_dir) == (16, 4, ["a", "b"], "x")
    assert cfg.parallel.timeout_s == 300.0


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        config.load(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid UTF-8 JSON"):
        config.load(str(bad))
    with pytest.raises(ConfigError, match="--set"):
        config.apply_overrides({}, ["novalue"])


# ---------------------------------------------------------------- the field table vs docs/config.md

import dataclasses  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import typing  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "config.md")


def docs_fields(path: str = DOCS) -> dict[str, dict]:
    """Every row of docs/config.md's key tables: dotted field name -> {"type", "default", "allowed",
    "remark"} (the allowed cell split at its first ';'). A row may list several keys."""
    out, section = {}, None
    for line in open(path, encoding="utf-8"):
        heading = re.match(r"^## `([a-z_]+)`", line)
        if heading:
            section = heading.group(1)
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else None
        if not cells or section is None:
            continue
        assert len(cells) == 4, f"docs/config.md row with {len(cells)} cells (key | type, default | allowed | meaning): {line}"
        keys = re.findall(r"`([a-z_.0-9]+)`", cells[0])
        type_text, _, default = cells[1].partition(", ")
        allowed, _, remark = cells[2].partition("; ")
        for key in keys:
            name = key if section == key else f"{section}.{key}"
            assert name not in out, f"docs/config.md documents {name} twice"
            out[name] = {"type": type_text, "default": default, "allowed": allowed, "remark": remark}
    return out


def _type_text(tp) -> str:
    """Annotation -> the docs' type words: int, number, str, bool, list of str; '... or null'."""
    nullable = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    if nullable:
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    if typing.get_origin(tp) is typing.Literal:
        tp = str
    words = {int: "int", float: "number", str: "str", bool: "bool", list: "list of str"}[tp]
    return words + (" or null" if nullable else "")


def _default_text(value) -> str:
    """A dataclass default as the docs write it: `"x"` for strings, JSON otherwise (floats as given)."""
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list):
        return "`" + json.dumps(value) + "`"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if not isinstance(value, float) or not value.is_integer() else (f"{value:.1f}", str(int(value)))


def _leaf_defaults(cfg=None, prefix: str = "") -> dict:
    cfg = cfg or config.Config()
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_leaf_defaults(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def test_every_field_of_a_free_type_has_a_rule():
    """Ints, numbers, strings and lists need a row in config.FIELDS (Literal choices and bools are
    fully described by their type): a new field without one fails here."""
    types = config.field_types()
    for name, tp in types.items():
        args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
        free = not (len(args) == 1 and (typing.get_origin(args[0]) is typing.Literal or args[0] is bool))
        assert (name in config.FIELDS) == free, f"{name}: {'missing from' if free else 'needs no row in'} config.FIELDS"


def test_docs_agree_with_the_validator_field_by_field():
    """docs/config.md has one row per config field, with the field's type, default and allowed values
    exactly as moe_ep.config has them."""
    docs = docs_fields()
    types, defaults = config.field_types(), _leaf_defaults()
    assert sorted(docs) == sorted(types), (f"not documented: {sorted(set(types) - set(docs))}; "
                                           f"documented but not fields: {sorted(set(docs) - set(types))}")
    for name, row in docs.items():
        assert row["type"] == _type_text(types[name]), (name, row["type"], _type_text(types[name]))
        want_default = _default_text(defaults[name])
        assert row["default"] in (want_default if isinstance(want_default, tuple) else (want_default,)), \
            (name, row["default"], want_default)
        assert row["allowed"] == config.allowed_text(name), (name, row["allowed"], config.allowed_text(name))


@pytest.mark.parametrize("name", sorted(config.FIELDS))
def test_refusal_names_the_field_and_states_the_docs_rule(name):
    """One out-of-range value per field: ConfigError naming it, whose message is the docs' rule."""
    allowed = config.FIELDS[name]
    if allowed.lo is not None:
        bad = allowed.lo if allowed.lo_open else allowed.lo - 1
    elif allowed.ok is not None:
        bad = {"non-empty": "", "non-empty list of strings": [], "list of strings": [1]}.get(allowed.text, "x")
    else:
        return  # "any"
    data = {}
    node = data
    *parents, last = name.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = bad
    with pytest.raises(ConfigError) as err:
        config.from_dict(data)
    assert err.value.field_name == name
    assert str(err.value).endswith("must be " + allowed.describe().replace("`", ""))


def test_unparseable_inputs_name_where_they_came_from(tmp_path):
    """A key given twice, a --set value json cannot take (5000 digits, nested too deep) and a
    folder as --config: one ConfigError each, naming --config or --set, never a traceback."""
    dup = tmp_path / "dup.json"
    dup.write_text('{"model": {"hidden_size": 64}, "model": {"hidden_size": 32}}')
    with pytest.raises(ConfigError, match="has the key 'model' twice") as err:
        config.load(str(dup))
    assert err.value.field_name == "--config"
    good = tmp_path / "good.json"
    good.write_text("{}")
    for item in ["model.hidden_size=" + "9" * 5000, "sampling.prompts=" + "[" * 100000]:
        with pytest.raises(ConfigError) as err:
            config.load(str(good), [item])
        assert err.value.field_name == "--set", err.value
    with pytest.raises(ConfigError, match="is a folder") as err:
        config.load(str(tmp_path))
    assert err.value.field_name == "--config"
    # timestep buckets without eplb, or with >= 2 buckets, are fine
    config.from_dict({"eplb": {"timestep_aware": True}})
    config.from_dict({"eplb": {"enabled": True, "timestep_aware": True, "timestep_buckets": 4}})


@pytest.mark.parametrize("sets,world,field", [
    ({"parallel": {"ranks_per_node": 3}}, 6, None),                    # 6 ranks, 3 per node: 2 nodes
    ({"parallel": {"ranks_per_node": 4}}, 6, None),                    # the planner sees 1 node (6 // 4)
    ({"parallel": {"ranks_per_node": 4}}, 12, None),                   # 3 nodes of 4
    ({"parallel": {"ranks_per_node": 2}}, 9, "parallel.ranks_per_node"),  # 4 nodes cannot split 9 ranks
    ({"parallel": {"ranks_per_node": 8}}, 6, None),                    # one node holds the EP group
    ({"eplb": {"num_groups": 4}}, 2, None),
    ({"eplb": {"num_groups": 3}, "parallel": {"ranks_per_node": 1}}, 3, None),   # 3 nodes, 3 groups of 12
])
def test_planner_topology_is_checked_before_the_run(sets, world, field):
    """A layout every rebalance would refuse (eplb.checks.check_topology) stops the run in
    preflight, naming the field; 36 experts, eplb on."""
    from moe_ep.job import check_planner_topology

    data = {"model": {"moe": {"num_experts": 36, "top_k": 2}}, "eplb": {"enabled": True}}
    for section, values in sets.items():
        data.setdefault(section, {}).update(values)
    cfg = config.from_dict(data)
    if field is None:
        check_planner_topology(cfg, 36, world, world)
        return
    with pytest.raises(ConfigError) as err:
        check_planner_topology(cfg, 36, world, world)
    assert err.value.field_name == field


def test_eplb_groups_of_a_diffusers_model_are_checked_against_its_experts():
    """model.moe is unused by diffusers models: eplb.num_groups must divide the folder's
    expert count (here 6), not model.moe.num_experts (8 by default)."""
    from moe_ep.job import check_planner_topology

    cfg = config.from_dict({"model": {"type": "diffusers", "path": "somewhere"},
                            "eplb": {"enabled": True, "num_groups": 3}})   # 3 does not divide 8: not refused here
    check_planner_topology(cfg, 6, 1, 1)
    cfg.eplb.num_groups = 4
    for enabled in (True, False):   # the config rule holds with eplb off too, as for the built-in model
        cfg.eplb.enabled = enabled
        with pytest.raises(ConfigError) as err:
            check_planner_topology(cfg, 6, 1, 1)
        assert err.value.field_name == "eplb.num_groups"


def test_expert_slots_that_cannot_fit_a_rank_are_refused():
    """The check compares one rank's expert slots (slots x MoE layers x 3 x H x F x dtype bytes)
    with the memory it is given, and passes at the boundary."""
    from moe_ep.models.moedit import check_expert_memory, expert_slot_bytes

    cfg = config.from_dict({"model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "dtype": "bfloat16",
                                      "moe": {"num_experts": 8, "top_k": 2, "expert_hidden_size": 32}},
                            "eplb": {"num_redundant_experts": 2}})
    need = expert_slot_bytes(cfg, ep=2)
    assert need == (10 // 2) * 2 * 3 * 64 * 32 * 2            # 5 slots x 2 MoE layers x 3HF x 2 bytes
    check_expert_memory(cfg, 2, (need, "one GPU's memory"))
    check_expert_memory(cfg, 2, None)                         # unknown memory: no check
    with pytest.raises(ConfigError, match="one GPU's memory is") as err:
        check_expert_memory(cfg, 2, (need - 1, "one GPU's memory"))
    assert err.value.field_name == "model.moe.expert_hidden_size"
