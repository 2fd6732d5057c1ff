"""Held-out NDCG: how well a list ranks the training user's held-out positives (the benchmark's metric).

NDCG@k = sum_{i<k} hit_i / log2(i + 2) / sum_{i < min(k, |T|)} 1 / log2(i + 2), binary gains, a repeated item
counted at its first position only; 0 for a list whose targets are unknown (empty). The same code as the
benchmark: `evaluation.metrics.ranking_metrics`.
"""

from __future__ import annotations

import numpy as np

from evaluation.metrics import item_mask, ranking_metrics
from rewards.base import Reward, RewardBatch, RewardContext


class NDCGReward(Reward):
    """NDCG@k of each list against its held-out targets, in [0, 1]."""

    def __init__(self, k: int = 10) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.k = k
        self.name = "ndcg" if k == 10 else f"ndcg@{k}"

    def __call__(self, batch: RewardBatch, ctx: RewardContext) -> np.ndarray:
        relevant = item_mask(batch.targets, ctx.catalog.n_items)  # (R, N)
        return ranking_metrics(batch.lists, relevant, [self.k])[f"ndcg@{self.k}"]
