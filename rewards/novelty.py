"""Novelty: mean self-information of a list's items under training popularity.

novelty = mean_i -log2((c_i + 1) / (U + 1)), c_i the training users with item i as a positive and U the number of
training users; >= 0, higher for rarer items. The same code as the benchmark: `evaluation.metrics.novelty`.
"""

from __future__ import annotations

import numpy as np

from evaluation.metrics import novelty
from rewards.base import Reward, RewardBatch, RewardContext


class NoveltyReward(Reward):
    """Mean -log2 of the smoothed popularity share of each list's items."""

    name = "novelty"

    def __call__(self, batch: RewardBatch, ctx: RewardContext) -> np.ndarray:
        return novelty(batch.lists, ctx.popularity, ctx.n_users)
