"""Rivals a practitioner would use instead of the retriever (DESIGN section 2), each tuned on validation only.

- `IntentBoost`: intent read off the seeds on top of any scorer: z-scored base scores (over each request's allowed
  items) + w * the number of attribute values and decade that all seeds share and the item has
  (`catalog.intent.IntentIndex`). A large w puts items carrying the shared intent first, a soft boost (k stays
  fillable). Applied to EASE and to the best of the learned rivals.
- `ALS`: implicit-feedback matrix factorisation (Hu, Koren & Volinsky 2008) through the `implicit` library, fit on
  the training users; a request's user factors are solved from its seed set (`recalculate_user`: confidence
  alpha on the seeds, 1 elsewhere, ridge `regularization`), scores = user factors . item factors.
- `TwoTower` (+ MMR over its item embeddings) and `MultVAE`: `evaluation/neural_rivals.py`.

`Rivals.tune` searches each rival's grid (`evaluation/tuning.py`: the mean over families of validation NDCG@10,
grids extended at their edges) and `Rivals.build` fits the rivals with given parameters; both share fitted models,
so tuning then building fits each model once. Every rival is a `Baseline`: `recommend` goes through the shared
hard-constraint post-filter.

Example:
    rivals = Rivals(data, cfg.eval, ease, seed=0)
    tuned = rivals.tune(ValidationSet(data.catalog, val_examples))  # {name: Tuned}
    methods = rivals.build(tuned)  # {"ALS": ..., "EASE + intent": ..., ...}
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from catalog.dataset import Dataset
from catalog.intent import IntentIndex
from catalog.requests import valid_mask
from catalog.schema import atomic_write
from core.carriers import Example
from core.numerics import masked_zscore
from evaluation.baselines import EASE, Baseline, filtered_scores, mmr_rerank, seed_matrix
from evaluation.neural_rivals import MultVAE, NeuralRival, TwoTower, fit_within_budget
from evaluation.tuning import Params, Tuned, ValidationSet, objective, tune

VERSION = 2  # part of the tuning cache's key: bump when a rival's code changes what tuning would find
LEARNED = ("ALS", "two-tower", "Mult-VAE")  # candidates for "X + intent"
LIMITS = {"factors": (2, 512), "regularization": (1e-6, 1e6), "alpha": (1e-3, 1e4), "temperature": (1e-3, 10.0),
          "beta": (1e-4, 1.0), "lam": (0.0, 1.0), "weight": (0.0, 1e6)}


def standardise(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """(R, N) z-scores of `scores`, with mean and standard deviation over each row's allowed items."""
    return masked_zscore(scores, allowed).astype(np.float32)


class IntentBoost(Baseline):
    """z-scored `base` scores + `weight` * the count of the seeds' shared values an item has."""

    def __init__(self, base: Baseline, weight: float, intent: IntentIndex) -> None:
        super().__init__(base.catalog)
        self.base, self.weight, self.intent = base, float(weight), intent

    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        allowed = np.stack([valid_mask(self.catalog, e.request) for e in examples])  # (R, N)
        z = standardise(self.base.scores(examples), allowed)
        return z + self.weight * self.intent.scores([e.request.seeds for e in examples])


class ALS(Baseline):
    """Implicit ALS item factors from the training users; a request's factors solved from its seeds."""

    def __init__(self, data: Dataset, factors: int, regularization: float, alpha: float, seed: int,
                 iterations: int = 15, threads: int = 1) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        super().__init__(data.catalog)
        # implicit runs its own OpenMP threads (fit and recalculate_user) and calls BLAS inside them: BLAS threads
        # there only contend, and OpenBLAS prints a warning per call (16 per request at 256 factors)
        with threadpool_limits(1, "blas"):
            self.model = AlternatingLeastSquares(factors=int(factors), regularization=float(regularization),
                                                 alpha=float(alpha), iterations=iterations, random_state=seed,
                                                 num_threads=threads)
            self.model.fit(sp.csr_matrix(data.train_matrix), show_progress=False)

    def user_factors(self, examples: Sequence[Example]) -> np.ndarray:
        """(R, F) least-squares user factors of each request's seed set (confidence alpha on the seeds)."""
        seeds = sp.csr_matrix(seed_matrix(examples, self.catalog.n_items))
        with threadpool_limits(1, "blas"):
            return self.model.recalculate_user(np.arange(len(examples)), seeds)

    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        return self.user_factors(examples) @ self.model.item_factors.T  # (R, N)


class EmbeddingMMR(Baseline):
    """MMR re-ranking (`mmr_rerank`) of a two-tower's scores, similarity = cosine of its item-tower vectors."""

    def __init__(self, tower: TwoTower, lam: float, pool: int = 200) -> None:
        super().__init__(tower.catalog)
        self.tower, self.lam, self.pool = tower, float(lam), pool
        self.unit = tower.item_vectors().detach().numpy()  # (N, D)

    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        return self.tower.scores(examples)

    def recommend(self, examples: Sequence[Example], k: int) -> np.ndarray:
        relevance = filtered_scores(self.scores(examples), examples, self.catalog, k)
        return mmr_rerank(relevance, self.unit, k, self.lam, self.pool)


class Rivals:
    """Fits, tunes and builds the rivals on one dataset. `grids`: {rival: {parameter: [values]}} (a one-value list
    is fixed; the neural rivals' `epochs` is their starting budget, doubled while its last epoch validates best, and
    the epoch kept is chosen on validation every `every`)."""

    def __init__(self, data: Dataset, grids: dict[str, dict[str, list[float]]], extensions: int, every: int,
                 ease: EASE, seed: int, k: int = 10, threads: int = 1) -> None:
        self.data, self.grids, self.extensions, self.every = data, grids, extensions, every
        self.ease, self.seed, self.k, self.threads = ease, seed, k, threads
        self.intent = IntentIndex(data.catalog)
        self.fitted: dict[str, Baseline] = {}  # json [name, params] -> fitted rival

    def make(self, name: str, params: Params) -> Baseline:
        """The rival `name` fitted with `params` (resolved: the neural rivals' `stop` included); memoised."""
        key = json.dumps([name, params], sort_keys=True)
        if key not in self.fitted:
            self.fitted[key] = self._fit(name, params)
        return self.fitted[key]

    def _neural(self, name: str, params: Params, stop: int | None) -> NeuralRival:
        cat, x, epochs = self.data.catalog, self.data.train_matrix, int(params["epochs"])
        if name == "two-tower":
            return TwoTower(cat, x, int(params["dim"]), params["temperature"], epochs, stop, self.seed)
        return MultVAE(cat, x, params["beta"], epochs, stop, self.seed)

    def _fit(self, name: str, params: Params) -> Baseline:
        if name == "ALS":
            return ALS(self.data, int(params["factors"]), params["regularization"], params["alpha"], self.seed,
                       threads=self.threads)
        if name in ("two-tower", "Mult-VAE"):
            return self._neural(name, params, int(params["stop"])).fit()
        raise ValueError(f"unknown rival {name!r}")

    def _tune_neural(self, name: str, val: ValidationSet) -> Tuned:
        def evaluate(params: Params) -> tuple[dict[str, float], Params]:
            model, epochs, stop = fit_within_budget(lambda e, s: self._neural(name, {**params, "epochs": e}, s),
                                                    int(params["epochs"]), self.every,
                                                    lambda m: objective(val.family_ndcg(m.scores(val.examples))),
                                                    self.extensions)
            resolved = {**params, "epochs": epochs, "stop": stop}
            self.fitted[json.dumps([name, resolved], sort_keys=True)] = model
            return val.family_ndcg(model.scores(val.examples)), resolved
        return tune(evaluate, self.grids[name], self.extensions, LIMITS)

    def _tune_intent(self, base: Baseline, val: ValidationSet) -> Tuned:
        z = standardise(base.scores(val.examples), val.allowed)  # (R, N), computed once for every weight
        shared = self.intent.scores([e.request.seeds for e in val.examples])  # (R, N)
        return tune(lambda p: (val.family_ndcg(z + p["weight"] * shared), p), self.grids["intent"],
                    self.extensions, LIMITS)

    def tune(self, val: ValidationSet, learned: Sequence[str] = LEARNED) -> dict[str, Tuned]:
        """{rival: Tuned} for every rival, on the validation set; one progress line per rival. `learned`: the learned
        rivals to tune (the others, and two-tower + MMR without two-tower, are left out)."""
        out: dict[str, Tuned] = {}

        def step(name: str, run) -> None:
            start = time.time()
            out[name] = run()
            print(f"rival {name}: {out[name].params} validation NDCG@10 "
                  + ", ".join(f"{f} {v:.4f}" for f, v in out[name].families.items())
                  + f" ({len(out[name].points)} points, {time.time() - start:.0f}s)", flush=True)

        if unknown := set(learned) - set(LEARNED):
            raise ValueError(f"unknown learned rival(s) {sorted(unknown)}; known: {', '.join(LEARNED)}")
        if "ALS" in learned:
            step("ALS", lambda: tune(lambda p: (val.family_ndcg(self.make("ALS", p).scores(val.examples)), p),
                                     self.grids["ALS"], self.extensions, LIMITS))
        for name in ("two-tower", "Mult-VAE"):
            if name in learned:
                step(name, functools.partial(self._tune_neural, name, val))
        if "two-tower" in learned:
            tower = self.make("two-tower", out["two-tower"].params)
            step("two-tower + MMR", lambda: tune(lambda p: (val.lists_ndcg(EmbeddingMMR(tower, p["lam"]).recommend(
                val.examples, self.k)), p), self.grids["two-tower + MMR"], self.extensions, LIMITS))
        step("EASE + intent", lambda: self._tune_intent(self.ease, val))
        if not learned:
            return out
        best = max(learned, key=lambda name: out[name].score)
        step(f"{best} + intent", lambda: self._tune_intent(self.make(best, out[best].params), val))
        return out

    def build(self, tuned: dict[str, Tuned]) -> dict[str, Baseline]:
        """{rival: Baseline} fitted with the tuned parameters (fitted models of other grid points are dropped)."""
        out: dict[str, Baseline] = {}
        for name, result in tuned.items():
            if name == "two-tower + MMR":
                tower = self.make("two-tower", tuned["two-tower"].params)
                out[name] = EmbeddingMMR(tower, result.params["lam"])  # type: ignore[arg-type]
            elif name.endswith(" + intent"):
                base_name = name.removesuffix(" + intent")
                base = self.ease if base_name == "EASE" else self.make(base_name, tuned[base_name].params)
                out[name] = IntentBoost(base, result.params["weight"], self.intent)
            else:
                out[name] = self.make(name, result.params)
        keep = {json.dumps([name, tuned[name].params], sort_keys=True) for name in LEARNED if name in tuned}
        self.fitted = {key: model for key, model in self.fitted.items() if key in keep}
        return out


def load_or_tune(rivals: Rivals, val: ValidationSet, path: Path, key: dict) -> dict[str, Tuned]:
    """{rival: Tuned} from `path` when it was written with the same `key` (data, requests, grids, ...), else tuned
    on `val` and written there."""
    key = {**key, "version": VERSION}
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return {name: Tuned.from_json(value) for name, value in cached["rivals"].items()}
    tuned = rivals.tune(val)
    value = {"key": key, "rivals": {name: result.to_json() for name, result in tuned.items()}}
    atomic_write(path, lambda p: p.write_text(json.dumps(value, indent=2)))
    return tuned


def best_per_family(methods: dict[str, Baseline], val: ValidationSet,
                    k: int) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """({family: the method with the highest validation NDCG@10 there}, {method: {family: NDCG@10}})."""
    table = {name: val.lists_ndcg(method.recommend(val.examples, k)) for name, method in methods.items()}
    families = sorted({f for scores in table.values() for f in scores})
    return {f: max(table, key=lambda name: table[name][f]) for f in families}, table
