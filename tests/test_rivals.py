"""Tests of the rivals (evaluation/rivals.py, evaluation/neural_rivals.py) and their tuner (evaluation/tuning.py):
contract (shape, finite, deterministic, the shared post-filter), the intent boost on a hand-built catalog, ALS's
solved user factors against a direct ridge solve, the grid extension, the neural rivals' epoch choice and the
doubling of a budget whose last epoch validates best, and the "best rival" rows of the report. Tiny synthetic data;
seconds."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from test_evaluation import make_catalog, random_examples, tiny_dataset

from catalog.dataset import Dataset
from catalog.intent import IntentIndex
from catalog.requests import valid_mask
from core.carriers import Example, Request
from core.config import EvalConfig
from evaluation.baselines import EASE, Popularity, build_baselines
from evaluation.metrics import list_metrics
from evaluation.neural_rivals import MultVAE, TwoTower, fit_neural, fit_within_budget
from evaluation.report import evaluate_methods
from evaluation.rivals import ALS, IntentBoost, Rivals, best_per_family, load_or_tune, standardise
from evaluation.tuning import ValidationSet, tune

TINY_GRIDS = {"ALS": {"factors": [4], "regularization": [1.0], "alpha": [2.0]},
              "two-tower": {"temperature": [0.1], "dim": [8], "epochs": [3]},
              "two-tower + MMR": {"lam": [0.5, 0.9]},
              "Mult-VAE": {"beta": [0.2], "epochs": [3]},
              "intent": {"weight": [0.5, 5.0]}}


def tiny_rivals(data: Dataset, seed: int = 0) -> Rivals:
    return Rivals(data, TINY_GRIDS, extensions=1, every=1, ease=EASE(data.catalog, data.train_matrix, 10.0), seed=seed)


def val_set(data: Dataset, seed: int = 11) -> ValidationSet:
    return ValidationSet(data.catalog, random_examples(data, 40, k=8, seed=seed))


@pytest.mark.usefixtures("single_thread")
def test_rivals_contract(tmp_path):
    """Every tuned rival: (R, N) finite scores, the same from a second, independent tuning and fitting with the
    same seed (and the cache), and lists with no seed, negative, duplicate or constraint violation."""
    data = tiny_dataset(21)
    val, test = val_set(data), random_examples(data, 60, k=8, seed=12)
    first = tiny_rivals(data)
    tuned = load_or_tune(first, val, tmp_path / "rivals.json", {"data": 1})
    built = first.build(tuned)
    assert {"ALS", "two-tower", "two-tower + MMR", "Mult-VAE", "EASE + intent"} <= set(built)
    assert sum(name.endswith(" + intent") for name in built) == 2
    again = tiny_rivals(data).build(load_or_tune(tiny_rivals(data), val, tmp_path / "other.json", {"data": 1}))
    cached = tiny_rivals(data).build(load_or_tune(tiny_rivals(data), val, tmp_path / "rivals.json", {"data": 1}))
    allowed = np.stack([valid_mask(data.catalog, e.request) for e in test])
    for name, rival in built.items():
        scores = rival.scores(test)
        assert scores.shape == (60, data.catalog.n_items) and np.isfinite(scores).all(), name
        np.testing.assert_array_equal(scores, again[name].scores(test), err_msg=name)
        np.testing.assert_array_equal(scores, cached[name].scores(test), err_msg=name)
        lists = rival.recommend(test, 8)
        assert np.take_along_axis(allowed, lists, axis=1).all(), name
        m = list_metrics(lists, test, data, np.eye(data.catalog.n_items, dtype=np.float32), [8])
        assert (m["duplicates"] == 0).all() and (m["seed_leak"] == 0).all(), name


@pytest.mark.usefixtures("single_thread")
def test_tuning_some_learned_rivals():
    """`learned=("ALS",)` tunes ALS, EASE + intent and ALS + intent only, as the full tuning finds them; an unknown
    name is refused."""
    data = tiny_dataset(21)
    val = val_set(data)
    some = tiny_rivals(data).tune(val, learned=("ALS",))
    assert set(some) == {"ALS", "EASE + intent", "ALS + intent"}
    full = tiny_rivals(data).tune(val)
    assert all(some[name].params == full[name].params for name in ("ALS", "EASE + intent"))
    assert set(tiny_rivals(data).build(some)) == set(some)
    with pytest.raises(ValueError, match="unknown learned rival"):
        tiny_rivals(data).tune(val, learned=("EASE",))


def test_intent_boost_puts_shared_values_first():
    """Items 0-3 Horror (1990s: 0, 1, 2; 1970s: 3), items 4-9 Comedy (1990s). Seeds 0 and 1 share Horror and the
    1990s. Popularity favours 9, 8, ... 2 (base = item index), so w = 0 ranks 9, 8, 7 first; w = 100 ranks item 2
    (Horror + 1990s = 2 shared values) first, then the 1990s Comedies 9, 8, ..., 4 and 3 (Horror only) tie at one
    value and the base decides: 9 before 3 since z(9) > z(3)."""
    genres = [("Horror",)] * 4 + [("Comedy",)] * 6
    years = [1991, 1995, 1998, 1975] + [1990 + i for i in range(6)]
    cat = make_catalog(genres, years)
    base = Popularity(cat, np.arange(10, dtype=np.float32))
    ex = [Example(Request((0, 1)), (2,), 0, "B", 2)]
    intent = IntentIndex(cat)
    np.testing.assert_array_equal(intent.scores([(0, 1)])[0], [2, 2, 2, 1, 1, 1, 1, 1, 1, 1])
    assert IntentBoost(base, 0.0, intent).recommend(ex, 3).tolist() == [[9, 8, 7]]
    assert IntentBoost(base, 100.0, intent).recommend(ex, 4).tolist() == [[2, 9, 8, 7]]
    z = standardise(np.arange(10, dtype=np.float32)[None], valid_mask(cat, ex[0].request)[None])[0]
    assert z[2:].mean() == pytest.approx(0.0, abs=1e-6) and z[2:].std() == pytest.approx(1.0, abs=1e-5)


def test_als_user_factors_are_a_ridge_solve():
    """ALS's user factors for a seed set s solve min_x sum_i c_i (p_i - x . y_i)^2 + reg |x|^2 with the fitted item
    factors Y, p_i = 1 and c_i = alpha on the seeds, p_i = 0 and c_i = 1 elsewhere:
    x = (Y^T C Y + reg I)^-1 Y^T C p = (Y^T Y + (alpha - 1) sum_s y_s y_s^T + reg I)^-1 alpha sum_s y_s."""
    data = tiny_dataset(22)
    als = ALS(data, factors=6, regularization=0.5, alpha=3.0, seed=0)
    examples = random_examples(data, 5, k=4, seed=13)
    y = als.model.item_factors.astype(np.float64)  # (N, F)
    for example, x in zip(examples, als.user_factors(examples)):
        ys = y[list(example.request.seeds)]
        a = y.T @ y + 2.0 * ys.T @ ys + 0.5 * np.eye(6)
        np.testing.assert_allclose(x, np.linalg.solve(a, 3.0 * ys.sum(0)), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(als.scores(examples), als.user_factors(examples) @ als.model.item_factors.T)


def test_als_runs_blas_on_one_thread_inside_its_own_threads(capfd):
    """implicit solves users in its own OpenMP threads and calls BLAS inside them: with BLAS threads there, OpenBLAS
    prints "Detect OpenMP Loop" per call (16 per request at 256 factors; 22,992 lines in a MovieTweetings job).
    Two implicit threads, 256 factors: the fit and the solved user factors print nothing."""
    data = tiny_dataset(23, n_items=300, n_users=60)
    als = ALS(data, factors=256, regularization=1.0, alpha=3.0, seed=0, iterations=2, threads=2)
    scores = als.scores(random_examples(data, 20, k=4, seed=14))
    assert np.isfinite(scores).all()
    assert "OpenBLAS" not in capfd.readouterr().err


def peaked(best: float, params: dict) -> tuple[dict[str, float], dict]:
    """Validation score -(log2 x - log2 best)^2 with its maximum at x = best; y changes nothing."""
    return {"A": -(math.log2(params["x"]) - math.log2(best)) ** 2, "B": 0.0}, params


def test_tune_extends_the_grid_at_its_edge():
    """Grid x in {1, 2, 4}, peak at 32: extended 8, 16, 32, then 64 (lower: 32 is no longer at an edge). With two
    extensions it ends at 16; a limit of 10 stops it at 8; a peak inside the grid adds nothing; a one-value
    parameter (y) is never extended. A float grid {1, 2} with its peak at 0.3 grows down to 0.5, 0.25 (best) and
    0.125 (worse: |log2 0.125 - log2 0.3| = 1.26 > 0.26)."""
    tuned = tune(functools.partial(peaked, 32.0), {"x": [4, 1, 2], "y": [7]}, extensions=10)
    assert tuned.grid == {"x": [1, 2, 4, 8, 16, 32, 64], "y": [7]} and tuned.params == {"x": 32, "y": 7}
    assert len(tuned.points) == 7 and tuned.families["A"] == 0.0
    assert tune(functools.partial(peaked, 32.0), {"x": [1, 2, 4]}, 2).grid["x"] == [1, 2, 4, 8, 16]
    assert tune(functools.partial(peaked, 32.0), {"x": [1, 2, 4]}, 10, {"x": (0, 10)}).params == {"x": 8}
    assert tune(functools.partial(peaked, 2.0), {"x": [1, 2, 4]}, 10).grid["x"] == [1, 2, 4]
    low = tune(functools.partial(peaked, 0.3), {"x": [1.0, 2.0]}, 10)
    assert low.grid["x"] == [0.125, 0.25, 0.5, 1.0, 2.0] and low.params == {"x": 0.25}


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("kind", ["two-tower", "Mult-VAE"])
def test_fit_neural_keeps_the_best_epoch(kind):
    """A validation score that peaks at epoch 2 of 4: the kept model is the one a fresh fit stopped at epoch 2 gives
    (seeded), and differs from the epoch-4 model."""
    data = tiny_dataset(23)
    examples = random_examples(data, 10, k=4, seed=14)

    def make(stop):
        if kind == "two-tower":
            return TwoTower(data.catalog, data.train_matrix, 8, 0.1, epochs=4, stop=stop, seed=3)
        return MultVAE(data.catalog, data.train_matrix, 0.2, epochs=4, stop=stop, seed=3, hidden=16, latent=4)

    calls = iter([0.1, 0.5, 0.3, 0.2])  # epochs 1..4
    model, epoch = fit_neural(make, 1, lambda m: next(calls))
    assert epoch == 2 and model.stop == 2
    np.testing.assert_array_equal(model.scores(examples), make(2).fit().scores(examples))
    assert not np.array_equal(model.scores(examples), make(None).fit().scores(examples))


@pytest.mark.usefixtures("single_thread")
def test_a_budget_whose_last_epoch_validates_best_doubles():
    """Validation peaks at epoch 3: a 2-epoch budget keeps its last epoch, so it doubles to 4, which keeps epoch 3
    (the same weights as a fresh 4-epoch fit stopped at 3); a score that never peaks doubles the budget
    `extensions` times and stops there."""
    data = tiny_dataset(23)
    examples = random_examples(data, 10, k=4, seed=14)

    def make(epochs, stop):
        return TwoTower(data.catalog, data.train_matrix, 8, 0.1, epochs=epochs, stop=stop, seed=3)

    def peak_at(epoch):
        seen = {"model": None, "epochs": 0}

        def validate(model):  # every = 1: called once per epoch of each fit
            if model is not seen["model"]:
                seen.update(model=model, epochs=0)
            seen["epochs"] += 1
            return -abs(seen["epochs"] - epoch)
        return validate

    model, budget, stop = fit_within_budget(make, 2, 1, peak_at(3), extensions=3)
    assert (budget, stop) == (4, 3)
    np.testing.assert_array_equal(model.scores(examples), make(4, 3).fit().scores(examples))
    assert fit_within_budget(make, 1, 1, peak_at(100), extensions=2)[1:] == (4, 4)
    assert fit_within_budget(make, 4, 1, peak_at(2), extensions=2)[1:] == (4, 2)


def test_best_rival_rows():
    """best_per_family picks each family's best on validation; a "best rival" composite row holds, for each request,
    the lists of its family's pick, so its NDCG equals that method's per family and its paired difference is 0."""
    data = tiny_dataset(24)
    features = np.random.default_rng(1).normal(size=(data.catalog.n_items, 4)).astype(np.float32)
    baselines = build_baselines(data, features, EvalConfig(), ease_lambda=10.0)
    best, table = best_per_family(baselines, val_set(data, 15), k=8)
    assert set(best) == {"A", "B"}
    assert all(table[best[f]][f] == max(t[f] for t in table.values()) for f in best)
    chosen = {"A": "popularity", "B": "EASE"}
    methods = {name: functools.partial(baselines[name].recommend, k=8) for name in ("popularity", "EASE", "MMR")}
    results = evaluate_methods(methods, random_examples(data, 50, k=8, seed=16), data, EvalConfig(ks=[4, 8],
                               bootstrap=50), ("best rival",), features=features, composites={"best rival": chosen})
    for family, name in chosen.items():
        assert results[family]["best rival"]["ndcg@4"] == pytest.approx(results[family][name]["ndcg@4"])
        assert results[family][name]["ndcg@4_vs_best rival"] == pytest.approx(0.0)
    assert results["A"]["MMR"]["ndcg@4_vs_best rival"] == pytest.approx(
        results["A"]["MMR"]["ndcg@4"] - results["A"]["popularity"]["ndcg@4"])


@pytest.mark.usefixtures("single_thread")
def test_tuning_cache_is_keyed(tmp_path):
    """rivals.json is reused for the same key (even by a Rivals with another grid: the caller puts the grids in the
    key) and retuned for another key."""
    data, path = tiny_dataset(25), tmp_path / "rivals.json"
    val = val_set(data)
    first = load_or_tune(tiny_rivals(data), val, path, {"grids": 1})
    other = Rivals(data, {**TINY_GRIDS, "intent": {"weight": [7.0]}}, 1, 1, EASE(data.catalog, data.train_matrix,
                   10.0), seed=0)
    assert load_or_tune(other, val, path, {"grids": 1})["EASE + intent"].params == first["EASE + intent"].params
    assert load_or_tune(other, val, path, {"grids": 2})["EASE + intent"].params == {"weight": 7.0}
