"""Intent read off a seed set: the attribute values that every seed shares, and the seeds' common decade.

A practitioner facing "these three movies" reads the intent straight off the seeds: if all of them are comedies
from the 1990s, more 1990s comedies are a good bet. `IntentIndex.scores` is that reading, for every attribute field
of the catalog (not only MovieLens genres) plus the decade: for each request, the number of shared values an item
matches. The intent rival in `evaluation/` adds it to a scorer as a soft boost, and the model may use it as a prior.

Example:
    intent = IntentIndex(catalog)
    boost = intent.scores([e.request.seeds for e in examples])  # (R, N) float32, 0..(shared values)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from catalog.schema import Catalog


class IntentIndex:
    """Items' attribute values and decade as one (N, V) multi-hot, to find what a seed set shares."""

    def __init__(self, catalog: Catalog, fields: Sequence[str] | None = None, decade: bool = True) -> None:
        names = sorted(catalog.attributes) if fields is None else list(fields)
        columns = [catalog.attribute_matrix(name)[0] for name in names]
        if decade:
            decades = np.where(catalog.years > 0, catalog.years // 10 * 10, -1)
            known = np.unique(decades[decades > 0])
            columns.append(decades[:, None] == known[None, :])  # unknown years match no decade
        self.values = np.concatenate(columns, axis=1).astype(np.float32) if columns \
            else np.zeros((catalog.n_items, 0), np.float32)  # (N, V)

    def shared(self, seeds: Sequence[Sequence[int]]) -> np.ndarray:
        """(R, V) bool: the values that every seed of each request has."""
        out = np.zeros((len(seeds), self.values.shape[1]), dtype=bool)
        for r, ids in enumerate(seeds):
            out[r] = self.values[list(ids)].all(axis=0)
        return out

    def scores(self, seeds: Sequence[Sequence[int]]) -> np.ndarray:
        """(R, N) float32: how many of the request's shared values each item has."""
        return self.shared(seeds).astype(np.float32) @ self.values.T
