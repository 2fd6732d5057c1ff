"""Tests of the typed run configuration (core/config.py).

Every YAML in `configs/` loads; unknown keys, wrong types and out-of-choice values raise ConfigError naming the
dotted key (from a file and from a `key=value` override); `base:` inheritance and override precedence; the
resolved config round-trips through plain data; every field has help text and is reachable by an override.
Run: `python -m pytest tests/test_config.py -q`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.pipeline import MOST_KEYS, most_settings
from core.config import ConfigError, RunConfig, config_from_dict, config_to_dict, describe, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_load():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.most.lr == 1e-3 and cfg.requests.seed_sizes == [3, 5, 10] and cfg.model.prior == "ease"


@pytest.mark.parametrize("path", [None, *CONFIGS], ids=["defaults", *(p.name for p in CONFIGS)])
def test_every_config_file_loads(path):
    """Every configs/*.yaml (none may exist yet; the defaults always run) loads and round-trips."""
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_unknown_key_in_yaml_names_dotted_key(tmp_path):
    path = write(tmp_path / "run.yaml", "model:\n  d_model: 64\n  n_layerz: 2\n")
    with pytest.raises(ConfigError, match=r"model\.n_layerz"):
        load_config(path)


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path / "run.yaml", "modle:\n  d_model: 64\n")
    with pytest.raises(ConfigError, match=r"unknown config key modle"):
        load_config(path)


def test_unknown_key_in_override_names_dotted_key():
    with pytest.raises(ConfigError, match=r"most\.learning_rate"):
        load_config(None, ["most.learning_rate=0.1"])


@pytest.mark.parametrize("override, key", [
    ("most.lr=abc", r"most\.lr"),
    ("model.n_layers=1.5", r"model\.n_layers"),
    ("model.n_layers=true", r"model\.n_layers"),  # a bool is not an int
    ("model.time_input=1", r"model\.time_input"),
    ("data.split_seed=[1]", r"data\.split_seed"),
    ("requests.seed_sizes=[3, x]", r"requests\.seed_sizes\[1\]"),
    ("requests.seed_sizes=3", r"requests\.seed_sizes"),
    ("model=3", r"^model: expected a mapping"),
])
def test_wrong_type_in_override_names_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_wrong_type_in_yaml_names_key(tmp_path):
    path = write(tmp_path / "run.yaml", "sampler:\n  steps: ten\n")
    with pytest.raises(ConfigError, match=r"sampler\.steps: expected int"):
        load_config(path)


@pytest.mark.parametrize("override", ["most.order=alphabetical", "model.prior=svd"])
def test_literal_outside_choices_raises(override):
    key = override.split("=")[0].replace(".", r"\.")
    with pytest.raises(ConfigError, match=key + r".*not one of"):
        load_config(None, [override])


def test_override_values_are_converted():
    """An int given for a float is widened; exponent floats without a dot (`3e-4`, a string to PyYAML) parse."""
    cfg = load_config(None, ["most.lr=3e-4", "most.max_minutes=2", "eval.ease_lambdas=[1e2, 500]",
                             "requests.seed_sizes=[2, 4]", "model.prior=none", "out_dir=runs/x=y"])
    assert cfg.most.lr == pytest.approx(3e-4) and isinstance(cfg.most.lr, float)
    assert cfg.most.max_minutes == 2.0 and isinstance(cfg.most.max_minutes, float)
    assert cfg.eval.ease_lambdas == [100.0, 500.0]
    assert cfg.requests.seed_sizes == [2, 4]
    assert cfg.model.prior == "none"
    assert cfg.out_dir == "runs/x=y"  # only the first '=' splits key from value


def test_exponent_float_in_yaml(tmp_path):
    path = write(tmp_path / "run.yaml", "most:\n  lr: 1e-5\n  eps: 2.5E-3\ndata:\n  positive_threshold: -2.5E-3\n")
    cfg = load_config(path)
    assert cfg.most.lr == pytest.approx(1e-5) and cfg.most.eps == pytest.approx(2.5e-3)
    assert cfg.data.positive_threshold == pytest.approx(-2.5e-3)


def test_override_without_equals_raises():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("most.lr")


def test_base_inheritance_and_precedence(tmp_path):
    """child overrides base, overrides beat both, and untouched fields keep base or default values."""
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", "seed: 7\nmodel:\n  d_model: 64\n  n_layers: 2\nmost:\n  lr: 0.01\n")
    child = write(tmp_path / "sub" / "child.yaml",
                  "base: ../base.yaml\nmodel:\n  n_layers: 4\nmost:\n  batch_size: 8\n")
    cfg = load_config(child)
    assert cfg.seed == 7  # from base
    assert cfg.model.d_model == 64  # from base, sibling of an overridden key (deep merge)
    assert cfg.model.n_layers == 4  # child beats base
    assert cfg.most.lr == 0.01 and cfg.most.batch_size == 8
    assert cfg.model.n_heads == RunConfig().model.n_heads  # default
    cfg = load_config(child, ["model.n_layers=6", "seed=1", "most.lr=0.5"])
    assert (cfg.model.n_layers, cfg.seed, cfg.most.lr, cfg.model.d_model) == (6, 1, 0.5, 64)
    cfg = load_config(child, ["seed=1", "seed=2"])
    assert cfg.seed == 2  # the last override wins


def test_base_errors(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "base: missing.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "c.yaml")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_round_trip_through_plain_data():
    cfg = load_config(None, ["most.lr=0.002", "model.prior=none", "requests.seed_sizes=[1, 2]", "seed=3"])
    data = config_to_dict(cfg)
    assert json.loads(json.dumps(data)) == data  # plain JSON-able data
    assert config_from_dict(data) == cfg
    assert config_from_dict(config_to_dict(RunConfig())) == RunConfig()
    data["model"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"model\.bogus"):
        config_from_dict(data)


def test_describe_covers_every_field_with_help():
    rows = describe()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert {"most.lr", "model.prior", "data.split_seed", "eval.ks", "out_dir"} <= set(keys)
    assert all(help_text.strip() for _, _, help_text in rows), [k for k, _, h in rows if not h.strip()]
    cfg = RunConfig()
    for key, default, _ in rows:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == default, key


def test_every_field_is_reachable_by_override():
    """Overriding each key with its default (as JSON text) is accepted and reproduces the defaults."""
    overrides = [f"{key}={json.dumps(default)}" for key, default, _ in describe()]
    assert load_config(None, overrides) == RunConfig()


def test_h2po_seed_falls_back_to_the_global_seed_and_leaves_most_reusable():
    """h2po.seed = -1 follows `seed`; another value changes only H2PO's draws, so MOST's checkpoint still fits."""
    assert load_config(None, ["seed=3"]).h2po_seed == 3
    assert load_config(None, ["seed=3", "h2po.seed=5"]).h2po_seed == 5
    assert load_config(None, ["h2po.seed=0"]).h2po_seed == 0
    assert "h2po" not in MOST_KEYS and "seed" in MOST_KEYS


def test_most_settings_leave_out_what_only_scores_the_test_split():
    """A MOST checkpoint stays reusable when only eval.test_draws (or an H2PO key) changes, not when a setting it
    was trained or validated with does."""
    base = most_settings(config_to_dict(load_config(None, [])))
    assert most_settings(config_to_dict(load_config(None, ["eval.test_draws=3", "h2po.lr=1e-3"]))) == base
    assert most_settings(config_to_dict(load_config(None, ["eval.rivals=false", "eval.rival_extensions=1"]))) == base
    for override in ("eval.ease_lambdas=[3000.0]", "eval.request_seed=2", "most.lr=3e-4", "seed=1"):
        assert most_settings(config_to_dict(load_config(None, [override]))) != base, override


@pytest.mark.parametrize("override, message", [
    ("eval.rival_grids={ALS: {factor: [8]}}", r"eval\.rival_grids\.ALS: expected a mapping of \['alpha'"),
    ("eval.rival_grids.intent.weight=[0.0]", r"eval\.rival_grids\.intent\.weight must be a non-empty list"),
    ("eval.rival_grids.kNN={k: [5]}", r"eval\.rival_grids: unknown rival 'kNN'"),
])
def test_rival_grids_are_checked_when_the_config_is_read(override, message):
    """A rival grid with an unknown parameter, a value <= 0 or an unknown rival is refused up front; what an
    override does not name keeps its default grid."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    grids = load_config(None, ["eval.rival_grids.intent.weight=[2.0]"]).eval.rival_grids
    assert grids["intent"] == {"weight": [2.0]} and grids["ALS"] == load_config(None, []).eval.rival_grids["ALS"]


def test_test_draws_below_one_is_refused_when_the_config_is_read():
    with pytest.raises(ConfigError, match=r"eval\.test_draws = 0 is outside its range \[1, 1000\]"):
        load_config(None, ["eval.test_draws=0"])


def test_moved_knobs_old_spelling_refused_in_text_and_read_from_recorded_configs(tmp_path):
    """system.pairs_per_step and system.grad_clip moved to h2po: written by the user (override or file) they are an
    error naming the new key; in a recorded config (a checkpoint's header, `config_from_dict`) they are read as
    h2po.*, and data.min_year_field, which nothing read, is ignored."""
    with pytest.raises(ConfigError, match=r"system\.pairs_per_step is now h2po\.pairs_per_step"):
        load_config(None, ["system.pairs_per_step=0"])
    (tmp_path / "old.yaml").write_text("system:\n  grad_clip: 0.5\n")
    with pytest.raises(ConfigError, match=r"system\.grad_clip is now h2po\.grad_clip"):
        load_config(tmp_path / "old.yaml")
    recorded = config_to_dict(load_config(None, []))
    recorded["system"].update(pairs_per_step=0, grad_clip=0.5)
    del recorded["h2po"]["pairs_per_step"], recorded["h2po"]["grad_clip"]
    recorded["data"]["min_year_field"] = "year"
    cfg = config_from_dict(recorded)
    assert (cfg.h2po.pairs_per_step, cfg.h2po.grad_clip, cfg.h2po.pairs()) == (0, 0.5, 0)
    assert load_config(None, ["h2po.pairs_per_step=3"], base=recorded).h2po.pairs_per_step == 3
