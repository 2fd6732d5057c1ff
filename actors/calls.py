"""Calls to the actors, with the fault handling of DESIGN section 7 (used by `actors.driver`).

Rollout actors are started with `max_restarts`; when one dies (its call raises `RayActorError`, or it answers with
a version older than the one pushed to it) the current weights and version are pushed to the restarted actor again,
the same generation is retried (same seed, same group ids) and the restart is counted. A learner rank that dies
fails the step at once with `LearnerFailed`, naming the rank: the other ranks would wait in a collective for ever,
so no learner wait is without a timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from rewards.registry import RewardError

MAX_ROLLOUT_RESTARTS = 8  # Ray restarts of one rollout actor (beyond them its calls fail for good)
GENERATE_ATTEMPTS = 3  # tries of one generation call across restarts
RESTART_TIMEOUT = 300.0  # seconds to wait for a restarted rollout actor to take the weights
ACTOR_GONE = (RayActorError, ActorUnavailableError)  # died, or restarting / restarted under a call


class LearnerFailed(RuntimeError):
    """A learner rank died or hung: the step cannot complete; the run resumes from its last train state."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass
class Actors:
    """Handles of the placed actors: learner ranks (rank order), rollout actors, the replay buffer; the latest
    published weights (ObjectRef, version) that a restarted rollout actor gets again, and its restarts."""

    learners: list
    rollouts: list
    buffer: object
    weights: tuple = (None, 0)
    rollout_restarts: int = 0
    events: list = field(default_factory=list)  # restarts and skipped batches since the driver last drained them

    def kill(self) -> None:
        for actor in [*self.learners, *self.rollouts, self.buffer]:
            ray.kill(actor)


@dataclass
class RolloutCall:
    """One generation call in flight: which rollout actor, how many requests, its seed, the weight version the
    actor should have, and the result's ObjectRef."""

    actor: int
    n_requests: int
    seed: int
    version: int
    ref: object
    done: dict | None = None  # when collected: lists, seconds (generation time), version of the rollouts

    def group_ids(self, n: int) -> list[str]:
        return [f"g{self.seed}-{b}" for b in range(n)]


def launch_rollouts(actors: Actors, n_requests: int, call: int) -> list[RolloutCall]:
    """Split n requests over the rollout actors and start their generation (seed = call * actors + actor)."""
    counts = [len(part) for part in np.array_split(np.arange(n_requests), len(actors.rollouts))]
    calls = [RolloutCall(i, n, call * len(actors.rollouts) + i, actors.weights[1], None)
             for i, n in enumerate(counts) if n > 0]
    for c in calls:
        c.ref = actors.rollouts[c.actor].generate.remote(c.n_requests, c.seed)
    return calls


def recover_rollout(actors: Actors, call: RolloutCall, why: str) -> None:
    """A rollout actor died (Ray restarts it): push the current weights and version again, retry the call."""
    actors.rollout_restarts += 1
    actor = actors.rollouts[call.actor]
    state_ref, version = actors.weights
    deadline = time.time() + RESTART_TIMEOUT
    while state_ref is not None:
        try:
            ray.get(actor.set_weights.remote(state_ref, version), timeout=RESTART_TIMEOUT)
            break
        except ACTOR_GONE:
            if time.time() > deadline:
                raise
            time.sleep(0.5)  # still restarting
    message = f"rollout actor {call.actor} restarted ({why}); weights v{version} re-pushed, generation retried"
    actors.events.append({"event": "restart", "actor": call.actor, "message": message})
    print(f"{message} (rollout restarts: {actors.rollout_restarts})", flush=True)
    call.version, call.ref = version, actor.generate.remote(call.n_requests, call.seed)


def get_rollouts(call: RolloutCall, actors: Actors | None):
    """The call's Rollouts; with `actors`, a dead or restarted rollout actor is recovered and the call retried."""
    for attempt in range(GENERATE_ATTEMPTS):
        try:
            rollouts = ray.get(call.ref)
        except ACTOR_GONE as err:
            if actors is None or attempt + 1 == GENERATE_ATTEMPTS:
                raise
            recover_rollout(actors, call, f"died: {type(err).__name__}")
            continue
        if actors is None or rollouts.version >= call.version or attempt + 1 == GENERATE_ATTEMPTS:
            return rollouts
        recover_rollout(actors, call, f"answered with v{rollouts.version}, expected v{call.version}")
    raise AssertionError("unreachable")


def collect_rollouts(calls: list[RolloutCall], buffer, on_reward_error: str, actors: Actors | None = None) -> int:
    """Wait for the rollouts and hand them, with their group ids, to the buffer.  -> batches skipped for a failing
    reward ("skip"). With `actors`, dead rollout actors are recovered (module docstring).

    The rollouts pass through the driver (a few KB) rather than as ObjectRefs to the buffer, so that a failed
    generation reaches the driver directly instead of being re-raised by the buffer."""
    skipped, accepted = 0, []
    for call in calls:
        try:
            rollouts = get_rollouts(call, actors)
            call.done = {"lists": len(rollouts.items), "seconds": rollouts.seconds, "version": rollouts.version}
            accepted.append((rollouts, call.group_ids(len(rollouts.examples))))
        except RewardError as err:
            if on_reward_error == "stop":
                raise getattr(err, "cause", err) from None  # the reward's own error, with its name
            print(f"skipping a rollout batch: {err}", flush=True)
            if actors is not None:
                actors.events.append({"event": "skipped_batch", "actor": call.actor, "message": str(err)})
            skipped += 1
    ray.get([buffer.put.remote(rollouts, ids) for rollouts, ids in accepted])
    return skipped


def gather_ranks(refs: list, what: str, timeout: float, hint: str) -> list:
    """Results of one call per learner rank, failing at once (`LearnerFailed`) when any rank dies or all do not
    answer within `timeout` seconds: the surviving ranks would otherwise wait in a collective for ever."""
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    remaining, deadline = list(refs), time.time() + timeout
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1, timeout=max(0.0, deadline - time.time()))
        if not ready:
            ranks = sorted(rank_of[r] for r in remaining)
            raise LearnerFailed(ranks[0], f"learner rank(s) {ranks} did not finish {what} within {timeout:.0f}s; "
                                          f"the run stopped. {hint}")
        try:
            ray.get(ready[0])
        except RayActorError as err:
            rank = rank_of[ready[0]]
            raise LearnerFailed(rank, f"learner rank {rank} died during {what} ({type(err).__name__}); the other "
                                      f"ranks cannot continue without it, the run stopped. {hint}") from None
    return ray.get(list(refs))


def push_weights(actors: Actors, wait: bool) -> None:
    """Send the latest published weights to every rollout actor (sync: wait; a dead one is recovered later)."""
    state_ref, version = actors.weights
    updates = [actor.set_weights.remote(state_ref, version) for actor in actors.rollouts]
    for ref in updates if wait else []:
        try:
            ray.get(ref)
        except ACTOR_GONE:
            pass  # its next generation fails or answers with an old version: `get_rollouts` recovers it
