"""Baselines (DESIGN section 2): popularity, centroid kNN, MMR, item-kNN and EASE, all behind one post-filter.

A baseline scores every catalog item for every request (`scores(examples) -> (R, N)`); `recommend` turns
scores into lists with `top_k`, which applies the same hard-constraint post-filter to all of them: items that
`valid_mask` rejects (seeds, negatives, constraint violators) get -inf before the best k are taken. MMR
applies that filter to its relevance scores before its greedy re-ranking.

EASE (Steck 2019, arXiv:1905.03375) is fit on the training users' matrix X only:
G = X^T X + lambda I, P = G^-1, B = I - P diagMat(1 / diag P) (zero diagonal), scores = sum of B's seed rows.
The solve is restricted to items with a training positive, in float64: a cold item's column of X is zero, so
its row and column of B are exactly 0 in the full solution too. With fewer users than items, P comes from the
Woodbury identity P = (I - X^T (lambda I + X X^T)^-1 X) / lambda, a U x U solve instead of an N x N one.
At large N (more warm items than model.prior_items) EASE is approximated without any (N, N) array: see `EASE` and
evaluation/neighbours.py (exact EASE on the most popular items, item-kNN for the rest, top-m rows).

Example:
    ease = EASE(data.catalog, data.train_sparse, lam=3000.0)
    lists = ease.recommend(examples, k=20)  # (R, 20)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from catalog.dataset import Dataset
from catalog.requests import valid_mask
from catalog.schema import Catalog
from core.carriers import Example
from core.config import EvalConfig, ModelConfig
from core.numerics import Neighbours, seed_row_sum, top_neighbours, unit_rows
from evaluation.metrics import item_mask, ranking_metrics
from evaluation.neighbours import build_neighbours, ease_inverse


def seed_matrix(examples: Sequence[Example], n_items: int) -> np.ndarray:
    """(R, N) float32 multi-hot of each request's seeds."""
    return item_mask([e.request.seeds for e in examples], n_items).astype(np.float32)


def filtered_scores(scores: np.ndarray, examples: Sequence[Example], catalog: Catalog, k: int) -> np.ndarray:
    """(R, N) copy of `scores` with -inf wherever `valid_mask` rejects an item (the shared post-filter)."""
    if scores.shape != (len(examples), catalog.n_items):
        raise ValueError(f"scores of shape {scores.shape}, expected {(len(examples), catalog.n_items)}")
    if not np.isfinite(scores).all():
        raise ValueError("a baseline produced non-finite scores")
    allowed = np.stack([valid_mask(catalog, e.request) for e in examples])  # (R, N)
    short = np.flatnonzero(allowed.sum(1) < k)
    if len(short):
        raise ValueError(f"request {short[0]} allows only {allowed[short[0]].sum()} items; k={k} asked")
    return np.where(allowed, scores, -np.inf).astype(np.float32)


def best_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(R, k) indices of the k highest scores per row, best first."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (R, k) unordered
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def top_k(scores: np.ndarray, examples: Sequence[Example], catalog: Catalog, k: int) -> np.ndarray:
    """(R, k) int64 lists: the best k items of `scores` (R, N) among those each request allows."""
    return best_k(filtered_scores(scores, examples, catalog, k), k).astype(np.int64)


class Baseline:
    """A scorer over the catalog; `recommend` ranks its scores behind the shared post-filter."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        """(R, N) float32 scores, higher is better."""
        raise NotImplementedError

    def recommend(self, examples: Sequence[Example], k: int) -> np.ndarray:
        """(R, k) int64 ranked lists."""
        return top_k(self.scores(examples), examples, self.catalog, k)


class Popularity(Baseline):
    """Most training positives first, the same list for every request."""

    def __init__(self, catalog: Catalog, popularity: np.ndarray) -> None:
        super().__init__(catalog)
        self.popularity = popularity.astype(np.float32)  # (N,)

    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        return np.broadcast_to(self.popularity, (len(examples), len(self.popularity))).copy()


class CentroidKNN(Baseline):
    """Cosine between each item's feature row and the mean of the seeds' feature rows."""

    def __init__(self, catalog: Catalog, features: np.ndarray) -> None:
        super().__init__(catalog)
        self.features = features.astype(np.float32)  # (N, F)
        self.unit = unit_rows(self.features)  # (N, F)

    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        seeds = seed_matrix(examples, self.catalog.n_items)  # (R, N)
        centroid = seeds @ self.features / seeds.sum(1, keepdims=True)  # (R, F)
        return unit_rows(centroid) @ self.unit.T  # (R, N)


def mmr_rerank(relevance: np.ndarray, unit: np.ndarray, k: int, lam: float, pool: int = 200,
               chunk: int = 256) -> np.ndarray:
    """(R, k) maximal marginal relevance (Carbonell & Goldstein 1998) lists from the top `pool` items of
    `relevance` (R, N; -inf = not allowed, so filter first): next = argmax_i lam * rel_i - (1 - lam) *
    max_{j chosen} cos(x_i, x_j), with `unit` (N, F) unit-norm item vectors x. Rows go `chunk` at a time."""
    out = np.empty((len(relevance), k), dtype=np.int64)
    for start in range(0, len(relevance), chunk):
        rows = slice(start, start + chunk)
        candidates = best_k(relevance[rows], min(max(pool, k), relevance.shape[1]))  # (C, M)
        rel = np.take_along_axis(relevance[rows], candidates, axis=1)  # (C, M), -inf = not allowed
        blocked = ~np.isfinite(rel)  # (C, M) grows with the chosen items
        rel = np.where(blocked, 0.0, rel)
        x = unit[candidates]  # (C, M, F)
        sim = x @ x.transpose(0, 2, 1)  # (C, M, M)
        idx = np.arange(len(candidates))
        max_sim = np.zeros(candidates.shape, dtype=np.float32)  # (C, M) to the chosen items; no penalty at first
        for step in range(k):  # greedy: each position depends on the previous ones
            value = np.where(blocked, -np.inf, lam * rel - (1.0 - lam) * max_sim)  # (C, M)
            pick = value.argmax(1)  # (C,)
            out[rows, step] = candidates[idx, pick]
            blocked[idx, pick] = True
            max_sim = sim[idx, pick] if step == 0 else np.maximum(max_sim, sim[idx, pick])
    return out


class MMR(CentroidKNN):
    """`mmr_rerank` of the centroid-kNN scores, cosine similarity of item feature rows."""

    def __init__(self, catalog: Catalog, features: np.ndarray, lam: float, pool: int = 200) -> None:
        super().__init__(catalog, features)
        self.lam, self.pool = lam, pool

    def recommend(self, examples: Sequence[Example], k: int) -> np.ndarray:
        relevance = filtered_scores(self.scores(examples), examples, self.catalog, k)  # (R, N), filter first
        return mmr_rerank(relevance, self.unit, k, self.lam, self.pool)


class ItemKNN(Baseline):
    """Sum over seeds of the cosine between item columns of the training matrix X (U, N)."""

    def __init__(self, catalog: Catalog, train_matrix: np.ndarray) -> None:
        super().__init__(catalog)
        self.x = train_matrix.astype(np.float32)  # (U, N)
        self.norm = np.maximum(np.linalg.norm(self.x, axis=0), 1e-12)  # (N,)

    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        seeds = seed_matrix(examples, self.catalog.n_items) / self.norm  # (R, N)
        # sum_s x_s . x_j / (|x_s| |x_j|) = ((sum_s x_s / |x_s|) . x_j) / |x_j|
        return (seeds @ self.x.T) @ self.x / self.norm  # (R, N)


def ease_weights(train_matrix: np.ndarray | sp.spmatrix, lam: float) -> torch.Tensor:
    """(N, N) float32 EASE B = I - P diagMat(1 / diag P), zero diagonal, solved over items with a positive."""
    dense = train_matrix.toarray() if sp.issparse(train_matrix) else np.ascontiguousarray(train_matrix)
    x = torch.from_numpy(dense).to(torch.float64)  # (U, N)
    warm = torch.nonzero(x.sum(0) > 0).squeeze(1)  # (W,)
    p = ease_inverse(x[:, warm], lam)  # (W, W)
    b_warm = p.div_(-torch.diagonal(p).clone())  # B_ij = -P_ij / P_jj off the diagonal
    b_warm.fill_diagonal_(0.0)
    rows = torch.zeros(len(warm), x.shape[1], dtype=torch.float32)  # (W, N)
    rows[:, warm] = b_warm.float()
    b = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32)  # (N, N)
    b[warm] = rows
    return b


def neighbour_scores(rows: Neighbours, seed_multi_hot: torch.Tensor) -> torch.Tensor:
    """(R, N) float32 sums of the seeds' sparse rows (`core.numerics.seed_row_sum`) for a seed multi-hot (R, N)."""
    device = seed_multi_hot.device
    requests, seeds = (seed_multi_hot != 0).nonzero(as_tuple=True)
    width = int(torch.bincount(requests, minlength=len(seed_multi_hot)).max()) if len(requests) else 1
    padded = torch.zeros(len(seed_multi_hot), width, dtype=torch.long, device=device)  # (R, S) seeds, padded
    mask = torch.zeros(padded.shape, dtype=torch.bool, device=device)
    slot = torch.arange(len(requests), device=device) - torch.searchsorted(requests, requests)  # position in row
    padded[requests, slot], mask[requests, slot] = seeds, True
    return seed_row_sum(rows, padded, mask)


class NeighbourScores(Baseline):
    """Sum of the seeds' rows of a sparse item-item matrix (e.g. EASE's B truncated to each item's top m)."""

    def __init__(self, catalog: Catalog, rows: Neighbours) -> None:
        super().__init__(catalog)
        self.rows = rows

    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        seeds = torch.from_numpy(seed_matrix(examples, self.catalog.n_items))  # (R, N)
        return neighbour_scores(self.rows, seeds).numpy()


class EASE(Baseline):
    """Embarrassingly shallow autoencoder; `neighbours` and `prior_scores` also serve the model as a prior.

    Exact (dense B, (N, N)) when the catalog has at most `popular` warm items (ml-latest-small: 9,742 items, all
    exact); above that, the approximation of evaluation/neighbours.py: B is never formed, each item keeps its top
    `neighbours` entries (EASE on the `popular` most popular items, scaled item-kNN for the rest), and the scores are
    the sums of those sparse seed rows. Defaults: model.prior_items and model.prior_neighbours."""

    def __init__(self, catalog: Catalog, train_matrix: np.ndarray | sp.spmatrix, lam: float,
                 popular: int = ModelConfig.prior_items, neighbours: int = ModelConfig.prior_neighbours) -> None:
        super().__init__(catalog)
        self.lam, self.m = lam, neighbours
        self.exact = int((np.asarray(train_matrix.sum(0)).ravel() > 0).sum()) <= popular
        self.B = ease_weights(train_matrix, lam) if self.exact else None  # (N, N) float32, small N only
        self.rows = None if self.exact else build_neighbours(train_matrix, lam, neighbours, popular)
        self._on_device: dict[torch.device, torch.Tensor | Neighbours] = {}

    def neighbours(self, m: int) -> Neighbours:
        """Each item's top-m neighbours of B (float32 values): the model's prior, the rewards' relevance."""
        if self.exact:
            return top_neighbours(self.B, m)
        if m > self.m:
            raise ValueError(f"this EASE kept {self.m} neighbours per item; {m} asked (build it with neighbours={m})")
        return Neighbours(self.rows.indices[:, :m].contiguous(), self.rows.values[:, :m].contiguous())

    def prior_scores(self, seed_multi_hot: torch.Tensor) -> torch.Tensor:
        """(R, N) = seed_multi_hot (R, N) @ B, i.e. the sum of B's seed rows; on the input's device."""
        device = seed_multi_hot.device
        if device not in self._on_device:
            self._on_device[device] = self.B.to(device) if self.exact else self.rows.to(device)
        if self.exact:
            return torch.sparse.mm(seed_multi_hot.float().to_sparse(), self._on_device[device])
        return neighbour_scores(self._on_device[device], seed_multi_hot)

    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        seeds = torch.from_numpy(seed_matrix(examples, self.catalog.n_items))  # (R, N)
        return self.prior_scores(seeds).numpy()


def tune_ease(data: Dataset, examples_val: Sequence[Example], lambdas: Sequence[float],
              k: int = 10) -> tuple[float, dict[float, float]]:
    """(best lambda, {lambda: mean NDCG@k}) on the family A validation examples; EASE fit on training users."""
    family_a = [e for e in examples_val if e.family == "A"]
    if not family_a:
        raise ValueError("tune_ease needs family A validation examples")
    relevant = item_mask([e.targets for e in family_a], data.catalog.n_items)  # (R, N)
    table = {}
    for lam in lambdas:
        lists = EASE(data.catalog, data.train_sparse, lam).recommend(family_a, k)
        table[float(lam)] = float(ranking_metrics(lists, relevant, [k])[f"ndcg@{k}"].mean())
    return max(table, key=table.get), table


def build_baselines(data: Dataset, features: np.ndarray, cfg: EvalConfig, ease_lambda: float,
                    popular: int = ModelConfig.prior_items,
                    neighbours: int = ModelConfig.prior_neighbours) -> dict[str, Baseline]:
    """Every baseline of DESIGN section 2, by display name (EASE approximated above `popular` warm items)."""
    cat = data.catalog
    return {"popularity": Popularity(cat, data.train_popularity), "centroid-kNN": CentroidKNN(cat, features),
            "MMR": MMR(cat, features, cfg.mmr_lambda), "item-kNN": ItemKNN(cat, data.train_matrix),
            "EASE": EASE(cat, data.train_sparse, ease_lambda, popular, neighbours)}
