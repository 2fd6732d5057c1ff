"""Intent read off a seed set: the attribute values that every seed shares, and the seeds' common decade.

A practitioner facing "these three movies" reads the intent straight off the seeds: if all of them are comedies
from the 1990s, more 1990s comedies are a good bet. `IntentIndex.scores` is that reading, for every attribute field
of the catalog (not only MovieLens genres) plus the decade: for each request, the number of shared values an item
matches. The intent rival in `evaluation/` adds it to a scorer as a soft boost, and the model uses it as part of
its prior (`model.prior=ease+intent`). Both go through the same two torch functions, `shared_values` and
`intent_counts`, on the same (N, V) multi-hot, so the rival and the model read the same intent.

Example:
    intent = IntentIndex(catalog)
    boost = intent.scores([e.request.seeds for e in examples])  # (R, N) float32, 0..(shared values)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from catalog.schema import Catalog
from core.numerics import intent_counts, shared_values

DECADE = "decade"


class IntentIndex:
    """Items' attribute values and decade as one (N, V) multi-hot, to find what a seed set shares.

    `parts` (V,) names each column's part by its index in `part_names` (the attribute fields, then "decade"), so a
    scorer may weigh the parts apart."""

    def __init__(self, catalog: Catalog, fields: Sequence[str] | None = None, decade: bool = True) -> None:
        names = sorted(catalog.attributes) if fields is None else list(fields)
        columns = [catalog.attribute_matrix(name)[0] for name in names]
        if decade:
            decades = np.where(catalog.years > 0, catalog.years // 10 * 10, -1)
            known = np.unique(decades[decades > 0])
            columns.append(decades[:, None] == known[None, :])  # unknown years match no decade
            names.append(DECADE)
        self.part_names = names
        self.parts = np.concatenate([np.full(c.shape[1], p, np.int64) for p, c in enumerate(columns)]) if columns \
            else np.zeros(0, np.int64)  # (V,)
        self.values = np.concatenate(columns, axis=1).astype(np.float32) if columns \
            else np.zeros((catalog.n_items, 0), np.float32)  # (N, V)

    def shared(self, seeds: Sequence[Sequence[int]]) -> np.ndarray:
        """(R, V) bool: the values that every seed of each request has."""
        width = max((len(s) for s in seeds), default=0)
        padded = torch.zeros((len(seeds), width), dtype=torch.long)
        mask = torch.zeros((len(seeds), width), dtype=torch.bool)
        for r, ids in enumerate(seeds):
            padded[r, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
            mask[r, :len(ids)] = True
        return shared_values(torch.from_numpy(self.values), padded, mask).numpy()

    def scores(self, seeds: Sequence[Sequence[int]]) -> np.ndarray:
        """(R, N) float32: how many of the request's shared values each item has."""
        values = torch.from_numpy(self.values)
        return intent_counts(values, torch.from_numpy(self.shared(seeds))).numpy()
