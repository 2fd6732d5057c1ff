"""Per-request metrics of ranked lists and bootstrap confidence intervals (DESIGN section 2).

Every list metric takes `lists` (R, K) int64 item indices, one ranked list per request, and returns one value
per request (R,), so that `evaluation/report.py` can pool them, split them by family and seed size, and
bootstrap them; rewards reuse `ranking_metrics` on sampled lists. Conventions (deliberate choices):

- Recall@K (min-normalised), key `recall_min@K` = hits in the top K / min(K, |targets|), not / |targets| as
  the usual Recall@K (so it reaches 1 when |targets| > K); NDCG@K has binary gains, discounts 1 / log2(rank + 1)
  and the ideal DCG of min(K, |targets|) hits; HitRate@K = 1 when a target is in the top K. An item repeated
  in a list is a hit at its first position only.
- Constraint satisfaction looks at the hard constraints alone (Exclude, Require, Recency.min_year): the
  constraints are put into `valid_mask` with an empty seed set. Seeds and negatives in a list are counted
  separately by `seed_leak_rate`.
- ILD = mean over position pairs i < j of 1 - cosine(x_i, x_j) of item feature rows.
- Novelty = mean over positions of -log2 p_i with p_i = (c_i + 1) / (U + 1), c_i the number of training users
  with item i as a positive and U the number of training users (the smoothed popularity share, <= 1).
- Coverage = distinct items over all lists / N, one scalar for a set of lists.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from catalog.dataset import Dataset
from catalog.requests import valid_mask
from catalog.schema import Catalog
from core.carriers import Example, Request
from core.numerics import unit_rows


def item_mask(item_sets: Sequence[Sequence[int]], n_items: int) -> np.ndarray:
    """(R, N) bool: row r is True at the items of `item_sets[r]`."""
    lengths = np.fromiter((len(s) for s in item_sets), dtype=np.int64, count=len(item_sets))
    rows = np.repeat(np.arange(len(item_sets)), lengths)
    cols = np.fromiter(itertools.chain.from_iterable(item_sets), dtype=np.int64, count=int(lengths.sum()))
    mask = np.zeros((len(item_sets), n_items), dtype=bool)
    mask[rows, cols] = True
    return mask


def first_occurrence(lists: np.ndarray) -> np.ndarray:
    """(R, K) bool: False where a position repeats an item already listed at an earlier position."""
    same = lists[:, :, None] == lists[:, None, :]  # (R, K, K)
    return ~np.tril(same, k=-1).any(2)


def ranking_metrics(lists: np.ndarray, relevant: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Recall@K (min-normalised), NDCG@K and HitRate@K per request, for every K in `ks`.

    lists: (R, K_list) item indices; relevant: (R, N) bool targets. Returns {"recall_min@K", "ndcg@K", "hit@K"} -> (R,).
    NDCG@K = sum_{i<K} hit_i / log2(i + 2) / sum_{i < min(K, |T|)} 1 / log2(i + 2).
    """
    hits = np.take_along_axis(relevant, lists, axis=1) & first_occurrence(lists)  # (R, K_list)
    n_relevant = relevant.sum(1)  # (R,)
    discount = 1.0 / np.log2(np.arange(2, max(max(ks), lists.shape[1]) + 2))  # (max K,)
    ideal_dcg = np.concatenate([[0.0], np.cumsum(discount)])  # ideal_dcg[n] = DCG of n hits on top
    out = {}
    for k in ks:
        top = hits[:, :k]  # (R, min(k, K_list))
        n_ideal = np.minimum(k, n_relevant)  # (R,)
        dcg = top @ discount[: top.shape[1]]  # (R,)
        out[f"recall_min@{k}"] = np.divide(top.sum(1), n_ideal, out=np.zeros(len(top)), where=n_ideal > 0)
        out[f"ndcg@{k}"] = np.divide(dcg, ideal_dcg[n_ideal], out=np.zeros(len(top)), where=n_ideal > 0)
        out[f"hit@{k}"] = top.any(1).astype(np.float64)
    return out


def constraint_satisfaction(lists: np.ndarray, catalog: Catalog, requests: Sequence[Request]) -> np.ndarray:
    """(R,) share of each list's items that satisfy that request's hard constraints (seeds/negatives ignored)."""
    by_constraints: dict[tuple, list[int]] = {}
    for r, request in enumerate(requests):  # one valid_mask per distinct constraint tuple, not per request
        by_constraints.setdefault(request.constraints, []).append(r)
    allowed = np.empty((len(requests), catalog.n_items), dtype=bool)  # (R, N)
    for constraints, rows in by_constraints.items():
        allowed[rows] = valid_mask(catalog, Request(seeds=(), constraints=constraints))
    return np.take_along_axis(allowed, lists, axis=1).mean(1)


def duplicate_rate(lists: np.ndarray) -> np.ndarray:
    """(R,) share of positions repeating an item from an earlier position."""
    return 1.0 - first_occurrence(lists).mean(1)


def seed_leak_rate(lists: np.ndarray, requests: Sequence[Request], n_items: int) -> np.ndarray:
    """(R,) share of positions holding one of the request's seeds or negatives."""
    banned = item_mask([r.seeds + r.negatives for r in requests], n_items)  # (R, N)
    return np.take_along_axis(banned, lists, axis=1).mean(1)


def intra_list_diversity(lists: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(R,) mean over position pairs i < j of 1 - cosine(features[l_i], features[l_j]); 0 for lists of one item."""
    if lists.shape[1] < 2:
        return np.zeros(len(lists))
    x = unit_rows(features)[lists]  # (R, K, F)
    sim = x @ x.transpose(0, 2, 1)  # (R, K, K)
    upper_i, upper_j = np.triu_indices(lists.shape[1], k=1)
    return (1.0 - sim[:, upper_i, upper_j]).mean(1).astype(np.float64)


def novelty(lists: np.ndarray, popularity: np.ndarray, n_users: int) -> np.ndarray:
    """(R,) mean of -log2((c_i + 1) / (U + 1)) over a list's items; popularity: (N,) training counts c."""
    self_information = -np.log2((popularity.astype(np.float64) + 1.0) / (n_users + 1.0))  # (N,)
    return self_information[lists].mean(1)


def coverage(lists: np.ndarray, n_items: int) -> float:
    """Distinct items across all lists / N."""
    return len(np.unique(lists)) / n_items


def list_metrics(lists: np.ndarray, examples: Sequence[Example], data: Dataset, features: np.ndarray,
                 ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Every per-request metric of `lists` (R, K) against `examples`: {name: (R,) float64}."""
    if lists.ndim != 2 or len(lists) != len(examples):
        raise ValueError(f"lists of shape {lists.shape} do not match {len(examples)} examples")
    n_items = data.catalog.n_items
    requests = [e.request for e in examples]
    out = ranking_metrics(lists, item_mask([e.targets for e in examples], n_items), ks)
    out["constraint_sat"] = constraint_satisfaction(lists, data.catalog, requests)
    out["duplicates"] = duplicate_rate(lists)
    out["seed_leak"] = seed_leak_rate(lists, requests, n_items)
    out["ild"] = intra_list_diversity(lists, features)
    out["novelty"] = novelty(lists, data.train_popularity, len(data.train_users))
    return out


def bootstrap_ci(values: np.ndarray, n: int, seed: int, clusters: np.ndarray | None = None,
                 chunk: int = 200) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of `values` (R,) and its 95% percentile bootstrap interval from `n` resamples.

    `clusters` (R,) labels requests that are not independent (the same user's requests); a resample then draws
    whole clusters with replacement and takes the mean over their requests. Without it each request is its own
    cluster."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-D array, got shape {values.shape}")
    if clusters is None:
        sums, counts = values, np.ones(len(values))
    else:
        if np.shape(clusters) != values.shape:
            raise ValueError(f"clusters need shape {values.shape}, got {np.shape(clusters)}")
        inverse = np.unique(clusters, return_inverse=True)[1]
        sums, counts = np.bincount(inverse, weights=values), np.bincount(inverse).astype(np.float64)  # (C,)
    rng = np.random.default_rng(seed)
    means = []
    for m in np.diff(np.append(np.arange(0, n, chunk), n)):
        draw = rng.integers(0, len(sums), size=(m, len(sums)))  # (m, C) resampled clusters
        means.append(sums[draw].sum(1) / counts[draw].sum(1))
    lo, hi = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(values.mean()), float(lo), float(hi)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int, seed: int,
                     clusters: np.ndarray | None = None) -> tuple[float, float, float]:
    """(d, lo, hi): mean difference a - b of two methods on the same requests, resampling requests (or the
    `clusters` of `bootstrap_ci`) jointly."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs equal shapes, got {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, n, seed, clusters)
