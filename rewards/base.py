"""The reward interface (DESIGN section 6): a batch of requests and their generated lists in, one float per list out.

A reward is a small class with a `name` and `__call__(batch, ctx) -> (R,) float64`. It is deterministic and needs
no gradient (it is called under `torch.no_grad()`). Everything a reward may read besides the batch lives in the
frozen `RewardContext`, built once per run. Shapes: R lists in a batch, K items per list, N catalog items,
F feature dimensions. `rewards/registry.py` builds rewards from the run config and checks what they return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from catalog.dataset import Dataset
from catalog.schema import Catalog
from core.carriers import Request
from core.numerics import Neighbours, unit_rows


@dataclass(frozen=True, eq=False)
class RewardContext:
    """What rewards may read besides the batch; built once per run, never mutated."""

    catalog: Catalog
    features: np.ndarray  # (N, F) float32, rows of unit L2 norm
    popularity: np.ndarray  # (N,) positives per item among training users
    n_users: int  # number of training users U
    relevance: Neighbours | None = None  # (N, m) item-to-item relevance, e.g. EASE's top-m rows; None = cosine

    @classmethod
    def from_dataset(cls, data: Dataset, features: np.ndarray, relevance: Neighbours | None = None) -> RewardContext:
        """The context of a run: training popularity and user count from `data`, features scaled to unit rows."""
        return cls(data.catalog, unit_rows(features), data.train_popularity, len(data.train_users), relevance)


@dataclass
class RewardBatch:
    """R generated lists and the requests they answer (rollouts of one request repeat its row)."""

    requests: Sequence[Request]  # (R,)
    lists: np.ndarray  # (R, K) int64 item indices
    targets: Sequence[tuple[int, ...]]  # (R,) held-out positives per list; () when unknown

    def __post_init__(self) -> None:
        if self.lists.ndim != 2 or not len(self.requests) == len(self.targets) == len(self.lists):
            raise ValueError(f"a RewardBatch needs (R, K) lists, R requests and R targets; got lists "
                             f"{self.lists.shape}, {len(self.requests)} requests, {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.lists)


class Reward:
    """One reward component. Subclasses set `name` and implement `__call__`; constructor arguments come from the
    spec's `args` in the run config, so every argument needs a default for the contract test."""

    name: str = "reward"

    def __call__(self, batch: RewardBatch, ctx: RewardContext) -> np.ndarray:
        """(R,) float64: one score per list of `batch`, deterministic, no gradient."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
