"""Validation tuning of the rivals: a grid search whose grid grows when the best value sits at its edge.

`tune` evaluates every point of a product grid, then, while the best value of some parameter is the first or last
of its list, adds one value beyond that edge (geometric step for positive grids, arithmetic otherwise, rounded for
grids given as ints, clipped by `limits`) and evaluates it with the other parameters at their best (a line search). It
does so at most `extensions` times per parameter and records the grid it ended on. `ValidationSet` scores (R, N)
score matrices on validation requests: the objective is the mean over families of the family's mean NDCG@10, so
family A's three seed sizes do not outweigh family B.

Example:
    val = ValidationSet(data.catalog, examples(ws, "val"))
    tuned = tune(lambda p: (val.family_ndcg(ALS(cat, x, **p).scores(val.examples)), p), {"alpha": [1, 10]}, 3)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from catalog.requests import valid_mask
from catalog.schema import Catalog
from core.carriers import Example
from evaluation.baselines import best_k
from evaluation.metrics import item_mask, ranking_metrics

Params = dict[str, float]
Evaluate = Callable[[Params], tuple[dict[str, float], Params]]  # params -> (NDCG@10 per family, resolved params)


class ValidationSet:
    """Validation examples with their allowed items and targets, to score many (R, N) score matrices quickly."""

    def __init__(self, catalog: Catalog, examples: Sequence[Example], k: int = 10) -> None:
        if not examples:
            raise ValueError("tuning needs validation examples")
        self.examples, self.k = list(examples), k
        self.allowed = np.stack([valid_mask(catalog, e.request) for e in self.examples])  # (R, N)
        self.relevant = item_mask([e.targets for e in self.examples], catalog.n_items)  # (R, N)
        self.families = np.array([e.family for e in self.examples])

    def family_ndcg(self, scores: np.ndarray) -> dict[str, float]:
        """{family: mean NDCG@k} of the lists that `scores` (R, N) give behind the hard-constraint filter."""
        if not np.isfinite(scores).all():
            raise ValueError("a rival produced non-finite validation scores")
        return self.lists_ndcg(best_k(np.where(self.allowed, scores, -np.inf), self.k))

    def lists_ndcg(self, lists: np.ndarray) -> dict[str, float]:
        """{family: mean NDCG@k} of ranked lists (R, >= k)."""
        ndcg = ranking_metrics(lists, self.relevant, [self.k])[f"ndcg@{self.k}"]
        return {str(f): float(ndcg[self.families == f].mean()) for f in sorted(set(self.families))}


def objective(families: dict[str, float]) -> float:
    """The tuning objective: the mean over families of their mean NDCG@10."""
    return float(np.mean(list(families.values())))


@dataclass
class Tuned:
    """A tuning result: the best resolved parameters, their validation scores, the grid it ended on, every point."""

    params: Params
    families: dict[str, float]
    grid: dict[str, list[float]]
    points: list[dict] = field(default_factory=list)

    @property
    def score(self) -> float:
        return objective(self.families)

    def to_json(self) -> dict:
        return {"params": self.params, "validation_ndcg@10": self.families, "objective": self.score,
                "grid": self.grid, "points": self.points}

    @classmethod
    def from_json(cls, value: dict) -> Tuned:
        return cls(value["params"], value["validation_ndcg@10"], value["grid"], value["points"])


def beyond(values: Sequence[float], low_edge: bool, integer: bool, limits: tuple[float, float] | None) -> float | None:
    """The next value past the low or high edge of a sorted grid (rounded, and >= 1, for an integer grid), or None
    when `limits` forbid it."""
    a, b = (values[0], values[1]) if low_edge else (values[-1], values[-2])
    new = a * a / b if a > 0 and b > 0 else a + (a - b)  # geometric for positive grids
    if integer:
        new = max(round(new), 1)
    lo, hi = limits if limits is not None else (-np.inf, np.inf)
    if not lo <= new <= hi or new in values:
        return None
    return new


def tune(evaluate: Evaluate, grid: dict[str, Sequence[float]], extensions: int,
         limits: dict[str, tuple[float, float]] | None = None) -> Tuned:
    """Grid search maximising `objective`, extending a parameter's grid (at most `extensions` times) while its best
    value is at an edge. Ties keep the first point evaluated."""
    limits = limits or {}
    integer = {name: all(isinstance(v, int) for v in vs) for name, vs in grid.items()}  # a grid of ints stays ints
    values = {name: sorted(vs if integer[name] else [float(v) for v in vs]) for name, vs in grid.items()}
    seen: dict[tuple, tuple[dict[str, float], Params]] = {}
    points: list[dict] = []

    def run(params: Params) -> None:
        key = tuple(params[name] for name in values)
        if key not in seen:
            seen[key] = evaluate(dict(params))
            families, resolved = seen[key]
            points.append({"params": dict(params), "resolved": resolved, "validation_ndcg@10": families})

    def best_key() -> tuple:
        return max(seen, key=lambda key: objective(seen[key][0]))  # max keeps the first of equal scores

    for combo in itertools.product(*values.values()):
        run(dict(zip(values, combo)))
    added = dict.fromkeys(values, 0)
    while True:
        best = dict(zip(values, best_key()))
        moves = []
        for name, vs in values.items():
            if len(vs) < 2 or added[name] >= extensions or best[name] not in (vs[0], vs[-1]):
                continue
            new = beyond(vs, best[name] == vs[0], integer[name], limits.get(name))
            if new is not None:
                moves.append((name, new))
        if not moves:
            break
        for name, new in moves:
            values[name] = sorted([*values[name], new])
            added[name] += 1
            run({**best, name: new})
    families, resolved = seen[best_key()]
    return Tuned(resolved, families, values, points)
