"""The relevance numerics that the model's prior, the rewards, the rivals and MOST's targets share.

One definition each, so that a reward and the prior it mirrors cannot drift apart:
- `Neighbours`: a sparse item-item relevance matrix, each item's top-m neighbours (indices and values, (N, m) each):
  memory linear in N where a dense (N, N) matrix grows as N^2 (9,742^2 fp16 = 190 MB; 1e6^2 = 2 TB);
- `seed_row_sum`: relevance of every item to a seed set, the sum of the seeds' rows of the item-item matrix;
- `masked_zscore`: rows standardised over the entries a mask allows (population std, floored at STD_FLOOR);
- `unit_rows`: rows scaled to unit L2 norm (zero rows stay zero).
`masked_zscore` and `unit_rows` take a numpy array or a torch tensor and return the same kind (and dtype).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

STD_FLOOR = 1e-6  # a row whose allowed entries are all equal gets z = 0, not NaN
NORM_FLOOR = 1e-12

Array = np.ndarray | torch.Tensor


class Neighbours(NamedTuple):
    """Row i of a sparse item-item matrix M: M[i, indices[i, j]] = values[i, j], every other entry 0.

    indices (N, m) int32 or int64, values (N, m) float16 or float32. A row with fewer than m non-zeros pads with
    value 0 (any index). Built by `top_neighbours` from a dense matrix, or by evaluation/neighbours.py at large N."""

    indices: torch.Tensor  # (N, m)
    values: torch.Tensor  # (N, m)

    @property
    def n_items(self) -> int:
        return self.indices.shape[0]

    def to(self, device: torch.device | str) -> Neighbours:
        return Neighbours(self.indices.to(device), self.values.to(device))


def top_neighbours(matrix: torch.Tensor, m: int, chunk: int = 1024) -> Neighbours:
    """Each row's m largest entries of a dense (N, N) `matrix` (sorted, largest first), `chunk` rows at a time
    -> Neighbours with int32 indices and the matrix's values dtype. m >= N keeps every entry (exact)."""
    n = matrix.shape[0]
    m = min(m, matrix.shape[1])
    indices = torch.empty(n, m, dtype=torch.int32)
    values = torch.empty(n, m, dtype=matrix.dtype)
    for start in range(0, n, chunk):
        top = matrix[start: start + chunk].float().topk(m, dim=1, sorted=True)
        indices[start: start + chunk] = top.indices.to(torch.int32)
        values[start: start + chunk] = top.values.to(matrix.dtype)
    return Neighbours(indices, values)


def seed_row_sum(matrix: Neighbours, seeds: torch.Tensor, seed_mask: torch.Tensor) -> torch.Tensor:
    """Relevance of every item to a seed set: the sum of the seeds' rows of a sparse item-item matrix (e.g. EASE's B
    truncated to each item's top-m neighbours), scattered into (B, N): rel[b, j] = sum_s M[seeds[b, s], j].

    matrix Neighbours (N, m); seeds, seed_mask (B, S) padded -> (B, N) float32. Cost B x S x m, not B x S x N."""
    b = seeds.shape[0]
    columns = matrix.indices[seeds].long().reshape(b, -1)  # (B, S * m)
    weights = (matrix.values[seeds].float() * seed_mask[..., None]).reshape(b, -1)  # (B, S * m), padding 0
    out = torch.zeros(b, matrix.n_items, device=weights.device)
    return out.scatter_add_(1, columns, weights)


def masked_zscore(raw: Array, allowed: Array | None = None) -> Array:
    """(R, N) z-scores of `raw` (R, N), with mean and standard deviation over each row's allowed entries (all when
    `allowed` is None); a row allowing nothing is standardised as if it allowed one entry."""
    if isinstance(raw, np.ndarray):
        mask = None if allowed is None else torch.from_numpy(np.asarray(allowed))
        return masked_zscore(torch.from_numpy(raw), mask).numpy()
    weight = torch.ones_like(raw) if allowed is None else allowed.to(raw.dtype)
    count = weight.sum(-1, keepdim=True).clamp_min(1)
    mean = (raw * weight).sum(-1, keepdim=True) / count
    std = (((raw - mean) ** 2 * weight).sum(-1, keepdim=True) / count).sqrt().clamp_min(STD_FLOOR)
    return (raw - mean) / std


def unit_rows(x: Array) -> Array:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    if isinstance(x, np.ndarray):
        return unit_rows(torch.from_numpy(x)).numpy()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)


def shared_values(values: torch.Tensor, seeds: torch.Tensor, seed_mask: torch.Tensor) -> torch.Tensor:
    """(B, V) bool: the values that every seed of a request has (a request without seeds shares none).

    values (N, V) multi-hot (any dtype, non-zero = has); seeds, seed_mask (B, S) padded."""
    has = (values[seeds] != 0) | ~seed_mask[..., None]  # (B, S, V): padding has every value
    return has.all(1) & seed_mask.any(1, keepdim=True)


def intent_counts(values: torch.Tensor, shared: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) float32: sum over the request's shared values v of weights[v] * values[i, v] (weights (V,) or, per
    request, (B, V); default 1: the number of shared values item i has). values (N, V), shared (B, V) bool.

    Only the columns some request shares enter the product (a seed set shares a few values of thousands), so the
    cost is B x N x (shared columns), not B x N x V."""
    cols = shared.any(0).nonzero().squeeze(1)  # (C,)
    mine = shared[:, cols].float() if weights is None else shared[:, cols].float() * weights[..., cols]
    return mine @ values[:, cols].float().T
