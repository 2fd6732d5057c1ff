"""Diversity: intra-list diversity (ILD) of item features.

ILD = mean over position pairs i < j of 1 - cos(x_{l_i}, x_{l_j}), in [0, 2] (0 for a one-item list). The same code
as the benchmark: `evaluation.metrics.intra_list_diversity`.
"""

from __future__ import annotations

import numpy as np

from evaluation.metrics import intra_list_diversity
from rewards.base import Reward, RewardBatch, RewardContext


class DiversityReward(Reward):
    """ILD of each list over the context's unit feature rows."""

    name = "diversity"

    def __call__(self, batch: RewardBatch, ctx: RewardContext) -> np.ndarray:
        return intra_list_diversity(batch.lists, ctx.features)
