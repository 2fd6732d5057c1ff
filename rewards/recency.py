"""Recency: the mean half-life recency bonus of a list's items.

recency = (1/K) sum_i 2^(-(y_max - y_{l_i}) / h), y_max the newest year of the catalog and h the request's Recency
half_life; items of unknown year score 0; 0 for a request without a Recency half_life. In [0, 1]. Bonuses
come from `catalog.requests.soft_bonus` (the sampler's soft bonus) restricted to the half-life.
"""

from __future__ import annotations

import numpy as np

from catalog.requests import soft_bonus
from core.carriers import Recency, Request
from rewards.base import Reward, RewardBatch, RewardContext


class RecencyReward(Reward):
    """Mean half-life recency bonus per list item."""

    name = "recency"

    def __call__(self, batch: RewardBatch, ctx: RewardContext) -> np.ndarray:
        out = np.zeros(len(batch))
        bonus: dict[float, np.ndarray] = {}  # one (N,) bonus per distinct half-life
        for r, request in enumerate(batch.requests):
            half_lives = [c.half_life for c in request.constraints if isinstance(c, Recency) and c.half_life]
            if not half_lives:
                continue
            for h in half_lives:  # a request may, oddly, carry two; their bonuses add up as in soft_bonus
                if h not in bonus:
                    bonus[h] = soft_bonus(ctx.catalog, Request(seeds=(), constraints=(Recency(half_life=h),)))
                out[r] += bonus[h][batch.lists[r]].astype(np.float64).mean()
        return out
