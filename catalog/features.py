"""Item feature vectors x_i (DESIGN section 1): attribute multi-hot, hashed tags, year, popularity and
collaborative factors computed on the training split only."""

from __future__ import annotations

import warnings

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


def cf_factors(train_matrix: np.ndarray | sp.spmatrix, dim: int) -> np.ndarray:
    """(N, dim) item factors from a truncated SVD of the (users x items) training matrix, rows L2-normalised.
    A scipy sparse matrix goes in as a torch CSR tensor (memory linear in its entries; the same factors as the
    dense matrix to float rounding)."""
    dim = min(dim, *train_matrix.shape)
    if dim == 0:
        return np.zeros((train_matrix.shape[1], 0), dtype=np.float32)
    if sp.issparse(train_matrix):
        csr = sp.csr_matrix(train_matrix, dtype=np.float32)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": the products svd_lowrank needs work
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            x = torch.sparse_csr_tensor(torch.from_numpy(csr.indptr.astype(np.int64)),
                                        torch.from_numpy(csr.indices.astype(np.int64)), torch.from_numpy(csr.data),
                                        size=csr.shape, check_invariants=True)
    else:
        x = torch.from_numpy(train_matrix)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # svd_lowrank is randomised; keep the features deterministic
    _, s, v = torch.svd_lowrank(x, q=dim, niter=4)
    torch.random.set_rng_state(generator_state)
    factors = (v * s.sqrt()).numpy()
    return unit_rows(factors)
