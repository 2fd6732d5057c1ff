"""Intent match: how much of the seeds' shared intent a list keeps, computable at serving time.

For a request whose seeds share the values v_1..v_m (attribute values every seed has, and their common decade:
`catalog.intent.IntentIndex`), an item's match is the share of those values it has, c_j / m, and
intent = (1/K) sum_i c_{l_i} / m, in [0, 1]. A request whose seeds share nothing scores 0 for every list (so the
reward is constant within its group and adds no advantage).
"""

from __future__ import annotations

import numpy as np

from catalog.intent import IntentIndex
from rewards.base import Reward, RewardBatch, RewardContext


class IntentReward(Reward):
    """Mean share of the seeds' shared values that each list's items have."""

    name = "intent"

    def __init__(self) -> None:
        self._index: tuple[object, IntentIndex] | None = None  # (catalog, its index), built on first use

    def index(self, ctx: RewardContext) -> IntentIndex:
        if self._index is None or self._index[0] is not ctx.catalog:
            self._index = (ctx.catalog, IntentIndex(ctx.catalog))
        return self._index[1]

    def __call__(self, batch: RewardBatch, ctx: RewardContext) -> np.ndarray:
        index = self.index(ctx)
        shared = index.shared([r.seeds for r in batch.requests]).astype(np.float64)  # (R, V)
        counts = np.einsum("rkv,rv->rk", index.values[batch.lists], shared)  # (R, K) shared values per item
        return counts.mean(1) / np.maximum(shared.sum(1), 1.0)
