"""Item feature vectors x_i (DESIGN section 1): attribute multi-hot, hashed tags, year, popularity and
collaborative factors computed on the training split only."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from catalog.dataset import Dataset, stable_hash
from core.numerics import unit_rows

DECADES = np.arange(1900, 2030, 10)


def item_features(data: Dataset) -> np.ndarray:
    """(N, F) float32 feature matrix, each block scaled to unit-ish norm."""
    cat, cfg = data.catalog, data.cfg
    genres, _ = data.genres
    blocks = [genres / np.maximum(genres.sum(1, keepdims=True), 1)]
    if "tag" in cat.attributes:
        tags = np.zeros((cat.n_items, cfg.tag_buckets), dtype=np.float32)
        for n, values in enumerate(cat.attributes["tag"]):
            for v in values:
                tags[n, stable_hash(v) % cfg.tag_buckets] += 1.0
        blocks.append(unit_rows(tags))
    years = cat.years.astype(np.float32)
    known = years > 0
    decade = np.zeros((cat.n_items, len(DECADES)), dtype=np.float32)
    decade[known, np.clip(np.searchsorted(DECADES, years[known], side="right") - 1, 0, len(DECADES) - 1)] = 1.0
    year_scaled = np.where(known, (years - 1990.0) / 30.0, 0.0)[:, None]
    pop = np.log1p(data.train_popularity)[:, None]
    blocks += [decade, year_scaled, known[:, None].astype(np.float32), pop / max(pop.max(), 1.0)]
    blocks.append(cf_factors(data.train_sparse, cfg.cf_dim))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def cf_factors(train_matrix: np.ndarray | sp.spmatrix, dim: int, niter: int = 4) -> np.ndarray:
    """(N, dim) item factors V sqrt(S) from a truncated SVD of the (users x items) training matrix X, rows
    L2-normalised. Randomised subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4) on the item side, with
    a fixed seed: X may be dense or scipy sparse, and only (N, dim) and (U, dim) arrays are formed besides it, so
    memory is linear in N (torch.svd_lowrank on a torch sparse tensor took 77 s at N = 1e6, scipy's sparse products
    take seconds). Each factor's sign is fixed (its largest entry positive). Like svd_lowrank, the trailing factors
    still vary with the thread count (rounding in the QR steps), by as much as they differ from the exact SVD."""
    users, items = train_matrix.shape
    dim = min(dim, users, items)
    if dim == 0:
        return np.zeros((items, 0), dtype=np.float32)
    x = sp.csr_matrix(train_matrix, dtype=np.float32)  # (U, N)
    xt = x.T.tocsr()  # (N, U)

    def orthonormal(product: np.ndarray) -> np.ndarray:  # torch's QR: several times numpy's on (N, dim) blocks
        return torch.linalg.qr(torch.from_numpy(np.ascontiguousarray(product)))[0].numpy()

    rng = np.random.default_rng(0)
    basis = orthonormal(xt @ rng.standard_normal((users, dim), dtype=np.float32))  # (N, dim)
    for _ in range(niter):
        basis = orthonormal(xt @ orthonormal(x @ basis))
    _, s, wt = np.linalg.svd(x @ basis, full_matrices=False)  # X basis = U S W^T, so X ~ U S (basis W)^T
    v = torch.from_numpy(basis) @ torch.from_numpy(wt.T.copy())  # (N, dim) right singular vectors
    v = v * torch.sign(v.gather(0, v.abs().argmax(0)[None]))
    return unit_rows((v * torch.from_numpy(np.sqrt(s))).numpy())
