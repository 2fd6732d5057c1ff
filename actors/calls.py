"""The Ray side of the driver's calls (DESIGN section 7): actor handles, the rollout workers of
`actors.scheduler` over Ray, and learner-rank calls that fail loudly.

Rollout actors are started with `max_restarts`; `RayWorkers` turns a call on one that died (or is restarting) into
`WorkerGone`, and the scheduler re-pushes the weights and retries the call. A generation call returns two objects:
a small summary the driver waits for, and the rollouts, which go from the rollout actor's object store to the buffer
actor as a reference. A learner rank that dies fails the step at once with `LearnerFailed`, naming the rank: the
other ranks would wait in a collective for ever, so no learner wait is without a timeout; the error names the
rank's node (`actors.placement.node_name`, recorded when it was placed) and says when Ray reports that node dead.
A rollout actor's results lost with its node (`ObjectLostError`) count as the worker gone: the call is retried.
Published weights are one object in Ray's object store per version (rank 0's return value): every rollout actor is
sent the same `ObjectRef`, so each node fetches the weights once, whatever the number of actors. At the end of a run
the driver's questions to rollout actors (`ask_rollouts`: weight version, peak memory) answer None for one that is
restarting or gone, since the policy is already written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError

from actors.placement import Groups, node_alive
from actors.scheduler import RESTART_TIMEOUT, WorkerGone

MAX_ROLLOUT_RESTARTS = 8  # Ray restarts of one rollout actor (beyond them its calls fail for good)
PEER_GRACE = 60.0  # seconds a rank's error waits for Ray to report a peer dead (its health checks: ~15-30 s)
ACTOR_GONE = (RayActorError, ActorUnavailableError, ObjectLostError)  # died, restarting, or its node (and results)


class LearnerFailed(RuntimeError):
    """A learner rank died or hung: the step cannot complete; the run resumes from its last train state."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True)
class Actors:
    """Handles of the placed actors: learner ranks (rank order), rollout actors, the replay buffer; their placement
    groups and the nodes where they were placed (`actors.placement.node_name`, per rank / rollout actor)."""

    learners: list
    rollouts: list
    buffer: Any
    groups: Groups | None = None

    @property
    def learner_nodes(self) -> list[tuple[str, str]]:
        """Per rank: (node id, node name) where it was placed; [] without placement groups."""
        return self.groups.placed["learners"] if self.groups is not None else []

    def form_group(self, timeout: float, hint: str) -> Actors:
        """The learner ranks' process group: all ranks rendezvous at rank 0's address at once, failing with
        `LearnerFailed` (`gather_ranks`) when a rank dies or the group is not formed within `timeout` seconds. On
        failure the run's actors and placement groups are removed.  -> self"""
        try:
            address, port = gather_ranks([self.learners[0].address.remote()], "its start", timeout, hint,
                                         self.learner_nodes)[0]
            gather_ranks([learner.init_distributed.remote(rank, len(self.learners), port, address)
                          for rank, learner in enumerate(self.learners)], "joining the process group", timeout, hint,
                         self.learner_nodes)
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        for actor in [*self.learners, *self.rollouts, self.buffer]:
            ray.kill(actor)
        if self.groups is not None:
            self.groups.remove()


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
        try:
            ray.get(self.buffer.put.remote(handle[1], ids))  # Ray resolves the reference in the buffer's process
        except ObjectLostError as err:  # the rollouts were in the object store of a node that has gone since
            raise WorkerGone(type(err).__name__) from None

    def set_weights(self, worker: int, weights: Any, version: int) -> Any:
        if not isinstance(weights, ray.ObjectRef):  # a value would be serialised into every actor's call
            raise TypeError(f"publish weights as one ObjectRef per version, got {type(weights).__name__}")
        return self.rollouts[worker].set_weights.remote(weights, version)

    def wait_weights(self, handle: Any) -> None:
        try:
            ray.get(handle, timeout=RESTART_TIMEOUT)
        except ACTOR_GONE as err:
            raise WorkerGone(type(err).__name__) from None


def rank_node(nodes: list[tuple[str, str]], rank: int, wait: float = 0.0) -> str:
    """' on NODE' for a rank placed there, + ' (node dead)' when Ray reports that node dead within `wait` seconds;
    '' when unknown."""
    if rank >= len(nodes) or not nodes[rank][0]:
        return ""
    node_id, name = nodes[rank]
    deadline = time.time() + wait
    while node_alive(node_id):
        if time.time() >= deadline:
            return f" on {name}"
        time.sleep(1.0)
    return f" on {name} (node dead)"


def gather_ranks(refs: list, what: str, timeout: float, hint: str, nodes: list[tuple[str, str]] = ()) -> list:
    """Results of one call per learner rank, failing at once (`LearnerFailed`) when any rank dies or all do not
    answer within `timeout` seconds: the surviving ranks would otherwise wait in a collective for ever. `nodes`:
    per rank (node id, name), named in the error.

    A rank whose call raises is often the survivor of a collective whose peer died with its node (the socket
    closes at once; Ray reports the peer dead only after its health checks): the other ranks get PEER_GRACE seconds
    to be reported dead, and a dead one is blamed. Otherwise the first rank's own error is raised."""
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    remaining, deadline, failed = list(refs), time.time() + timeout, None
    while remaining:
        until = deadline if failed is None else min(deadline, failed[1] + PEER_GRACE)
        ready, remaining = ray.wait(remaining, num_returns=1, timeout=max(0.0, until - time.time()))
        if not ready and failed is not None:
            break
        if not ready:
            ranks = sorted(rank_of[r] for r in remaining)
            raise LearnerFailed(ranks[0], f"learner rank(s) {ranks}{rank_node(nodes, ranks[0])} did not finish "
                                          f"{what} within {timeout:.0f}s; the run stopped. {hint}")
        try:
            ray.get(ready[0])
        except RayActorError as err:
            rank = rank_of[ready[0]]
            # unreachable (ActorUnavailableError), as when its node went: Ray says so after its health checks
            wait = PEER_GRACE if isinstance(err, ActorUnavailableError) else 0.0
            raise LearnerFailed(rank, f"learner rank {rank} died during {what}{rank_node(nodes, rank, wait)} "
                                      f"({type(err).__name__}); the other ranks cannot continue without it, the run "
                                      f"stopped. {hint}") from None
        except Exception as err:  # noqa: BLE001 - raised below unless a peer turns out dead
            failed = failed or (err, time.time())
    if failed is not None:
        raise failed[0]
    return ray.get(list(refs))


def peak_memory(actors: Actors) -> dict[str, float]:
    """Peak resident memory of every actor's process, MiB (a rollout actor away at the end is left out)."""
    named = {f"learner{r}": a for r, a in enumerate(actors.learners)}
    named["buffer"] = actors.buffer
    out = dict(zip(named, ray.get([a.peak_memory.remote() for a in named.values()]), strict=True))
    for i, mib in enumerate(ask_rollouts(actors.rollouts, "peak_memory")):
        if mib is not None:
            out[f"rollout{i}"] = mib
    return out


def ask_rollouts(rollouts: list, method: str) -> list:
    """Each rollout actor's answer to a no-argument `method` at the end of a run; None for one that is restarting or
    lost with its node then (the policy is rank 0's and already written: such an actor does not fail the run)."""
    out = []
    for ref in [getattr(actor, method).remote() for actor in rollouts]:  # all asked at once, answers read in turn
        try:
            out.append(ray.get(ref))
        except ACTOR_GONE:
            out.append(None)
    return out
