"""Range and size checks of the run configuration at the edge (core/config.py), and the bounded request loop.

Every numeric field has a declared range (`option(..., low=, high=)`) and every value outside it, non-finite or
huge is refused with one line naming the dotted key, the value and the range; a few cross-field rules
(n_heads divides d_model, k <= max_k, lambda_off decays); YAML aliases, deep nesting and oversized files or
overrides are refused before anything expands; a positive threshold above every weight is refused when the dataset
is built, and `training_examples` stops with a CatalogError when no training user can give a request instead of
looping forever.
Run: `python -m pytest tests/test_config_ranges.py -q`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing

import numpy as np
import pytest

from catalog.dataset import Dataset, training_examples
from catalog.requests import MAX_K, MAX_SEEDS
from catalog.schema import CatalogError
from core import config as config_module
from core.config import (
    ConfigError,
    DataConfig,
    RequestConfig,
    RunConfig,
    config_from_dict,
    config_to_dict,
    describe,
    load_config,
)
from core.config_yaml import MAX_CONFIG_BYTES, MAX_OVERRIDE_CHARS


def refused(overrides: list[str]) -> str:
    """The one-line message of the ConfigError that `overrides` raise."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message
    return message


@pytest.mark.parametrize("override, message", [
    ("most.lr=-1", "most.lr = -1.0 is outside its range [0, 1]"),
    ("most.lr=.nan", "most.lr = nan is outside its range [0, 1]"),
    ("most.lr=1e999", "most.lr = inf is outside its range [0, 1]"),
    ("h2po.lr=-.inf", "h2po.lr = -inf is outside its range [0, 1]"),
    ("requests.k=0", f"requests.k = 0 is outside its range [1, {MAX_K}]"),
    ("requests.k=65", f"requests.k = 65 is outside its range [1, {MAX_K}]"),
    ("model.max_k=65", f"model.max_k = 65 is outside its range [1, {MAX_K}]"),
    ("most.batch_size=0", "most.batch_size = 0 is outside its range [1, 65536]"),
    ("sampler.batch_size=0", "sampler.batch_size = 0 is outside its range [1, 65536]"),
    ("h2po.batch_requests=0", "h2po.batch_requests = 0 is outside its range [1, 65536]"),
    ("most.eval_every=0", "most.eval_every = 0 is outside its range [1, 10000000]"),
    ("h2po.eval_every=-1", "h2po.eval_every = -1 is outside its range [0, 10000000]"),
    ("model.dropout=2", "model.dropout = 2.0 is outside its range [0, 1)"),
    ("model.dropout=1", "model.dropout = 1.0 is outside its range [0, 1)"),
    ("model.d_model=0", "model.d_model = 0 is outside its range [1, 8192]"),
    ("most.max_steps=0", "most.max_steps = 0 is outside its range [1, 10000000]"),
    ("most.max_minutes=0", "most.max_minutes = 0.0 is outside its range (0, 525600]"),
    ("most.patience=0", "most.patience = 0 is outside its range [1, 10000000]"),
    ("most.eps=0", "most.eps = 0.0 is outside its range (0, 1)"),
    ("eval.test_draws=0", "eval.test_draws = 0 is outside its range [1, 1000]"),
    ("h2po.clip_low=1", "h2po.clip_low = 1.0 is outside its range [0, 1)"),
    ("h2po.group_size=1", "h2po.group_size = 1 is outside its range [2, 1024]"),
    ("h2po.rollout_temperature=0", "h2po.rollout_temperature = 0.0 is outside its range (0, 100]"),
    ("preferences.noise=0", "preferences.noise = 0.0 is outside its range (0, 100]"),
    ("system.zero_stage=3", "system.zero_stage = 3 is outside its range [0, 2]"),
    ("dashboard.port=70000", "dashboard.port = 70000 is outside its range [0, 65535]"),
    ("data.positive_threshold=.inf", "data.positive_threshold = inf is outside its range [-1e+09, 1e+09]"),
    ("seed=-1", "seed = -1 is outside its range [0, 4294967295]"),
    ("seed=" + "9" * 40, "seed = " + "9" * 40 + " is outside its range [0, 4294967295]"),
    ("model.prior_lambda=" + "1" * 400, "model.prior_lambda = <1326-bit integer> is too large for a number"),
    ("requests.seed_sizes=[3, 0]", f"requests.seed_sizes[1] = 0 is outside its range [1, {MAX_SEEDS}]"),
    ("requests.seed_sizes=[]", "requests.seed_sizes has 0 entries; allowed 1 to 16"),
    ("eval.ks=[10, 65]", f"eval.ks[1] = 65 is outside its range [1, {MAX_K}]"),
    ("eval.ease_lambdas=[0]", "eval.ease_lambdas[0] = 0.0 is outside its range (0, 1e+09]"),
    ("h2po.rewards=[]", "h2po.rewards has 0 entries; allowed 1 to 32"),
])
def test_out_of_range_values_are_refused_naming_key_value_and_range(override, message):
    assert refused([override]).startswith(message)


@pytest.mark.parametrize("overrides, message", [
    (["model.n_heads=3"], "model.n_heads = 3 does not divide model.d_model = 128"),
    (["model.d_model=32", "model.n_heads=5"], "model.n_heads = 5 does not divide model.d_model = 32"),
    (["model.max_k=16"], "requests.k = 20 is above model.max_k = 16"),
    (["requests.k=40", "model.max_k=32"], "requests.k = 40 is above model.max_k = 32"),
    (["h2po.lambda_off_end=2"], "h2po.lambda_off_end = 2.0 is above h2po.lambda_off_start = 1.0"),
])
def test_cross_field_rules(overrides, message):
    assert refused(overrides).startswith(message)


def test_values_inside_the_ranges_load():
    """The edges of the ranges themselves are allowed (k = max_k = MAX_K, lr 0 for a frozen control)."""
    cfg = load_config(None, [f"requests.k={MAX_K}", f"model.max_k={MAX_K}", "h2po.lr=0", "most.eps=1e-6",
                             "model.dropout=0.99", "h2po.steps=0", "h2po.seed=-1", "model.d_model=30",
                             "model.n_heads=3", "h2po.lambda_off_end=1.0"])
    assert (cfg.requests.k, cfg.model.n_heads, cfg.h2po.lr) == (MAX_K, 3, 0.0)


def test_ranges_are_checked_in_files_and_saved_configs_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  dropout: 2\n")
    with pytest.raises(ConfigError, match=r"^model\.dropout = 2\.0 is outside its range \[0, 1\)$"):
        load_config(path)
    data = config_to_dict(RunConfig())
    data["most"]["lr"] = float("nan")
    with pytest.raises(ConfigError, match=r"^most\.lr = nan"):
        config_from_dict(data)
    with pytest.raises(ConfigError, match="requests.k = 20 is above model.max_k = 8"):
        load_config(None, [], base={"model": {"max_k": 8}})  # a checkpoint's config is checked like a file


def numeric_fields(cls: type = RunConfig, prefix: str = ""):
    """(dotted key, field, element type) of every int/float field and list of them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from numeric_fields(hint, f"{prefix}{f.name}.")
            continue
        element = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
        if element in (int, float):
            yield f"{prefix}{f.name}", f, element


def test_every_numeric_field_declares_its_range_and_its_default_is_inside():
    """Every int and float field (and list of them) has both bounds, so huge values are refused; every default is
    inside its range (the defaults load through the checks)."""
    for key, f, _ in numeric_fields():
        assert "low" in f.metadata or "above" in f.metadata, key
        assert "high" in f.metadata or "below" in f.metadata, key
    overrides = [f"{key}={json.dumps(default)}" for key, default, _ in describe()]
    assert load_config(None, overrides) == RunConfig()


def test_describe_shows_the_ranges():
    rows = {key: text for key, _, text in describe()}
    assert rows["most.lr"].endswith("Range [0, 1].")
    assert rows["model.dropout"].endswith("Range [0, 1).")
    assert rows["requests.seed_sizes"].endswith(f"Range [1, {MAX_SEEDS}] each, 1 to 16 entries.")


def test_config_limits_match_the_catalog():
    """config.py sits below catalog/ (it cannot import it), so it repeats these two limits: they must agree."""
    assert (config_module.MAX_K, config_module.MAX_SEEDS) == (MAX_K, MAX_SEEDS)


BOMB = """\
h2po:
  rewards:
    - name: ndcg
      weight: 1.0
      args:
        a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
        b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
        c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
        d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
        e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
        f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
        g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
        h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
        i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: YAML aliases \(\*a\) are not allowed in configs"):
        load_config(path)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ConfigError, match="YAML aliases"):
        load_config(None, ["h2po.rewards=[&r {name: ndcg, weight: 1.0}, *r]"])


def test_size_and_depth_limits(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("out_dir: runs/x\n" + "#" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match=f"big.yaml: larger than {MAX_CONFIG_BYTES} bytes"):
        load_config(big)
    long = "out_dir=" + "x" * MAX_OVERRIDE_CHARS
    message = refused([long])
    assert message.startswith("override 'out_dir=xxx") and f"longer than {MAX_OVERRIDE_CHARS}" in message
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)  # a directory (a FIFO or a device alike) is not read
    deep = tmp_path / "deep.yaml"
    deep.write_text("h2po:\n  rewards: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: nested deeper than 32 levels"):
        load_config(deep)


@pytest.mark.parametrize("text, message", [
    ("1: 2\nfoo: 3\n", "unknown config key 1"),  # a non-string key, next to string keys
    ("h2po:\n  rewards: [{name: ndcg, weight: 1.0, args: {when: 2020-01-01}}]\n",
     "h2po.rewards[0].args.when: expected plain data"),
    ("h2po:\n  rewards: [{name: ndcg, weight: 1.0, args: {x: .nan}}]\n", "h2po.rewards[0].args.x = nan"),
    ("h2po:\n  rewards: [{name: ndcg, weight: 1.0, args: {3: x}}]\n", "h2po.rewards[0].args: key 3 is not a string"),
    ("out_dir: \"a\\0b\"\n", "out_dir: text with a NUL character"),
    ("seed: 1" + "0" * 5000 + "\n", "not valid YAML"),  # Python refuses to parse ints of > 4300 digits
    ("base: 3\n", "base: expected a file name"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_malformed_files_give_one_line(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 300


def test_a_threshold_above_every_weight_is_refused_when_the_dataset_is_built(tiny_catalog):
    """Every interaction of the tiny catalog has weight 4: at data.positive_threshold=100 no user has a positive, and
    nothing could be trained (before, pretraining drew requests forever or failed deep inside EASE tuning)."""
    with pytest.raises(CatalogError, match=r"^tiny50: no training user has a positive at "
                                           r"data\.positive_threshold=100 \(the largest interaction weight is 4\)$"):
        Dataset.build(tiny_catalog, DataConfig(positive_threshold=100.0))


@pytest.mark.parametrize("positives, request_cfg, reason", [
    ({}, RequestConfig(), "no training user has a positive at data.positive_threshold=4"),
    (None, RequestConfig(seed_sizes=[10], family_b_share=0.0), "no training user has more than 10 positives"),
    (None, RequestConfig(seed_sizes=[10], family_b_share=1.0, family_b_seed_size=5, family_b_min_targets=3),
     "no training user has more than 7 positives"),
])
def test_training_examples_stop_when_no_user_can_give_a_request(tiny_catalog, positives, request_cfg, reason):
    """The tiny catalog's users have six positives each: a seed set of 10 plus a target needs 11, family B 5 seeds
    and 3 targets needs 8, and a dataset without positives gives nothing. Before, `training_examples` drew forever."""
    data = Dataset.build(tiny_catalog, DataConfig())
    if positives is not None:
        data = dataclasses.replace(data, positives=positives)
    start = time.perf_counter()
    with pytest.raises(CatalogError, match=reason) as info:
        training_examples(data, request_cfg, 4, np.random.default_rng(0))
    assert time.perf_counter() - start < 5.0 and "\n" not in str(info.value)


def test_training_examples_still_draw_where_users_allow(tiny_catalog):
    data = Dataset.build(tiny_catalog, DataConfig())
    examples = training_examples(data, RequestConfig(seed_sizes=[2], family_b_share=0.0), 8, np.random.default_rng(0))
    assert len(examples) == 8 and all(ex.family == "A" and len(ex.request.seeds) == 2 for ex in examples)
