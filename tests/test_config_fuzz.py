"""Property-based config validation: broken configs (made by mutating the quickstart config) are
refused with ConfigError naming the field -- never another exception from deep inside -- by what
launch/infer.py runs before any process group starts: `config.from_dict` then
`run.preflight(cfg, world_size)`. Impossible size combinations are checked against an
independent oracle. docs/reliability.md lists the cases and counts."""
from __future__ import annotations

import copy
import json
import math
import os
import re
import zlib

import numpy as np

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_ep import config
from moe_ep.config import ConfigError
from moe_ep.job import preflight
from tiny_job import ROOT, TINY_MODEL

BASE = json.load(open(os.path.join(ROOT, "configs", "quickstart.json")))
BASE["model"] = copy.deepcopy(TINY_MODEL)   # the tiny model (tests/tiny_job.py), not the demo model
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _leaves(d: dict, prefix=()) -> list[tuple[str, ...]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _leaves(v, prefix + (k,))
        else:
            out.append(prefix + (k,))
    return out


SECTIONS = [p for p in [("model",), ("model", "moe"), ("parallel",), ("eplb",), ("sampling",), ("telemetry",), ()]]


def _get(d, path):
    for k in path:
        d = d[k]
    return d


def _set(d, path, value):
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _merged(defaults: dict, base: dict) -> dict:
    out = dict(defaults)
    for k, v in base.items():
        out[k] = _merged(defaults[k], v) if isinstance(v, dict) else v
    return out


FULL = _merged(config.Config().to_dict(), BASE)  # every key, the quickstart's values where it sets them
FULL["output_dir"] = "outputs/fuzz"             # never created: nothing here runs the job
LEAVES = _leaves(FULL)
NUMERIC = [p for p in LEAVES if isinstance(_get(FULL, p), (int, float)) and not isinstance(_get(FULL, p), bool)]
EDGES = [0, -1, 1, 3, 0.5, -0.0, 10 ** 30, -10 ** 30, 2 ** 63, 2 ** 64, 1e308, float("nan"), float("inf"), float("-inf")]

def validate_like_infer(data: dict, world: int = 2):
    """What launch/infer.py does before any process group: load + validate, then preflight."""
    cfg = config.from_dict(data)
    preflight(cfg, world)
    return cfg


def accepted_or_config_error(data: dict, world: int = 2):
    """-> the Config or the ConfigError; any other exception fails the test."""
    try:
        return validate_like_infer(data, world)
    except ConfigError as err:
        assert str(err).startswith(f"config field '{err.field_name}' = "), str(err)
        assert "\n" not in str(err), str(err)
        return err


def assert_sane(cfg) -> None:
    """An accepted config has only values the runtime can use."""
    for path in _leaves(cfg.to_dict()):
        v = _get(cfg.to_dict(), path)
        if isinstance(v, float):
            assert math.isfinite(v), (path, v)
    m, s = cfg.model, cfg.sampling
    assert m.num_layers >= m.moe_every >= 1
    assert 1 <= m.moe.top_k <= m.moe.num_experts and m.moe.num_experts % m.moe.n_group == 0
    assert s.height % (m.patch_size * m.vae_scale_factor) == 0 and s.width % (m.patch_size * m.vae_scale_factor) == 0
    assert s.prompts and all(isinstance(p, str) for p in s.prompts)


OTHER_TYPES = st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                        st.booleans(), st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30))


@FUZZ
@given(path=st.sampled_from(LEAVES), value=OTHER_TYPES)
def test_fuzz_replace_a_value(path, value):
    """Any leaf replaced by any JSON value (wrong type, out of range, NaN, inf, huge): refused with
    ConfigError or accepted as a usable config."""
    data = copy.deepcopy(FULL)
    _set(data, path, value)
    out = accepted_or_config_error(data)
    if isinstance(out, ConfigError):
        return
    assert_sane(out)
    got = _get(out.to_dict(), path)
    assert got == value or (isinstance(value, int) and not isinstance(value, bool) and got == float(value)), (path, value, got)
    # a value of a JSON type the field cannot have is never accepted
    if isinstance(value, (dict, list)) and path[-1] not in ("prompts", "tags"):
        pytest.fail(f"{'.'.join(path)} accepted {value!r}")


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(NUMERIC), value=st.sampled_from(EDGES))
def test_fuzz_numeric_edges(path, value):
    """Every numeric field at 0, negative, fractional, huge (beyond int64 / uint64 / float64), NaN
    and +-inf: refused with ConfigError or accepted as a usable config."""
    data = copy.deepcopy(FULL)
    _set(data, path, value)
    out = accepted_or_config_error(data)
    name = ".".join(path)
    rule = numeric_rule(DOC_FIELDS[name]["allowed"])
    wrong_type = name in INT_FIELDS and not isinstance(value, int)
    if wrong_type or not math.isfinite(value) or not in_rule(value, rule):
        # outside what docs/config.md allows: refused, and the error names this field
        assert isinstance(out, ConfigError) and out.field_name == name, (name, value, out)
    elif not isinstance(out, ConfigError):
        assert_sane(out)


@FUZZ
@given(path=st.sampled_from(LEAVES), suffix=st.sampled_from(["_", "s", "X", "__", "2"]), keep=st.booleans())
def test_fuzz_renamed_key_is_named(path, suffix, keep):
    """A misspelt key is refused, naming it (whether or not the right key is still there)."""
    data = copy.deepcopy(FULL)
    parent = _get(data, path[:-1])
    value = parent[path[-1]] if keep else parent.pop(path[-1])
    parent[path[-1] + suffix] = value
    with pytest.raises(ConfigError) as err:
        validate_like_infer(data)
    assert err.value.field_name == ".".join(path[:-1] + (path[-1] + suffix,))
    assert "unknown key" in str(err.value)


@FUZZ
@given(drop=st.lists(st.sampled_from(LEAVES + [s for s in SECTIONS if s]), max_size=6, unique=True))
def test_fuzz_dropped_keys_take_defaults(drop):
    """Dropping keys or whole sections: defaults fill in; the result is valid or refused cleanly."""
    data = copy.deepcopy(FULL)
    for path in drop:
        try:
            del _get(data, path[:-1])[path[-1]]
        except KeyError:
            pass
    out = accepted_or_config_error(data)
    if not isinstance(out, ConfigError):
        assert_sane(out)


@FUZZ
@given(section=st.sampled_from(SECTIONS), value=st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2), st.none()))
def test_fuzz_section_of_wrong_type(section, value):
    data = copy.deepcopy(BASE)
    if not section:
        data = value
    else:
        _set(data, section, value)
    with pytest.raises(ConfigError) as err:
        validate_like_infer(data)
    assert err.value.field_name == (".".join(section) or "<root>")


SIZES = st.fixed_dictionaries({
    "E": st.integers(1, 24), "k": st.integers(0, 26), "n_group": st.integers(0, 8), "topk_group": st.integers(0, 8),
    "redundant": st.integers(-1, 10), "ep": st.one_of(st.none(), st.integers(0, 9)), "world": st.sampled_from([1, 2, 3, 4, 6, 8]),
    "num_groups": st.integers(0, 8), "heads": st.integers(0, 9), "hidden": st.sampled_from([8, 12, 16, 24, 30, 64]),
    "layers": st.integers(0, 4), "moe_every": st.integers(0, 5), "hw": st.integers(0, 40), "patch": st.integers(0, 4),
})


def oracle_problems(z: dict) -> list[str]:
    """The independent rule list (docs/config.md): every field that must be refused."""
    bad = []
    E, k, ng, tg = z["E"], z["k"], z["n_group"], z["topk_group"]
    positive = {"model.moe.top_k": k, "model.moe.n_group": ng, "model.moe.topk_group": tg, "eplb.num_groups": z["num_groups"],
                "model.num_heads": z["heads"], "model.num_layers": z["layers"], "model.moe_every": z["moe_every"],
                "sampling.height": z["hw"], "model.patch_size": z["patch"]}
    bad += [name for name, v in positive.items() if v < 1]
    if z["ep"] is not None and z["ep"] < 1:
        bad.append("parallel.ep_size")
    if z["redundant"] < 0:
        bad.append("eplb.num_redundant_experts")
    if bad:
        return bad
    if k > E:
        bad.append("model.moe.top_k")
    if E % ng:
        bad.append("model.moe.n_group")
    if tg > ng:
        bad.append("model.moe.topk_group")
    if ng > 1 and E % ng == 0 and tg <= ng and k <= E and k > tg * (E // ng):
        bad.append("model.moe.top_k")
    if z["hidden"] % z["heads"]:
        bad.append("model.num_heads")
    if z["hw"] % z["patch"]:
        bad.append("sampling.height")
    if z["num_groups"] > 1 and E % z["num_groups"]:
        bad.append("eplb.num_groups")
    if z["moe_every"] > z["layers"]:
        bad.append("model.moe_every")
    ep = z["world"] if z["ep"] is None else z["ep"]
    if z["world"] % ep:
        bad.append("parallel.ep_size")
    elif (E + z["redundant"]) % ep:
        bad.append("eplb.num_redundant_experts" if z["redundant"] else "model.moe.num_experts")
    return bad


@settings(max_examples=400, deadline=None)
@given(z=SIZES)
def test_fuzz_size_combinations_match_oracle(z):
    """Experts vs slots vs EP size vs world, top-k vs experts, groups, heads, patch size: refused
    exactly when the rules say so, naming one of the offending fields."""
    data = {"model": {"hidden_size": z["hidden"], "num_heads": z["heads"], "num_layers": z["layers"],
                      "moe_every": z["moe_every"], "patch_size": z["patch"],
                      "moe": {"num_experts": z["E"], "top_k": z["k"], "n_group": z["n_group"], "topk_group": z["topk_group"]}},
            "parallel": {"ep_size": z["ep"]},
            "eplb": {"num_redundant_experts": z["redundant"], "num_groups": z["num_groups"]},
            "sampling": {"height": z["hw"], "width": 32 if z["patch"] in (1, 2, 4) else z["hw"]},
            "telemetry": {"wandb": False}}
    want = oracle_problems(z)
    out = accepted_or_config_error(data, z["world"])
    if want:
        assert isinstance(out, ConfigError), f"accepted, but the rules refuse {want}: {z}"
        assert out.field_name in want, (out.field_name, want, z)
    else:
        assert not isinstance(out, ConfigError), f"refused {out} but the rules accept: {z}"


@settings(max_examples=100, deadline=None)
@given(items=st.lists(st.text(alphabet="ab.=[]{}\"0123456789-e:,", max_size=12), max_size=4))
def test_fuzz_overrides_never_crash(items):
    """--set strings of any shape: a ConfigError or a valid config."""
    try:
        data = config.apply_overrides(BASE, items)
    except ConfigError as err:
        assert err.field_name and "\n" not in str(err), str(err)
        return
    out = accepted_or_config_error(data)
    if not isinstance(out, ConfigError):
        assert_sane(out)


# Inputs that once escaped config.load / validate as other exception types.
def test_refused_non_utf8_config_file(tmp_path):
    p = tmp_path / "c.json"
    p.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError):
        config.load(str(p))


def test_refused_overrides_on_a_list_config(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError):
        config.load(str(p), ["sampling.seed=1"])


@pytest.mark.parametrize("patch", [{"parallel": {"timeout_s": float("nan")}}, {"sampling": {"shift": float("inf")}},
                                   {"sampling": {"seed": 2 ** 64}}, {"model": {"num_layers": 1, "moe_every": 2}}])
def test_refused_validate_alone(patch):
    with pytest.raises(ConfigError):
        config.from_dict(patch)


# ---------------------------------------------------------------- per field, from docs/config.md's rules

from test_config import docs_fields  # noqa: E402  (the docs' field table, parsed)

DOC_FIELDS = docs_fields()
_BOUND = re.compile(r"^(>=|>|<=|<) (-?(?:2\*\*\d+|[0-9.]+(?:e\d+)?))$")


def _number(text: str):
    if "**" in text:
        sign = -1 if text.startswith("-") else 1
        return sign * 2 ** int(text.lstrip("-").split("**")[1])
    return float(text) if ("." in text or "e" in text) else int(text)


def numeric_rule(allowed: str):
    """'>= 1', '> 0, <= 1e9', ... -> [(op, bound), ...], or None when the text is not a range."""
    exact = re.match(r"^(-?\d+) \(", allowed)     # "1 (tensor parallelism is not implemented)"
    if exact:
        return [(">=", int(exact.group(1))), ("<=", int(exact.group(1)))]
    parts = allowed.split(", ")
    bounds = [_BOUND.match(p) for p in parts]
    if not all(bounds):
        return None
    return [(m.group(1), _number(m.group(2))) for m in bounds]


def in_rule(value, rule) -> bool:
    ops = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}
    return all(ops[op](value, bound) for op, bound in rule)


# A permissive base (one head, patch 1, top-1 of groups of one) so that a value in its field's range
# meets no other field's rule, plus the companions a field's own cross-field rules need.
PERMISSIVE = {"model": {"num_heads": 1, "patch_size": 1, "vae_scale_factor": 1, "moe_every": 1,
                        "moe": {"top_k": 1, "n_group": 1, "topk_group": 1}},
              "sampling": {"prompts": ["a"], "height": 8, "width": 8}, "eplb": {"num_groups": 1}}
COMPANIONS = {  # field -> fields set to the same value
    "model.num_heads": ["model.hidden_size"], "model.moe_every": ["model.num_layers"],
    "model.patch_size": ["sampling.height", "sampling.width"], "model.vae_scale_factor": ["sampling.height", "sampling.width"],
    "model.moe.top_k": ["model.moe.num_experts"], "model.moe.n_group": ["model.moe.num_experts"],
    "model.moe.topk_group": ["model.moe.n_group", "model.moe.num_experts"], "eplb.num_groups": ["model.moe.num_experts"],
}
COMPANION_CONSTANTS = {"model.path": {"model.type": "diffusers"},
                       # the file replaces the list: refused beside a non-default sampling.prompts
                       "sampling.prompts_file": {"sampling.prompts": list(config.DEFAULT_PROMPTS)}}
NUMERIC_FIELDS = sorted(n for n, row in DOC_FIELDS.items() if numeric_rule(row["allowed"]))
INT_FIELDS = {n for n, row in DOC_FIELDS.items() if row["type"].startswith("int")}


def _with(name: str, value, companions: bool = True) -> dict:
    """PERMISSIVE with `name` = value (and, with `companions`, the fields its rules tie to it)."""
    data = copy.deepcopy(PERMISSIVE)
    _set(data, tuple(name.split(".")), value)
    for other in COMPANIONS.get(name, []) if companions else []:
        _set(data, tuple(other.split(".")), value)
    for other, v in COMPANION_CONSTANTS.get(name, {}).items():
        _set(data, tuple(other.split(".")), v)
    return data


def _values_near(rule, is_int: bool):
    """Values on, just inside and just outside every bound, and far beyond."""
    out = []
    for _, b in rule:
        if is_int:
            out += [b - 2, b - 1, b, b + 1, b + 2]
        else:
            out += [b - 1.0, math.nextafter(float(b), -math.inf), float(b), math.nextafter(float(b), math.inf), b + 1.0]
    out += [-10 ** 30, 10 ** 30] if is_int else [-1e300, 1e300]
    return out


@pytest.mark.parametrize("name", NUMERIC_FIELDS)
def test_each_numeric_field_refused_exactly_outside_its_documented_range(name):
    """For every numeric field: values outside the range docs/config.md states are refused with a
    ConfigError naming that field; values inside are accepted (and kept as given). Bounds, their
    neighbours, huge values, and 60 random draws either side."""
    rule = numeric_rule(DOC_FIELDS[name]["allowed"])
    is_int = name in INT_FIELDS
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    draws = [int(v) for v in rng.integers(-10 ** 6, 10 ** 6, 60)] if is_int else list(rng.normal(0, 1e3, 60))
    for value in _values_near(rule, is_int) + draws:
        inside = in_rule(value, rule)
        try:
            cfg = config.from_dict(_with(name, value, companions=inside))
        except ConfigError as err:
            assert not inside, f"{name} = {value!r} is in the documented range {rule} but refused: {err}"
            assert err.field_name == name, f"{name} = {value!r}: the error names {err.field_name}: {err}"
            continue
        assert inside, f"{name} = {value!r} is outside the documented range {rule} but accepted"
        assert _get(cfg.to_dict(), tuple(name.split("."))) == value


STRING_CASES = {  # docs' allowed text -> (accepted values, refused values)
    "non-empty": (["x", "outputs/a b", "ü"], [""]),
    "any": (["", "x", "ü"], []),
    "non-empty list of strings": ([["a"], ["a", ""]], [[], [1], ["a", None]]),
    "list of strings": ([[], ["a", "b"]], [[1], [None]]),
    '`"builtin"` or `"module:function"`': (["builtin", "pkg.mod:fn", "a:b"], ["", "mod", ":fn", "mod:", "a:b:c", "Builtin"]),
}


@pytest.mark.parametrize("name", sorted(n for n, row in DOC_FIELDS.items() if row["allowed"] in STRING_CASES))
def test_each_string_field_refused_exactly_outside_its_documented_rule(name):
    ok, bad = STRING_CASES[DOC_FIELDS[name]["allowed"]]
    for value in ok:
        assert _get(config.from_dict(_with(name, value)).to_dict(), tuple(name.split("."))) == value
    for value in bad:
        with pytest.raises(ConfigError) as err:
            config.from_dict(_with(name, value))
        assert err.value.field_name == name, (value, str(err.value))


@pytest.mark.parametrize("name", sorted(n for n, row in DOC_FIELDS.items() if row["allowed"].startswith('`"')
                                        and " or " not in row["allowed"]))
def test_each_choice_field_takes_exactly_its_documented_values(name):
    choices = re.findall(r'`"([^"]*)"`', DOC_FIELDS[name]["allowed"])
    extra = {"model.type": {"diffusers": {"model.path": "some/folder"}}}.get(name, {})
    for value in choices:
        data = _with(name, value)
        for other, v in extra.get(value, {}).items():
            _set(data, tuple(other.split(".")), v)
        assert _get(config.from_dict(data).to_dict(), tuple(name.split("."))) == value
    for value in ["", choices[0].upper(), choices[0] + " ", "none", 1, None, True]:
        if value in choices:
            continue
        with pytest.raises(ConfigError) as err:
            config.from_dict(_with(name, value))
        assert err.value.field_name == name, (value, str(err.value))


def test_every_documented_field_is_fuzzed_per_field():
    """No field escapes the three per-field tests above (bools: their type check elsewhere)."""
    covered = set(NUMERIC_FIELDS) | {n for n, r in DOC_FIELDS.items() if r["allowed"] in STRING_CASES} \
        | {n for n, r in DOC_FIELDS.items() if r["allowed"].startswith('`"') and " or " not in r["allowed"]} \
        | {n for n, r in DOC_FIELDS.items() if r["allowed"] == "true, false"}
    assert covered == set(DOC_FIELDS), sorted(set(DOC_FIELDS) - covered)
