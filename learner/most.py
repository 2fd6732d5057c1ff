"""MOST - Metric-Ordered Sequence Training (DESIGN section 4): target lists and the loss.

A training request's targets are the user's held-out positives sorted by the request-conditioned metric
M(i) = relevance(i, seeds) + matching Prefer weights + recency bonus - similarity to negatives, taken greedily
with an MMR redundancy penalty, then filled up to k with teacher items (the relevance scorer's best valid
items) at a lower loss weight. Ablations: "relevance" (sorted by relevance alone) and "random" order.
"""

from __future__ import annotations

import numpy as np
import torch

from core.carriers import Example
from core.numerics import masked_zscore


def metric_scores(relevance: np.ndarray, bonus: np.ndarray, features: np.ndarray,
                  negatives: tuple[int, ...]) -> np.ndarray:
    """M(i) for all items: z-scored relevance + soft bonus - max cosine to a negative.  (N,) -> (N,)"""
    z = masked_zscore(relevance)
    if negatives:
        z = z - (features @ features[list(negatives)].T).max(1)
    return z + bonus


def mmr_order(candidates: np.ndarray, score: np.ndarray, features: np.ndarray, redundancy: float, k: int) -> list[int]:
    """Greedy: argmax score(i) - redundancy * max cosine(i, already picked), up to k items."""
    picked: list[int] = []
    remaining = list(candidates)
    penalty = np.zeros(len(remaining))
    while remaining and len(picked) < k:
        j = int(np.argmax(score[remaining] - redundancy * penalty))
        item = remaining.pop(j)
        penalty = np.delete(penalty, j)
        picked.append(item)
        if remaining:
            penalty = np.maximum(penalty, features[remaining] @ features[item])
    return picked


def build_targets(examples: list[Example], relevance: np.ndarray, bonus: np.ndarray, valid: np.ndarray,
                  features: np.ndarray, k: int, order: str, redundancy: float, fill_weight: float,
                  rng: np.random.Generator, preferred: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered target lists x0 (B, K) and loss weights (B, K) (1 for held-out positives, fill_weight for fill).

    relevance, bonus (B, N) float; valid (B, N) bool; features (N, F) rows L2-normalised. Fill items are the
    most relevant valid non-targets, taken first from `preferred` (B, N) bool where given (the request's intent,
    e.g. a family B facet), then from the other valid items.
    """
    x0 = np.zeros((len(examples), k), dtype=np.int64)
    weights = np.zeros((len(examples), k), dtype=np.float32)
    for b, ex in enumerate(examples):
        targets = np.asarray(ex.targets, dtype=np.int64)
        if order == "random":
            ordered = list(rng.permutation(targets)[:k])
        elif order == "relevance":
            ordered = list(targets[np.argsort(-relevance[b, targets], kind="stable")][:k])
        else:
            score = metric_scores(relevance[b], bonus[b], features, ex.request.negatives)
            ordered = mmr_order(targets, score, features, redundancy, k)
        need = k - len(ordered)
        fill_score = np.where(valid[b], relevance[b], -np.inf)
        fill_score[targets] = -np.inf
        if preferred is not None:  # preferred items first: lift them above every other valid item
            lift = np.ptp(relevance[b]) + 1.0
            fill_score = np.where(preferred[b] & np.isfinite(fill_score), fill_score + lift, fill_score)
        fill = np.argpartition(-fill_score, need)[:need] if 0 < need < len(fill_score) else np.arange(need)
        fill = fill[np.argsort(-fill_score[fill], kind="stable")]
        if not np.isfinite(fill_score[fill]).all():
            raise ValueError(f"request {b}: fewer than k valid items to fill the targets")
        x0[b] = np.concatenate([np.asarray(ordered, dtype=np.int64), fill])
        weights[b, : len(ordered)] = 1.0
        weights[b, len(ordered):] = fill_weight
    return torch.from_numpy(x0), torch.from_numpy(weights)


def most_loss(nll: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_MOST = sum_b,k w_bk (1/t_b) 1[masked] (-log p(x0_bk | xt)) / sum_b,k w_bk.

    nll (B, K) are the per-slot ELBO terms of `model.diffusion.elbo_nll` (already 1/t-weighted, 0 where unmasked);
    weights (B, K) the target weights.
    """
    return (nll * weights).sum() / weights.sum().clamp_min(1e-8)
