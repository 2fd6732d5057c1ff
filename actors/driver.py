"""The H2PO driver (DESIGN section 7): start or join Ray, place the actors, run the loop, write the policy.

    from actors.driver import train
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

Faults (`actors.calls`): a dead rollout actor is restarted, re-sent the weights and its call retried; a dead
learner rank fails the step at once with `LearnerFailed`, naming the rank and pointing to `--resume`.

Checkpoints and resume: every `h2po.checkpoint_every` steps and at the end the driver writes OUT_DIR/train_state
atomically (`actors.train_state`); `train(..., resume=True)` restores engines, buffer, preference cursor, version
and the ledger, and continues with the next step. Every rollout group has an id (`g<call seed>-<request>`), every
logged pair one (`p<pass>-<row>`); the ledger lists per step the ids trained on. In async mode the generation in
flight is collected into the buffer before a checkpoint, so that no accepted group is lost or sampled twice.

Ray: `RAY_ADDRESS` set -> `ray.init(address=...)` (e.g. inside `ray job submit`); else a local instance that
listens on loopback only (`loopback_only`), shut down again at the end. An already initialised Ray (a test's
cluster) is used as it is. The run's actors are killed at the end, whether it succeeded or not.

Monitoring (`actors.monitor`): every step appends a record to OUT_DIR/metrics.jsonl (also exported as Ray gauges),
the live dashboard page serves it (its URL is printed at start), validation NDCG@10 is probed every
`h2po.eval_every` steps, and OUT_DIR/report.html is written at the end, also when the run fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import ray

from actors.buffer import ReplayBufferActor
from actors.calls import (
    MAX_ROLLOUT_RESTARTS,
    Actors,
    collect_rollouts,
    gather_ranks,
    launch_rollouts,
    push_weights,
)
from actors.learner import LearnerActor
from actors.monitor import Monitor
from actors.rollout import RolloutActor
from actors.train_state import DriverState, find_train_state, read_train_state, write_train_state
from catalog.dataset import load_catalog
from catalog.preferences import read_preferences
from catalog.schema import CatalogError
from h2po.config import RunConfig, SystemConfig
from h2po.errors import UserError
from learner.checkpoint import read_header
from learner.engine import EngineConfig
from learner.h2po import lambda_off_at
from rewards.registry import build_rewards
from rollout.buffer import BufferStats, LearnerBatch, shard_batch


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
    ledger: list[list[str]] = field(default_factory=list)  # per step: ids of the groups and pairs trained on
    rollout_restarts: int = 0  # rollout actors restarted after dying (this process's part of the run)
    resumed_from: int = 0  # steps already done by the train state this run resumed from
    peak_memory: dict[str, float] = field(default_factory=dict)  # actor -> peak resident memory, MiB


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
        loopback_only()
        ray.init(num_cpus=system.ray_cpus or max(os.cpu_count() or 1, int(np.ceil(needed))), include_dashboard=False)
    return True


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> None:
    """Make the local Ray instance we start listen on loopback only, its Prometheus metrics endpoint included.

    Ray binds its services to the node's IP address, and the metrics endpoint to every interface unless that
    address is loopback (ray/dashboard/modules/reporter/reporter_agent.py). It takes loopback as the node address
    only where multi-node clusters are off: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (ray._private.services.
    get_node_ip_address; `_node_ip_address="127.0.0.1"` is turned back into the outward address). An operator who
    sets that variable to 1 gets Ray's own binding back (then restrict the ports with a firewall)."""
    from ray._private import ray_constants

    os.environ.setdefault(LOOPBACK_ENV, "0")  # Ray's processes read it at start; the driver read it at import
    ray_constants.ENABLE_RAY_CLUSTER = os.environ[LOOPBACK_ENV].lower() in ("1", "true")


def check_inputs(cfg: RunConfig, checkpoint: Path, preferences: str | None, steps: int,
                 mode: str) -> list[tuple[str, float]]:
    """Fail fast, with a user error, before any actor starts (their errors would arrive wrapped by Ray).
    -> (name, weight) of the configured rewards"""
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
    return [(reward.name, weight) for reward, weight in build_rewards(cfg.h2po.rewards)]


def place_actors(cfg: RunConfig, checkpoint: str, preferences: str | None, system: SystemConfig) -> Actors:
    """Start the buffer, rollout actors and learner ranks, then form the learners' process group."""
    def with_threads(cpus: float) -> RunConfig:
        return dataclasses.replace(cfg, threads=cfg.threads or max(1, int(cpus)))

    engine_cfg = EngineConfig(zero_stage=system.zero_stage, lr=cfg.h2po.lr, grad_clip=system.grad_clip)
    buffer = ReplayBufferActor.options(num_cpus=0).remote(cfg, preferences)
    rollouts = [RolloutActor.options(num_cpus=system.rollout_cpus, num_gpus=system.rollout_gpus,
                                     max_restarts=MAX_ROLLOUT_RESTARTS)
                .remote(with_threads(system.rollout_cpus), checkpoint, cfg.h2po_seed * 1000 + i)
                for i in range(system.rollout_actors)]
    learners = [LearnerActor.options(num_cpus=system.learner_cpus, num_gpus=system.learner_gpus)
                .remote(with_threads(system.learner_cpus), checkpoint, engine_cfg) for _ in range(system.learners)]
    address, port = ray.get(learners[0].address.remote())
    ray.get([learner.init_distributed.remote(rank, len(learners), port, address)
             for rank, learner in enumerate(learners)])  # all ranks rendezvous at once
    return Actors(learners, rollouts, buffer)


def step_stats(rank_stats: list[dict], batch: LearnerBatch, rewards: list[tuple[str, float]]) -> dict:
    """Mean of the ranks' stats (over the ranks that report a key) plus reward means and batch facts."""
    keys = dict.fromkeys(k for stats in rank_stats for k in stats)
    out = {k: float(np.mean([s[k] for s in rank_stats if k in s])) for k in keys}
    out["version"] = int(rank_stats[0]["version"])
    if batch.rollouts is not None:
        for (name, _), mean in zip(rewards, batch.rollouts.rewards.mean(0), strict=True):
            out[f"reward/{name}"] = float(mean)
        out["reward/total"] = float((batch.rollouts.rewards @ np.array([w for _, w in rewards])).mean())
    out.update({"rollout/requests": batch.n_requests, "rollout/staleness": batch.staleness,
                "pairs": len(batch.pairs), "batch/on": batch.n_requests, "batch/off": len(batch.pairs),
                "buffer/waiting": batch.waiting, "staleness": {str(k): v for k, v in batch.staleness_counts.items()}})
    return out


def format_stats(step: int, steps: int, stats: dict) -> str:
    shown = ["loss/total", "loss/on", "loss/off", "loss/anchor", "kl", "dpo/accuracy", "grad_norm"]
    shown += [k for k in stats if k.startswith("reward/")]
    parts = [f"{k} {stats[k]:.4f}" for k in shown if k in stats]
    times = " ".join(f"{k[5:]} {stats[k]:.2f}s" for k in ("time/rollout", "time/train", "time/sync") if k in stats)
    return f"step {step + 1}/{steps} v{stats['version']} " + " ".join(parts) + \
        f" staleness {stats['rollout/staleness']} | {times}"


@dataclass
class LoopOptions:
    """How the loop runs: steps, mode, pairs per batch, checkpoints, learner timeout, a hook after each step."""

    steps: int
    mode: str
    n_pairs: int
    checkpoint_every: int = 0
    step_timeout: float = 1800.0
    on_step: Callable[[int, Actors], None] | None = None  # (step index, actors), e.g. a test killing an actor
    rewards: list[tuple[str, float]] = field(default_factory=list)  # (name, weight) of the configured rewards


def peak_memory(actors: Actors) -> dict[str, float]:
    """Peak resident memory of every actor's process, MiB."""
    named = {f"learner{r}": a for r, a in enumerate(actors.learners)}
    named.update({f"rollout{i}": a for i, a in enumerate(actors.rollouts)})
    named["buffer"] = actors.buffer
    return dict(zip(named, ray.get([a.peak_memory.remote() for a in named.values()]), strict=True))


def resume_hint(cfg: RunConfig) -> str:
    found = find_train_state(cfg.out_dir)
    if found is None:
        return "No train state was written yet (h2po.checkpoint_every): start the run again."
    step = json.loads((found / "driver.json").read_text())["step"]
    return f"Resume from the last checkpoint ({found}, step {step}) with `h2po train ... --resume`."


def save_state(actors: Actors, cfg: RunConfig, state: DriverState, timeout: float) -> Path:
    """Write OUT_DIR/train_state atomically (`actors.train_state`)."""
    def save_engines(directory: str) -> None:
        gather_ranks([learner.save_checkpoint.remote(directory) for learner in actors.learners], "a checkpoint",
                     timeout, resume_hint(cfg))
    return write_train_state(cfg.out_dir, save_engines, ray.get(actors.buffer.state.remote()), state, cfg)


def learn(actors: Actors, cfg: RunConfig, opts: LoopOptions, batch: LearnerBatch, lambda_off: float,
          step: int) -> tuple[list[dict], object, float]:
    """One learner step on the ranks' shards, then rank 0 publishes the weights and the rollout actors get them
    (sync: waited for; async: queued behind the generation already running).
    -> (per-rank stats, ObjectRef of the published weights, seconds spent publishing)"""
    hint = resume_hint(cfg)
    shards = shard_batch(batch, len(actors.learners))
    rank_stats = gather_ranks([learner.train_step.remote(shard.rollouts, shard.pairs, lambda_off)
                               for learner, shard in zip(actors.learners, shards, strict=True)],
                              f"step {step + 1}", opts.step_timeout, hint)
    sync_start = time.time()
    state_ref, version_ref = actors.learners[0].weights.remote()
    actors.weights = (state_ref, gather_ranks([version_ref], "publishing weights", opts.step_timeout, hint)[0])
    push_weights(actors, wait=opts.mode == "sync")
    return rank_stats, state_ref, time.time() - sync_start


def checkpoint(actors: Actors, cfg: RunConfig, state: DriverState, pending: list | None, timeout: float) -> list:
    """Write the train state after `state.step` steps. In async mode the generation in flight is collected into the
    buffer first, so that it is saved rather than lost on a crash.  -> the calls collected (reported next step)"""
    collected = pending or []
    if pending is not None:
        state.skipped += collect_rollouts(pending, actors.buffer, cfg.h2po.on_reward_error, actors)
        state.collected_through = state.step
    state.rollout_restarts = actors.rollout_restarts
    print(f"train state written: {save_state(actors, cfg, state, timeout)}", flush=True)
    return collected


def run_loop(actors: Actors, cfg: RunConfig, opts: LoopOptions, state: DriverState,
             monitor: Monitor | None = None) -> DriverState:
    """The training loop (module docstring), from `state.step` on.  -> the state after the last step

    Stops early, after a complete step, when `h2po.max_minutes` is spent (the schedule keeps `opts.steps`)."""
    h2po, steps = cfg.h2po, opts.steps
    pending, collected, loop_start = None, [], time.time()  # collected: calls of the batch not yet reported
    state.stopped_by = "steps"

    def over_budget() -> bool:
        return 0 < h2po.max_minutes * 60 < time.time() - loop_start

    for step in range(state.step, steps):
        start = time.time()
        if pending is None and state.collected_through < step:
            pending = launch_rollouts(actors, h2po.batch_requests, step)
        if pending is not None:
            state.skipped += collect_rollouts(pending, actors.buffer, h2po.on_reward_error, actors)
            state.collected_through, pending, collected = step, None, pending
        batch: LearnerBatch = ray.get(actors.buffer.take.remote(state.version, h2po.batch_requests, opts.n_pairs))
        rollout_seconds = time.time() - start
        if opts.mode == "async" and step + 1 < steps and not over_budget():
            pending = launch_rollouts(actors, h2po.batch_requests, step + 1)
        lambda_off = lambda_off_at(step, steps, h2po.lambda_off_start, h2po.lambda_off_end)
        rank_stats, state_ref, sync_seconds = learn(actors, cfg, opts, batch, lambda_off, step)
        stats = step_stats(rank_stats, batch, opts.rewards)
        step_seconds = time.time() - start
        stats.update({"step": step + 1, "time/rollout": rollout_seconds, "time/sync": sync_seconds,
                      "time/step": step_seconds, "learner/idle_fraction": 1 - stats["time/train"] / step_seconds,
                      "lambda_off": lambda_off, "rollout/skipped_batches": state.skipped,
                      "rollout/restarts": actors.rollout_restarts})
        state.step, state.version = step + 1, actors.weights[1]
        state.history.append(stats)
        state.ledger.append(batch.ids)
        print(format_stats(step, steps, stats), flush=True)
        if monitor is not None:
            monitor.step(stats, batch, collected, actors.events, state_ref)
        actors.events.clear()
        collected, stop = [], over_budget() and state.step < steps
        if opts.checkpoint_every > 0 and (state.step % opts.checkpoint_every == 0 or state.step == steps or stop):
            collected, pending = checkpoint(actors, cfg, state, pending, opts.step_timeout), None
        if opts.on_step is not None:
            opts.on_step(step, actors)
        if stop:
            state.stopped_by = "max_minutes"
            print(f"WARNING: h2po.max_minutes ({h2po.max_minutes:g}) spent: stopping after step {state.step} of "
                  f"{steps}. The budget is in steps (h2po.steps); the clock ended this run, so its policy depends on "
                  "the machine's speed. Raise h2po.max_minutes (a safety net) to let the steps decide.",
                  file=sys.stderr, flush=True)
            break
    state.rollout_restarts = actors.rollout_restarts
    return state


def restore_state(actors: Actors, cfg: RunConfig, timeout: float) -> DriverState:
    """Load OUT_DIR/train_state into the placed actors and push the restored weights to the rollout actors."""
    found = find_train_state(cfg.out_dir)
    if found is None:
        raise UserError(f"--resume: no train state under {cfg.out_dir} (written every h2po.checkpoint_every steps)")
    state, buffer_state = read_train_state(found)
    versions = gather_ranks([learner.load_checkpoint.remote(str(found / "engine")) for learner in actors.learners],
                            "loading the checkpoint", timeout, "")
    if versions != [state.version] * len(versions):
        raise RuntimeError(f"{found}: engine versions {versions} differ from the driver's {state.version}")
    ray.get(actors.buffer.restore.remote(buffer_state))
    state_ref, version_ref = actors.learners[0].weights.remote()
    actors.weights = (state_ref, ray.get(version_ref))
    push_weights(actors, wait=True)
    actors.rollout_restarts = state.rollout_restarts
    print(f"resumed from {found}: step {state.step}, version {state.version}, "
          f"{len(buffer_state['groups'])} groups waiting", flush=True)
    return state


def write_policy(actors: Actors, cfg: RunConfig, state: DriverState, meta: dict, with_pairs: bool) -> TrainResult:
    """Write OUT_DIR/h2po.safetensors from rank 0 and gather what the run produced (seconds left to the caller)."""
    out = Path(cfg.out_dir) / "h2po.safetensors"
    meta = {"steps": state.step, **meta, "final": state.history[-1]}
    ray.get(actors.learners[0].save_policy.remote(str(out), json.loads(json.dumps(meta))))
    if with_pairs:
        print(ray.get(actors.buffer.preference_report.remote()))
    return TrainResult(ray.get(actors.weights[0]), state.version, state.history, ray.get(actors.buffer.stats.remote()),
                       out, 0.0, ray.get([a.weight_version.remote() for a in actors.rollouts]), state.ledger,
                       state.rollout_restarts, state.step, peak_memory(actors))


def train(cfg: RunConfig, checkpoint: str | Path, preferences_path: str | Path | None = None, steps: int = 100,
          mode: Literal["sync", "async"] = "sync", system: SystemConfig | None = None, resume: bool = False,
          step_timeout: float = 1800.0, on_step: Callable[[int, Actors], None] | None = None) -> TrainResult:
    """H2PO from a MOST checkpoint on Ray + DeepSpeed; writes OUT_DIR/h2po.safetensors (module docstring).

    `resume`: continue from OUT_DIR/train_state; `step_timeout`: seconds a learner step may take before the run
    fails; `on_step(step, actors)`: called after every step (tests use it to kill actors)."""
    system = system or cfg.system
    n_pairs = system.pairs(cfg.h2po.batch_requests) if preferences_path else 0
    if preferences_path and not n_pairs:
        print(f"logged pairs: {preferences_path} not read (system.pairs_per_step=0: on-policy only)", flush=True)
    checkpoint, preferences = Path(checkpoint), str(preferences_path) if n_pairs else None
    rewards = check_inputs(cfg, checkpoint, preferences, steps, mode)
    opts = LoopOptions(steps, mode, n_pairs, cfg.h2po.checkpoint_every, step_timeout, on_step, rewards)
    start, started, actors, monitor = time.time(), connect_ray(system), None, None
    try:
        monitor = Monitor(cfg, str(checkpoint), opts.rewards, load_catalog(cfg.data, Path(cfg.out_dir)), resume)
        actors = place_actors(cfg, str(checkpoint), preferences, system)
        print(f"H2PO: {system.learners} learner ranks (ZeRO {system.zero_stage}), {system.rollout_actors} rollout "
              f"actor(s), {mode} mode, {steps} steps; actors ready in {time.time() - start:.1f}s", flush=True)
        state = restore_state(actors, cfg, step_timeout) if resume else DriverState()
        resumed_from = state.step
        if state.step >= steps:
            raise UserError(f"the train state under {cfg.out_dir} has {state.step} steps done; ask for more than that")
        monitor.start({"run": Path(cfg.out_dir).resolve().name, "mode": mode, "steps": steps,
                       "learners": system.learners, "rollout_actors": system.rollout_actors,
                       "zero_stage": system.zero_stage, "rewards": [n for n, _ in monitor.rewards]}, resumed_from)
        state = run_loop(actors, cfg, opts, state, monitor)
        result = write_policy(actors, cfg, state, {"mode": mode, "from": str(checkpoint),
                                                   "stopped_by": state.stopped_by}, preferences is not None)
        result.seconds, result.resumed_from = time.time() - start, resumed_from
        print(f"H2PO done: version {result.version} in {result.seconds:.1f}s; {result.buffer}; rollout restarts "
              f"{result.rollout_restarts}; peak memory (MiB) "
              + ", ".join(f"{k} {v:.0f}" for k, v in result.peak_memory.items()) + f"; policy {result.checkpoint}")
        monitor.finish("done", "" if state.stopped_by == "steps" else
                       f"stopped by h2po.max_minutes after step {state.step} of {steps}")
        return result
    except BaseException as err:
        if monitor is not None:
            monitor.failed(f"{type(err).__name__}: {err}")
        raise
    finally:
        if actors is not None:
            actors.kill()  # also a rank stuck in a collective after another rank died
        if started:
            ray.shutdown()
