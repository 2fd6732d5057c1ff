"""The replay buffer's logic (no Ray; `actors.buffer.ReplayBuffer` is its shell): versioned rollout groups with a
staleness bound, logged preference pairs streamed from Parquet, and learner batches with the configured mix.

- A *group* is one request's G rollouts (`split_groups`); the buffer keeps groups first-in first-out, each tagged
  with the weight version that sampled it. `take(current_version, n)` first drops every group older than
  `max_staleness` versions (AReaL's staleness bound, arXiv:2505.24298) and counts them, then serves the n oldest.
- `PreferenceStream` reads the logged pairs through the validating reader (`catalog.preferences`) one record batch
  at a time and starts a new pass at the end of the file; bad rows are never served (the reader counts them).
- `LearnerBatch` = on-policy groups + logged pairs; `shard_batch` splits it over the data-parallel ranks.

Deliberate simplifications: the buffer lives in memory (accepted groups and the preference cursor are not yet
persisted across a restart); a concatenated batch carries the oldest version of its groups.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from catalog.preferences import PreferencePair, read_preferences
from catalog.schema import Catalog, CatalogError
from rollout.generate import Rollouts


def split_groups(rollouts: Rollouts) -> list[Rollouts]:
    """One Rollouts per request (its G rows), same version."""
    g = rollouts.group_size
    return [Rollouts([ex], rollouts.items[b * g:(b + 1) * g], rollouts.step_of[b * g:(b + 1) * g],
                     rollouts.behaviour_logp[b * g:(b + 1) * g], rollouts.rewards[b * g:(b + 1) * g],
                     rollouts.advantages[b * g:(b + 1) * g], rollouts.version)
            for b, ex in enumerate(rollouts.examples)]


def concat_groups(groups: list[Rollouts]) -> Rollouts | None:
    """Groups (same G and k) back into one Rollouts, request-major; its version is the oldest one.  None if empty."""
    if not groups:
        return None
    return Rollouts([ex for r in groups for ex in r.examples], torch.cat([r.items for r in groups]),
                    torch.cat([r.step_of for r in groups]), torch.cat([r.behaviour_logp for r in groups]),
                    np.concatenate([r.rewards for r in groups]), torch.cat([r.advantages for r in groups]),
                    min(r.version for r in groups))


@dataclass
class LearnerBatch:
    """What one learner step (or one rank's shard of it) trains on; either part may be empty."""

    rollouts: Rollouts | None
    pairs: list[PreferencePair]
    staleness: int = 0  # largest (current version - sampling version) among the groups

    @property
    def n_requests(self) -> int:
        return 0 if self.rollouts is None else len(self.rollouts.examples)


def shard_batch(batch: LearnerBatch, n: int) -> list[LearnerBatch]:
    """Split requests and pairs into n contiguous, near-equal shards (data parallelism: each rank takes one)."""
    groups = split_groups(batch.rollouts) if batch.rollouts is not None else []
    group_parts = np.array_split(np.arange(len(groups)), n)
    pair_parts = np.array_split(np.arange(len(batch.pairs)), n)
    return [LearnerBatch(concat_groups([groups[i] for i in g]), [batch.pairs[i] for i in p], batch.staleness)
            for g, p in zip(group_parts, pair_parts, strict=True)]


@dataclass
class BufferStats:
    """Counters of the buffer (groups are requests with their G rollouts)."""

    groups_accepted: int = 0
    groups_served: int = 0
    groups_dropped_stale: int = 0
    groups_waiting: int = 0
    pairs_served: int = 0
    preference_passes: int = 0  # completed passes over the preference file
    preference_rows_bad: int = 0  # bad rows seen in the current pass (see `PreferenceStream.report`)


class RolloutQueue:
    """FIFO of rollout groups tagged with versions, with the staleness bound."""

    def __init__(self, max_staleness: int) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = max_staleness
        self.groups: deque[Rollouts] = deque()
        self.stats = BufferStats()

    def put(self, rollouts: Rollouts) -> int:
        """Accept a batch of rollouts; returns the number of groups now waiting."""
        groups = split_groups(rollouts)
        self.groups.extend(groups)
        self.stats.groups_accepted += len(groups)
        self.stats.groups_waiting = len(self.groups)
        return len(self.groups)

    def take(self, current_version: int, n: int) -> tuple[Rollouts | None, int]:
        """Drop groups staler than the bound, then serve up to n oldest.  -> (rollouts or None, max staleness)"""
        fresh = [r for r in self.groups if current_version - r.version <= self.max_staleness]
        self.stats.groups_dropped_stale += len(self.groups) - len(fresh)
        served, rest = fresh[:n], fresh[n:]
        self.groups = deque(rest)
        self.stats.groups_served += len(served)
        self.stats.groups_waiting = len(self.groups)
        staleness = max((current_version - r.version for r in served), default=0)
        return concat_groups(served), staleness


class PreferenceStream:
    """Valid logged pairs from a Parquet file, served in order, pass after pass (`report`: bad rows of this pass)."""

    def __init__(self, path: str | Path, catalog: Catalog, batch_rows: int = 1024) -> None:
        self.reader = read_preferences(path, catalog, batch_rows)
        self.pending: deque[PreferencePair] = deque()
        self.batches = iter(self.reader)
        self.passes = 0
        self.served = 0

    def next_pairs(self, n: int) -> list[PreferencePair]:
        """The next n valid pairs; raises CatalogError when a whole pass over the file holds none."""
        while len(self.pending) < n:
            batch = next(self.batches, None)
            if batch is not None:
                self.pending.extend(batch.pairs)
                continue
            if self.reader.report.good == 0:
                raise CatalogError(f"{self.reader.path}: no valid preference pairs\n{self.reader.report.summary()}")
            self.passes += 1
            self.batches = iter(self.reader)  # a new pass (the reader starts a fresh report)
        self.served += n
        return [self.pending.popleft() for _ in range(n)]

    @property
    def report(self):
        return self.reader.report


class ReplayBuffer:
    """Rollout groups (staleness-bounded) plus logged pairs, served as learner batches with a fixed on/off mix."""

    def __init__(self, max_staleness: int, preferences: PreferenceStream | None = None) -> None:
        self.queue = RolloutQueue(max_staleness)
        self.preferences = preferences

    def put(self, rollouts: Rollouts) -> int:
        return self.queue.put(rollouts)

    def take(self, current_version: int, n_requests: int, n_pairs: int) -> LearnerBatch:
        """Up to n_requests fresh groups and, when a preference file is attached, exactly n_pairs logged pairs."""
        rollouts, staleness = self.queue.take(current_version, n_requests)
        pairs = self.preferences.next_pairs(n_pairs) if self.preferences is not None else []
        return LearnerBatch(rollouts, pairs, staleness)

    def stats(self) -> BufferStats:
        stats = BufferStats(**vars(self.queue.stats))
        if self.preferences is not None:
            stats.pairs_served = self.preferences.served
            stats.preference_passes = self.preferences.passes
            stats.preference_rows_bad = self.preferences.report.bad
        return stats
