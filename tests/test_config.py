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
])
def test_bad_fields_are_named(patch, field):
    with pytest.raises(ConfigError) as err:
        config.from_dict(patch)
    assert err.value.field_name == field
    assert f"'{field}'" in str(err.value)


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
