"""Typed run configuration: YAML -> dataclasses, validated once at the edge.

Every default lives in a dataclass field below, with its help text in the field's metadata (it doubles as
`h2po config --help`). A YAML file may name a `base:` file it overrides; `key=value` overrides from the command
line address any field by its dotted path (`most.lr=3e-4`). Unknown keys, values of the wrong type and numbers
outside a field's range (declared with the field: `option(..., low=, high=)`) raise `ConfigError` naming the key, the
value and the range; `_check_relations` adds the few rules that join two fields. core/config_yaml.py reads the
text (size, alias and nesting bounds).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.config_check import check_limits, check_value, option, range_help
from core.config_yaml import (
    ConfigError,
    key_text,
    merge,
    parse_override,
    read_yaml,
    refuse_old_spellings,
    upgrade_recorded,
)
from core.errors import quoted
from core.placement import PlacementConfig
from core.rival_grids import RIVAL_GRIDS, merge_rival_grids

MAX_K = 64  # = catalog.requests.MAX_K and MAX_SEEDS (this leaf package cannot import catalog/; a test ties them)
MAX_SEEDS = 32
SEED_MAX = 2**32 - 1
MAX_STEPS = 10**7
MAX_BATCH = 65536
MAX_MINUTES = 525600.0  # a year


@dataclass
class DataConfig:
    """Where the catalog comes from and how it is split."""

    catalog: str = option("", "Directory with items.parquet + interactions.parquet; empty = import data.format.")
    format: Literal["movielens", "movietweetings"] = option("movielens", "Dataset format imported when no catalog "
                                                            "is given: ml-latest-small CSVs or MovieTweetings .dat.")
    source: str = option("", "Directory of data.format's files; empty = $H2PO_MOVIELENS / $H2PO_MOVIETWEETINGS, "
                             "../shared/data/<dataset>, (MovieLens) the cache.")
    movielens: str = option("", "ml-latest-small CSV directory (older spelling of data.source for format movielens).")
    positive_threshold: float = option(4.0, "An interaction with weight >= this is a positive.", low=-1e9, high=1e9)
    split_seed: int = option(0, "Seed of the 60/20/20 train/validation/test user split.", low=0, high=SEED_MAX)
    tag_buckets: int = option(64, "Hashed tag buckets in the item feature vector.", low=1, high=4096)
    cf_dim: int = option(64, "Collaborative-factor dimensions (truncated SVD of training positives).", low=0, high=1024)


@dataclass
class RequestConfig:
    """How seed-set requests are drawn from a user's positives (DESIGN section 2)."""

    seed_sizes: list[int] = option([3, 5, 10], "Seed-set sizes s of family A.", low=1, high=MAX_SEEDS, length=(1, 16))
    family_b_seed_size: int = option(3, "Seed-set size of family B (seeds share a genre and decade).",
                                     low=1, high=MAX_SEEDS)
    family_b_min_targets: int = option(2, "Family B requests need at least this many targets.", low=1, high=1000)
    family_b_share: float = option(0.4, "Share of family B requests among training requests.", low=0.0, high=1.0)
    k: int = option(20, "Output length k (up to model.max_k).", low=1, high=MAX_K)


@dataclass
class ModelConfig:
    """The masked-diffusion transformer over k list slots (DESIGN section 3)."""

    d_model: int = option(128, "Width D.", low=1, high=8192)
    n_layers: int = option(3, "Transformer blocks.", low=1, high=64)
    n_heads: int = option(4, "Attention heads.", low=1, high=256)
    dropout: float = option(0.1, "Dropout inside blocks.", low=0.0, below=1.0)
    id_dropout: float = option(0.1, "Probability of zeroing an item's learned id residual u_i in training.",
                               low=0.0, high=1.0)
    max_k: int = option(64, "Largest k the rank-position table supports.", low=1, high=MAX_K)
    time_input: bool = option(False, "Condition blocks on the diffusion time t (not needed for absorbing diffusion).")
    prior: Literal["none", "ease", "ease+intent"] = option("ease", "Strong prior whose scores the item head adds "
                                                           "to (residual); +intent adds the seeds' shared values.")
    intent_init: float = option(10.0, "Initial learned weight of each intent part (attribute field, decade) in the "
                                      "prior, in units of the standardised EASE score (prior=ease+intent; the value "
                                      "measured in docs/results.md, issue 13).",
                                low=-100.0, high=100.0)
    intent_gate: bool = option(False, "Scale each intent part per request by 2 sigmoid(g . c), c the pooled request "
                                      "vector, g learned from zero (a gate of 1 at the start): a request whose seeds "
                                      "share values by chance can weigh them less (prior=ease+intent).")
    prior_lambda: float = option(0.0, "EASE lambda of the prior; 0 = the value tuned on validation.", low=0.0, high=1e9)
    prior_neighbours: int = option(200, "m: the prior keeps each item's top-m EASE entries.", low=1, high=10**5)
    prior_items: int = option(20000, "P: exact EASE up to P warm items, else P most popular + kNN.", low=2, high=10**6)
    prior_folds: int = option(1, "F: training requests (MOST's, H2PO's rollouts and anchor) see an out-of-fold "
                                 "prior. The training users are split into F folds, and a request of a user in fold f "
                                 "uses EASE fit without fold f (as its prior and MOST's target relevance), so that "
                                 "training sees the prior as it is at serving time, not one that saw the user's "
                                 "held-out items; 1 = one EASE on all training users. Validation and serving use the "
                                 "full EASE.", low=1, high=100)
    zero_head: bool = option(False, "Start the item head W_o at zero: an untrained model scores exactly its prior "
                                    "(+ b_i = 0), and MOST learns a residual from there; MOST then validates step 0 "
                                    "too and keeps the prior unless training beats it.")
    item_chunk: int = option(16384, "Items per chunk of the item head's exact softmax, draw and top-k (model/head.py): "
                                    "peak memory rows x chunk, not rows x N; N <= chunk runs in one piece.",
                             low=1, high=2**31 - 1)


@dataclass
class SamplerConfig:
    """Low-confidence-remasking sampler (DESIGN section 3.4)."""

    steps: int = option(10, "Denoising steps S.", low=1, high=MAX_K)
    temperature: float = option(0.0, "Gumbel temperature T: 0 = greedy (serving), 1 = rollouts.", low=0.0, high=100.0)
    batch_size: int = option(256, "Requests per sampler batch.", low=1, high=MAX_BATCH)
    order: Literal["slots", "score"] = option("score", "Rank order of a served list: slots = the order of the slots "
                                              "the sampler filled; score = its k items re-sorted by their logit in "
                                              "the first slot of the all-masked list (one more forward pass).")


@dataclass
class MostConfig:
    """MOST pretraining (DESIGN section 4)."""

    order: Literal["metric", "relevance", "random"] = option("metric", "Target order: MOST, relevance-only, random.")
    batch_size: int = option(64, "Requests per step.", low=1, high=MAX_BATCH)
    lr: float = option(1e-3, "AdamW learning rate.", low=0.0, high=1.0)
    weight_decay: float = option(0.01, "AdamW weight decay.", low=0.0, high=10.0)
    warmup_steps: int = option(50, "Linear learning-rate warm-up.", low=0, high=MAX_STEPS)
    max_steps: int = option(3000, "Upper bound on optimiser steps (the budget is in steps: max_steps, patience).",
                            low=1, high=MAX_STEPS)
    max_minutes: float = option(20.0, "Wall-clock safety net, minutes: if it ends training before max_steps or "
                                "early stopping, a WARNING says so and pretrain.json / the checkpoint record it.",
                                above=0.0, high=MAX_MINUTES)
    eval_every: int = option(100, "Validate every this many steps; the best checkpoint is kept.", low=1, high=MAX_STEPS)
    val_requests: int = option(256, "Validation requests scored at each validation (a fixed subset of those "
                               "of val_draws, drawn with eval.request_seed).", low=1, high=10**6)
    val_draws: int = option(1, "Validation requests drawn per validation user, family and seed size.", low=1,
                            high=100)
    patience: int = option(6, "Stop after this many validations without improvement.", low=1, high=MAX_STEPS)
    ema: float = option(0.0, "Decay of an exponential moving average of the weights, which is validated and kept "
                        "instead of the last step's (0 = off).", low=0.0, below=1.0)
    fill_weight: float = option(0.3, "Loss weight of teacher items that fill targets up to k.", low=0.0, high=1.0)
    redundancy: float = option(0.1, "MMR redundancy penalty when ordering targets.", low=0.0, high=10.0)
    eps: float = option(1e-3, "Smallest diffusion time t.", above=0.0, below=1.0)


@dataclass
class EvalConfig:
    """Evaluation and baselines (DESIGN section 2)."""

    ks: list[int] = option([10, 20], "Cut-offs K of the metrics.", low=1, high=MAX_K, length=(1, 8))
    bootstrap: int = option(1000, "Bootstrap resamples for confidence intervals (users are resampled).",
                            low=1, high=10**6)
    ease_lambdas: list[float] = option([300.0, 1000.0, 3000.0, 10000.0], "EASE lambda grid tuned on validation.",
                                       above=0.0, high=1e9, length=(1, 64))
    mmr_lambda: float = option(0.7, "MMR trade-off between relevance and diversity.", low=0.0, high=1.0)
    request_seed: int = option(1, "Seed drawing the validation and test requests.", low=0, high=SEED_MAX)
    test_draws: int = option(10, "Requests per test user for every family A seed size and for family B, each "
                                 "with its own seed set (the bootstrap resamples users; validation draws one).",
                             low=1, high=1000)
    rivals: bool = option(True, "Tune the rivals of evaluation/rivals.py on validation (cached in OUT_DIR/rivals.json) "
                                "and add them, and the best rival per family, to the test table.")
    rival_grids: dict = option(RIVAL_GRIDS, "Starting grids of the rivals' validation tuning, {rival: {parameter: "
                                            "[values]}} (what is not given keeps its default); a one-value list is "
                                            "fixed, but for epochs: a neural rival's starting budget.")
    rival_extensions: int = option(3, "Times a rival's grid may grow past the edge where its best value sits, and "
                                      "a neural rival's budget may double while its last epoch validates best.",
                                   low=0, high=20)
    rival_eval_every: int = option(5, "Validate the neural rivals every this many epochs; the best epoch is kept.",
                                   low=1, high=10000)

    def __post_init__(self):
        self.rival_grids = merge_rival_grids(self.rival_grids)


@dataclass
class H2POConfig:
    """H2PO fine-tuning (DESIGN section 5)."""

    group_size: int = option(8, "Rollouts G per request.", low=2, high=1024)
    batch_requests: int = option(16, "Requests per on-policy learner batch (B; B * G rollouts).", low=1, high=MAX_BATCH)
    lr: float = option(1e-4, "Learning rate (chosen on validation with benchmarks/probe.py; docs/results.md).",
                       low=0.0, high=1.0)
    inner_epochs: int = option(2, "Passes over each learner batch.", low=1, high=100)
    clip_low: float = option(0.2, "PPO ratio clip: lower bound 1 - clip_low.", low=0.0, below=1.0)
    clip_high: float = option(0.28, "PPO ratio clip: upper bound 1 + clip_high.", low=0.0, high=10.0)
    max_importance_weight: float = option(5.0, "Slots whose pi_prox / pi_behav exceeds this are dropped.",
                                          low=1.0, high=1e6)
    max_staleness: int = option(1, "Async mode: rollouts for up to this many weight versions ahead of the learner are "
                                "in flight (a call starts only when its rollouts will be at most this many versions "
                                "old when trained on); older groups in the buffer are dropped. Sync mode: 0.",
                                low=0, high=1000)
    kl_beta: float = option(0.04, "Weight of the k3 KL to the reference policy.", low=0.0, high=100.0)
    dpo_beta: float = option(0.1, "DPO temperature beta on ELBO differences.", above=0.0, high=100.0)
    vrpo_samples: int = option(8, "Timesteps (one mask each) per ELBO estimate, shared by policy and reference.",
                               low=1, high=1024)
    lambda_off_start: float = option(1.0, "Weight of the off-policy DPO term at the first step.", low=0.0, high=100.0)
    lambda_off_end: float = option(0.3, "Weight of the off-policy DPO term at the last step (linear decay).",
                                   low=0.0, high=100.0)
    lambda_sft: float = option(0.1, "Weight of the MOST anchor.", low=0.0, high=100.0)
    pairs_per_step: int = option(-1, "Logged pairs per learner batch (the off-policy share); -1 = h2po.batch_requests; "
                                 "0 = on-policy only (a preference file given is not read).", low=-1, high=MAX_BATCH)
    grad_clip: float = option(1.0, "Global gradient-norm clip of the learner (DeepSpeed engine or the probe's AdamW); "
                              "0 = none.", low=0.0, high=1e6)
    rollout_temperature: float = option(1.0, "Sampler temperature of rollouts.", above=0.0, high=100.0)
    rewards: list[dict] = option([{"name": "ndcg", "weight": 1.0}],
                                 "Rewards: {name: built-in or dotted path, weight, args: {...}}.", length=(1, 32))
    on_reward_error: Literal["stop", "skip"] = option("stop", "A failing reward stops the run, or skips the batch.")
    checkpoint_every: int = option(50, "Write OUT_DIR/train_state (resumable: h2po train --resume) every this many "
                                   "learner steps and at the end; 0 = never.", low=0, high=MAX_STEPS)
    steps: int = option(60, "Learner steps: of `h2po run`, and of `h2po train` unless --steps is given.",
                        low=0, high=MAX_STEPS)
    max_minutes: float = option(0.0, "Wall-clock safety net (the budget is h2po.steps): stop after the first "
                                "learner step that ends past it, counted from this process's first step, with a "
                                "WARNING and stopped_by in the checkpoint's meta; 0 = no limit.",
                                low=0.0, high=MAX_MINUTES)
    eval_every: int = option(20, "Validation NDCG@10 of the policy every this many steps, shown on the dashboard; "
                             "0 = never.", low=0, high=MAX_STEPS)
    keep: Literal["last", "best"] = option("last", "The policy OUT_DIR/h2po.safetensors holds at the end: the last "
                                           "step's, or the best probe (h2po.eval_every) on validation NDCG@10 "
                                           "whose gain over step 0 (the start) has a 95% interval over users above "
                                           "0, else the start; the last one is then kept as h2po_last.safetensors.")
    seed: int = option(-1, "Seed of H2PO's own draws (rollout requests and sampling, learner noise); -1 = the "
                       "global seed. Another value: another trajectory from the same MOST checkpoint.",
                       low=-1, high=SEED_MAX)

    def pairs(self) -> int:
        """Logged pairs per learner batch: pairs_per_step, or batch_requests when that is negative."""
        return self.batch_requests if self.pairs_per_step < 0 else self.pairs_per_step


@dataclass
class PreferenceConfig:
    """Logged preference pairs produced from a behaviour policy (DESIGN section 5)."""

    behaviour: Literal["ease", "centroid-knn"] = option("ease", "Behaviour policy producing the logged lists.")
    noise: float = option(1.0, "Gumbel noise temperature on the policy's standardised scores.", above=0.0, high=100.0)
    pairs_per_user: int = option(8, "Preference pairs drawn per training user.", low=1, high=10_000)
    seed: int = option(0, "Seed of the request and noise draws.", low=0, high=SEED_MAX)


@dataclass
class SystemConfig:
    """Placement and engine options of a distributed H2PO run (DESIGN section 7)."""

    learners: int = option(2, "Data-parallel learner ranks (Ray actors, one DeepSpeed engine each).", low=1, high=1024)
    zero_stage: int = option(2, "DeepSpeed ZeRO stage (0-2).", low=0, high=2)
    rollout_actors: int = option(1, "Rollout actors; a batch's requests are split over them.", low=1, high=1024)
    rollout_cpus: float = option(1.0, "CPUs per rollout actor.", low=0.0, high=1024.0)
    rollout_gpus: float = option(0.0, "GPUs per rollout actor.", low=0.0, high=64.0)
    learner_cpus: float = option(1.0, "CPUs per learner rank.", low=0.0, high=1024.0)
    learner_gpus: float = option(0.0, "GPUs per learner rank.", low=0.0, high=64.0)
    bf16: bool = option(True, "bf16 autocast of rollout and learner forward passes on GPU (fp32 weights, optimiser "
                              "and item head); CPU runs are fp32 whatever this says.")
    ray_cpus: int = option(0, "CPUs of a local Ray instance (0 = all cores, at least what the actors ask).",
                           low=0, high=4096)
    placement: PlacementConfig = field(default_factory=PlacementConfig)  # nodes of learner ranks and rollout actors


@dataclass
class DashboardConfig:
    """The live rollout/learner page started with every training run (`h2po dashboard --run DIR` on its own)."""

    enabled: bool = option(True, "Serve the live page while `h2po train` / `h2po run` trains.")
    host: str = option("127.0.0.1", "Address the page binds to; another host only when asked for (e.g. 0.0.0.0).")
    port: int = option(0, "Port of the page; 0 = a free port (the URL is printed at start).", low=0, high=65535)
    report: bool = option(True, "Write OUT_DIR/report.html (self-contained, offline) at the end of the run.")


@dataclass
class ServeConfig:
    """`h2po serve`: the Ray Serve deployment of a checkpoint and its rivals (serving/)."""

    host: str = option("127.0.0.1", "Address the HTTP proxy binds to; beyond loopback every request needs the bearer "
                       "token (--token, $H2PO_SERVE_TOKEN, else a generated one, printed).")
    port: int = option(8000, "HTTP port of the Ray Serve proxy.", low=1, high=65535)
    replicas: int = option(1, "Replicas of the model deployment (each rival deployment gets one).", low=1, high=1024)
    replica_cpus: float = option(1.0, "Ray CPUs reserved by each replica.", low=0.0, high=1024.0)
    replica_gpus: float = option(0.0, "Ray GPUs reserved by each model replica; > 0 loads the model onto the "
                                 "replica's GPU and samples there (rivals stay on the CPU); 0 = CPU.",
                                 low=0.0, high=64.0)
    bf16: bool = option(True, "bf16 autocast of the served sampler's forward passes on a GPU replica (fp32 weights, "
                        "as system.bf16 in training); no effect on the CPU.")
    threads: int = option(0, "Torch CPU threads of each replica; 0 = the machine's cores over the replicas.",
                          low=0, high=1024)
    steps: int = option(0, "Sampler steps S per list; 0 = the checkpoint's sampler.steps.", low=0, high=MAX_K)
    max_batch_size: int = option(16, "Most requests the dynamic batcher (serve.batch) puts in one sampler call.",
                                 low=1, high=MAX_BATCH)
    batch_wait_ms: float = option(5.0, "How long the batcher waits to fill a batch after its first request, ms.",
                                  low=0.0, high=10_000.0)
    max_ongoing: int = option(128, "Requests a replica holds at once, its batcher's queue included (Ray Serve "
                              "max_ongoing_requests); beyond them requests wait in Ray Serve's router.",
                              low=1, high=100_000)
    max_queued: int = option(128, "Requests waiting in the router for a replica before new ones are shed with 503 + "
                             "Retry-After (Ray Serve max_queued_requests).", low=1, high=1_000_000)
    retry_after_s: int = option(1, "Retry-After, seconds, sent with a shed request.", low=0, high=3600)
    max_body_bytes: int = option(1_000_000, "Largest request body; a larger one gets 413.", low=1024,
                                 high=100_000_000)
    rivals: list[str] = option(["EASE", "two-tower"], "Rivals served beside the model, each on /<name>/ "
                               "(EASE, EASE + intent, two-tower).", length=(0, 3))
    ease_lambda: float = option(0.0, "EASE lambda of the served rivals; 0 = ease.json beside the checkpoint.",
                                low=0.0, high=1e9)
    watch_s: float = option(2.0, "Seconds between checks of the checkpoint file for a newer one (hot swap); 0 = off.",
                            low=0.0, high=86_400.0)
    after_training: bool = option(False, "`h2po train` / `h2po run` serve OUT_DIR/h2po.safetensors once training "
                                  "(and the run's evaluation) ends, until Ctrl-C.")


@dataclass
class RunConfig:
    """The whole run: every component's sub-config."""

    out_dir: str = option("runs/default", "Run directory (checkpoints, results, copied licence).")
    seed: int = option(0, "Global random seed.", low=0, high=SEED_MAX)
    threads: int = option(0, "Torch CPU threads; 0 = all cores.", low=0, high=1024)
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
    serve: ServeConfig = field(default_factory=ServeConfig)

    @property
    def h2po_seed(self) -> int:
        """The seed of the H2PO stage: h2po.seed, or the global seed when that is -1."""
        return self.seed if self.h2po.seed < 0 else self.h2po.seed


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and values outside their fields' ranges."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {quoted(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(name) for name in values if name not in fields)
    if unknown:
        raise ConfigError(f"unknown config key {key_text(prefix + unknown[0])} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = check_limits(check_value(value, hint, f"{prefix}{name}"), fields[name].metadata,
                                        f"{prefix}{name}")
    return cls(**kwargs)


def _check_relations(cfg: RunConfig) -> RunConfig:
    """The rules that join two fields (each field's own range is checked by `_build`)."""
    model, h2po = cfg.model, cfg.h2po
    if model.d_model % model.n_heads:
        raise ConfigError(f"model.n_heads = {model.n_heads} does not divide model.d_model = {model.d_model}")
    if cfg.requests.k > model.max_k:
        raise ConfigError(f"requests.k = {cfg.requests.k} is above model.max_k = {model.max_k} (the rank-position "
                          "table's size)")
    if h2po.lambda_off_end > h2po.lambda_off_start:
        raise ConfigError(f"h2po.lambda_off_end = {h2po.lambda_off_end!r} is above h2po.lambda_off_start = "
                          f"{h2po.lambda_off_start!r} (lambda_off decays linearly from start to end)")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Load a RunConfig: `base` values (e.g. a checkpoint's config), then a YAML file, then `key=value` overrides."""
    if base is not None and not isinstance(base, dict):
        raise ConfigError(f"base config: expected a mapping, got {quoted(base)}")
    values = merge(upgrade_recorded(base or {}), refuse_old_spellings(read_yaml(Path(path)) if path else {}))
    for text in overrides:
        values = merge(values, refuse_old_spellings(parse_override(text)))
    return _check_relations(_build(RunConfig, values, ""))


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (saved with every checkpoint and result)."""
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict) -> RunConfig:
    """Inverse of config_to_dict (validated like a file; an older version's spelling is upgraded)."""
    if not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping, got {quoted(values)}")
    return _check_relations(_build(RunConfig, upgrade_recorded(values), ""))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field: the `--help` listing of configuration keys."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", default, f.metadata.get("help", "") + range_help(f.metadata)))
    return rows
