"""`ReplayBufferActor`: the replay buffer as a Ray actor (DESIGN section 7), a shell around `rollout.buffer`.

It holds the versioned rollout groups (staleness bound `h2po.max_staleness`) and, when a preference file is
given, streams logged pairs from it through the validating reader. `put` receives rollouts straight from a rollout
actor (the driver passes the reference); `take` serves one learner step with the configured mix (n on-policy
requests, m logged pairs) as a summary for the driver plus one shard per learner rank, separate return objects
that the driver hands to the ranks as references; `state`/`restore` carry it across a restart.
"""

from __future__ import annotations

from pathlib import Path

import ray

from actors.policy import ActorProcess
from catalog.dataset import load_catalog
from core.carriers import Rollouts
from core.config import RunConfig
from rollout.buffer import BufferStats, PreferenceStream, ReplayBuffer


@ray.remote
class ReplayBufferActor(ActorProcess):
    """Versioned rollout groups + logged preference pairs; serves learner batches."""

    def __init__(self, cfg: RunConfig, preferences_path: str | None) -> None:
        stream = None
        if preferences_path:
            catalog = load_catalog(cfg.data, Path(cfg.out_dir))
            stream = PreferenceStream(preferences_path, catalog)
        self.buffer = ReplayBuffer(cfg.h2po.max_staleness, stream)

    def put(self, rollouts: Rollouts, ids: list[str] | None = None) -> int:
        """Accept rollouts (one id per request); returns the number of groups waiting."""
        return self.buffer.put(rollouts, ids)

    def state(self) -> dict:
        """Waiting groups, counters and preference cursor (`rollout.buffer.ReplayBuffer.state`)."""
        return self.buffer.state()

    def restore(self, state: dict) -> int:
        """Continue from a saved `state()`.  -> groups waiting"""
        self.buffer.restore(state)
        return len(self.buffer.queue.groups)

    def take(self, current_version: int, n_requests: int, n_pairs: int,
             n_shards: int) -> tuple:
        """Drop stale groups, then serve up to n_requests groups and n_pairs logged pairs over n_shards ranks; call
        it with `.options(num_returns=1 + n_shards)`.  -> (summary, shard 0, ..., shard n_shards - 1)"""
        summary, shards = self.buffer.take(current_version, n_requests, n_pairs, n_shards)
        return (summary, *shards)

    def stats(self) -> BufferStats:
        return self.buffer.stats()

    def preference_report(self) -> str:
        """The validating reader's summary of the current pass ('' without a preference file)."""
        stream = self.buffer.preferences
        return stream.report.summary() if stream is not None else ""
