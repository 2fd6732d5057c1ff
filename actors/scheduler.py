"""Async control of the rollout side in one unit (in the spirit of AReaL's staleness manager): the rollout calls in
flight, the weight version, admission by staleness, collection into the buffer and restart retries.

    scheduler = RolloutScheduler(workers, n_requests=16, lookahead=1)
    for step in range(steps):
        calls = scheduler.collect(step)        # call `step` is in the buffer (launched now if it was not)
        ...take the buffer's batch...
        scheduler.admit(last_call=steps - 1)   # launch every later call the staleness bound admits
        ...train on the batch...
        scheduler.publish(weights, version)    # the new weights go to every worker, ahead of later calls

Call c feeds learner step c; at step c the learner holds version c (one version per step). A call is admitted only
when its rollouts will be at most `lookahead` versions old when trained on, i.e. while c <= version + lookahead:
rollouts are never generated to be dropped. lookahead 0 is sync mode (each batch sampled by the weights about to
train on it); lookahead m >= 1 keeps the calls of up to m steps ahead in flight while the learner trains
(`h2po.max_staleness`). A worker serves its calls in submission order, so a call samples with the last weights
published before it was launched: that version is recorded with the call. Admission comes after the step's collect,
so a worker restarted under the collected call has the weights again before the next call reaches it.

Call c's requests are split over the workers; worker i's part has seed c * workers + i and group ids
`g<seed>-<request>`, so a retried or resumed call makes the same groups. `collect(c)` waits for the calls up to c
and hands their rollouts to the buffer (`Workers.deliver`: worker to buffer, never through the driver). `drain()`
collects everything in flight: the driver calls it before a checkpoint, so that no admitted call is lost or
generated twice on resume (`collected_through` says which calls the buffer already holds).

Faults: a worker that died under a call, or whose finished call's rollouts were lost with its node before `deliver`
(`WorkerGone`; Ray restarts it, on another node if its own is gone), or answers with an older version than the
call was launched with (it restarted from the checkpoint) gets the current weights again and the call is retried
with the same seed, at most `ATTEMPTS` times; restarts are counted and reported in `events`. A failing reward
(`RewardError`) stops the run ("stop", re-raising the reward's own error) or drops that call's rollouts ("skip").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from rewards.registry import RewardError

ATTEMPTS = 3  # tries of one call across worker restarts
RESTART_TIMEOUT = 300.0  # seconds to wait for a restarted worker to take the weights


class WorkerGone(RuntimeError):
    """The worker died under a call (it may be restarting)."""


class Workers(Protocol):
    """The rollout workers as the scheduler sees them (`actors.calls.RayWorkers`; fakes in tests/test_scheduler.py).
    Handles are opaque; a call's results stay with the workers until `deliver` hands them to the buffer."""

    def __len__(self) -> int: ...

    def generate(self, worker: int, n_requests: int, seed: int) -> Any:
        """Start a generation call.  -> its handle"""

    def wait(self, handle: Any) -> dict:
        """Wait for a call.  -> {"lists", "seconds", "version"}; raises WorkerGone or RewardError."""

    def deliver(self, handle: Any, ids: list[str]) -> None:
        """Put a finished call's rollouts, one id per request, into the buffer."""

    def set_weights(self, worker: int, weights: Any, version: int) -> Any:
        """Queue the weights of `version` on a worker, behind its calls so far.  -> a handle"""

    def wait_weights(self, handle: Any) -> None:
        """Wait for a `set_weights`; raises WorkerGone."""


@dataclass
class RolloutCall:
    """One worker's part of call `call`: requests, seed, the version it samples with, its handle, its result."""

    call: int
    worker: int
    n_requests: int
    seed: int
    version: int
    handle: Any
    done: dict | None = None  # when collected: lists, seconds (generation time), version of the rollouts

    def group_ids(self) -> list[str]:
        return [f"g{self.seed}-{b}" for b in range(self.n_requests)]


class RolloutScheduler:
    """Owns the calls in flight and the weight version (module docstring)."""

    def __init__(self, workers: Workers, n_requests: int, lookahead: int, on_reward_error: str = "stop",
                 version: int = 0, collected_through: int = -1, restarts: int = 0, skipped: int = 0) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.workers, self.n_requests, self.lookahead = workers, n_requests, lookahead
        self.on_reward_error = on_reward_error
        self.version, self.weights = version, None
        self.collected_through, self.next_call = collected_through, collected_through + 1
        self.in_flight: list[RolloutCall] = []
        self.restarts, self.skipped = restarts, skipped  # counted over the whole run, resumes included
        self.events: list[dict] = []  # restarts and skipped calls since the driver last drained them

    def admit(self, last_call: int) -> list[int]:
        """Launch every call c <= min(version + lookahead, last_call) not launched yet.  -> the calls launched"""
        launched = []
        while self.next_call <= min(self.version + self.lookahead, last_call):
            self._launch(self.next_call)
            launched.append(self.next_call)
            self.next_call += 1
        return launched

    def _launch(self, call: int) -> None:
        n = len(self.workers)
        counts = [len(part) for part in np.array_split(np.arange(self.n_requests), n)]
        for worker, count in enumerate(counts):
            if count > 0:
                seed = call * n + worker
                handle = self.workers.generate(worker, count, seed)
                self.in_flight.append(RolloutCall(call, worker, count, seed, self.version, handle))

    def collect(self, through: int) -> list[RolloutCall]:
        """Launch the calls up to `through` not launched yet (the current step's is always admitted), wait for the
        calls up to `through` and deliver them to the buffer in launch order.  -> those calls"""
        while self.next_call <= through:
            self._launch(self.next_call)
            self.next_call += 1
        ready = [c for c in self.in_flight if c.call <= through]
        self.in_flight = [c for c in self.in_flight if c.call > through]
        for call in ready:
            self._finish(call)
        self.collected_through = max([self.collected_through, *(c.call for c in ready)])
        return ready

    def drain(self) -> list[RolloutCall]:
        """Collect every call in flight (before a checkpoint)."""
        return self.collect(self.next_call - 1)

    def publish(self, weights: Any, version: int, wait: bool = False) -> None:
        """Make `version` current and queue its weights on every worker (sync: wait; a dead worker is recovered by
        its next call)."""
        self.weights, self.version = weights, version
        handles = [self.workers.set_weights(i, weights, version) for i in range(len(self.workers))]
        for handle in handles if wait else []:
            try:
                self.workers.wait_weights(handle)
            except WorkerGone:
                pass

    def _finish(self, call: RolloutCall) -> None:
        for attempt in range(ATTEMPTS):
            last = attempt + 1 == ATTEMPTS
            try:
                done = self.workers.wait(call.handle)
                current = done["version"] >= call.version or last
                if current:  # its rollouts may be lost with the worker's node: WorkerGone, retried
                    self.workers.deliver(call.handle, call.group_ids())
            except WorkerGone as err:
                if last:
                    raise
                self._retry(call, f"died: {err}")
                continue
            except RewardError as err:
                if self.on_reward_error == "stop":
                    raise getattr(err, "cause", err) from None  # the reward's own error, with its name
                print(f"skipping a rollout batch: {err}", flush=True)
                self.events.append({"event": "skipped_batch", "actor": call.worker, "message": str(err)})
                self.skipped += 1
                return
            if current:
                call.done = done
                return
            self._retry(call, f"answered with v{done['version']}, expected v{call.version}")

    def _retry(self, call: RolloutCall, why: str) -> None:
        """The worker restarted: give it the current weights again, then launch the same call again."""
        self.restarts += 1
        deadline = time.time() + RESTART_TIMEOUT
        while self.weights is not None:
            try:
                self.workers.wait_weights(self.workers.set_weights(call.worker, self.weights, self.version))
                break
            except WorkerGone:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)  # still restarting
        message = (f"rollout actor {call.worker} restarted ({why}); weights v{self.version} re-pushed, generation "
                   "retried")
        self.events.append({"event": "restart", "actor": call.worker, "message": message})
        print(f"{message} (rollout restarts: {self.restarts})", flush=True)
        call.version, call.handle = self.version, self.workers.generate(call.worker, call.n_requests, call.seed)
