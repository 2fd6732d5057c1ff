"""Typed run configuration: YAML -> dataclasses, validated once at the edge.

Every default lives in a dataclass field below, with its help text in the field's metadata (it doubles as
`h2po config --help`). A YAML file may name a `base:` file it overrides; `key=value` overrides from the command
line address any field by its dotted path (`most.lr=3e-4`). Unknown keys and values of the wrong type raise
`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from h2po.errors import UserError


class ConfigError(UserError):
    """A configuration file or override is invalid; the message names the key."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """Where the catalog comes from and how it is split."""

    catalog: str = option("", "Directory with items.parquet + interactions.parquet; empty = import MovieLens.")
    movielens: str = option("", "ml-latest-small CSV directory; empty = $H2PO_MOVIELENS, ../shared/data, cache.")
    positive_threshold: float = option(4.0, "An interaction with weight >= this is a positive.")
    split_seed: int = option(0, "Seed of the 60/20/20 train/validation/test user split.")
    tag_buckets: int = option(64, "Hashed tag buckets in the item feature vector.")
    cf_dim: int = option(64, "Collaborative-factor dimensions (truncated SVD of training positives).")
    min_year_field: str = option("year", "Name used for the year in constraints (Recency).")


@dataclass
class RequestConfig:
    """How seed-set requests are drawn from a user's positives (DESIGN section 2)."""

    seed_sizes: list[int] = option([3, 5, 10], "Seed-set sizes s of family A.")
    family_b_seed_size: int = option(3, "Seed-set size of family B (seeds share a genre and decade).")
    family_b_min_targets: int = option(2, "Family B requests need at least this many targets.")
    family_b_share: float = option(0.4, "Share of family B requests among training requests.")
    k: int = option(20, "Output length k (up to 64).")


@dataclass
class ModelConfig:
    """The masked-diffusion transformer over k list slots (DESIGN section 3)."""

    d_model: int = option(128, "Width D.")
    n_layers: int = option(3, "Transformer blocks.")
    n_heads: int = option(4, "Attention heads.")
    dropout: float = option(0.1, "Dropout inside blocks.")
    id_dropout: float = option(0.1, "Probability of zeroing an item's learned id residual u_i in training.")
    max_k: int = option(64, "Largest k the rank-position table supports.")
    time_input: bool = option(False, "Condition blocks on the diffusion time t (not needed for absorbing diffusion).")
    prior: Literal["none", "ease"] = option("ease", "Strong prior whose scores the item head adds to (residual).")
    prior_lambda: float = option(0.0, "EASE lambda of the prior; 0 = the value tuned on validation.")


@dataclass
class SamplerConfig:
    """Low-confidence-remasking sampler (DESIGN section 3.4)."""

    steps: int = option(10, "Denoising steps S.")
    temperature: float = option(0.0, "Gumbel temperature T: 0 = greedy (serving), 1 = rollouts.")
    batch_size: int = option(256, "Requests per sampler batch.")


@dataclass
class MostConfig:
    """MOST pretraining (DESIGN section 4)."""

    order: Literal["metric", "relevance", "random"] = option("metric", "Target order: MOST, relevance-only, random.")
    batch_size: int = option(64, "Requests per step.")
    lr: float = option(1e-3, "AdamW learning rate.")
    weight_decay: float = option(0.01, "AdamW weight decay.")
    warmup_steps: int = option(50, "Linear learning-rate warm-up.")
    max_steps: int = option(3000, "Upper bound on optimiser steps.")
    max_minutes: float = option(12.0, "Wall-clock budget for training.")
    eval_every: int = option(100, "Validate every this many steps; the best checkpoint is kept.")
    val_requests: int = option(256, "Validation requests scored at each validation (a fixed subset).")
    patience: int = option(6, "Stop after this many validations without improvement.")
    fill_weight: float = option(0.3, "Loss weight of teacher items that fill targets up to k.")
    redundancy: float = option(0.1, "MMR redundancy penalty when ordering targets.")
    eps: float = option(1e-3, "Smallest diffusion time t.")


@dataclass
class EvalConfig:
    """Evaluation and baselines (DESIGN section 2)."""

    ks: list[int] = option([10, 20], "Cut-offs K of the metrics.")
    bootstrap: int = option(1000, "Bootstrap resamples for confidence intervals (users are resampled).")
    ease_lambdas: list[float] = option([300.0, 1000.0, 3000.0, 10000.0], "EASE lambda grid tuned on validation.")
    mmr_lambda: float = option(0.7, "MMR trade-off between relevance and diversity.")
    request_seed: int = option(1, "Seed drawing the validation and test requests.")
    test_draws: int = option(10, "Requests per test user for every family A seed size and for family B, each "
                                 "with its own seed set (the bootstrap resamples users; validation draws one).")

    def __post_init__(self):
        if self.test_draws < 1:  # checked when the config is read, not after training
            raise ConfigError(f"eval.test_draws must be >= 1, got {self.test_draws}")


@dataclass
class H2POConfig:
    """H2PO fine-tuning (DESIGN section 5)."""

    group_size: int = option(8, "Rollouts G per request.")
    batch_requests: int = option(16, "Requests per on-policy learner batch (B; B * G rollouts).")
    lr: float = option(1e-4, "Learning rate (chosen on validation with benchmarks/probe.py; docs/results.md).")
    inner_epochs: int = option(2, "Passes over each learner batch.")
    clip_low: float = option(0.2, "PPO ratio clip: lower bound 1 - clip_low.")
    clip_high: float = option(0.28, "PPO ratio clip: upper bound 1 + clip_high.")
    max_importance_weight: float = option(5.0, "Slots whose pi_prox / pi_behav exceeds this are dropped.")
    max_staleness: int = option(4, "Rollouts older than this many weight versions are discarded.")
    kl_beta: float = option(0.04, "Weight of the k3 KL to the reference policy.")
    dpo_beta: float = option(0.1, "DPO temperature beta on ELBO differences.")
    vrpo_samples: int = option(8, "Timesteps (one mask each) per ELBO estimate, shared by policy and reference.")
    lambda_off_start: float = option(1.0, "Weight of the off-policy DPO term at the first step.")
    lambda_off_end: float = option(0.3, "Weight of the off-policy DPO term at the last step (linear decay).")
    lambda_sft: float = option(0.1, "Weight of the MOST anchor.")
    rollout_temperature: float = option(1.0, "Sampler temperature of rollouts.")
    rewards: list[dict] = option([{"name": "ndcg", "weight": 1.0}],
                                 "Rewards: {name: built-in or dotted path, weight, args: {...}}.")
    on_reward_error: Literal["stop", "skip"] = option("stop", "A failing reward stops the run, or skips the batch.")
    checkpoint_every: int = option(50, "Write OUT_DIR/train_state (resumable: h2po train --resume) every this many "
                                   "learner steps and at the end; 0 = never.")
    steps: int = option(60, "Learner steps: of `h2po run`, and of `h2po train` unless --steps is given.")
    max_minutes: float = option(0.0, "Stop after the first learner step that ends past this budget, counted from "
                                "this process's first step (a resumed run starts a new one); 0 = no limit.")
    eval_every: int = option(20, "Validation NDCG@10 of the policy every this many steps, shown on the dashboard; "
                             "0 = never.")
    seed: int = option(-1, "Seed of H2PO's own draws (rollout requests and sampling, learner noise); negative = the "
                       "global seed. Another value: another trajectory from the same MOST checkpoint.")


@dataclass
class PreferenceConfig:
    """Logged preference pairs produced from a behaviour policy (DESIGN section 5)."""

    behaviour: Literal["ease", "centroid-knn"] = option("ease", "Behaviour policy producing the logged lists.")
    noise: float = option(1.0, "Gumbel noise temperature on the policy's standardised scores.")
    pairs_per_user: int = option(8, "Preference pairs drawn per training user.")
    seed: int = option(0, "Seed of the request and noise draws.")


@dataclass
class SystemConfig:
    """Placement and engine options of a distributed H2PO run (DESIGN section 7)."""

    learners: int = option(2, "Data-parallel learner ranks (Ray actors, one DeepSpeed engine each).")
    zero_stage: int = option(2, "DeepSpeed ZeRO stage (0-2).")
    rollout_actors: int = option(1, "Rollout actors; a batch's requests are split over them.")
    rollout_cpus: float = option(1.0, "CPUs per rollout actor.")
    rollout_gpus: float = option(0.0, "GPUs per rollout actor.")
    learner_cpus: float = option(1.0, "CPUs per learner rank.")
    learner_gpus: float = option(0.0, "GPUs per learner rank.")
    pairs_per_step: int = option(-1, "Logged pairs per learner batch (the off-policy share); -1 = h2po.batch_requests; "
                                 "0 = on-policy only (a preference file given is not read).")
    grad_clip: float = option(1.0, "Gradient-norm clip of the engine.")
    bf16: bool = option(True, "bf16 autocast of rollout and learner forward passes on GPU (fp32 weights, optimiser "
                              "and item head); CPU runs are fp32 whatever this says.")
    ray_cpus: int = option(0, "CPUs of a local Ray instance (0 = all cores, at least what the actors ask).")

    def pairs(self, batch_requests: int) -> int:
        """Logged pairs per learner batch: pairs_per_step, or batch_requests when that is negative."""
        return batch_requests if self.pairs_per_step < 0 else self.pairs_per_step


@dataclass
class DashboardConfig:
    """The live rollout/learner page started with every training run (`h2po dashboard --run DIR` on its own)."""

    enabled: bool = option(True, "Serve the live page while `h2po train` / `h2po run` trains.")
    host: str = option("127.0.0.1", "Address the page binds to; another host only when asked for (e.g. 0.0.0.0).")
    port: int = option(0, "Port of the page; 0 = a free port (the URL is printed at start).")
    report: bool = option(True, "Write OUT_DIR/report.html (self-contained, offline) at the end of the run.")


@dataclass
class RunConfig:
    """The whole run: every component's sub-config."""

    out_dir: str = option("runs/default", "Run directory (checkpoints, results, copied licence).")
    seed: int = option(0, "Global random seed.")
    threads: int = option(0, "Torch CPU threads; 0 = all cores.")
    data: DataConfig = field(default_factory=DataConfig)
    requests: RequestConfig = field(default_factory=RequestConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    most: MostConfig = field(default_factory=MostConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    h2po: H2POConfig = field(default_factory=H2POConfig)
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)

    @property
    def h2po_seed(self) -> int:
        """The seed of the H2PO stage: h2po.seed, or the global seed when that is -1."""
        return self.seed if self.h2po.seed < 0 else self.h2po.seed


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(annotation):
            if arg is type(None) and value is None:
                return None
            try:
                return _check_value(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {annotation}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # PyYAML reads `3e-4` (no dot) as a string
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config, following `base:` links (relative to the file)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config base cycle through {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = values.pop("base", None)
    if base is None:
        return values
    return _merge(_read_yaml(path.parent / base, (*seen, path.resolve())), values)


def parse_override(text: str) -> dict:
    """`a.b=3` -> {"a": {"b": 3}}; the value is parsed as YAML (so `x=[1,2]` gives a list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Load a RunConfig: `base` values (e.g. a checkpoint's config), then a YAML file, then `key=value` overrides."""
    values = _merge(base or {}, _read_yaml(Path(path)) if path else {})
    for text in overrides:
        values = _merge(values, parse_override(text))
    return _build(RunConfig, values, "")


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (saved with every checkpoint and result)."""
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict) -> RunConfig:
    """Inverse of config_to_dict (validated like a file)."""
    return _build(RunConfig, values, "")


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field: the `--help` listing of configuration keys."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", default, f.metadata.get("help", "")))
    return rows
