"""Training on an out-of-fold prior (`model.prior_folds`) and the score order of served lists (`sampler.order`).

- `training_folds` splits the training users into F disjoint folds that cover them all, and each fold's prior is
  EASE fit without that fold's users (so a training request never sees a prior that saw its own held-out items);
  F = 1 keeps one EASE on every training user.
- `most_step` with a fold takes its requests from the fold's users and uses the fold's prior both as MOST's target
  relevance and as the model's prior: the same loss as a model whose own prior is that fold's.
- The folds are cached in the run directory by what they are computed from: a second call reads them back without
  fitting EASE, another lambda fits them again; EASE's lambda is looked up only when there are folds.
- H2PO trains as MOST does: rollouts of a fold's requests carry that fold's EASE scores (`RequestBatch.ease`), so
  the learner scores each list under the prior it was sampled with (its log-probs equal the sampler's at T = 1, and
  differ under the model's own full prior); the replay buffer's split and concatenation keep them, and requests
  with and without them do not stack.
- `served_order(..., "score")` re-sorts a list by the first slot's logits (`Retriever.item_logits`, the entries of
  `logits` at the list's items): for a model that is its prior (zero head), the prior's own order; a permutation.
Run: `python -m pytest tests/test_prior_folds.py -q` (about 30 s).
"""

from __future__ import annotations

import dataclasses
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
from learner import workspace as workspace_module
from learner.pretrain import Fold, most_step
from learner.update import rollout_log_probs
from learner.workspace import build_model, prior_neighbours, training_folds
from rewards.base import RewardContext
from rewards.registry import build_rewards
from rollout.buffer import concat_groups, request_rows, split_groups
from rollout.generate import generate_rollouts
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


class Refit(Exception):
    """Raised by a stand-in EASE: the folds were fitted, not read from the cache."""


def test_folds_are_cached_by_what_they_are_computed_from(workspace, monkeypatch):
    path = workspace.out_dir / "folds.safetensors"
    path.unlink(missing_ok=True)
    first = training_folds(workspace, LAMBDA)
    assert path.is_file()

    def refit(*args, **kwargs):
        raise Refit
    monkeypatch.setattr(workspace_module, "EASE", refit)
    again = training_folds(workspace, LAMBDA)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.users, b.users)
        assert torch.equal(a.prior.indices, b.prior.indices) and torch.equal(a.prior.values, b.prior.values)
    with pytest.raises(Refit):
        training_folds(workspace, 2 * LAMBDA)
    monkeypatch.setattr(workspace_module, "ease_lambda", lambda ws: LAMBDA)  # the lambda, looked up when not given
    assert torch.equal(training_folds(workspace)[0].prior.values, first[0].prior.values)
    monkeypatch.setattr(workspace_module, "ease_lambda", refit)  # without folds it is never looked up (no tuning)
    one = pipeline.prepare(load_config(TINY, [f"out_dir={workspace.out_dir}", "threads=1", "model.prior_folds=1"]))
    assert training_folds(one) is None


def test_rollouts_carry_their_folds_prior_to_the_learner(workspace):
    ws = workspace
    fold = training_folds(ws, LAMBDA)[1]
    torch.manual_seed(0)
    model = build_model(ws, pipeline.fit_ease(ws, LAMBDA)).eval()
    examples = training_examples(ws.data, ws.cfg.requests, 3, np.random.default_rng(0), fold.users)
    out = generate_rollouts(model, ws.data.catalog, ws.vocab, examples, 2, 3, 1.0, build_rewards(ws.cfg.h2po.rewards),
                            RewardContext.from_dataset(ws.data, ws.features, model.prior), 0,
                            torch.Generator().manual_seed(1), ease=fold.prior)
    torch.testing.assert_close(out.batch.ease, seed_row_sum(fold.prior, out.batch.seeds, out.batch.seed_mask))
    torch.testing.assert_close(rollout_log_probs(model, out), out.behaviour_logp, atol=1e-4, rtol=0)
    own = dataclasses.replace(out, batch=dataclasses.replace(out.batch, ease=None))  # the full prior instead
    assert (rollout_log_probs(model, own) - out.behaviour_logp).abs().max() > 1e-2
    assert torch.equal(concat_groups(split_groups(out)).batch.ease, out.batch.ease)
    with pytest.raises(ValueError, match="out-of-fold EASE"):
        request_rows([out.batch, own.batch])


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
