"""The Ray side of the driver's calls (DESIGN section 7): actor handles, the rollout workers of
`actors.scheduler` over Ray, and learner-rank calls that fail loudly.

Rollout actors are started with `max_restarts`; `RayWorkers` turns a call on one that died (or is restarting) into
`WorkerGone`, and the scheduler re-pushes the weights and retries the call. A generation call returns two objects:
a small summary the driver waits for, and the rollouts, which go from the rollout actor's object store to the buffer
actor as a reference. A learner rank that dies fails the step at once with `LearnerFailed`, naming the rank: the
other ranks would wait in a collective for ever, so no learner wait is without a timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.scheduler import RESTART_TIMEOUT, WorkerGone

MAX_ROLLOUT_RESTARTS = 8  # Ray restarts of one rollout actor (beyond them its calls fail for good)
ACTOR_GONE = (RayActorError, ActorUnavailableError)  # died, or restarting / restarted under a call


class LearnerFailed(RuntimeError):
    """A learner rank died or hung: the step cannot complete; the run resumes from its last train state."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True)
class Actors:
    """Handles of the placed actors: learner ranks (rank order), rollout actors, the replay buffer."""

    learners: list
    rollouts: list
    buffer: Any

    def kill(self) -> None:
        for actor in [*self.learners, *self.rollouts, self.buffer]:
            ray.kill(actor)


class RayWorkers:
    """`actors.scheduler.Workers` over rollout actors and the buffer actor; a handle is (summary ref, rollouts ref)."""

    def __init__(self, rollouts: list, buffer: Any) -> None:
        self.rollouts, self.buffer = rollouts, buffer

    def __len__(self) -> int:
        return len(self.rollouts)

    def generate(self, worker: int, n_requests: int, seed: int) -> tuple:
        return tuple(self.rollouts[worker].generate.remote(n_requests, seed))

    def wait(self, handle: tuple) -> dict:
        try:
            return ray.get(handle[0])
        except ACTOR_GONE as err:
            raise WorkerGone(type(err).__name__) from None

    def deliver(self, handle: tuple, ids: list[str]) -> None:
        ray.get(self.buffer.put.remote(handle[1], ids))  # Ray resolves the reference in the buffer's process

    def set_weights(self, worker: int, weights: Any, version: int) -> Any:
        return self.rollouts[worker].set_weights.remote(weights, version)

    def wait_weights(self, handle: Any) -> None:
        try:
            ray.get(handle, timeout=RESTART_TIMEOUT)
        except ACTOR_GONE as err:
            raise WorkerGone(type(err).__name__) from None


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
