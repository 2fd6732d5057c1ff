"""Logged preference data for the benchmark, made from real feedback by a behaviour policy (DESIGN section 5).

For each training user, `generate_preferences` draws `pairs_per_user` training requests (families A/B of DESIGN
section 2, the user's held-out positives as targets). The behaviour policy (EASE or centroid kNN) shows two lists
per request, each a Gumbel-top-k sample at temperature `noise` from its scores standardised over the items the
request allows (`valid_mask`: no seeds, hard constraints kept, k distinct items). The list with more hits on the
targets is chosen; ties are skipped and counted. Deliberate simplifications: every pair has weight 1.0 (the hit
margin is not used), and the timestamp is the generation time. The rows follow `catalog.preferences`' schema.

Example:
    table, stats = generate_preferences(data, EASE(data.catalog, data.train_matrix, 3000.0), pairs_per_user=8,
                                        noise=1.0, k=20, seed=0, source="ease")
    write_preferences(table, "prefs.parquet")
    print(stats.summary())
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from catalog.dataset import Dataset, training_example
from catalog.preferences import PREFERENCES_SCHEMA
from catalog.requests import request_to_json, valid_mask
from catalog.schema import Catalog
from core.carriers import Example
from core.config import RequestConfig
from core.numerics import masked_zscore

USER_BLOCK = 32  # users whose requests are scored in one (R, N) matrix
TRIES = 4  # draws per wanted request before a user is given fewer (family B often finds no facet)


class Scorer(Protocol):
    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        """(R, N) scores, higher is better."""


@dataclass
class GenerationStats:
    """What `generate_preferences` did: requests drawn, pairs written, ties skipped."""

    users: int = 0
    users_without_requests: int = 0
    requests: int = 0
    pairs: int = 0
    ties: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.pairs} preference pairs from {self.requests} requests of {self.users} training users "
                f"({self.ties} ties skipped, {self.users_without_requests} users without a request) "
                f"in {self.seconds:.1f}s")


@dataclass
class PairDraw:
    """Two sampled lists per request, ordered into chosen/rejected; `rows` index the requests that were not ties."""

    rows: np.ndarray  # (P,) indices into the examples
    chosen: np.ndarray  # (P, k) item indices
    rejected: np.ndarray  # (P, k)
    chosen_hits: np.ndarray  # (P,)
    rejected_hits: np.ndarray  # (P,)
    ties: int


def user_examples(data: Dataset, cfg: RequestConfig, user: int, n: int, rng: np.random.Generator) -> list[Example]:
    """Up to `n` training requests of one user (family B with probability `family_b_share`, else family A)."""
    out: list[Example] = []
    for _ in range(n * TRIES):
        if len(out) == n:
            break
        ex = training_example(data, user, cfg, rng)
        if ex is not None:
            out.append(ex)
    return out


def gumbel_top_k(z: np.ndarray, allowed: np.ndarray, noise: float, k: int, rng: np.random.Generator) -> np.ndarray:
    """(R, k) lists, best first: the top k of z + noise * Gumbel(0, 1) (R, N) among the allowed (R, N) items.

    This samples k distinct items without replacement from softmax(z / noise) (the Gumbel-top-k trick)."""
    noisy = np.where(allowed, z + noise * rng.gumbel(size=z.shape), -np.inf)  # (R, N)
    top = np.argpartition(-noisy, k - 1, axis=1)[:, :k]  # (R, k) unordered
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(noisy, top, 1), axis=1), 1)


def draw_pairs(catalog: Catalog, examples: Sequence[Example], scores: np.ndarray, noise: float, k: int,
               rng: np.random.Generator) -> PairDraw:
    """Two Gumbel-top-k lists per request from `scores` (R, N) standardised over the items `valid_mask` allows;
    the one with more hits on the request's targets is chosen, ties are dropped."""
    allowed = np.stack([valid_mask(catalog, e.request) for e in examples])  # (R, N)
    if (allowed.sum(1) < k).any():
        raise ValueError(f"a request allows fewer than k={k} items")
    z = masked_zscore(scores, allowed)  # (R, N)
    targets = np.zeros(allowed.shape, dtype=bool)
    for r, e in enumerate(examples):
        targets[r, list(e.targets)] = True
    lists = np.stack([gumbel_top_k(z, allowed, noise, k, rng) for _ in range(2)])  # (2, R, k)
    hits = np.take_along_axis(targets[None], lists, 2).sum(2)  # (2, R)
    rows = np.flatnonzero(hits[0] != hits[1])  # (P,) ties are skipped
    win = (hits[1] > hits[0])[rows].astype(np.int64)  # (P,) which of the two lists is chosen
    return PairDraw(rows, lists[win, rows], lists[1 - win, rows], hits[win, rows], hits[1 - win, rows],
                    len(examples) - len(rows))


def generate_preferences(data: Dataset, scorer: Scorer, pairs_per_user: int, noise: float, k: int, seed: int,
                         source: str, requests: RequestConfig | None = None, timestamp: int | None = None,
                         progress: bool = False) -> tuple[pa.Table, GenerationStats]:
    """Preference pairs for every training user (module docstring); `timestamp` defaults to now."""
    if noise <= 0:
        raise ValueError(f"noise must be positive, got {noise}: without it both lists are the same")
    cfg = dataclasses.replace(requests or RequestConfig(), k=k)
    noise_rng = np.random.default_rng([seed, 1 << 31])  # a stream no user's request rng shares
    stamp = int(time.time()) if timestamp is None else int(timestamp)
    stats, parts, start = GenerationStats(users=len(data.train_users)), [], time.time()
    with tqdm(total=len(data.train_users), desc="preferences", unit="user", disable=not progress) as bar:
        for first in range(0, len(data.train_users), USER_BLOCK):
            block = [int(u) for u in data.train_users[first:first + USER_BLOCK]]
            per_user = [user_examples(data, cfg, u, pairs_per_user, np.random.default_rng([seed, u])) for u in block]
            examples = [e for user in per_user for e in user]
            stats.users_without_requests += sum(not user for user in per_user)
            if examples:
                draw = draw_pairs(data.catalog, examples, scorer.scores(examples), noise, k, noise_rng)
                parts.append(_pair_table(data.catalog, examples, draw, source, stamp))
                stats.requests += len(examples)
                stats.pairs += len(draw.rows)
                stats.ties += draw.ties
            bar.update(len(block))
    stats.seconds = time.time() - start
    return (pa.concat_tables(parts) if parts else PREFERENCES_SCHEMA.empty_table()), stats


def _pair_table(catalog: Catalog, examples: Sequence[Example], draw: PairDraw, source: str, stamp: int) -> pa.Table:
    """The drawn pairs as rows of PREFERENCES_SCHEMA (external ids)."""
    kept = [examples[i] for i in draw.rows]
    n, ids = len(kept), catalog.item_ids

    def fixed(lists: np.ndarray) -> pa.Array:  # (P, k) item indices -> list<int64> of ids
        return pa.ListArray.from_arrays(np.arange(0, lists.size + 1, max(lists.shape[1], 1), dtype=np.int32),
                                        pa.array(ids[lists].ravel(), pa.int64()))
    return pa.table({
        "user_id": [e.user for e in kept],
        "seeds": [ids[list(e.request.seeds)].tolist() for e in kept],
        "negatives": [ids[list(e.request.negatives)].tolist() for e in kept],
        "constraints": [json.dumps(request_to_json(catalog, e.request).get("constraints", [])) for e in kept],
        "k": [e.request.k for e in kept], "chosen": fixed(draw.chosen), "rejected": fixed(draw.rejected),
        "weight": np.ones(n, np.float32), "source": [source] * n, "timestamp": np.full(n, stamp, np.int64),
    }, schema=PREFERENCES_SCHEMA)
