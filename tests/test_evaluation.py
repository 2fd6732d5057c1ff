"""Tests of evaluation/: metrics on hand-worked lists, EASE against a direct ridge solve, baseline invariants,
bootstrap intervals and the report's shape. Tiny synthetic catalogs only; the whole file runs in seconds."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from catalog.dataset import Dataset
from catalog.requests import valid_mask
from catalog.schema import Catalog, Interactions
from core.carriers import Example, Exclude, Recency, Request, Require
from core.config import EvalConfig
from evaluation.baselines import EASE, build_baselines, ease_weights, top_k, tune_ease
from evaluation.metrics import (
    bootstrap_ci,
    constraint_satisfaction,
    coverage,
    duplicate_rate,
    intra_list_diversity,
    item_mask,
    list_metrics,
    novelty,
    paired_bootstrap,
    ranking_metrics,
    seed_leak_rate,
)
from evaluation.report import evaluate_methods, format_table

GENRES = ("Action", "Comedy", "Drama", "Horror")


def make_catalog(genres: list[tuple[str, ...]], years: list[int]) -> Catalog:
    n = len(genres)
    empty = Interactions(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.int64))
    return Catalog(item_ids=np.arange(100, 100 + n, dtype=np.int64), titles=[f"item {i}" for i in range(n)],
                   attributes={"genre": genres}, years=np.asarray(years, dtype=np.int32),
                   popularity=np.zeros(n, dtype=np.int64), interactions=empty, name="tiny")


def tiny_dataset(seed: int, n_items: int = 50, n_users: int = 40) -> Dataset:
    """Random genres (1-2 of 4), years 1980-2019 (10% unknown), 3-12 positives per user; users 0-23 train."""
    rng = np.random.default_rng(seed)
    genres = [tuple(sorted(rng.choice(GENRES, size=rng.integers(1, 3), replace=False))) for _ in range(n_items)]
    years = np.where(rng.random(n_items) < 0.1, 0, rng.integers(1980, 2020, n_items))
    positives = {u: np.sort(rng.choice(n_items, size=rng.integers(3, 13), replace=False)) for u in range(n_users)}
    users = np.arange(n_users)
    return Dataset(make_catalog(genres, list(years)), positives, users[:24], users[24:32], users[32:])


def random_examples(data: Dataset, n: int, k: int, seed: int) -> list[Example]:
    """Random requests with seeds, negatives and a random hard constraint, kept when >= k items are allowed."""
    rng = np.random.default_rng(seed)
    n_items, out = data.catalog.n_items, []
    while len(out) < n:
        items = rng.choice(n_items, size=rng.integers(2, 9), replace=False)
        s = int(rng.integers(1, len(items)))
        kind = rng.integers(4)
        constraints = [(), (Exclude("genre", str(rng.choice(GENRES))),), (Require("genre", str(rng.choice(GENRES))),),
                       (Recency(min_year=int(rng.integers(1985, 2005))),)][kind]
        request = Request(tuple(int(i) for i in items[:s]), tuple(int(i) for i in items[s:s + 2]), constraints, k)
        if valid_mask(data.catalog, request).sum() >= k:
            targets = tuple(int(i) for i in rng.choice(n_items, size=3, replace=False))
            out.append(Example(request, targets, user=len(out), family="AB"[int(kind > 0)], seed_size=s))
    return out


def test_ranking_metrics_hand_worked():
    """Row 0: list [5, 1, 7, 2], targets {1, 2, 9}: hits at ranks 2 and 4.
    @2: recall 1/2, NDCG = (1/log2 3) / (1 + 1/log2 3) = 0.63093 / 1.63093 = 0.38685, hit 1.
    @4: recall 2/3, NDCG = (1/log2 3 + 1/log2 5) / (1 + 1/log2 3 + 1/2) = 1.06161 / 2.13093 = 0.49819.
    Row 1: list [3, 3, 4, 0], targets {3}: the repeated 3 counts once -> recall 1, NDCG 1 at both K.
    Row 2: list [0, 4, 6, 8], targets {9}: all 0."""
    lists = np.array([[5, 1, 7, 2], [3, 3, 4, 0], [0, 4, 6, 8]])
    relevant = item_mask([(1, 2, 9), (3,), (9,)], 10)
    m = ranking_metrics(lists, relevant, [2, 4])
    np.testing.assert_allclose(m["recall_min@2"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(m["ndcg@2"], [0.38685, 1.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(m["hit@2"], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(m["recall_min@4"], [2 / 3, 1.0, 0.0])
    np.testing.assert_allclose(m["ndcg@4"], [0.49819, 1.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(duplicate_rate(lists), [0.0, 0.25, 0.0])
    assert m["ndcg@4"][0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3) + 0.5))


def test_list_metrics_hand_worked():
    """Items: 0 Action 1990, 1 Comedy 2005, 2 Action+Comedy unknown year, 3 Drama 2010.
    Exclude Comedy, seeds (0,), negatives (3,), list [3, 1]: sat 1/2 (1 is Comedy), leak 1/2 (3 is a negative).
    Recency(2000), list [1, 3]: sat 1; list [2, 0]: sat 0 (unknown year fails, 1990 < 2000).
    Features 0 (1, 0), 1 (0, 1), 3 (2, 0): ILD of [0, 1, 3] = ((1 - 0) + (1 - 1) + (1 - 0)) / 3 = 2/3.
    Popularity (3, 1, 0, 3) of U = 3 users: -log2(4/4) = 0, -log2(2/4) = 1, -log2(1/4) = 2 -> novelty of [0, 1, 2] = 1.
    Coverage of [[0, 1], [1, 2]] over 4 items = 3/4."""
    cat = make_catalog([("Action",), ("Comedy",), ("Action", "Comedy"), ("Drama",)], [1990, 2005, 0, 2010])
    requests = [Request((0,), (3,), (Exclude("genre", "Comedy"),)), Request((2,), (), (Recency(min_year=2000),)),
                Request((1,), (), (Recency(min_year=2000),))]
    lists = np.array([[3, 1], [1, 3], [2, 0]])
    np.testing.assert_allclose(constraint_satisfaction(lists, cat, requests), [0.5, 1.0, 0.0])
    np.testing.assert_allclose(seed_leak_rate(lists, requests, 4), [0.5, 0.0, 0.0])
    features = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    np.testing.assert_allclose(intra_list_diversity(np.array([[0, 1, 3]]), features), [2 / 3], atol=1e-6)
    np.testing.assert_allclose(novelty(np.array([[0, 1, 2]]), np.array([3, 1, 0, 3]), 3), [1.0])
    assert coverage(np.array([[0, 1], [1, 2]]), 4) == 0.75


@pytest.mark.parametrize("n_users, n_items", [(6, 10), (20, 8)])  # Woodbury path, direct path
def test_ease_equals_ridge_solve(n_users, n_items):
    """Column j of B is argmin_w ||X_j - X w||^2 + lam ||w||^2 with w_j = 0, i.e. the ridge solution
    (X_-j^T X_-j + lam I)^-1 X_-j^T X_j on the other columns; item 3 has no positive, so its row and column are 0."""
    rng = np.random.default_rng(0)
    x = (rng.random((n_users, n_items)) < 0.4).astype(np.float32)
    x[:, 3] = 0.0
    lam = 2.0
    b = ease_weights(x, lam).double().numpy()
    x64 = x.astype(np.float64)
    for j in range(n_items):
        others = [i for i in range(n_items) if i != j]
        a = x64[:, others]
        w = np.linalg.solve(a.T @ a + lam * np.eye(n_items - 1), a.T @ x64[:, j])
        np.testing.assert_allclose(b[others, j], w, atol=1e-6)
    np.testing.assert_array_equal(np.diag(b), 0.0)
    np.testing.assert_array_equal(b[3], 0.0)
    np.testing.assert_array_equal(b[:, 3], 0.0)


def test_ease_refuses_a_lambda_that_is_not_positive():
    """lam = 0 would divide by zero in the Woodbury form and give a NaN B; it is an error instead."""
    x = np.eye(4, 6, dtype=np.float32)
    with pytest.raises(ValueError, match="EASE lambda must be positive, got 0"):
        ease_weights(x, 0.0)


def test_ease_prior_scores_sum_seed_rows():
    """prior_scores(multi-hot) = sum of B's seed rows; scores(examples) is the same thing in numpy."""
    data = tiny_dataset(1)
    ease = EASE(data.catalog, data.train_matrix, 5.0)
    seeds = torch.zeros(2, data.catalog.n_items)
    seeds[0, [1, 4]] = 1.0
    seeds[1, 7] = 1.0
    scores = ease.prior_scores(seeds)
    torch.testing.assert_close(scores[0], ease.B[1] + ease.B[4])
    torch.testing.assert_close(scores[1], ease.B[7])
    ex = [Example(Request((1, 4)), (2,), 0, "A", 2), Example(Request((7,)), (2,), 1, "A", 1)]
    np.testing.assert_allclose(ease.scores(ex), scores.numpy())


def test_baselines_respect_requests():
    """Over 200 random requests (seeds, negatives, Exclude / Require / Recency), no baseline returns a seed, a
    negative, a duplicate or an item its hard constraint rejects; the metrics agree (sat 1, dup 0, leak 0)."""
    data = tiny_dataset(2)
    features = np.random.default_rng(3).normal(size=(data.catalog.n_items, 6)).astype(np.float32)
    examples = random_examples(data, 200, k=8, seed=4)
    allowed = np.stack([valid_mask(data.catalog, e.request) for e in examples])  # (R, N)
    for name, baseline in build_baselines(data, features, EvalConfig(), ease_lambda=10.0).items():
        lists = baseline.recommend(examples, 8)
        assert lists.shape == (200, 8), name
        assert np.take_along_axis(allowed, lists, axis=1).all(), name
        assert all(len(set(row)) == 8 for row in lists.tolist()), name
        m = list_metrics(lists, examples, data, features, [4, 8])
        assert (m["constraint_sat"] == 1).all() and (m["duplicates"] == 0).all() and (m["seed_leak"] == 0).all()


def test_top_k_orders_and_refuses_short_requests():
    """Scores (0.1, 0.9, 0.5, 0.7, 0.3) with seed 1 excluded: top 3 = [3, 2, 4]. Require Horror with no Horror
    item allows nothing, so asking for k=2 raises instead of returning violators."""
    cat = make_catalog([("Action",)] * 5, [2000] * 5)
    scores = np.array([[0.1, 0.9, 0.5, 0.7, 0.3]], dtype=np.float32)
    assert top_k(scores, [Example(Request((1,)), (0,), 0, "A", 1)], cat, 3).tolist() == [[3, 2, 4]]
    with pytest.raises(ValueError, match="allows only 0 items"):
        top_k(scores, [Example(Request((1,), constraints=(Require("genre", "Action"), Exclude("genre", "Action"))),
                               (0,), 0, "B", 1)], cat, 2)


def test_bootstrap_ci_contains_mean_and_narrows():
    """Normal(0.5, 1) samples: the 95% interval contains the sample mean and is narrower for 5000 values than 50;
    the same seed gives the same interval; paired_bootstrap(a, a - 0.1) is exactly 0.1 with a zero-width interval."""
    rng = np.random.default_rng(5)
    small, large = rng.normal(0.5, 1.0, 50), rng.normal(0.5, 1.0, 5000)
    mean, lo, hi = bootstrap_ci(small, 500, seed=0)
    assert lo < mean < hi and mean == pytest.approx(small.mean())
    _, lo_large, hi_large = bootstrap_ci(large, 500, seed=0)
    assert lo_large < large.mean() < hi_large
    assert hi_large - lo_large < (hi - lo) / 4
    assert bootstrap_ci(small, 500, seed=0) == (mean, lo, hi)
    d, d_lo, d_hi = paired_bootstrap(small, small - 0.1, 300, seed=1)
    assert d == pytest.approx(0.1) and d_lo == pytest.approx(0.1) and d_hi == pytest.approx(0.1)


def test_bootstrap_resamples_whole_clusters():
    """Three identical requests per user: resampling users gives exactly the interval of the per-user values, and
    the request-level interval (which treats the copies as independent) is narrower; bad cluster shapes raise."""
    per_user = np.random.default_rng(6).normal(0.4, 0.2, 40)
    values, users = np.repeat(per_user, 3), np.repeat(np.arange(100, 140), 3)
    clustered = bootstrap_ci(values, 1000, seed=2, clusters=users)
    assert clustered == pytest.approx(bootstrap_ci(per_user, 1000, seed=2))
    _, lo, hi = bootstrap_ci(values, 1000, seed=2)
    assert hi - lo < 0.75 * (clustered[2] - clustered[1])
    assert paired_bootstrap(values, values - 0.1, 200, seed=3, clusters=users) == pytest.approx((0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="clusters need shape"):
        bootstrap_ci(values, 100, seed=0, clusters=users[:-1])


def test_evaluate_methods_and_table():
    """Two methods on family A (seed sizes 1..) and B examples: groups per family and per seed size, CIs around
    the means, the paired difference to the reference only for the other method, and a table naming both."""
    data = tiny_dataset(6)
    features = np.random.default_rng(7).normal(size=(data.catalog.n_items, 4)).astype(np.float32)
    examples = random_examples(data, 60, k=8, seed=8)
    baselines = build_baselines(data, features, EvalConfig(), ease_lambda=10.0)
    methods = {name: functools.partial(baselines[name].recommend, k=8) for name in ("popularity", "EASE")}
    cfg = EvalConfig(ks=[4, 8], bootstrap=100)
    results = evaluate_methods(methods, examples, data, cfg, features=features)
    assert {"A", "B"} <= set(results) and any(g.startswith("A/s=") for g in results)
    pop, ease = results["A"]["popularity"], results["A"]["EASE"]
    assert pop["ndcg@4_ci"][0] <= pop["ndcg@4"] <= pop["ndcg@4_ci"][1]
    assert pop["ndcg@4_vs_EASE"] == pytest.approx(pop["ndcg@4"] - ease["ndcg@4"])
    assert "ndcg@4_vs_EASE" not in ease and 0 < ease["coverage"] <= 1
    table = format_table(results)
    assert "popularity" in table and "EASE" in table and "== B" in table
    two = evaluate_methods(methods, examples, data, cfg, ("EASE", "popularity"), features=features)["A"]
    assert two["EASE"]["ndcg@4_vs_popularity"] == pytest.approx(-two["popularity"]["ndcg@4_vs_EASE"])
    header = format_table({"A": two}).splitlines()[1]
    assert "dNDCG@4 vs EASE" in header and "dNDCG@4 vs popularity" in header
    lam, grid = tune_ease(data, examples, [1.0, 10.0, 100.0], k=4)
    assert lam in grid and grid[lam] == max(grid.values())


def test_one_recommender_under_two_names_runs_once():
    """The same callable given under two names (H2PO that kept its start, scored beside MOST) makes its lists once,
    and both rows are the same; another callable with the same results runs on its own."""
    data = tiny_dataset(6)
    examples = random_examples(data, 30, k=8, seed=9)
    features = np.random.default_rng(7).normal(size=(data.catalog.n_items, 4)).astype(np.float32)
    ease = build_baselines(data, features, EvalConfig(), ease_lambda=10.0)["EASE"]
    calls = []

    def recommend(batch):
        calls.append(len(batch))
        return ease.recommend(batch, k=8)

    methods = {"MOST": recommend, "H2PO": recommend, "EASE": functools.partial(ease.recommend, k=8)}
    results = evaluate_methods(methods, examples, data, EvalConfig(ks=[4, 8], bootstrap=50), ("MOST",), features)
    assert calls == [len(examples)]
    assert results["A"]["H2PO"]["ndcg@8"] == results["A"]["MOST"]["ndcg@8"] == results["A"]["EASE"]["ndcg@8"]
    assert results["A"]["H2PO"]["ndcg@4_vs_MOST"] == 0.0
