"""The H2PO driver (DESIGN section 7): start or join Ray, place the actors, run the loop, write the policy.

    from actors.driver import train
    result = train(cfg, "runs/default/most.safetensors", "prefs.parquet", steps=100, mode="async")
    # or: h2po train --checkpoint runs/default/most.safetensors --preferences prefs.parquet --steps 100

The loop is plain calls, one learner step per iteration (`run_loop`):
    scheduler.collect (rollout actors -> buffer) -> buffer.take (one shard per learner rank) -> scheduler.admit (the
    next calls) -> the ranks' H2PO updates (DeepSpeed) -> rank 0's weights -> scheduler.publish (-> rollout actors).
The rollout data travels as Ray object references, rollout actor -> buffer -> learner ranks, never through the driver;
the driver sees a summary of each batch (ids, staleness, rewards, one sample group). `actors.scheduler` owns the
calls in flight, the weight version and the admission by staleness:
- sync: each batch is sampled with the weights the learner is about to train (staleness 0);
- async (`DEFAULT_MODE`): the calls for up to `h2po.max_staleness` steps ahead are in flight while the learner trains,
  each sampling with the weights published before it started (with 1, the default, every batch after the first is
  one version old); a call that would exceed the bound is not started.
A failing reward raises `RewardError` from the rollout actor: `h2po.on_reward_error` = "stop" re-raises it
(naming the reward), "skip" drops that rollout batch and counts it.

Faults: a dead rollout actor is restarted by Ray (in its placement-group bundle, on another node when its node died);
the scheduler re-sends it the weights and retries its call. A dead learner rank fails the step at once with
`LearnerFailed` (`actors.calls`), naming the rank and its node and pointing to `--resume`.

Checkpoints and resume: every `h2po.checkpoint_every` steps and at the end the driver writes OUT_DIR/train_state
atomically (`actors.train_state`); `train(..., resume=True)` restores engines, buffer, preference cursor, version
and the ledger, and continues with the next step. Every rollout group has an id (`g<call seed>-<request>`), every
logged pair one (`p<pass>-<row>`); the ledger lists per step the ids trained on. The calls in flight are collected
into the buffer before a checkpoint, so that no accepted group is lost or sampled twice.

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
from actors.calls import MAX_ROLLOUT_RESTARTS, Actors, RayWorkers, ask_rollouts, gather_ranks, peak_memory
from actors.learner import LearnerActor
from actors.monitor import Monitor
from actors.placement import driver_node_options, place_groups
from actors.rollout import RolloutActor
from actors.scheduler import RolloutScheduler
from actors.train_state import DriverState, find_train_state, read_train_state, write_train_state
from catalog.dataset import load_catalog
from catalog.preferences import read_preferences
from catalog.schema import CatalogError
from core.config import RunConfig, SystemConfig
from core.errors import UserError
from learner.checkpoint import read_header
from learner.engine import EngineConfig
from learner.h2po import lambda_off_at
from rewards.registry import build_rewards
from rollout.buffer import BatchSummary, BufferStats

DEFAULT_MODE = "async"  # the mode of `train(mode=None)`, hence of `h2po train` without --mode and of `h2po run`
STEP_TIMEOUT = 1800.0  # seconds a learner call (forming the group, a step, a checkpoint) may take by default


@dataclass
class TrainResult:
    """What a run produced: the final weights (parameters) and version, per-step stats, buffer counters."""

    state_dict: dict
    version: int
    history: list[dict]
    buffer: BufferStats
    checkpoint: Path
    seconds: float
    rollout_versions: list[int | None] = field(default_factory=list)  # each rollout actor's weight version at the end
    # (None: the actor was restarting or its node gone when the run ended; the policy is rank 0's, not its)
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
    if cfg.h2po.keep == "best" and cfg.h2po.eval_every < 1:
        raise UserError("h2po.keep=best chooses among the validation probes: it needs h2po.eval_every >= 1")
    return [(reward.name, weight) for reward, weight in build_rewards(cfg.h2po.rewards)]


def place_actors(cfg: RunConfig, checkpoint: str, preferences: str | None, system: SystemConfig,
                 timeout: float = STEP_TIMEOUT) -> Actors:
    """Start the buffer (on the driver's node), the rollout actors and learner ranks in their placement groups
    (`actors.placement`: `system.placement`), then form the learners' process group (within `timeout` s)."""
    def with_threads(cpus: float) -> RunConfig:
        return dataclasses.replace(cfg, threads=cfg.threads or max(1, int(cpus)))

    engine_cfg = EngineConfig(zero_stage=system.zero_stage, lr=cfg.h2po.lr, grad_clip=cfg.h2po.grad_clip)
    groups = place_groups(system)
    buffer = ReplayBufferActor.options(num_cpus=0, **driver_node_options()).remote(cfg, preferences)
    rollouts = [RolloutActor.options(max_restarts=MAX_ROLLOUT_RESTARTS, **groups.rollout_options(i, system))
                .remote(with_threads(system.rollout_cpus), checkpoint, cfg.h2po_seed * 1000 + i)
                for i in range(system.rollout_actors)]
    learners = [LearnerActor.options(**groups.learner_options(rank, system))
                .remote(with_threads(system.learner_cpus), checkpoint, engine_cfg) for rank in range(system.learners)]
    return Actors(learners, rollouts, buffer, groups).form_group(timeout, resume_hint(cfg))


def step_stats(rank_stats: list[dict], batch: BatchSummary, rewards: list[tuple[str, float]]) -> dict:
    """Mean of the ranks' stats (over the ranks that report a key) plus reward means and batch facts."""
    keys = dict.fromkeys(k for stats in rank_stats for k in stats)
    out = {k: float(np.mean([s[k] for s in rank_stats if k in s])) for k in keys}
    out["version"] = int(rank_stats[0]["version"])
    if batch.rewards is not None:
        for (name, _), mean in zip(rewards, batch.rewards.mean(0), strict=True):
            out[f"reward/{name}"] = float(mean)
        out["reward/total"] = float((batch.rewards @ np.array([w for _, w in rewards])).mean())
    out.update({"rollout/requests": batch.n_requests, "rollout/staleness": batch.staleness,
                "pairs": batch.n_pairs, "batch/on": batch.n_requests, "batch/off": batch.n_pairs,
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
    step_timeout: float = STEP_TIMEOUT
    on_step: Callable[[int, Actors], None] | None = None  # (step index, actors), e.g. a test killing an actor
    rewards: list[tuple[str, float]] = field(default_factory=list)  # (name, weight) of the configured rewards


def resume_hint(cfg: RunConfig) -> str:
    found = find_train_state(cfg.out_dir)
    if found is None:
        return "No train state was written yet (h2po.checkpoint_every): start the run again."
    step = json.loads((found / "driver.json").read_text())["step"]
    return f"Resume from the last checkpoint ({found}, step {step}) with `h2po train ... --resume`."


def take_batch(actors: Actors, version: int, n_requests: int, n_pairs: int) -> tuple[BatchSummary, list]:
    """The buffer serves one step: its summary (fetched) and one shard reference per learner rank (not fetched)."""
    n = len(actors.learners)
    summary_ref, *shards = actors.buffer.take.options(num_returns=1 + n).remote(version, n_requests, n_pairs, n)
    return ray.get(summary_ref), shards


def learn(actors: Actors, shards: list, lambda_off: float, what: str, timeout: float, hint: str) -> list[dict]:
    """One learner step, each rank on its shard (an object reference, resolved in the rank).  -> per-rank stats"""
    return gather_ranks([learner.train_step.remote(shard, lambda_off)
                         for learner, shard in zip(actors.learners, shards, strict=True)], what, timeout, hint,
                        actors.learner_nodes)


def rank0_weights(actors: Actors, timeout: float, hint: str) -> tuple[object, int]:
    """Rank 0's weights as an ObjectRef (not fetched) and their version."""
    state_ref, version_ref = actors.learners[0].weights.remote()
    return state_ref, gather_ranks([version_ref], "publishing weights", timeout, hint, actors.learner_nodes)[0]


def save_state(actors: Actors, cfg: RunConfig, scheduler: RolloutScheduler, state: DriverState,
               timeout: float) -> list:
    """Collect the calls in flight into the buffer, then write OUT_DIR/train_state atomically (`actors.train_state`).
    -> the calls collected (reported with the next step)"""
    collected = scheduler.drain()
    state.version, state.collected_through = scheduler.version, scheduler.collected_through
    state.rollout_restarts, state.skipped = scheduler.restarts, scheduler.skipped

    def save_engines(directory: str) -> None:
        gather_ranks([learner.save_checkpoint.remote(directory) for learner in actors.learners], "a checkpoint",
                     timeout, resume_hint(cfg), actors.learner_nodes)
    path = write_train_state(cfg.out_dir, save_engines, ray.get(actors.buffer.state.remote()), state, cfg)
    print(f"train state written: {path}", flush=True)
    return collected


def run_loop(actors: Actors, cfg: RunConfig, opts: LoopOptions, state: DriverState, scheduler: RolloutScheduler,
             monitor: Monitor | None = None) -> DriverState:
    """The training loop (module docstring), from `state.step` on.  -> the state after the last step

    Stops early, after a complete step, when `h2po.max_minutes` is spent (the schedule keeps `opts.steps`)."""
    h2po, steps = cfg.h2po, opts.steps
    unreported, loop_start = [], time.time()  # rollout calls collected but not yet reported to the monitor
    state.stopped_by = "steps"

    def over_budget() -> bool:
        return 0 < h2po.max_minutes * 60 < time.time() - loop_start

    for step in range(state.step, steps):
        start = time.time()
        unreported += scheduler.collect(step)
        batch, shards = take_batch(actors, scheduler.version, h2po.batch_requests, opts.n_pairs)
        rollout_seconds = time.time() - start
        scheduler.admit(last_call=step if over_budget() else steps - 1)
        lambda_off = lambda_off_at(step, steps, h2po.lambda_off_start, h2po.lambda_off_end)
        hint = resume_hint(cfg)
        rank_stats = learn(actors, shards, lambda_off, f"step {step + 1}", opts.step_timeout, hint)
        sync_start = time.time()
        state_ref, version = rank0_weights(actors, opts.step_timeout, hint)
        scheduler.publish(state_ref, version, wait=opts.mode == "sync")  # async: queued behind the calls in flight
        stats = step_stats(rank_stats, batch, opts.rewards)
        step_seconds = time.time() - start
        stats.update({"step": step + 1, "time/rollout": rollout_seconds, "time/sync": time.time() - sync_start,
                      "time/step": step_seconds, "learner/idle_fraction": 1 - stats["time/train"] / step_seconds,
                      "lambda_off": lambda_off, "rollout/skipped_batches": scheduler.skipped,
                      "rollout/restarts": scheduler.restarts})
        state.step, state.version = step + 1, version
        state.history.append(stats)
        state.ledger.append(batch.ids)
        print(format_stats(step, steps, stats), flush=True)
        if monitor is not None:
            monitor.step(stats, batch, unreported, scheduler.events, state_ref)
        scheduler.events.clear()
        unreported, stop = [], over_budget() and state.step < steps
        if opts.checkpoint_every > 0 and (state.step % opts.checkpoint_every == 0 or state.step == steps or stop):
            unreported = save_state(actors, cfg, scheduler, state, opts.step_timeout)
        if opts.on_step is not None:
            opts.on_step(step, actors)
        if stop:
            state.stopped_by = "max_minutes"
            warn_time_cap(state.step, steps, h2po.max_minutes)
            break
    state.rollout_restarts, state.skipped = scheduler.restarts, scheduler.skipped
    return state


def warn_time_cap(step: int, steps: int, max_minutes: float) -> None:
    """The loud line of an H2PO run that the wall clock, not its step budget, ended."""
    print(f"WARNING: h2po.max_minutes ({max_minutes:g}) spent: stopping after step {step} of {steps}. The budget is "
          "in steps (h2po.steps); the clock ended this run, so its policy depends on the machine's speed. Raise "
          "h2po.max_minutes (a safety net) to let the steps decide.", file=sys.stderr, flush=True)


def restore_state(actors: Actors, cfg: RunConfig, timeout: float) -> tuple[DriverState, object]:
    """Load OUT_DIR/train_state into the placed actors.  -> (the driver's state, rank 0's restored weights)"""
    found = find_train_state(cfg.out_dir)
    if found is None:
        raise UserError(f"--resume: no train state under {cfg.out_dir} (written every h2po.checkpoint_every steps)")
    state, buffer_state = read_train_state(found)
    versions = gather_ranks([learner.load_checkpoint.remote(str(found / "engine")) for learner in actors.learners],
                            "loading the checkpoint", timeout, "", actors.learner_nodes)
    if versions != [state.version] * len(versions):
        raise RuntimeError(f"{found}: engine versions {versions} differ from the driver's {state.version}")
    ray.get(actors.buffer.restore.remote(buffer_state))
    print(f"resumed from {found}: step {state.step}, version {state.version}, "
          f"{len(buffer_state['groups'])} groups waiting", flush=True)
    return state, rank0_weights(actors, timeout, "")[0]


def write_policy(actors: Actors, cfg: RunConfig, state: DriverState, weights, meta: dict,
                 with_pairs: bool) -> TrainResult:
    """Write OUT_DIR/h2po.safetensors from rank 0 and gather what the run produced (seconds left to the caller)."""
    out = Path(cfg.out_dir) / "h2po.safetensors"
    meta = {"steps": state.step, **meta, "final": state.history[-1]}
    ray.get(actors.learners[0].save_policy.remote(str(out), json.loads(json.dumps(meta))))
    if with_pairs:
        print(ray.get(actors.buffer.preference_report.remote()))
    return TrainResult(ray.get(weights), state.version, state.history, ray.get(actors.buffer.stats.remote()),
                       out, 0.0, ask_rollouts(actors.rollouts, "weight_version"), state.ledger,
                       state.rollout_restarts, state.step, peak_memory(actors))


def start_state(actors: Actors, cfg: RunConfig, opts: LoopOptions, resume: bool) -> tuple[DriverState,
                                                                                           RolloutScheduler]:
    """A fresh or restored driver state and the rollout scheduler that continues from it (`actors.scheduler`)."""
    state, weights = restore_state(actors, cfg, opts.step_timeout) if resume else (DriverState(), None)
    lookahead = cfg.h2po.max_staleness if opts.mode == "async" else 0
    scheduler = RolloutScheduler(RayWorkers(actors.rollouts, actors.buffer), cfg.h2po.batch_requests, lookahead,
                                 cfg.h2po.on_reward_error, state.version, state.collected_through,
                                 state.rollout_restarts, state.skipped)
    if weights is not None:
        scheduler.publish(weights, state.version, wait=True)
    return state, scheduler


def train(cfg: RunConfig, checkpoint: str | Path, preferences_path: str | Path | None = None, steps: int = 100,
          mode: Literal["sync", "async"] | None = None, system: SystemConfig | None = None, resume: bool = False,
          step_timeout: float = STEP_TIMEOUT, on_step: Callable[[int, Actors], None] | None = None) -> TrainResult:
    """H2PO from a MOST checkpoint on Ray + DeepSpeed; writes OUT_DIR/h2po.safetensors (module docstring).

    `mode`: None = `DEFAULT_MODE`; `resume`: continue from OUT_DIR/train_state; `step_timeout`: seconds a learner
    step may take before the run fails; `on_step(step, actors)`: called after every step (tests use it to kill
    actors)."""
    system, mode = system or cfg.system, mode or DEFAULT_MODE
    n_pairs = cfg.h2po.pairs() if preferences_path else 0
    if preferences_path and not n_pairs:
        print(f"logged pairs: {preferences_path} not read (h2po.pairs_per_step=0: on-policy only)", flush=True)
    checkpoint, preferences = Path(checkpoint), str(preferences_path) if n_pairs else None
    rewards = check_inputs(cfg, checkpoint, preferences, steps, mode)
    opts = LoopOptions(steps, mode, n_pairs, cfg.h2po.checkpoint_every, step_timeout, on_step, rewards)
    start, started, actors, monitor = time.time(), connect_ray(system), None, None
    try:
        monitor = Monitor(cfg, str(checkpoint), opts.rewards, load_catalog(cfg.data, Path(cfg.out_dir)), resume)
        actors = place_actors(cfg, str(checkpoint), preferences, system, step_timeout)
        print(f"H2PO: {system.learners} learner ranks (ZeRO {system.zero_stage}), {system.rollout_actors} rollout "
              f"actor(s), {mode} mode, {steps} steps; actors ready in {time.time() - start:.1f}s", flush=True)
        state, scheduler = start_state(actors, cfg, opts, resume)
        resumed_from = state.step
        if state.step >= steps:
            raise UserError(f"the train state under {cfg.out_dir} has {state.step} steps done; ask for more than that")
        monitor.start({"run": Path(cfg.out_dir).resolve().name, "mode": mode, "steps": steps,
                       "learners": system.learners, "rollout_actors": system.rollout_actors,
                       "zero_stage": system.zero_stage, "rewards": [n for n, _ in monitor.rewards]}, resumed_from)
        state = run_loop(actors, cfg, opts, state, scheduler, monitor)
        result = write_policy(actors, cfg, state, scheduler.weights, {"mode": mode, "from": str(checkpoint),
                                                                      "stopped_by": state.stopped_by},
                              preferences is not None)
        monitor.keep_best(result.checkpoint, {"mode": mode, "stopped_by": state.stopped_by, "last_step": state.step})
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
