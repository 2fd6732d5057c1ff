"""Tests of rollout/ without Ray: rollout generation (`rollout.generate`) and the serving front end
(`rollout.retrieve`) on the 50-item in-memory catalog and a randomised tiny model (tests/conftest.py). The sampler's
own invariants are in tests/test_model.py, the replay buffer's logic in tests/test_actors.py.
Run: `python -m pytest tests/test_rollout.py -q` (a few seconds).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from catalog.batch import encode_requests
from catalog.requests import valid_mask
from core.carriers import Example, Request
from core.config import SamplerConfig
from rewards.base import Reward, RewardContext
from rewards.novelty import NoveltyReward
from rollout.generate import generate_rollouts
from rollout.retrieve import recommend
from rollout.sampler import served_order

pytestmark = pytest.mark.usefixtures("single_thread")
K, G = 5, 4


class FirstItemReward(Reward):
    """The first item's index: a reward whose group statistics the test can compute by hand."""

    name = "first_item"

    def __call__(self, batch, ctx) -> np.ndarray:
        return batch.lists[:, 0].astype(np.float64)


def examples(catalog, n: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for user in range(n):
        items = rng.permutation(catalog.n_items)
        request = Request(tuple(int(i) for i in items[:3]), (int(items[3]),), (), K)
        out.append(Example(request, tuple(int(i) for i in items[4:9]), user, "A", 3))
    return out


def group_z(scores: np.ndarray) -> np.ndarray:
    """Each group of G scores minus its mean, over its population std (a constant group gives 0), flattened."""
    by_group = scores.reshape(-1, G)
    std = by_group.std(1, keepdims=True)
    return ((by_group - by_group.mean(1, keepdims=True)) / np.where(std > 0, std, 1)).reshape(-1)


def context(catalog) -> RewardContext:
    features = np.random.default_rng(0).normal(size=(catalog.n_items, 8)).astype(np.float32)
    return RewardContext(catalog, features / np.linalg.norm(features, axis=1, keepdims=True),
                         np.arange(catalog.n_items) % 7, 5)


def test_rollouts_are_valid_lists_with_group_standardised_advantages(tiny_catalog, tiny_vocab, tiny_model):
    batch = examples(tiny_catalog, 3, seed=1)
    rewards = [(FirstItemReward(), 1.0), (NoveltyReward(), 0.5)]
    out = generate_rollouts(tiny_model, tiny_catalog, tiny_vocab, batch, G, steps=K, temperature=1.0,
                            rewards=rewards, ctx=context(tiny_catalog), version=7,
                            generator=torch.Generator().manual_seed(0))
    assert out.version == 7 and out.group_size == G and out.items.shape == (3 * G, K)
    assert out.rewards.shape == (3 * G, 2) and out.advantages.shape == (3 * G,)
    assert out.requests == [e.request for e in batch for _ in range(G)]
    for row, request in enumerate(out.requests):
        items = out.items[row].tolist()
        assert len(set(items)) == K and valid_mask(tiny_catalog, request)[items].all()
    assert torch.isfinite(out.behaviour_logp).all() and (out.behaviour_logp <= 0).all()
    first = out.items[:, 0].double().numpy()
    np.testing.assert_allclose(out.rewards[:, 0], first)
    expected = group_z(first) + 0.5 * group_z(out.rewards[:, 1])
    np.testing.assert_allclose(out.advantages.numpy(), expected, atol=1e-5)
    assert out.batch.seeds.shape[0] == 3 * G  # each row's request encoded once, for the learner


def test_same_generator_gives_the_same_rollouts(tiny_catalog, tiny_vocab, tiny_model):
    batch = examples(tiny_catalog, 2, seed=2)
    runs = [generate_rollouts(tiny_model, tiny_catalog, tiny_vocab, batch, G, K, 1.0, [(NoveltyReward(), 1.0)],
                              context(tiny_catalog), 0, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(runs[0].items, runs[1].items)
    assert torch.equal(runs[0].behaviour_logp, runs[1].behaviour_logp)


def test_recommend_keeps_request_order_and_each_k(tiny_catalog, tiny_vocab, tiny_model):
    requests = [dataclasses.replace(e.request, k=k) for e, k in zip(examples(tiny_catalog, 7, seed=3),
                                                                     [3, 5, 3, 8, 5, 3, 8], strict=True)]
    cfg = SamplerConfig(steps=4, temperature=0.0, batch_size=256)
    lists = recommend(tiny_model, tiny_catalog, tiny_vocab, requests, cfg)
    assert [len(items) for items in lists] == [r.k for r in requests]
    one_at_a_time = [recommend(tiny_model, tiny_catalog, tiny_vocab, [r], cfg)[0] for r in requests]
    small_batches = recommend(tiny_model, tiny_catalog, tiny_vocab, requests, dataclasses.replace(cfg, batch_size=2))
    for items, alone, small in zip(lists, one_at_a_time, small_batches, strict=True):
        np.testing.assert_array_equal(items, alone)  # greedy lists do not depend on batching
        np.testing.assert_array_equal(items, small)


def test_score_order_rewards_the_served_order_and_keeps_the_trajectory(tiny_catalog, tiny_vocab, tiny_model):
    """sampler.order=score: the rewards see each list as `recommend` serves it (re-sorted by `served_order`); the
    rollout keeps the sampler's slots, whose trajectory the learner scores; the same draws either way."""
    batch = examples(tiny_catalog, 3, seed=4)
    runs = {order: generate_rollouts(tiny_model, tiny_catalog, tiny_vocab, batch, G, K, 1.0, [(FirstItemReward(), 1.0)],
                                     context(tiny_catalog), 0, torch.Generator().manual_seed(5), order=order)
            for order in ("slots", "score")}
    assert torch.equal(runs["slots"].items, runs["score"].items)
    served = served_order(tiny_model, tiny_model.encode(runs["score"].batch), runs["score"].items, "score")
    np.testing.assert_allclose(runs["score"].rewards[:, 0], served[:, 0].double().numpy())
    assert not np.allclose(runs["score"].rewards[:, 0], runs["slots"].rewards[:, 0])
    cfg = SamplerConfig(steps=K, temperature=0.0, order="score")
    requests = [e.request for e in batch]
    slots = np.stack(recommend(tiny_model, tiny_catalog, tiny_vocab, requests, dataclasses.replace(cfg, order="slots")))
    lists = np.stack(recommend(tiny_model, tiny_catalog, tiny_vocab, requests, cfg))
    encoded = tiny_model.encode(encode_requests(tiny_catalog, requests, tiny_vocab))
    np.testing.assert_array_equal(lists, served_order(tiny_model, encoded, torch.from_numpy(slots), "score").numpy())
