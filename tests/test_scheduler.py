"""Tests of the rollout scheduler (`actors/scheduler.py`) on CPU with fake workers, no Ray: admission by staleness
(0, 1 and 2), a worker dying mid-call or restarting between calls, reward errors, and resume after a checkpoint.

The fake workers behave like Ray actors where it matters: a worker serves its calls in submission order, so a call
samples with the last weights queued before it; a worker that dies fails the calls it holds, and Ray restarts it from
its constructor (version 0) until it is given weights again.
Run: `PYTHONPATH=. python -m pytest tests/test_scheduler.py -q` (well under a second).
"""

from __future__ import annotations

import pytest

from actors.scheduler import ATTEMPTS, RolloutScheduler, WorkerGone
from rewards.registry import RewardError


class FakeWorkers:
    """In-process `actors.scheduler.Workers`; `delivered` is the buffer: (ids, version) per delivered call."""

    def __init__(self, n: int) -> None:
        self.version = [0] * n
        self.held: list[list[dict]] = [[] for _ in range(n)]  # calls a worker holds (not yet waited for)
        self.delivered: list[tuple[list[str], int]] = []
        self.launched: list[tuple[int, int, int]] = []  # (worker, seed, version) of every generate
        self.reward_error_seeds: set[int] = set()

    def __len__(self) -> int:
        return len(self.version)

    def generate(self, worker: int, n_requests: int, seed: int) -> dict:
        handle = {"worker": worker, "n": n_requests, "seed": seed, "version": self.version[worker], "gone": False}
        self.held[worker].append(handle)
        self.launched.append((worker, seed, self.version[worker]))
        return handle

    def wait(self, handle: dict) -> dict:
        self.held[handle["worker"]].remove(handle)
        if handle["gone"]:
            raise WorkerGone("killed")
        if handle["seed"] in self.reward_error_seeds:
            raise RewardError("fake", "returned 2 NaN values")
        return {"lists": 2 * handle["n"], "seconds": 0.1, "version": handle["version"]}

    def deliver(self, handle: dict, ids: list[str]) -> None:
        self.delivered.append((ids, handle["version"]))

    def set_weights(self, worker: int, weights, version: int) -> dict:
        self.version[worker] = version
        return {"gone": False}

    def wait_weights(self, handle: dict) -> None:
        if handle["gone"]:
            raise WorkerGone("killed")

    def die(self, worker: int) -> None:
        """Kill a worker: the calls it holds fail, and it restarts at version 0."""
        for handle in self.held[worker]:
            handle["gone"] = True
        self.version[worker] = 0


def run(scheduler: RolloutScheduler, first: int, stop: int, steps: int | None = None, on_step=None) -> list[int]:
    """The driver loop's scheduler calls for steps first..stop-1 of a run of `steps` (default stop) steps (a learner
    step makes version + 1).  -> calls in flight right after each admit"""
    in_flight = []
    for step in range(first, stop):
        scheduler.collect(step)
        scheduler.admit(last_call=(steps or stop) - 1)
        in_flight.append(len({c.call for c in scheduler.in_flight}))  # while the learner trains
        scheduler.publish(f"w{step + 1}", step + 1)
        if on_step is not None:
            on_step(step)
    return in_flight


@pytest.mark.parametrize("lookahead, staleness, in_flight", [
    (0, [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]),
    (1, [0, 1, 1, 1, 1], [1, 1, 1, 1, 0]),
    (2, [0, 1, 2, 2, 2], [2, 2, 2, 1, 0]),
])
def test_admission_by_staleness(lookahead, staleness, in_flight):
    """5 steps, 1 worker, 2 requests a call. Call c is admitted while c <= version + lookahead, so with lookahead m
    the calls of up to m steps ahead are in flight while the learner trains (fewer at the end) and call c samples
    with version max(c - m, 0): staleness (version at training - sampling version) = min(c, m). Exactly one call per
    step is generated (none beyond the last step, none dropped), in step order, ids g<c>-0, g<c>-1."""
    workers = FakeWorkers(1)
    scheduler = RolloutScheduler(workers, 2, lookahead)
    assert run(scheduler, 0, 5) == in_flight
    assert [step - version for step, (_, version) in enumerate(workers.delivered)] == staleness
    assert [ids for ids, _ in workers.delivered] == [[f"g{c}-0", f"g{c}-1"] for c in range(5)]
    assert len(workers.launched) == 5 and scheduler.in_flight == [] and scheduler.collected_through == 4


def test_requests_split_over_workers_with_their_seeds():
    """5 requests over 2 workers: 3 + 2, seeds c * 2 + worker, ids g<seed>-<request>."""
    workers = FakeWorkers(2)
    run(RolloutScheduler(workers, 5, 1), 0, 2)
    assert [ids for ids, _ in workers.delivered] == [["g0-0", "g0-1", "g0-2"], ["g1-0", "g1-1"],
                                                     ["g2-0", "g2-1", "g2-2"], ["g3-0", "g3-1"]]


def test_worker_dies_mid_call_and_the_call_is_retried(capsys):
    """Lookahead 1, 2 workers. After step 0 (version 1 published) worker 1 dies while it holds call 1: collecting
    step 1 re-pushes version 1 and retries the same seed, before call 2 is admitted (so call 2 finds the weights).
    Every step trains the scheduled groups; one restart, reported."""
    workers = FakeWorkers(2)
    scheduler = RolloutScheduler(workers, 2, 1)
    run(scheduler, 0, 4, on_step=lambda step: workers.die(1) if step == 0 else None)
    assert [ids for ids, _ in workers.delivered] == [[f"g{s}-0"] for s in range(8)]
    assert [version for _, version in workers.delivered] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert scheduler.restarts == 1 and [e["event"] for e in scheduler.events] == ["restart"]
    assert "rollout actor 1 restarted (died: killed); weights v1 re-pushed" in capsys.readouterr().out


def test_worker_restarted_between_calls_answers_an_old_version():
    """Sync (lookahead 0): worker 1 dies after step 0 holding no call and restarts at version 0, so call 1 answers
    with version 0 where 1 was expected: it gets version 1 again and the call is retried; staleness stays 0."""
    workers = FakeWorkers(2)
    scheduler = RolloutScheduler(workers, 2, 0)
    run(scheduler, 0, 3, on_step=lambda step: workers.die(1) if step == 0 else None)
    assert [version for _, version in workers.delivered] == [0, 0, 1, 1, 2, 2]
    assert scheduler.restarts == 1 and "answered with v0, expected v1" in scheduler.events[0]["message"]


def test_rollouts_lost_with_their_node_are_generated_again():
    """Call 1 finishes, but its rollouts are lost with the worker's node before they reach the buffer (`deliver`
    raises WorkerGone, as `RayWorkers` does for ObjectLostError): the worker gets the weights again, the call is
    generated again with the same seed, and the buffer receives each group once."""
    workers = FakeWorkers(1)
    original, lost = workers.deliver, []

    def losing_deliver(handle, ids):
        if handle["seed"] == 1 and not lost:
            lost.append(ids)
            raise WorkerGone("ObjectLostError")
        original(handle, ids)
    workers.deliver = losing_deliver
    scheduler = RolloutScheduler(workers, 1, 1)
    run(scheduler, 0, 3)
    assert lost == [["g1-0"]] and [ids for ids, _ in workers.delivered] == [["g0-0"], ["g1-0"], ["g2-0"]]
    assert scheduler.restarts == 1 and [seed for _, seed, _ in workers.launched] == [0, 1, 1, 2]


def test_a_worker_that_keeps_dying_fails_the_run():
    """A call whose worker dies on every attempt raises WorkerGone after ATTEMPTS tries."""
    workers = FakeWorkers(1)
    scheduler = RolloutScheduler(workers, 1, 0)
    scheduler.admit(0)  # lookahead 0 admits call 0 at version 0
    original = workers.generate

    def dying_generate(*args):
        handle = original(*args)
        handle["gone"] = True
        return handle
    workers.generate = dying_generate
    scheduler.in_flight[0].handle["gone"] = True
    with pytest.raises(WorkerGone):
        scheduler.collect(0)
    assert scheduler.restarts == ATTEMPTS - 1


def test_reward_error_stops_or_skips():
    """A failing reward: "stop" re-raises it (naming the reward); "skip" drops that call, counts it and goes on."""
    workers = FakeWorkers(1)
    workers.reward_error_seeds = {1}
    with pytest.raises(RewardError, match="'fake'"):
        run(RolloutScheduler(workers, 1, 1, "stop"), 0, 3)
    workers = FakeWorkers(1)
    workers.reward_error_seeds = {1}
    scheduler = RolloutScheduler(workers, 1, 1, "skip")
    run(scheduler, 0, 3)
    assert [ids for ids, _ in workers.delivered] == [["g0-0"], ["g2-0"]]
    assert scheduler.skipped == 1 and scheduler.events[0]["event"] == "skipped_batch"


@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_resume_after_a_checkpoint_continues_the_schedule(lookahead):
    """6 steps uninterrupted, against: 3 steps, `drain()` (the checkpoint collects every call in flight), then a new
    scheduler from the saved (version, collected_through) on fresh workers given the saved weights: the buffer
    receives the same groups with the same versions, each once, and no call is generated twice."""
    reference = FakeWorkers(1)
    run(RolloutScheduler(reference, 2, lookahead), 0, 6)
    first = FakeWorkers(1)
    scheduler = RolloutScheduler(first, 2, lookahead)
    run(scheduler, 0, 3, steps=6)
    scheduler.drain()
    assert scheduler.in_flight == [] and scheduler.collected_through == min(2 + lookahead, 5)
    second = FakeWorkers(1)
    resumed = RolloutScheduler(second, 2, lookahead, version=scheduler.version,
                               collected_through=scheduler.collected_through)
    resumed.publish(scheduler.weights, scheduler.version, wait=True)
    run(resumed, 3, 6)
    assert first.delivered + second.delivered == reference.delivered
    assert len(first.launched) + len(second.launched) == 6
