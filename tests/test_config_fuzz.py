"""Fuzz test of config loading (core/config.py, core/config_yaml.py) with hypothesis.

Generated YAML files, `key=value` overrides and base mappings (a checkpoint's saved config) mix the real dotted
keys of `describe()` with unknown ones, and values of every type: NaN, infinities, huge integers, text with odd
characters, lists, nested mappings, shared references (dumped as YAML aliases) and raw text that is not YAML.
The property: `load_config` returns a RunConfig that survives a strict JSON round trip and validates again, or
raises ConfigError with one bounded line; never another exception, and each case within the hypothesis deadline.
Run: `python -m pytest tests/test_config_fuzz.py -q` (about 200 cases per test, a few seconds).
"""

from __future__ import annotations

import json
import math
from datetime import timedelta

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.config import ConfigError, RunConfig, config_from_dict, config_to_dict, describe, load_config

KEYS = [key for key, _, _ in describe()]
SECTIONS = sorted({key.split(".")[0] for key in KEYS if "." in key})
ODD_KEYS = ["base", "modle", "most.learning_rate", "h2po.rewards.0", "", ".", "model..d_model", "seed.x"]

key_strategy = st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS), st.sampled_from(ODD_KEYS),
                         st.text(max_size=12))
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(-3, 70), st.sampled_from([0, -1, 2**31, 2**63, 10**30, -(10**40)]),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2.0, 2.0),
    st.text(max_size=20), st.sampled_from(["nan", ".inf", "1e999", "3e-4", "ease", "metric", "stop", "x\0y", ""]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(["name", "weight", "args"])), inner, max_size=4),
), max_leaves=12)
FAST = settings(max_examples=200, deadline=timedelta(milliseconds=2000),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def nest(pairs: list[tuple[str, object]]) -> dict:
    """Dotted keys -> a nested mapping (a later key wins; a value in the way of a deeper key is replaced)."""
    out: dict = {}
    for key, value in pairs:
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def check(load) -> None:
    """Run `load()`: a valid RunConfig or a one-line ConfigError, nothing else."""
    try:
        cfg = load()
    except ConfigError as err:
        message = str(err)
        assert message and "\n" not in message and len(message) < 500, message
        return
    assert isinstance(cfg, RunConfig)
    data = json.loads(json.dumps(config_to_dict(cfg), allow_nan=False))  # plain, finite data (as saved)
    assert config_from_dict(data) == cfg


def no_huge_ints(value: object) -> bool:
    """PyYAML and json cannot write integers of more than 4300 digits (parsing them is tested on its own)."""
    if isinstance(value, int):
        return abs(value) < 10**4000
    if isinstance(value, list):
        return all(no_huge_ints(v) for v in value)
    if isinstance(value, dict):
        return all(no_huge_ints(v) for v in value.values())
    return True


@FAST
@given(pairs=st.lists(st.tuples(key_strategy, values), max_size=6), share=st.booleans(), flow=st.booleans())
def test_generated_yaml_files(tmp_path, pairs, share, flow):
    """A YAML document built from generated keys and values (with `share`, one value appears twice: an alias)."""
    document = nest([(k, v) for k, v in pairs if no_huge_ints(v)])
    if share and document:
        shared = [1, 2, 3]
        document[next(iter(document))] = {"a": shared, "b": shared}
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True))
    check(lambda: load_config(path))


@FAST
@given(text=st.text(max_size=200))
def test_raw_text_files(tmp_path, text):
    path = tmp_path / "raw.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check(lambda: load_config(path))


value_texts = st.one_of(
    values.filter(no_huge_ints).map(lambda v: json.dumps(v) if not _non_finite(v) else yaml.safe_dump(v)),
    st.text(max_size=30),
    st.sampled_from(["[&a 1, *a]", "{a: &x [1], b: *x}", "[" * 40 + "]" * 40, "!!python/object:os.system {}",
                     "2020-01-01", "!!binary aGVsbG8=", "!!set {a, b}", "1" * 5000]),
)


def _non_finite(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


@FAST
@given(overrides=st.lists(st.one_of(st.tuples(key_strategy, value_texts).map("=".join), st.text(max_size=30)),
                          max_size=5))
def test_generated_overrides(overrides):
    check(lambda: load_config(None, overrides))


@FAST
@given(base=st.one_of(st.lists(st.tuples(key_strategy, values), max_size=6).map(nest), values))
def test_generated_base_mappings(base):
    """A base mapping is what a checkpoint header's config gives; huge integers and NaN come through JSON too."""
    check(lambda: load_config(None, [], base=base))


@pytest.mark.parametrize("key", KEYS)
def test_every_key_refuses_nan_and_huge_numbers_or_wrong_types(key):
    """Each key, given NaN, infinity, 10**30 or a nested mapping, raises a one-line ConfigError."""
    for value in (".nan", "-.inf", str(10**30), "{a: {b: [1]}}"):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"{key}={value}"])
        assert "\n" not in str(info.value) and key in str(info.value), (key, value, str(info.value))
