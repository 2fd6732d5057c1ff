"""Relevance to the seeds: the mean standardised relevance of a list's items to the request's seed set.

rel_j = sum_{s in seeds} M[s, j] with M the context's sparse relevance (each item's top-m neighbours of EASE's B, the
model's prior), or, when
there is none, rel_j = cos(x_j, mean_{s in seeds} x_s) over the unit feature rows. z_j = (rel_j - mu) / sigma with
mu, sigma over the request's valid items (as the model standardises its prior; sigma floored at 1e-6), and
relevance = (1/K) sum_i z_{l_i}. About 0 for a random valid list, positive when the list beats the average item.
"""

from __future__ import annotations

import numpy as np
import torch

from catalog.requests import valid_mask
from core.carriers import Request
from core.numerics import masked_zscore, seed_row_sum, unit_rows
from rewards.base import Reward, RewardBatch, RewardContext


def standardised_relevance(request: Request, ctx: RewardContext) -> np.ndarray:
    """(N,) float64 z-scored relevance of every item to the request's seeds, standardised over its valid items."""
    seeds = list(request.seeds)
    if not seeds:
        return np.zeros(ctx.catalog.n_items)
    if ctx.relevance is not None:
        with torch.no_grad():
            index = torch.tensor([seeds], device=ctx.relevance.indices.device)
            raw = seed_row_sum(ctx.relevance, index, torch.ones_like(index, dtype=torch.bool))[0]
        raw = raw.cpu().numpy().astype(np.float64)  # (N,)
    else:
        centroid = ctx.features[seeds].mean(0).astype(np.float64)  # (F,)
        raw = ctx.features @ unit_rows(centroid)  # (N,)
    valid = valid_mask(ctx.catalog, request)
    if not valid.any():
        return np.zeros(ctx.catalog.n_items)
    return masked_zscore(raw, valid)


class RelevanceReward(Reward):
    """Mean z-scored seed relevance of each list's items."""

    name = "relevance"

    def __call__(self, batch: RewardBatch, ctx: RewardContext) -> np.ndarray:
        out = np.empty(len(batch))
        z: dict[Request, np.ndarray] = {}  # one (N,) row per distinct request (rollouts share requests)
        for r, request in enumerate(batch.requests):
            if request not in z:
                z[request] = standardised_relevance(request, ctx)
            out[r] = z[request][batch.lists[r]].mean()
        return out
