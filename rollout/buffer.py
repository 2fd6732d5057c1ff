"""The replay buffer's logic (no Ray; `actors.buffer.ReplayBufferActor` is its shell): versioned rollout groups with
a staleness bound, logged preference pairs streamed from Parquet, and learner batches with the configured mix.

- A *group* is one request's G rollouts (`split_groups`); the buffer keeps groups first-in first-out, each tagged
  with the weight version that sampled it. `take(current_version, n)` first drops every group older than
  `max_staleness` versions (AReaL's staleness bound, arXiv:2505.24298; with the driver's admission control it only
  binds after a restart) and counts them, then serves the n oldest.
- `PreferenceStream` reads the logged pairs through the validating reader (`catalog.preferences`) one record batch
  at a time and starts a new pass at the end of the file; bad rows are never served (the reader counts them).
- `ReplayBuffer.take` serves one learner step: a `BatchSummary` for the driver (ids, staleness, rewards, a sample;
  a few KB) and one `LearnerBatch` per data-parallel rank (its contiguous share of the groups, concatenated once, and
  of the pairs, encoded here as `PairBatch` tensors). Every tensor a rank needs is encoded: the rollouts carry the
  request rows their actor encoded, and each shard's request tensors are trimmed to the widths its own rows need
  (`request_rows`), so a rank sees exactly what encoding its requests itself would give.

Every group and pair carries an id (groups: given by the driver, else their acceptance number; pairs:
`p<pass>-<row>` of the file), and a batch lists the ids it serves so the driver can keep a ledger of what was
trained. `state()` / `restore(state)` carry the waiting groups, the counters and the preference cursor (pass, next
row) across a restart: the driver writes them into its atomic train state.

Deliberate simplification: a concatenated batch carries the oldest version of its groups.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from catalog.batch import constraint_vocab, encode_requests
from catalog.preferences import PreferencePair, read_preferences
from catalog.schema import Catalog, CatalogError
from core.carriers import LearnerBatch, PairBatch, RequestBatch, Rollouts

PADDED = (("seeds", "seed_mask"), ("negatives", "negative_mask"), ("con_kind", "con_mask"), ("con_value", "con_mask"),
          ("con_scalar", "con_mask"))  # RequestBatch fields padded to a width, with the mask saying which are used


def request_rows(batches: list[RequestBatch], rows: list[torch.Tensor] | None = None) -> RequestBatch:
    """The given rows of each batch, stacked, every padded field cut or zero-padded to the widest row actually used
    (`catalog.batch.encode_requests` pads with zeros to the longest request), so the result equals encoding those
    rows' requests together."""
    parts = [b if r is None else RequestBatch(**{name: None if v is None else v[r] for name, v in vars(b).items()})
             for b, r in zip(batches, rows or [None] * len(batches), strict=True)]
    out = {"valid": torch.cat([p.valid for p in parts])}
    carried = {p.ease is not None for p in parts}
    if len(carried) > 1:
        raise ValueError("cannot stack requests that carry out-of-fold EASE scores with requests that do not")
    if carried == {True}:
        out["ease"] = torch.cat([p.ease for p in parts])
    for name, mask in PADDED:
        width = max((used_width(getattr(p, mask)) for p in parts), default=0)
        out[name] = torch.cat([_width(getattr(p, name), width) for p in parts])
        out[mask] = torch.cat([_width(getattr(p, mask), width) for p in parts])
    return RequestBatch(**out)


def used_width(mask: torch.Tensor) -> int:
    """(B, W) bool -> 1 + the last column any row uses (0 when none does)."""
    used = mask.any(0).nonzero()
    return int(used.max()) + 1 if len(used) else 0


def _width(values: torch.Tensor, width: int) -> torch.Tensor:
    """(B, W) -> (B, width): cut, or padded on the right with zeros (False)."""
    if values.shape[1] >= width:
        return values[:, :width]
    return torch.cat([values, values.new_zeros((values.shape[0], width - values.shape[1]))], dim=1)


def split_groups(rollouts: Rollouts) -> list[Rollouts]:
    """One Rollouts per request (its G rows), same version."""
    g = rollouts.group_size
    return [Rollouts([ex], request_rows([rollouts.batch], [torch.arange(b * g, (b + 1) * g)]),
                     rollouts.items[b * g:(b + 1) * g], rollouts.step_of[b * g:(b + 1) * g],
                     rollouts.behaviour_logp[b * g:(b + 1) * g], rollouts.rewards[b * g:(b + 1) * g],
                     rollouts.advantages[b * g:(b + 1) * g], rollouts.version)
            for b, ex in enumerate(rollouts.examples)]


def concat_groups(groups: list[Rollouts]) -> Rollouts | None:
    """Groups (same G and k) back into one Rollouts, request-major; its version is the oldest one.  None if empty."""
    if not groups:
        return None
    return Rollouts([ex for r in groups for ex in r.examples], request_rows([r.batch for r in groups]),
                    torch.cat([r.items for r in groups]), torch.cat([r.step_of for r in groups]),
                    torch.cat([r.behaviour_logp for r in groups]), np.concatenate([r.rewards for r in groups]),
                    torch.cat([r.advantages for r in groups]), min(r.version for r in groups))


def encode_pairs(catalog: Catalog, pairs: list[PreferencePair], vocab: dict) -> PairBatch | None:
    """Logged pairs -> tensors (None for no pairs)."""
    if not pairs:
        return None
    return PairBatch(encode_requests(catalog, [p.request for p in pairs], vocab),
                     torch.tensor([p.chosen for p in pairs], dtype=torch.long),
                     torch.tensor([p.rejected for p in pairs], dtype=torch.long),
                     torch.tensor([p.weight for p in pairs], dtype=torch.float32))


@dataclass
class BatchSummary:
    """What the driver sees of one learner step's batch (the tensors go from the buffer to the ranks directly)."""

    ids: list[str]  # ids of the served groups, then of the pairs (the ledger)
    n_requests: int
    n_pairs: int
    staleness: int = 0  # largest (current version - sampling version) among the groups
    staleness_counts: dict[int, int] = field(default_factory=dict)  # staleness -> groups served with it
    waiting: int = 0  # groups left in the buffer after this batch was taken
    rewards: np.ndarray | None = None  # (B*G, C) raw reward components of the served rollouts
    sample: Rollouts | None = None  # the first served group (the dashboard's sample panel)


def shard(groups: list[Rollouts], pairs: list[PreferencePair], n: int, catalog: Catalog | None,
          vocab: dict | None) -> list[LearnerBatch]:
    """Split groups and pairs into n contiguous, near-equal shards (data parallelism: each rank takes one)."""
    group_parts = np.array_split(np.arange(len(groups)), n)
    pair_parts = np.array_split(np.arange(len(pairs)), n)
    return [LearnerBatch(concat_groups([groups[i] for i in g]),
                         encode_pairs(catalog, [pairs[i] for i in p], vocab) if len(p) else None)
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
    """FIFO of rollout groups tagged with versions and ids, with the staleness bound."""

    def __init__(self, max_staleness: int) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = max_staleness
        self.groups: deque[tuple[str, Rollouts]] = deque()
        self.stats = BufferStats()

    def put(self, rollouts: Rollouts, ids: list[str] | None = None) -> int:
        """Accept a batch of rollouts (one id per request; default: acceptance numbers).  -> groups now waiting"""
        groups = split_groups(rollouts)
        if ids is None:
            ids = [f"g{self.stats.groups_accepted + b}" for b in range(len(groups))]
        if len(ids) != len(groups):
            raise ValueError(f"{len(groups)} groups but {len(ids)} ids")
        self.groups.extend(zip(ids, groups, strict=True))
        self.stats.groups_accepted += len(groups)
        self.stats.groups_waiting = len(self.groups)
        return len(self.groups)

    def take_with_ids(self, current_version: int, n: int) -> tuple[list[Rollouts], list[int], list[str]]:
        """Drop groups staler than the bound, then serve up to n oldest.
        -> (the served groups, staleness of each, their ids)"""
        fresh = [(i, r) for i, r in self.groups if current_version - r.version <= self.max_staleness]
        self.stats.groups_dropped_stale += len(self.groups) - len(fresh)
        served, rest = fresh[:n], fresh[n:]
        self.groups = deque(rest)
        self.stats.groups_served += len(served)
        self.stats.groups_waiting = len(self.groups)
        staleness = [current_version - r.version for _, r in served]
        return [r for _, r in served], staleness, [i for i, _ in served]


class PreferenceStream:
    """Valid logged pairs from a Parquet file, served in order, pass after pass (`report`: bad rows of this pass).

    The cursor is (pass, file row of the next pair to serve); `seek` restores it after a restart."""

    def __init__(self, path: str | Path, catalog: Catalog, batch_rows: int = 1024) -> None:
        self.catalog = catalog
        self.reader = read_preferences(path, catalog, batch_rows)
        self.pending: deque[tuple[int, PreferencePair]] = deque()  # (file row, pair)
        self.batches = iter(self.reader)
        self.passes = 0
        self.served = 0
        self.last_ids: list[str] = []  # `p<pass>-<row>` of the pairs of the last `next_pairs` call

    def _read_batch(self) -> bool:
        batch = next(self.batches, None)
        if batch is not None:
            self.pending.extend(zip(batch.rows, batch.pairs, strict=True))
        return batch is not None

    def next_pairs(self, n: int) -> list[PreferencePair]:
        """The next n valid pairs; raises CatalogError when a whole pass over the file holds none."""
        served = []
        while len(served) < n:
            if not self.pending:
                if self._read_batch():
                    continue
                if self.reader.report.good == 0:
                    raise CatalogError(f"{self.reader.path}: no valid preference pairs\n"
                                       f"{self.reader.report.summary()}")
                self.passes += 1
                self.batches = iter(self.reader)  # a new pass (the reader starts a fresh report)
                continue
            row, pair = self.pending.popleft()
            served.append((f"p{self.passes}-{row}", pair))
        self.served += n
        self.last_ids = [i for i, _ in served]
        return [pair for _, pair in served]

    def cursor(self) -> dict:
        """Where the stream stands: pass, the file row of the next pair, pairs served so far."""
        row = self.pending[0][0] if self.pending else self.reader.report.rows
        return {"passes": self.passes, "row": int(row), "served": self.served}

    def seek(self, cursor: dict) -> None:
        """Continue from a `cursor()`: re-read the current pass up to that row (the report counts those rows)."""
        self.passes, self.served = cursor["passes"], cursor["served"]
        self.batches, self.pending = iter(self.reader), deque()
        while self.reader.report.rows <= cursor["row"] and self._read_batch():
            pass
        self.pending = deque((row, pair) for row, pair in self.pending if row >= cursor["row"])

    @property
    def report(self):
        return self.reader.report


class ReplayBuffer:
    """Rollout groups (staleness-bounded) plus logged pairs, served as learner batches with a fixed on/off mix."""

    def __init__(self, max_staleness: int, preferences: PreferenceStream | None = None) -> None:
        self.queue = RolloutQueue(max_staleness)
        self.preferences = preferences
        self.vocab = constraint_vocab(preferences.catalog) if preferences is not None else None

    def put(self, rollouts: Rollouts, ids: list[str] | None = None) -> int:
        return self.queue.put(rollouts, ids)

    def take(self, current_version: int, n_requests: int, n_pairs: int,
             n_shards: int = 1) -> tuple[BatchSummary, list[LearnerBatch]]:
        """Up to n_requests fresh groups and, when a preference file is attached, exactly n_pairs logged pairs, split
        over n_shards ranks.  -> (the summary for the driver, one LearnerBatch per rank)"""
        groups, staleness, ids = self.queue.take_with_ids(current_version, n_requests)
        pairs = self.preferences.next_pairs(n_pairs) if self.preferences is not None else []
        pair_ids = self.preferences.last_ids if self.preferences is not None else []
        counts = {s: staleness.count(s) for s in sorted(set(staleness))}
        summary = BatchSummary(ids + pair_ids, len(groups), len(pairs), max(staleness, default=0), counts,
                               len(self.queue.groups), np.concatenate([g.rewards for g in groups]) if groups else None,
                               groups[0] if groups else None)
        catalog = self.preferences.catalog if self.preferences is not None else None
        return summary, shard(groups, pairs, n_shards, catalog, self.vocab)

    def state(self) -> dict:
        """What a restart needs: the waiting groups with their ids, the counters, the preference cursor."""
        return {"groups": list(self.queue.groups), "stats": vars(self.queue.stats).copy(),
                "preferences": self.preferences.cursor() if self.preferences is not None else None}

    def restore(self, state: dict) -> None:
        """Undo a restart: the inverse of `state()` (the preference file must be the same)."""
        self.queue.groups = deque(state["groups"])
        self.queue.stats = BufferStats(**state["stats"])
        if (state["preferences"] is None) != (self.preferences is None):
            raise ValueError("the saved buffer and this run differ in having a preference file")
        if self.preferences is not None:
            self.preferences.seek(state["preferences"])

    def stats(self) -> BufferStats:
        stats = BufferStats(**vars(self.queue.stats))
        if self.preferences is not None:
            stats.pairs_served = self.preferences.served
            stats.preference_passes = self.preferences.passes
            stats.preference_rows_bad = self.preferences.report.bad
        return stats
