"""Prefer satisfaction: how much of the request's soft Prefer weight a list's items carry.

prefer = (1/K) sum_i sum_{Prefer(f, v, w) in request} w * [item l_i has v in f]; 0 for a request without Prefer.
Item weights come from `catalog.requests.soft_bonus` (the sampler's soft bonus) restricted to the Prefer constraints.
"""

from __future__ import annotations

import numpy as np

from catalog.requests import soft_bonus
from core.carriers import Prefer, Request
from rewards.base import Reward, RewardBatch, RewardContext


class PreferReward(Reward):
    """Mean matching Prefer weight per list item."""

    name = "prefer"

    def __call__(self, batch: RewardBatch, ctx: RewardContext) -> np.ndarray:
        out = np.zeros(len(batch))
        bonus: dict[tuple, np.ndarray] = {}  # one (N,) bonus per distinct Prefer tuple (rollouts share requests)
        for r, request in enumerate(batch.requests):
            prefers = tuple(c for c in request.constraints if isinstance(c, Prefer))
            if not prefers:
                continue
            if prefers not in bonus:
                bonus[prefers] = soft_bonus(ctx.catalog, Request(seeds=(), constraints=prefers)).astype(np.float64)
            out[r] = bonus[prefers][batch.lists[r]].mean()
        return out
