"""Sparse item-item neighbours at any catalog size: the model's prior, the rewards' relevance and EASE at large N.

EASE's B is dense (N, N) and its fit inverts an (N, N) Gram matrix, which stops fitting in memory well below
N = 1e5 (issue 16). `build_neighbours` never forms an (N, N) array; it keeps each item's top-m row entries
(core.numerics.Neighbours, memory N x m) and builds them in two parts:
- the P most popular warm items (P = model.prior_items): exact EASE fitted on their columns of X only
  (a (P, P) solve), each row truncated to its m largest entries; their neighbours are popular items only;
- every other warm item: item-kNN, the cosine between columns of X (sparse products, `chunk` rows at a time),
  each row's m largest, scaled by one factor so that the mean row sum of its values equals that of the EASE rows
  (a seed set mixing both kinds then weighs them alike).
Items without a training positive get an all-zero row (as in exact EASE). When the warm items number at most P, the
result is exact EASE truncated to top m (`core.numerics.top_neighbours` of `evaluation.baselines.ease_weights`).

The train matrix X (U, N) may be a dense numpy array or a scipy sparse matrix (binary positives).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from core.numerics import Neighbours


def ease_inverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """(W, W) P = (X^T X + lam I)^-1 for x (U, W) float64, through whichever of U, W is smaller."""
    if not lam > 0:  # the Woodbury form divides by lam: 0 would give a NaN B, not an error
        raise ValueError(f"EASE lambda must be positive, got {lam:g}")
    users, items = x.shape
    if users < items:  # Woodbury: P = (I - X^T (lam I_U + X X^T)^-1 X) / lam
        inner = x @ x.T  # (U, U)
        inner.diagonal().add_(lam)
        p = x.T @ torch.cholesky_solve(x, torch.linalg.cholesky(inner))  # (W, W)
        p.neg_()
        p.diagonal().add_(1.0)
        return p.div_(lam)
    gram = x.T @ x  # (W, W)
    gram.diagonal().add_(lam)
    return torch.cholesky_inverse(torch.linalg.cholesky(gram))


def sparse_columns(train_matrix: np.ndarray | sp.spmatrix) -> sp.csc_matrix:
    """X (U, N) as a float32 CSC matrix (columns = items)."""
    return sp.csc_matrix(train_matrix, dtype=np.float32)


def popular_items(x: sp.csc_matrix, popular: int) -> tuple[np.ndarray, np.ndarray]:
    """(the up-to-P most popular warm items, sorted; the other warm items, sorted) by training positives."""
    counts = np.diff(x.indptr)  # (N,) positives per item
    warm = np.flatnonzero(counts > 0)
    order = warm[np.argsort(-counts[warm], kind="stable")]
    return np.sort(order[:popular]), np.sort(order[popular:])


def sparse_top(rows: sp.csr_matrix, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's m largest stored entries of a sparse (C, N) matrix -> indices (C, m) int32, values (C, m) float32;
    a row with fewer stored entries pads with index 0, value 0. Vectorised: one sort over the non-zeros."""
    rows.sort_indices()
    counts = np.diff(rows.indptr)
    row_of = np.repeat(np.arange(rows.shape[0]), counts)
    order = np.lexsort((-rows.data, row_of))  # grouped by row (already ascending), largest value first
    rank = np.arange(len(order)) - np.repeat(rows.indptr[:-1], counts)  # position within its row after the sort
    keep = rank < m
    indices = np.zeros((rows.shape[0], m), dtype=np.int32)
    values = np.zeros((rows.shape[0], m), dtype=np.float32)
    indices[row_of[keep], rank[keep]] = rows.indices[order[keep]]
    values[row_of[keep], rank[keep]] = rows.data[order[keep]]
    return indices, values


def ease_block(x: sp.csc_matrix, items: np.ndarray, lam: float, m: int, chunk: int = 1024) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """EASE fitted on the columns `items` (P,) of X only, each row's m largest entries as global item indices
    -> indices (P, m) int32, values (P, m) float32. Memory (P, P) float64 (or (U, U) when U < P)."""
    block = x[:, items]  # (U, P) sparse
    users = block.shape[0]
    if users < len(items):  # Woodbury through a (U, U) solve on the dense (U, P) block, smaller than (P, P)
        p = ease_inverse(torch.from_numpy(block.toarray()).double(), lam)
    else:
        gram = torch.from_numpy((block.T @ block).toarray()).double()  # (P, P) from a sparse product
        gram.diagonal().add_(lam)
        p = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    b = p.div_(-torch.diagonal(p).clone())  # B_ij = -P_ij / P_jj, zero diagonal
    b.fill_diagonal_(-torch.inf)  # never its own neighbour
    m_block = min(m, len(items) - 1)
    indices = np.zeros((len(items), m), dtype=np.int32)
    values = np.zeros((len(items), m), dtype=np.float32)
    for start in range(0, len(items), chunk):
        top = b[start: start + chunk].topk(m_block, dim=1)
        indices[start: start + chunk, :m_block] = items[top.indices.numpy()]
        values[start: start + chunk, :m_block] = top.values.float().numpy()
    return indices, values


def knn_block(x: sp.csc_matrix, items: np.ndarray, m: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Item-kNN rows of `items` (R,): cos(x_i, x_j) over the columns of X, each row's m largest (itself excluded)
    -> indices (R, m) int32, values (R, m) float32; sparse products of `chunk` rows at a time."""
    norms = np.sqrt(np.asarray(x.multiply(x).sum(0)).ravel())  # (N,)
    unit = (x @ sp.diags(1.0 / np.maximum(norms, 1e-12))).tocsc().astype(np.float32)  # (U, N) unit columns
    unit_t = unit.T.tocsr()  # (N, U)
    indices = np.zeros((len(items), m), dtype=np.int32)
    values = np.zeros((len(items), m), dtype=np.float32)
    for start in tqdm(range(0, len(items), chunk), desc="item-kNN neighbours", unit="chunk",
                      disable=len(items) <= 8 * chunk):
        rows = items[start: start + chunk]
        sims = (unit_t[rows] @ unit).tocoo()  # (C, N) sparse cosines
        other = sims.col != rows[sims.row]  # drop each row's self-similarity
        sims = sp.csr_matrix((sims.data[other], (sims.row[other], sims.col[other])), shape=sims.shape)
        indices[start: start + len(rows)], values[start: start + len(rows)] = sparse_top(sims, m)
    return indices, values


def build_neighbours(train_matrix: np.ndarray | sp.spmatrix, lam: float, m: int, popular: int) -> Neighbours:
    """Each item's top-m relevance neighbours (module docstring): exact EASE on the `popular` most popular warm
    items, scaled item-kNN cosine for the other warm items, zero rows for cold items. Never forms (N, N)."""
    x = sparse_columns(train_matrix)
    n = x.shape[1]
    top, rest = popular_items(x, popular)
    indices = np.zeros((n, m), dtype=np.int32)
    values = np.zeros((n, m), dtype=np.float32)
    if len(top) > 1:
        indices[top], values[top] = ease_block(x, top, lam, m)
    if len(rest):
        indices[rest], values[rest] = knn_block(x, rest, m)
        if len(top) > 1:  # one factor: the mean row sum of the kNN rows equals that of the EASE rows
            knn_sum = values[rest].sum(1).mean()
            values[rest] *= values[top].sum(1).mean() / max(float(knn_sum), 1e-12)
    return Neighbours(torch.from_numpy(indices), torch.from_numpy(values))
