"""Tests of MOST (DESIGN section 4): the metric, MMR ordering, target lists and the loss, plus a training smoke test.

Hand-computed values are in the docstrings; the model tests use the tiny randomised Retriever of conftest.py.
Run: `PYTHONPATH=. python -m pytest tests/test_most.py -q`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catalog.batch import encode_requests
from catalog.dataset import Dataset
from catalog.requests import valid_mask
from conftest import make_tiny_model
from core.carriers import Example, Exclude, Recency, Request
from core.config import DataConfig, MostConfig, RequestConfig
from learner.most import build_targets, metric_scores, mmr_order, most_loss
from learner.pretrain import pretrain
from model.diffusion import elbo_nll, stratified_times

pytestmark = pytest.mark.usefixtures("single_thread")
K = 8


def test_most_loss_hand_computed():
    """nll = [[1, 2], [3, 0]], w = [[1, 0.5], [1, 1]] -> (1 + 1 + 3 + 0) / 3.5 = 10/7."""
    loss = most_loss(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[1.0, 0.5], [1.0, 1.0]]))
    assert loss.item() == pytest.approx(10 / 7, abs=1e-7)


def test_metric_scores_hand_computed():
    """relevance (1, 2, 3): z = (-1.2247, 0, 1.2247) (population std sqrt(2/3)); bonus (0, 0.5, 0); negative item 0
    with features e_1, e_2, (0.6, 0.8) has cosines (1, 0, 0.6) -> M = (-2.2247, 0.5, 0.6247)."""
    features = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    m = metric_scores(np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.5, 0.0]), features, (0,))
    z = 1 / np.sqrt(2 / 3)
    np.testing.assert_allclose(m, [-z - 1, 0.5, z - 0.6], atol=1e-12)


def test_mmr_order_hand_computed():
    """Scores (1.0, 0.9, 0.8, 0.3); features: 0 = e_1, 1 = (0.99, 0.141, 0) (near-duplicate of 0), 2 = e_2, 3 = e_3.
    Redundancy 0: a sort by score (0, 1, 2, 3). Redundancy 1: pick 0; then 1: 0.9 - 0.99 = -0.09, 2: 0.8 - 0 = 0.8,
    3: 0.3 - 0 -> pick 2; then 1: 0.9 - max(0.99, 0.141) = -0.09 (the max over all picks, not the last pick's 0.141),
    3: 0.3 -> pick 3, then 1: (0, 2, 3, 1). k = 2 stops after two picks."""
    score = np.array([1.0, 0.9, 0.8, 0.3])
    features = np.array([[1.0, 0.0, 0.0], [0.99, 0.141, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    candidates = np.arange(4)
    assert mmr_order(candidates, score, features, 0.0, 4) == [0, 1, 2, 3]
    assert mmr_order(candidates, score, features, 1.0, 4) == [0, 2, 3, 1]
    assert mmr_order(candidates, score, features, 1.0, 2) == [0, 2]
    assert mmr_order(np.array([3, 1]), score, features, 0.0, 4) == [1, 3]


@pytest.fixture(scope="module")
def examples(tiny_catalog) -> list[Example]:
    """Four requests with 3 valid held-out targets each (one with a negative and hard constraints)."""
    requests = [Request((0, 1, 2), k=K), Request((5,), (6, 7), (Exclude("genre", "Drama"),), K),
                Request((10, 20), constraints=(Recency(min_year=1980),), k=K), Request((33, 34, 35, 36), k=K)]
    rng = np.random.default_rng(0)
    out = []
    for r in requests:
        valid = np.flatnonzero(valid_mask(tiny_catalog, r))
        out.append(Example(r, tuple(int(i) for i in rng.choice(valid, 3, replace=False)), 0, "A", len(r.seeds)))
    return out


def target_inputs(catalog, examples):
    rng = np.random.default_rng(1)
    relevance = rng.normal(size=(len(examples), catalog.n_items))
    bonus = np.zeros_like(relevance)
    valid = np.stack([valid_mask(catalog, e.request) for e in examples])
    features = rng.normal(size=(catalog.n_items, 6))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return relevance, bonus, valid, features


@pytest.mark.parametrize("order", ["metric", "relevance", "random"])
def test_build_targets(tiny_catalog, examples, order):
    """Targets first with weight 1, then fill items with weight fill_weight that are valid, not targets, distinct and
    the top of the relevance order among the remaining valid items. "relevance" sorts targets by relevance; "metric"
    with zero bonus, no negatives and redundancy 0 is the same sort (z-scoring is monotone); "random" permutes them."""
    relevance, bonus, valid, features = target_inputs(tiny_catalog, examples)
    redundancy = 0.0 if order == "metric" else 0.1
    x0, weights = build_targets(examples, relevance, bonus, valid, features, K, order, redundancy, 0.3,
                                np.random.default_rng(2))
    assert x0.shape == weights.shape == (len(examples), K) and x0.dtype == torch.long
    for b, ex in enumerate(examples):
        row, n = x0[b].tolist(), len(ex.targets)
        assert len(set(row)) == K and valid[b, row].all()
        assert sorted(row[:n]) == sorted(ex.targets)
        assert weights[b].tolist() == pytest.approx([1.0] * n + [0.3] * (K - n))
        fill = row[n:]
        assert not set(fill) & set(ex.targets)
        others = [i for i in np.flatnonzero(valid[b]) if i not in ex.targets]
        assert fill == sorted(others, key=lambda i: -relevance[b, i])[: K - n]
        if order == "metric" and ex.request.negatives:
            continue  # the metric subtracts similarity to negatives: not a pure relevance sort
        if order in ("metric", "relevance"):
            assert row[:n] == sorted(ex.targets, key=lambda i: -relevance[b, i])


def test_build_targets_truncates_long_target_lists(tiny_catalog, examples):
    """More than k targets: the first k in relevance order, all weight 1, no fill."""
    ex = examples[0]
    valid_items = np.flatnonzero(valid_mask(tiny_catalog, ex.request))
    long_ex = Example(ex.request, tuple(int(i) for i in valid_items[:K + 3]), 0, "A", 3)
    relevance, bonus, valid, features = target_inputs(tiny_catalog, [long_ex])
    x0, weights = build_targets([long_ex], relevance, bonus, valid, features, K, "relevance", 0.1, 0.3,
                                np.random.default_rng(0))
    assert x0[0].tolist() == sorted(long_ex.targets, key=lambda i: -relevance[0, i])[:K]
    assert (weights == 1).all()


def most_batch(catalog, vocab, examples):
    relevance, bonus, valid, features = target_inputs(catalog, examples)
    x0, weights = build_targets(examples, relevance, bonus, valid, features, K, "metric", 0.1, 0.3,
                                np.random.default_rng(3))
    generator = torch.Generator().manual_seed(4)
    t = stratified_times(len(examples), 1e-3, generator)
    u = torch.rand(x0.shape, generator=generator)
    return encode_requests(catalog, [e.request for e in examples], vocab), x0, weights, t, u


def test_split_batch_loss_equals_full_batch_loss(tiny_catalog, tiny_vocab, tiny_model, examples):
    """L = sum w*nll / sum w, so with halves (S1, W1), (S2, W2): L_full = (W1 * L1 + W2 * L2) / (W1 + W2) (1e-6).
    Encoding each half on its own (different padding) gives the same per-slot ELBO terms as the full batch (1e-5)."""
    batch, x0, weights, t, u = most_batch(tiny_catalog, tiny_vocab, examples)
    with torch.no_grad():
        nll = elbo_nll(tiny_model, tiny_model.encode(batch), x0, t, u)
        nll64, w64 = nll.double(), weights.double()  # float64 so that 1e-6 tests the algebra, not rounding
        full = most_loss(nll64, w64)
        first, second = slice(0, 2), slice(2, None)
        w1, w2 = w64[first].sum(), w64[second].sum()
        combined = (w1 * most_loss(nll64[first], w64[first]) + w2 * most_loss(nll64[second], w64[second])) / (w1 + w2)
        assert full.item() == pytest.approx(combined.item(), abs=1e-6)
        halves = []
        for rows in (first, second):
            sub = encode_requests(tiny_catalog, [e.request for e in examples[rows]], tiny_vocab)
            halves.append(elbo_nll(tiny_model, tiny_model.encode(sub), x0[rows], t[rows], u[rows]))
    torch.testing.assert_close(torch.cat(halves), nll, atol=1e-5, rtol=1e-5)


def test_training_lowers_the_loss(tiny_catalog, tiny_vocab, tiny_model, examples):
    """30 AdamW steps (lr 3e-3) on one fixed batch with fixed noise (t, u) lower the MOST loss (seeded)."""
    batch, x0, weights, t, u = most_batch(tiny_catalog, tiny_vocab, examples)
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=3e-3, weight_decay=0.01)
    tiny_model.train()
    losses = []
    for _ in range(30):
        loss = most_loss(elbo_nll(tiny_model, tiny_model.encode(batch), x0, t, u), weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tiny_model.eval()
    with torch.no_grad():
        final = most_loss(elbo_nll(tiny_model, tiny_model.encode(batch), x0, t, u), weights).item()
    assert np.isfinite(losses).all()
    assert final < 0.7 * losses[0]


def _pretrained_weights(tiny_catalog, tiny_vocab, steps: int, ema: float) -> tuple[dict, dict]:
    """`pretrain` of the tiny prior model for `steps` steps, validated at the last: (the weights it validated and
    saved, the trained model's own weights at the end)."""
    model = make_tiny_model(tiny_catalog, prior=True)
    saved = {}

    def save_best(kept, record):
        saved.update({k: v.detach().clone() for k, v in kept.state_dict().items()})
    cfg = MostConfig(batch_size=3, max_steps=steps, eval_every=steps, warmup_steps=0, ema=ema)
    pretrain(model, Dataset.build(tiny_catalog, DataConfig()), tiny_vocab, np.eye(tiny_catalog.n_items, 8),
             model.prior, RequestConfig(seed_sizes=[1, 2], family_b_share=0.0, k=4), cfg, 0, lambda m: 0.0,
             save_best)
    return saved, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_pretraining_keeps_the_moving_average_of_the_weights(tiny_catalog, tiny_vocab):
    """most.ema = 0.5 over two steps validates and keeps 0.5 w1 + 0.5 w2 (torch's AveragedModel starts from the
    first step's weights), where w1, w2 are the weights the same seed reaches after one and two steps; with ema = 0
    the kept weights are the trained ones. Buffers (features, prior) are the model's."""
    _, w1 = _pretrained_weights(tiny_catalog, tiny_vocab, 1, 0.0)
    kept, w2 = _pretrained_weights(tiny_catalog, tiny_vocab, 2, 0.0)
    averaged, trained = _pretrained_weights(tiny_catalog, tiny_vocab, 2, 0.5)
    for name in w2:
        torch.testing.assert_close(kept[name], w2[name])
        torch.testing.assert_close(trained[name], w2[name])
        expected = 0.5 * w1[name] + 0.5 * w2[name] if w2[name].is_floating_point() else w2[name]
        torch.testing.assert_close(averaged[name], expected.to(averaged[name].dtype))
    assert any(not torch.equal(w1[name], w2[name]) for name in w2)  # the two steps moved the weights
