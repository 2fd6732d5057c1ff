"""The H2PO driver (DESIGN section 7): start or join Ray, place the actors, run the loop, write the policy.

    from actors.driver import SystemConfig, train
    result = train(cfg, "runs/default/most.safetensors", "prefs.parquet", steps=100, mode="async")
    # or: h2po train --checkpoint runs/default/most.safetensors --preferences prefs.parquet --steps 100

The loop is plain calls, one learner step per iteration:
    rollouts (rollout actors -> driver -> buffer) -> take a batch (staleness bound, on/off mix) -> shard over the
    learner ranks -> H2PO updates (DeepSpeed) -> rank 0 publishes versioned weights -> rollout actors adopt them.
- sync: each batch is sampled with the weights the learner is about to train (staleness 0).
- async: the next batch is sampled while the learner trains on the current one, so it comes from the previous
  version (staleness 1, within `h2po.max_staleness`); the weight update is queued behind that generation.
A failing reward raises `RewardError` from the rollout actor: `h2po.on_reward_error` = "stop" re-raises it
(naming the reward), "skip" drops that rollout batch and counts it.

Ray: `RAY_ADDRESS` set -> `ray.init(address=...)` (e.g. inside `ray job submit`); else a local instance, shut
down again at the end. An already initialised Ray (a test's cluster) is used as it is.

Not yet built (see the module docstrings of rollout/buffer.py and learner/engine.py): periodic checkpoints of
optimiser + buffer + cursors and resume, evaluation during training, the dashboard feed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import ray

from actors.buffer import ReplayBufferActor
from actors.learner import LearnerActor
from actors.rollout import RolloutActor
from catalog.dataset import load_catalog
from catalog.preferences import read_preferences
from catalog.schema import CatalogError
from h2po.config import RunConfig, SystemConfig
from h2po.errors import UserError
from learner.checkpoint import read_header
from learner.engine import EngineConfig
from learner.h2po import lambda_off_at
from rewards.registry import RewardError, build_rewards
from rollout.buffer import BufferStats, LearnerBatch, shard_batch


@dataclass
class Actors:
    """Handles of the placed actors: learner ranks (rank order), rollout actors, the replay buffer."""

    learners: list
    rollouts: list
    buffer: object


@dataclass
class TrainResult:
    """What a run produced: the final weights (parameters) and version, per-step stats, buffer counters."""

    state_dict: dict
    version: int
    history: list[dict]
    buffer: BufferStats
    checkpoint: Path
    seconds: float
    rollout_versions: list[int] = field(default_factory=list)  # each rollout actor's weight version at the end


def connect_ray(system: SystemConfig) -> bool:
    """Join RAY_ADDRESS's cluster or start a local instance (unless Ray is up already).  -> whether we started it."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # CPUs are scheduling tokens: a small machine still gets one per actor (they then share its cores)
        needed = system.learners * system.learner_cpus + system.rollout_actors * system.rollout_cpus
        ray.init(num_cpus=system.ray_cpus or max(os.cpu_count() or 1, int(np.ceil(needed))), include_dashboard=False)
    return True


def check_inputs(cfg: RunConfig, checkpoint: Path, preferences: str | None, steps: int, mode: str) -> None:
    """Fail fast, with a user error, before any actor starts (their errors would arrive wrapped by Ray)."""
    if steps < 1 or mode not in ("sync", "async"):
        raise UserError(f"need steps >= 1 and mode sync or async, got steps={steps}, mode={mode!r}")
    if mode == "async" and cfg.h2po.max_staleness < 1:
        raise UserError("async mode samples with the previous weights: h2po.max_staleness must be >= 1")
    catalog = load_catalog(cfg.data, Path(cfg.out_dir))  # imports the catalog once, before the actors read it
    made_on = read_header(checkpoint)["catalog"]
    if made_on != catalog.fingerprint:
        raise CatalogError(f"{checkpoint} was trained on another catalog (fingerprint {made_on}, this catalog "
                           f"{catalog.fingerprint})")
    if preferences:
        read_preferences(preferences, catalog)  # missing file or columns -> CatalogError now
    build_rewards(cfg.h2po.rewards)


def place_actors(cfg: RunConfig, checkpoint: str, preferences: str | None, system: SystemConfig) -> Actors:
    """Start the buffer, rollout actors and learner ranks, then form the learners' process group."""
    def with_threads(cpus: float) -> RunConfig:
        return dataclasses.replace(cfg, threads=cfg.threads or max(1, int(cpus)))

    engine_cfg = EngineConfig(zero_stage=system.zero_stage, lr=cfg.h2po.lr, grad_clip=system.grad_clip)
    buffer = ReplayBufferActor.options(num_cpus=0).remote(cfg, preferences)
    rollouts = [RolloutActor.options(num_cpus=system.rollout_cpus, num_gpus=system.rollout_gpus)
                .remote(with_threads(system.rollout_cpus), checkpoint, cfg.seed * 1000 + i)
                for i in range(system.rollout_actors)]
    learners = [LearnerActor.options(num_cpus=system.learner_cpus, num_gpus=system.learner_gpus)
                .remote(with_threads(system.learner_cpus), checkpoint, engine_cfg) for _ in range(system.learners)]
    address, port = ray.get(learners[0].address.remote())
    ray.get([learner.init_distributed.remote(rank, len(learners), port, address)
             for rank, learner in enumerate(learners)])  # all ranks rendezvous at once
    return Actors(learners, rollouts, buffer)


def launch_rollouts(actors: Actors, n_requests: int, call: int) -> list:
    """Split n requests over the rollout actors and start their generation.  -> Rollouts refs"""
    counts = [len(part) for part in np.array_split(np.arange(n_requests), len(actors.rollouts))]
    return [actor.generate.remote(n, call * len(actors.rollouts) + i)
            for i, (actor, n) in enumerate(zip(actors.rollouts, counts)) if n > 0]


def collect_rollouts(refs: list, buffer, on_reward_error: str) -> int:
    """Wait for the rollouts and hand them to the buffer.  -> batches skipped for a failing reward ("skip").

    The rollouts pass through the driver (a few KB) rather than as ObjectRefs to the buffer, so that a failed
    generation reaches the driver directly instead of being re-raised by the buffer."""
    skipped, accepted = 0, []
    for ref in refs:
        try:
            accepted.append(ray.get(ref))
        except RewardError as err:
            if on_reward_error == "stop":
                raise getattr(err, "cause", err) from None  # the reward's own error, with its name
            print(f"skipping a rollout batch: {err}", flush=True)
            skipped += 1
    ray.get([buffer.put.remote(rollouts) for rollouts in accepted])
    return skipped


def step_stats(rank_stats: list[dict], batch: LearnerBatch, reward_names: list[str]) -> dict:
    """Mean of the ranks' stats (over the ranks that report a key) plus reward means and batch facts."""
    keys = dict.fromkeys(k for stats in rank_stats for k in stats)
    out = {k: float(np.mean([s[k] for s in rank_stats if k in s])) for k in keys}
    out["version"] = int(rank_stats[0]["version"])
    if batch.rollouts is not None:
        for name, mean in zip(reward_names, batch.rollouts.rewards.mean(0), strict=True):
            out[f"reward/{name}"] = float(mean)
    out.update({"rollout/requests": batch.n_requests, "rollout/staleness": batch.staleness,
                "pairs": len(batch.pairs)})
    return out


def format_stats(step: int, steps: int, stats: dict) -> str:
    shown = ["loss/total", "loss/on", "loss/off", "loss/anchor", "kl", "dpo/accuracy", "grad_norm"]
    shown += [k for k in stats if k.startswith("reward/")]
    parts = [f"{k} {stats[k]:.4f}" for k in shown if k in stats]
    times = " ".join(f"{k[5:]} {stats[k]:.2f}s" for k in ("time/rollout", "time/train", "time/sync") if k in stats)
    return f"step {step + 1}/{steps} v{stats['version']} " + " ".join(parts) + \
        f" staleness {stats['rollout/staleness']} | {times}"


def run_loop(actors: Actors, cfg: RunConfig, steps: int, mode: str, n_pairs: int) -> tuple[list[dict], object]:
    """The training loop (module docstring).  -> (per-step stats, ObjectRef of the last published weights)"""
    h2po = cfg.h2po
    names = ray.get(actors.rollouts[0].reward_names.remote())
    version, history, pending, state_ref, skipped = 0, [], None, None, 0
    for step in range(steps):
        start = time.time()
        pending = pending or launch_rollouts(actors, h2po.batch_requests, step)
        skipped += collect_rollouts(pending, actors.buffer, h2po.on_reward_error)
        batch: LearnerBatch = ray.get(actors.buffer.take.remote(version, h2po.batch_requests, n_pairs))
        rollout_seconds = time.time() - start
        overlap = mode == "async" and step + 1 < steps
        pending = launch_rollouts(actors, h2po.batch_requests, step + 1) if overlap else None
        lambda_off = lambda_off_at(step, steps, h2po.lambda_off_start, h2po.lambda_off_end)
        shards = shard_batch(batch, len(actors.learners))
        rank_stats = ray.get([learner.train_step.remote(shard.rollouts, shard.pairs, lambda_off)
                              for learner, shard in zip(actors.learners, shards, strict=True)])
        sync_start = time.time()
        state_ref, version_ref = actors.learners[0].weights.remote()
        version = ray.get(version_ref)
        updates = [actor.set_weights.remote(state_ref, version) for actor in actors.rollouts]
        if mode == "sync":
            ray.get(updates)  # in async mode the update waits behind the generation already running
        stats = step_stats(rank_stats, batch, names)
        stats.update({"time/rollout": rollout_seconds, "time/sync": time.time() - sync_start,
                      "lambda_off": lambda_off, "rollout/skipped_batches": skipped})
        history.append(stats)
        print(format_stats(step, steps, stats), flush=True)
    return history, state_ref


def train(cfg: RunConfig, checkpoint: str | Path, preferences_path: str | Path | None = None, steps: int = 100,
          mode: Literal["sync", "async"] = "sync", system: SystemConfig | None = None) -> TrainResult:
    """H2PO from a MOST checkpoint on Ray + DeepSpeed; writes OUT_DIR/h2po.safetensors (module docstring)."""
    system = system or cfg.system
    checkpoint, preferences = Path(checkpoint), str(preferences_path) if preferences_path else None
    check_inputs(cfg, checkpoint, preferences, steps, mode)
    n_pairs = (cfg.h2po.batch_requests if system.pairs_per_step < 0 else system.pairs_per_step) if preferences else 0
    start, started = time.time(), connect_ray(system)
    try:
        actors = place_actors(cfg, str(checkpoint), preferences, system)
        print(f"H2PO: {system.learners} learner ranks (ZeRO {system.zero_stage}), {system.rollout_actors} rollout "
              f"actor(s), {mode} mode, {steps} steps; actors ready in {time.time() - start:.1f}s", flush=True)
        history, state_ref = run_loop(actors, cfg, steps, mode, n_pairs)
        out = Path(cfg.out_dir) / "h2po.safetensors"
        meta = {"steps": steps, "mode": mode, "from": str(checkpoint), "final": history[-1]}
        ray.get(actors.learners[0].save_policy.remote(str(out), json.loads(json.dumps(meta))))
        buffer_stats = ray.get(actors.buffer.stats.remote())
        if preferences:
            print(ray.get(actors.buffer.preference_report.remote()))
        result = TrainResult(ray.get(state_ref), history[-1]["version"], history, buffer_stats, out,
                             time.time() - start, ray.get([a.weight_version.remote() for a in actors.rollouts]))
        print(f"H2PO done: version {result.version} in {result.seconds:.1f}s; {buffer_stats}; policy {out}")
        return result
    finally:
        if started:
            ray.shutdown()
