"""Tests of rewards/: the contract every reward file keeps, hand-computed built-ins, adding a reward through the
config, the errors a broken reward raises, and group advantages.

The contract test lists `rewards/*.py` itself, so a new reward file is covered without touching this file.
Run: `python -m pytest tests/test_rewards.py -q`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog.dataset import Dataset
from catalog.requests import valid_mask
from core.carriers import Prefer, Recency, Request
from core.config import DataConfig, load_config
from core.errors import UserError
from core.numerics import top_neighbours
from rewards.base import Reward, RewardBatch, RewardContext
from rewards.intent import IntentReward
from rewards.ndcg import NDCGReward
from rewards.prefer import PreferReward
from rewards.recency import RecencyReward
from rewards.registry import BUILTINS, RewardError, build_rewards, group_advantages, score_rewards
from rewards.relevance import RelevanceReward

REWARDS_DIR = Path(__file__).resolve().parent.parent / "rewards"
NOT_REWARDS = {"__init__", "base", "registry"}
REWARD_FILES = sorted(p.stem for p in REWARDS_DIR.glob("*.py") if p.stem not in NOT_REWARDS)
README = REWARDS_DIR / "README.md"


def reward_classes(stem: str) -> list[type[Reward]]:
    """The Reward subclasses defined in rewards/<stem>.py."""
    module = importlib.import_module(f"rewards.{stem}")
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, Reward) and c is not Reward and c.__module__ == module.__name__]


@pytest.fixture(scope="module")
def ctx(tiny_catalog) -> RewardContext:
    """Seeded random features (50, 8), training popularity of the tiny catalog's 60% training users."""
    features = np.random.default_rng(0).normal(size=(tiny_catalog.n_items, 8))
    return RewardContext.from_dataset(Dataset.build(tiny_catalog, DataConfig()), features)


@pytest.fixture(scope="module")
def ctx_matrix(ctx) -> RewardContext:
    """`ctx` with a seeded random relevance: each item's top 10 of a random (N, N) matrix."""
    matrix = top_neighbours(torch.rand(ctx.catalog.n_items, ctx.catalog.n_items,
                                       generator=torch.Generator().manual_seed(0)), 10)
    return RewardContext(ctx.catalog, ctx.features, ctx.popularity, ctx.n_users, matrix)


def random_batch(catalog, n_requests: int = 4, group: int = 3, k: int = 6, seed: int = 0) -> RewardBatch:
    """`n_requests` requests with assorted constraints, `group` valid lists of `k` items each (R = n * group)."""
    rng = np.random.default_rng(seed)
    constraint_sets = [(), (Prefer("genre", "Drama", 1.0),), (Recency(half_life=10.0),),
                       (Prefer("genre", "Comedy", 0.5), Recency(min_year=1970, half_life=5.0))]
    requests, lists, targets = [], [], []
    for b in range(n_requests):
        seeds = tuple(int(i) for i in rng.choice(catalog.n_items, 3, replace=False))
        request = Request(seeds, constraints=constraint_sets[b % len(constraint_sets)], k=k)
        allowed = np.flatnonzero(valid_mask(catalog, request))
        held_out = () if b == 0 else tuple(int(i) for i in rng.choice(allowed, 4, replace=False))
        for _ in range(group):
            requests.append(request)
            lists.append(rng.choice(allowed, k, replace=False))
            targets.append(held_out)
    return RewardBatch(requests, np.array(lists, dtype=np.int64), targets)


# sensible ranges of the built-ins; a new reward file only has to stay finite and bounded
RANGES = {"ndcg": (0.0, 1.0), "diversity": (0.0, 2.0), "novelty": (0.0, math.log2(4)), "prefer": (0.0, 1.0),
          "recency": (0.0, 1.0), "intent": (0.0, 1.0), "relevance": (-math.sqrt(50), math.sqrt(50))}


def test_reward_files_are_discovered():
    assert set(REWARD_FILES) >= {"ndcg", "relevance", "diversity", "novelty", "prefer", "recency"}
    for path in BUILTINS.values():
        module, cls = path.split(":")
        assert module.removeprefix("rewards.") in REWARD_FILES and cls in [c.__name__ for c in reward_classes(
            module.removeprefix("rewards."))]


@pytest.mark.parametrize("with_matrix", [False, True], ids=["features", "matrix"])
@pytest.mark.parametrize("stem", REWARD_FILES)
def test_reward_contract(stem, with_matrix, ctx, ctx_matrix):
    """Every reward in every file: a name, (R,) float64 finite scores, identical on a second call, in range."""
    classes = reward_classes(stem)
    assert classes, f"rewards/{stem}.py defines no Reward subclass"
    context = ctx_matrix if with_matrix else ctx
    batch = random_batch(context.catalog)
    for cls in classes:
        reward = cls()
        assert isinstance(reward.name, str) and reward.name
        scores = score_rewards([reward], batch, context)[:, 0]  # raises on a bad shape or NaN/inf
        again = np.asarray(reward(batch, context))
        assert again.shape == (len(batch),) and again.dtype == np.float64
        np.testing.assert_array_equal(scores, again)
        lo, hi = RANGES.get(reward.name, (-1e6, 1e6))
        assert (scores >= lo - 1e-9).all() and (scores <= hi + 1e-9).all(), (reward.name, scores)


def test_ndcg_hand_computed(tiny_catalog, ctx):
    """List [3, 5, 7, 9], targets {5, 9, 40}: hits at ranks 2 and 4.
    NDCG@10 = (1/log2 3 + 1/log2 5) / (1 + 1/log2 3 + 1/log2 4) = 1.06161 / 2.13093 = 0.49819;
    NDCG@2 = (1/log2 3) / (1 + 1/log2 3) = 0.38685; no targets -> 0."""
    request = Request((0, 1))
    batch = RewardBatch([request] * 2, np.array([[3, 5, 7, 9]] * 2), [(5, 9, 40), ()])
    d3, d5 = 1 / math.log2(3), 1 / math.log2(5)
    np.testing.assert_allclose(NDCGReward()(batch, ctx), [(d3 + d5) / (1 + d3 + 0.5), 0.0])
    np.testing.assert_allclose(NDCGReward(k=2)(batch, ctx), [d3 / (1 + d3), 0.0])
    assert NDCGReward(k=2).name == "ndcg@2" and NDCGReward().name == "ndcg"


def test_prefer_hand_computed(ctx):
    """List [2, 3, 9, 4]: Drama = items 2 (2 % 4 = 2) and 9 (Comedy, + Drama since 9 % 3 = 0); Horror = item 3.
    Prefer(Drama, 2) -> 2 * 2/4 = 1; + Prefer(Horror, 0.5) -> 1 + 0.5/4 = 1.125; no Prefer -> 0."""
    lists = np.array([[2, 3, 9, 4]] * 3)
    drama, horror = Prefer("genre", "Drama", 2.0), Prefer("genre", "Horror", 0.5)
    requests = [Request((0,), constraints=(drama,)), Request((0,), constraints=(drama, horror)),
                Request((0,), constraints=(Recency(half_life=5.0),))]
    np.testing.assert_allclose(PreferReward()(RewardBatch(requests, lists, [()] * 3), ctx), [1.0, 1.125, 0.0])


def test_recency_hand_computed(ctx):
    """Years 1950 + 7i mod 70; newest 2013 (items 9, 19). List [9, 0, 5, 19] with half-life 10:
    ages 0, 63, 28, 0 -> (1 + 2^-6.3 + 2^-2.8 + 1) / 4; Recency(min_year) alone or no Recency -> 0."""
    lists = np.array([[9, 0, 5, 19]] * 3)
    requests = [Request((1,), constraints=(Recency(min_year=1960, half_life=10.0),)),
                Request((1,), constraints=(Recency(min_year=1960),)), Request((1,))]
    expected = (2 + 2 ** -6.3 + 2 ** -2.8) / 4
    np.testing.assert_allclose(RecencyReward()(RewardBatch(requests, lists, [()] * 3), ctx), [expected, 0, 0])


def test_intent_hand_computed(ctx):
    """Seeds 0, 20, 40 share m = 2 values, the genre Action and the 1950s (tests/test_intent_prior.py). List
    [1, 3, 12, 4]: item 1 has the decade only, 3, 12 and 4 the genre only -> (1 + 1 + 1 + 1) / 4 / 2 = 0.5;
    [2, 1, 3, 4]: item 2 has neither -> 3 / 4 / 2 = 0.375. Seeds 1 (Comedy, 1957) and 2 (Drama, 1964) share
    nothing -> 0."""
    requests = [Request((0, 20, 40))] * 2 + [Request((1, 2))]
    lists = np.array([[1, 3, 12, 4], [2, 1, 3, 4], [1, 3, 12, 4]])
    np.testing.assert_allclose(IntentReward()(RewardBatch(requests, lists, [()] * 3), ctx), [0.5, 0.375, 0.0])


def test_relevance_matrix_and_feature_fallback(ctx):
    """M[s, j] = j (every entry kept: m = N): rel_j = 2 j for seeds {10, 20}, z-scored over the 48 valid items; the
    top list scores the mean z of items 46-49 (> 0), the bottom list that of 0-3 (< 0). Without a matrix, even items
    have cosine +1 to the even seeds' centroid and odd items -1; over the 48 valid items (23 even, 25 odd) mean =
    -1/24 and std = sqrt(1 - 1/576), so even items score (1 + 1/24) / std and odd items (-1 + 1/24) / std."""
    n = ctx.catalog.n_items
    matrix = top_neighbours(torch.arange(n, dtype=torch.float32).repeat(n, 1), n)  # M[s, j] = j
    with_matrix = RewardContext(ctx.catalog, ctx.features, ctx.popularity, ctx.n_users, matrix)
    request = Request((10, 20))
    batch = RewardBatch([request] * 2, np.array([[46, 47, 48, 49], [0, 1, 2, 3]]), [()] * 2)
    raw = 2.0 * np.arange(n)
    valid = np.setdiff1d(np.arange(n), [10, 20])
    z = (raw - raw[valid].mean()) / raw[valid].std()
    np.testing.assert_allclose(RelevanceReward()(batch, with_matrix), [z[46:50].mean(), z[0:4].mean()])
    features = np.zeros((n, 2), np.float32)
    features[:, 0] = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)  # even items point one way, odd items the other
    flat = RewardContext(ctx.catalog, features, ctx.popularity, ctx.n_users)
    batch = RewardBatch([request] * 2, np.array([[2, 4, 6], [1, 3, 5]]), [()] * 2)
    std = math.sqrt(1 - 1 / 576)
    np.testing.assert_allclose(RelevanceReward()(batch, flat), [(1 + 1 / 24) / std, (-1 + 1 / 24) / std])


def readme_block(language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", README.read_text(), re.DOTALL).group(1)


def test_new_reward_through_a_config_line(tmp_path, monkeypatch, ctx):
    """A reward module written into tmp_path and named on the command line is built and scored."""
    (tmp_path / "my_reward.py").write_text(readme_block("python"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_reward", raising=False)
    cfg = load_config(None, ["h2po.rewards=[{name: ndcg, weight: 1.0}, {name: my_reward.DramaShare, weight: 0.5}]"])
    built = build_rewards(cfg.h2po.rewards)
    assert [(r.name, w) for r, w in built] == [("ndcg", 1.0), ("drama_share", 0.5)]
    lists = np.array([[2, 3, 9, 4], [0, 1, 4, 5]])  # Drama: items 2 and 9 -> 0.5; none -> 0
    batch = RewardBatch([Request((7,))] * 2, lists, [(3,), ()])
    scores = score_rewards([r for r, _ in built], batch, ctx)
    np.testing.assert_allclose(scores[:, 1], [0.5, 0.0])


def test_readme_yaml_example(tmp_path, monkeypatch):
    """The README's YAML snippet loads and builds, with `args` and the `module.Class` path."""
    (tmp_path / "my_reward.py").write_text(readme_block("python"))
    (tmp_path / "run.yaml").write_text(readme_block("yaml"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_reward", raising=False)
    built = build_rewards(load_config(tmp_path / "run.yaml").h2po.rewards)
    assert [r.name for r, _ in built] == ["ndcg", "relevance", "drama_share"] and built[2][0].genre == "Drama"


def test_default_config_rewards_build():
    assert [(r.name, w) for r, w in build_rewards(load_config().h2po.rewards)] == [("ndcg", 1.0)]
    reward, weight = build_rewards([{"name": "rewards.ndcg:NDCGReward", "weight": 2, "args": {"k": 5}}])[0]
    assert isinstance(reward, NDCGReward) and reward.k == 5 and weight == 2.0


class Raises(Reward):
    name = "raises"

    def __call__(self, batch, ctx):
        raise KeyError("genre")


class ReturnsNaN(Reward):
    name = "returns_nan"

    def __call__(self, batch, ctx):
        return np.where(np.arange(len(batch)) % 2 == 0, np.nan, 1.0)


class ReturnsInf(Reward):
    name = "returns_inf"

    def __call__(self, batch, ctx):
        return np.full(len(batch), np.inf)


class WrongShape(Reward):
    name = "wrong_shape"

    def __call__(self, batch, ctx):
        return np.zeros((len(batch), 2))


class NotNumbers(Reward):
    name = "not_numbers"

    def __call__(self, batch, ctx):
        return ["good"] * len(batch)


@pytest.mark.parametrize("reward, message", [
    (Raises(), r"'raises' raised KeyError: 'genre'"),
    (ReturnsNaN(), r"'returns_nan' returned 2 NaN and 0 inf values of 4 \(first at list 0\)"),
    (ReturnsInf(), r"'returns_inf' returned 0 NaN and 4 inf values of 4"),
    (WrongShape(), r"'wrong_shape' returned shape \(4, 2\) for a batch of 4 lists; expected \(4,\)"),
    (NotNumbers(), r"'not_numbers' returned list, not an array of numbers"),
])
def test_broken_reward_is_named(reward, message, ctx):
    batch = RewardBatch([Request((0,))] * 4, np.arange(12).reshape(4, 3), [()] * 4)
    with pytest.raises(RewardError, match=message) as info:
        score_rewards([NDCGReward(), reward], batch, ctx)
    assert info.value.reward == reward.name and isinstance(info.value, UserError)


@pytest.mark.parametrize("spec, message", [
    ({"name": "ndgc", "weight": 1.0}, r"unknown reward 'ndgc'"),
    ({"name": "no_such_module.Reward", "weight": 1.0}, r"cannot import module 'no_such_module'"),
    ({"name": "collections:OrderedDict", "weight": 1.0}, r"not a subclass of rewards.base.Reward"),
    ({"name": "rewards.ndcg:Missing", "weight": 1.0}, r"rewards.ndcg.Missing is missing"),
    ({"name": "ndcg", "weight": 1.0, "wieght": 2}, r"h2po.rewards\[0\]: unknown key 'wieght'"),
    ({"name": "ndcg"}, r"missing key 'weight'"),
    ({"name": "ndcg", "weight": "heavy"}, r"\(ndcg\): weight must be a finite number"),
    ({"name": "ndcg", "weight": 1.0, "args": {"kk": 3}}, r"\(ndcg\): bad args .* unexpected keyword"),
    ({"name": "ndcg", "weight": 1.0, "args": {"k": 0}}, r"\(ndcg\): bad args .* k must be a positive integer"),
])
def test_bad_spec_raises_user_error(spec, message):
    with pytest.raises(UserError, match=message):
        build_rewards([spec])


def test_duplicate_reward_names_raise():
    with pytest.raises(UserError, match="'ndcg' appears twice"):
        build_rewards([{"name": "ndcg", "weight": 1.0}, {"name": "ndcg", "weight": 0.5}])
    assert len(build_rewards([{"name": "ndcg", "weight": 1.0}, {"name": "ndcg", "weight": 1.0, "args": {"k": 20}}]))


def test_group_advantages_hand_computed():
    """Group 0: component 0 = [1, 0, 0, 1] (mean 0.5, std 0.5) -> z = [1, -1, -1, 1]; component 1 constant -> 0.
    Group 1: component 0 = [0, 0, 0, 4] (mean 1, std sqrt 3) -> z = [-1, -1, -1, 3] / sqrt 3;
    component 1 = [0, 1, 2, 3] (mean 1.5, std sqrt 1.25) -> z = [-1.5, -0.5, 0.5, 1.5] / sqrt 1.25.
    Weights (2, 5): A = 2 z0 + 5 z1."""
    scores = np.array([[[1, 3], [0, 3], [0, 3], [1, 3]],
                       [[0, 0], [0, 1], [0, 2], [4, 3]]], dtype=np.float64)  # (B=2, G=4, C=2)
    expected = np.array([[2, -2, -2, 2],
                         2 * np.array([-1, -1, -1, 3]) / math.sqrt(3)
                         + 5 * np.array([-1.5, -.5, .5, 1.5]) / math.sqrt(1.25)])
    np.testing.assert_allclose(group_advantages(scores, [2.0, 5.0]), expected)
    np.testing.assert_array_equal(group_advantages(np.full((1, 3, 1), 0.1), [1.0]), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="weights"):
        group_advantages(scores, [1.0])
