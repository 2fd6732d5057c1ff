"""Build the configured rewards, score a batch with them safely, and turn scores into group advantages.

The run config lists rewards as `h2po.rewards: [{name: ..., weight: ..., args: {...}}]`. `name` is a built-in
(ndcg, relevance, diversity, novelty, prefer, recency, intent) or a dotted path to a `Reward` subclass importable from
sys.path (the working directory included): `package.module:ClassName` or `package.module.ClassName`. `args` go to
its constructor. A bad spec raises `UserError` naming it.

`score_rewards` never lets a broken reward through: an exception, a wrong shape or NaN/inf values raise
`RewardError` naming the reward and what went wrong. It has no skip policy of its own: the caller (the rollout
loop) catches `RewardError` and, following `h2po.on_reward_error`, stops the run ("stop") or drops that batch and
counts it ("skip").
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import sys
from collections.abc import Sequence

import numpy as np
import torch

from core.errors import UserError
from rewards.base import Reward, RewardBatch, RewardContext

BUILTINS = {
    "ndcg": "rewards.ndcg:NDCGReward",
    "relevance": "rewards.relevance:RelevanceReward",
    "diversity": "rewards.diversity:DiversityReward",
    "novelty": "rewards.novelty:NoveltyReward",
    "prefer": "rewards.prefer:PreferReward",
    "recency": "rewards.recency:RecencyReward",
    "intent": "rewards.intent:IntentReward",
}
SPEC_KEYS = ("name", "weight", "args")


class RewardError(UserError):
    """A reward raised or returned something unusable; `reward` is its name."""

    def __init__(self, reward: str, problem: str) -> None:
        super().__init__(f"reward {reward!r} {problem}")
        self.reward, self.problem = reward, problem

    def __reduce__(self) -> tuple:
        """Pickle by constructor arguments, so the error crosses process boundaries (Ray) intact."""
        return type(self), (self.reward, self.problem)


def resolve_reward(name: str) -> type[Reward]:
    """The Reward subclass a built-in name or dotted path names; raises UserError."""
    path = BUILTINS.get(name, name)
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise UserError(f"unknown reward {name!r}: not a built-in ({', '.join(BUILTINS)}) "
                        f"nor a dotted path package.module:ClassName")
    importlib.invalidate_caches()  # a reward file written after start-up must be found
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"reward {name!r}: cannot import module {module_name!r} ({err}); "
                        f"sys.path starts {sys.path[:3]}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise UserError(f"reward {name!r}: {module_name}.{attr} is {'missing' if cls is None else repr(cls)}, "
                        f"not a subclass of rewards.base.Reward")
    return cls


def build_reward(spec: dict, where: str) -> tuple[Reward, float]:
    """One (reward, weight) from a spec {name, weight, args}; `where` names the spec in errors."""
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a mapping {{name, weight, args}}, got {spec!r}")
    unknown = sorted(set(spec) - set(SPEC_KEYS), key=str)
    missing = [key for key in ("name", "weight") if key not in spec]
    if unknown or missing:
        problem = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
        raise UserError(f"{where}: {problem} (a reward spec has {', '.join(SPEC_KEYS)}; args is optional)")
    name, weight, args = spec["name"], spec["weight"], spec.get("args") or {}
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: name must be a non-empty string, got {name!r}")
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not np.isfinite(weight):
        raise UserError(f"{where} ({name}): weight must be a finite number, got {weight!r}")
    if not isinstance(args, dict) or not all(isinstance(key, str) for key in args):
        raise UserError(f"{where} ({name}): args must be a mapping of argument names, got {args!r}")
    cls = resolve_reward(name)
    try:
        inspect.signature(cls).bind(**args)
        reward = cls(**args)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where} ({name}): bad args {args!r} for {cls.__name__}: {err}") from None
    return reward, float(weight)


def build_rewards(specs: Sequence[dict]) -> list[tuple[Reward, float]]:
    """(reward, weight) per spec of `h2po.rewards`; raises UserError naming the first bad spec."""
    if not specs:
        raise UserError("h2po.rewards: at least one reward is needed")
    built = [build_reward(spec, f"h2po.rewards[{i}]") for i, spec in enumerate(specs)]
    names = [reward.name for reward, _ in built]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"h2po.rewards: reward name {repeated[0]!r} appears twice (metric keys reward/<name> "
                        f"must be distinct)")
    return built


def check_scores(reward: Reward, scores: object, n_lists: int) -> np.ndarray:
    """`scores` as a (R,) float64 array, or RewardError naming `reward` and what is wrong with it."""
    try:
        out = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise RewardError(reward.name, f"returned {type(scores).__name__}, not an array of numbers ({err})") from None
    if out.shape != (n_lists,):
        raise RewardError(reward.name, f"returned shape {out.shape} for a batch of {n_lists} lists; "
                                       f"expected ({n_lists},)")
    n_nan, n_inf = int(np.isnan(out).sum()), int(np.isinf(out).sum())
    if n_nan or n_inf:
        first = int(np.flatnonzero(~np.isfinite(out))[0])
        raise RewardError(reward.name, f"returned {n_nan} NaN and {n_inf} inf values of {n_lists} "
                                       f"(first at list {first})")
    return out


def score_rewards(rewards: Sequence[Reward], batch: RewardBatch, ctx: RewardContext) -> np.ndarray:
    """(R, C) float64: column c holds reward c's score of every list; raises RewardError on a broken reward."""
    columns = []
    for reward in rewards:
        try:
            with torch.no_grad():
                scores = reward(batch, ctx)
        except Exception as err:  # any failure inside a user's reward becomes an error that names it
            raise RewardError(reward.name, f"raised {type(err).__name__}: {err}") from err
        columns.append(check_scores(reward, scores, len(batch)))
    return np.stack(columns, axis=1) if columns else np.zeros((len(batch), 0))


def group_advantages(scores: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """(B, G) advantages A from per-component scores (B, G, C) of G rollouts per request (DESIGN section 5).

    A[b, g] = sum_c w_c * (s[b, g, c] - mean_g s[b, :, c]) / std_g s[b, :, c], the population std over the group;
    a component whose G scores are all equal contributes 0 to that group.
    """
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if scores.ndim != 3 or weights.shape != (scores.shape[2],):
        raise ValueError(f"group_advantages needs scores (B, G, C) and weights (C,), got {scores.shape} and "
                         f"{weights.shape}")
    deviation = scores - scores.mean(1, keepdims=True)  # (B, G, C)
    std = scores.std(1, keepdims=True)  # (B, 1, C)
    flat = scores.max(1, keepdims=True) == scores.min(1, keepdims=True)  # (B, 1, C) all G scores equal
    z = np.divide(deviation, std, out=np.zeros_like(deviation), where=~flat)  # (B, G, C)
    return z @ weights
