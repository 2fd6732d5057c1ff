"""Tests of the sparse prior (issue 16): `core.numerics.Neighbours`, `top_neighbours`, the sparse `seed_row_sum`,
the neighbour builder of evaluation/neighbours.py (exact EASE up to P warm items, item-kNN beyond, never (N, N)),
EASE's approximate path and the checkpoint round trip (sparse buffers; an old dense prior converted on load).

Hand-made matrices, the tiny catalog of conftest.py (N=50) and random binary interaction matrices; CPU only.
Run: `PYTHONPATH=. python -m pytest tests/test_sparse_prior.py -q`.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import TINY_PRIOR_NEIGHBOURS, make_tiny_model
from safetensors.torch import load_file, save_file

from catalog.batch import encode_requests
from catalog.dataset import Dataset
from core.carriers import Example, Request
from core.config import DataConfig, RunConfig
from core.numerics import Neighbours, seed_row_sum, top_neighbours
from evaluation.baselines import EASE, NeighbourScores, ease_weights
from evaluation.neighbours import build_neighbours, sparse_top
from learner.checkpoint import load_checkpoint, read_header, save_checkpoint

pytestmark = pytest.mark.unit

# M = [[0, 3, 1, 2], [5, 0, 4, -1], [1, 2, 0, 9], [2, 7, 6, 0]]: its top-2 rows keep (1: 3, 3: 2), (0: 5, 2: 4),
# (3: 9, 1: 2), (1: 7, 2: 6).
M = torch.tensor([[0.0, 3, 1, 2], [5, 0, 4, -1], [1, 2, 0, 9], [2, 7, 6, 0]])


def test_top_neighbours_keeps_each_rows_largest_entries():
    rows = top_neighbours(M, 2)
    assert rows.indices.dtype == torch.int32 and rows.n_items == 4
    assert rows.indices.tolist() == [[1, 3], [0, 2], [3, 1], [1, 2]]
    assert rows.values.tolist() == [[3, 2], [5, 4], [9, 2], [7, 6]]


def test_sparse_seed_row_sum_by_hand_and_against_dense():
    """Seeds {0, 2} (B = 2, padded to S = 2): top-2 rows 0 and 2 give item 1: 3 + 2 = 5, item 3: 2 + 9 = 11 ->
    [0, 5, 0, 11]; seeds {3} (second slot padding) give [0, 7, 6, 0]. With m = N every entry is kept and the sum
    equals the dense sum of the seed rows."""
    seeds = torch.tensor([[0, 2], [3, 0]])
    mask = torch.tensor([[True, True], [True, False]])
    out = seed_row_sum(top_neighbours(M, 2), seeds, mask)
    assert out.dtype == torch.float32
    assert out.tolist() == [[0, 5, 0, 11], [0, 7, 6, 0]]
    dense = (M[seeds] * mask[..., None]).sum(1)
    torch.testing.assert_close(seed_row_sum(top_neighbours(M, 4), seeds, mask), dense)
    half = top_neighbours(M.half(), 4)
    assert half.values.dtype == torch.float16
    torch.testing.assert_close(seed_row_sum(half, seeds, mask), dense)


def test_sparse_top_of_sparse_rows():
    """Row 0 stores (2: 0.5, 5: 0.9, 7: 0.1), row 1 nothing, row 2 (0: 0.3): m = 2 keeps (5, 2), pads row 1 with
    index 0 value 0 and row 2's second entry too."""
    rows = sp.csr_matrix((np.array([0.5, 0.9, 0.1, 0.3], np.float32), ([0, 0, 0, 2], [2, 5, 7, 0])), shape=(3, 8))
    indices, values = sparse_top(rows, 2)
    assert indices.tolist() == [[5, 2], [0, 0], [0, 0]]
    np.testing.assert_allclose(values, [[0.9, 0.5], [0, 0], [0.3, 0]])


def random_positives(users: int, items: int, per_user: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((users, items), np.float32)
    for u in range(users):
        x[u, rng.choice(items, size=per_user, replace=False)] = 1.0
    return x


@pytest.mark.parametrize("users", [15, 200])  # Woodbury (U < P) and the Gram solve (U >= P)
def test_builder_is_truncated_exact_ease_up_to_p_items(users):
    """At most P warm items: the builder's rows are exact EASE's top-m rows: entries of B (at the indices kept), with
    the same m largest values per row (items with equal columns tie, so indices may differ between equal values)."""
    x = random_positives(users, 40, 6, seed=users)
    x[:, 7] = 0.0  # a cold item: its row is all zeros
    lam, m = 3.0, 5
    built = build_neighbours(x, lam, m, popular=40)
    b = ease_weights(x, lam)
    exact = top_neighbours(b, m)
    torch.testing.assert_close(built.values, torch.gather(b, 1, built.indices.long()), atol=1e-6, rtol=1e-5)
    warm = x.sum(0) > 0
    torch.testing.assert_close(built.values[warm], exact.values[warm], atol=1e-6, rtol=1e-5)
    assert (built.values[7] == 0).all()


def test_builder_uses_scaled_item_knn_beyond_p():
    """P = 10 of 40 warm items: the 30 others get their top-m cosine neighbours (itself excluded), all scaled by one
    factor that makes their mean row sum equal to that of the 10 EASE rows."""
    x = random_positives(60, 40, 8, seed=3)
    built = build_neighbours(x, 3.0, 4, popular=10)
    counts = x.sum(0)
    rest = np.sort(np.argsort(-counts, kind="stable")[10:])
    top = np.setdiff1d(np.arange(40), rest)
    unit = x / np.linalg.norm(x, axis=0)
    cos = unit.T @ unit
    np.fill_diagonal(cos, -np.inf)
    values = built.values.numpy()
    scale = values[rest, 0] / np.sort(cos[rest], axis=1)[:, -1]
    np.testing.assert_allclose(scale, scale[0], rtol=1e-4)  # one factor for every kNN row
    np.testing.assert_allclose(values[rest] / scale[0], -np.sort(-cos[rest], axis=1)[:, :4], rtol=1e-4, atol=1e-6)
    assert np.isclose(values[rest].sum(1).mean(), values[top].sum(1).mean(), rtol=1e-4)
    assert np.isin(built.indices.numpy()[top], top).all()  # EASE rows name popular items only


def test_builder_at_200k_items_never_allocates_n_by_n():
    """N = 200,000 items, 300 users with 20 positives each (P = 500, m = 20): an (N, N) float32 array would take
    160 GB; the builder's traced peak stays under 64 MB (the (N, m) results are 32 MB)."""
    n, users = 200_000, 300
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(users), 20)
    cols = rng.zipf(1.3, size=len(rows)) % n  # power-law popularity
    x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(users, n))
    x.data[:] = 1.0
    tracemalloc.start()
    built = build_neighbours(x, 10.0, 20, popular=500)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert built.indices.shape == built.values.shape == (n, 20)
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    warm = np.flatnonzero(np.diff(x.tocsc().indptr) > 0)
    assert (built.values.numpy()[warm].max(1) > 0).mean() > 0.9  # warm items have neighbours


def test_ease_above_p_items_scores_its_sparse_rows(tiny_catalog):
    """EASE with popular < warm items takes the approximate path: no B, and its scores are the sums of the seed
    rows of its neighbours; its lists come from the shared top_k post-filter."""
    data = Dataset.build(tiny_catalog, DataConfig())
    ease = EASE(data.catalog, data.train_matrix, 10.0, popular=10, neighbours=6)
    assert not ease.exact and ease.B is None
    seeds = torch.zeros(2, data.catalog.n_items)
    seeds[0, [1, 4, 9]] = 1.0
    seeds[1, 7] = 1.0
    rows = ease.neighbours(6)
    expected = seed_row_sum(rows, torch.tensor([[1, 4, 9], [7, 7, 7]]), torch.tensor([[1, 1, 1], [1, 0, 0]]).bool())
    torch.testing.assert_close(ease.prior_scores(seeds), expected)
    assert ease.neighbours(3).indices.shape == (data.catalog.n_items, 3)
    with pytest.raises(ValueError, match="kept 6 neighbours"):
        ease.neighbours(7)


def test_checkpoint_round_trip_and_old_dense_prior(tiny_catalog, tiny_vocab, tmp_path):
    """The sparse prior is saved as two tensors and loads bit for bit; a checkpoint holding the old dense
    `prior_matrix` loads with it converted to top-m rows (m = model.prior_neighbours of its config)."""
    model = make_tiny_model(tiny_catalog, prior=True)
    cfg = RunConfig(out_dir=str(tmp_path), data=DataConfig(catalog=str(tmp_path)))
    cfg.model = model.cfg.__class__(**{**model.cfg.__dict__, "prior": "ease",
                                       "prior_neighbours": TINY_PRIOR_NEIGHBOURS})
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, cfg, tiny_catalog, {"step": 0})
    tensors = load_file(str(path))
    assert tensors["model.prior_indices"].shape == (tiny_catalog.n_items, TINY_PRIOR_NEIGHBOURS)
    assert "model.prior_matrix" not in tensors
    loaded, _, _ = load_checkpoint(path, tiny_catalog)
    assert torch.equal(loaded.prior_indices, model.prior_indices) and torch.equal(loaded.prior_values,
                                                                                  model.prior_values)
    batch = encode_requests(tiny_catalog, [Request((0, 20, 40)), Request((2, 9))], tiny_vocab)
    assert torch.equal(loaded.prior_scores(batch), model.prior_scores(batch))
    dense = torch.rand(tiny_catalog.n_items, tiny_catalog.n_items, generator=torch.Generator().manual_seed(3)).half()
    old = {k: v for k, v in tensors.items() if not k.startswith("model.prior_i") and k != "model.prior_values"}
    save_file({**old, "model.prior_matrix": dense}, str(tmp_path / "old.safetensors"), metadata=read_header(path))
    converted, _, _ = load_checkpoint(tmp_path / "old.safetensors", tiny_catalog)
    want = top_neighbours(dense, TINY_PRIOR_NEIGHBOURS)
    assert torch.equal(converted.prior_indices, want.indices) and torch.equal(converted.prior_values, want.values)
    assert isinstance(converted.prior, Neighbours)


def test_neighbour_scores_with_every_entry_equal_dense_ease(tiny_catalog):
    """NeighbourScores over B's top-N rows (every entry kept) scores requests exactly as the dense EASE; with the
    sparse train matrix EASE fits the same B."""
    data = Dataset.build(tiny_catalog, DataConfig())
    ease = EASE(data.catalog, data.train_sparse, 10.0)
    assert ease.exact
    torch.testing.assert_close(ease.B, EASE(data.catalog, data.train_matrix, 10.0).B)
    examples = [Example(Request((1, 4, 9)), (2,), 0, "A", 3), Example(Request((7,)), (2,), 1, "A", 1)]
    full = NeighbourScores(data.catalog, ease.neighbours(data.catalog.n_items))
    np.testing.assert_allclose(full.scores(examples), ease.scores(examples), atol=1e-5)
