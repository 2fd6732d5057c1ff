"""Training on an out-of-fold prior (`model.prior_folds`) and the score order of served lists (`sampler.order`).

- `training_folds` splits the training users into F disjoint folds that cover them all, and each fold's prior is
  EASE fit without that fold's users (so a training request never sees a prior that saw its own held-out items);
  F = 1 keeps one EASE on every training user.
- `most_step` with a fold takes its requests from the fold's users and uses the fold's prior both as MOST's target
  relevance and as the model's prior: the same loss as a model whose own prior is that fold's.
- `served_order(..., "score")` re-sorts a list by the first slot's logits (`Retriever.item_logits`, the entries of
  `logits` at the list's items): for a model that is its prior (zero head), the prior's own order; a permutation.
Run: `python -m pytest tests/test_prior_folds.py -q` (about 20 s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from app import pipeline
from catalog.batch import encode_requests
from catalog.dataset import training_examples
from core.carriers import Request
from core.config import load_config
from core.numerics import seed_row_sum
from evaluation.baselines import EASE
from learner.pretrain import Fold, most_step
from learner.workspace import build_model, prior_neighbours, training_folds
from rollout.sampler import sample_lists, served_order

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
LAMBDA = 300.0


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    run = tmp_path_factory.mktemp("folds")
    return pipeline.prepare(load_config(TINY, [f"out_dir={run}", "threads=1", "model.prior_folds=3"]))


def test_folds_cover_the_training_users_and_fit_without_them(workspace):
    folds = training_folds(workspace, LAMBDA)
    data = workspace.data
    assert len(folds) == 3
    users = np.concatenate([f.users for f in folds])
    np.testing.assert_array_equal(np.sort(users), data.train_users)  # disjoint and complete
    full = prior_neighbours(workspace, pipeline.fit_ease(workspace, LAMBDA)).values
    m = workspace.cfg.model
    for fold in folds:
        rest = ~np.isin(data.train_users, fold.users)
        expected = prior_neighbours(workspace, EASE(data.catalog, data.train_sparse[np.flatnonzero(rest)], LAMBDA,
                                                    m.prior_items, m.prior_neighbours))
        torch.testing.assert_close(fold.prior.values, expected.values)
        torch.testing.assert_close(fold.prior.indices, expected.indices)
        assert not torch.equal(fold.prior.values, full)  # it did leave users out
    one = pipeline.prepare(load_config(TINY, [f"out_dir={workspace.out_dir}", "threads=1", "model.prior_folds=1"]))
    assert training_folds(one, LAMBDA) is None


def test_training_examples_come_from_the_given_users(workspace):
    users = workspace.data.train_users[:7]
    examples = training_examples(workspace.data, workspace.cfg.requests, 40, np.random.default_rng(0), users)
    assert {e.user for e in examples} <= set(users.tolist())


def test_most_step_with_a_fold_is_a_model_whose_prior_is_the_folds(workspace):
    ws = workspace
    folds = training_folds(ws, LAMBDA)
    fold = Fold(ws.data.train_users, folds[0].prior)  # every user, so that both draw the same requests
    torch.manual_seed(0)
    model = build_model(ws, pipeline.fit_ease(ws, LAMBDA)).eval()
    twin = build_model(ws, pipeline.fit_ease(ws, LAMBDA)).eval()
    twin.load_state_dict({**model.state_dict(), "prior_indices": fold.prior.indices,
                          "prior_values": fold.prior.values})
    args = (ws.data, ws.vocab, ws.unit_features)
    losses = [most_step(model, *args, model.prior, ws.cfg.requests, ws.cfg.most, np.random.default_rng(1),
                        torch.Generator().manual_seed(2), fold),
              most_step(twin, *args, fold.prior, ws.cfg.requests, ws.cfg.most, np.random.default_rng(1),
                        torch.Generator().manual_seed(2)),
              most_step(model, *args, model.prior, ws.cfg.requests, ws.cfg.most, np.random.default_rng(1),
                        torch.Generator().manual_seed(2))]
    torch.testing.assert_close(losses[0], losses[1])
    assert not torch.isclose(losses[0], losses[2])  # the fold's prior is not the full one


def test_score_order_sorts_a_prior_only_model_by_its_prior(tiny_catalog, tiny_vocab):
    model = make_tiny_model(tiny_catalog, prior=True)
    zero = make_tiny_model(tiny_catalog, prior=True)
    with torch.no_grad():
        zero.head.weight.zero_()
        zero.item_bias.zero_()
    requests = [Request((1, 2, 3), k=8), Request((10, 20), k=8), Request((5,), k=8)]
    batch = encode_requests(tiny_catalog, requests, tiny_vocab)
    shuffle = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    for net in (model, zero):
        items = sample_lists(net, batch, 8, 4).items[:, shuffle]
        ctx = net.encode(batch)
        ordered = served_order(net, ctx, items, "score")
        np.testing.assert_array_equal(np.sort(ordered.numpy(), 1), np.sort(items.numpy(), 1))
        first = net.hidden(ctx, torch.full_like(items, -1))[:, 0]
        scores = net.logits(ctx, first, torch.arange(3)).gather(1, ordered)
        torch.testing.assert_close(net.item_logits(ctx, first, ordered), scores)
        assert (scores[:, :-1] >= scores[:, 1:]).all() and not torch.equal(ordered, items)
    prior = seed_row_sum(zero.prior, batch.seeds, batch.seed_mask)  # its logits are prior_scale * z-score(prior)
    scores = prior.float().gather(1, ordered)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
