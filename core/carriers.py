"""The typed carriers every layer passes around: requests and their constraints, a benchmark example, the padded
request tensors (`RequestBatch`), on-policy rollouts, logged pairs as tensors and one learner rank's batch.

Plain dataclasses (torch and numpy only): how they are made lives with their makers (`catalog.requests` checks a
user's request, `catalog.batch.encode_requests` pads requests, `rollout.generate` samples rollouts,
`rollout.buffer` shards learner batches).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass(frozen=True)
class Exclude:
    """Hard: no output item has `value` in `field`."""

    field: str
    value: str


@dataclass(frozen=True)
class Require:
    """Hard: every output item has `value` in `field`."""

    field: str
    value: str


@dataclass(frozen=True)
class Prefer:
    """Soft: items with `value` in `field` should rank higher, by `weight`."""

    field: str
    value: str
    weight: float = 1.0


@dataclass(frozen=True)
class Recency:
    """Hard with `min_year` (items of unknown year fail it); soft with `half_life` (years)."""

    min_year: int | None = None
    half_life: float | None = None


Constraint = Exclude | Require | Prefer | Recency
CONSTRAINT_TYPES = (Exclude, Require, Prefer, Recency)


@dataclass(frozen=True)
class Request:
    """What a user asks for; items are catalog indices."""

    seeds: tuple[int, ...]
    negatives: tuple[int, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    k: int = 20


@dataclass(frozen=True)
class Example:
    """A request with the held-out items it is judged against (benchmark and training)."""

    request: Request
    targets: tuple[int, ...]
    user: int
    family: str  # "A" seed-set completion, "B" fine-grained intent
    seed_size: int
    facet: tuple[str, int] | None = None  # family B: the (genre, decade) the request was drawn from


CONSTRAINT_KINDS = {"pad": 0, "exclude": 1, "require": 2, "prefer": 3, "min_year": 4, "half_life": 5}


@dataclass
class RequestBatch:
    """Tensors of B requests; `valid` is DESIGN 3.3's V (seeds, negatives, hard-constraint violators excluded)."""

    seeds: torch.Tensor  # (B, S) long, padded with 0
    seed_mask: torch.Tensor  # (B, S) bool
    negatives: torch.Tensor  # (B, M) long
    negative_mask: torch.Tensor  # (B, M) bool
    con_kind: torch.Tensor  # (B, C) long
    con_value: torch.Tensor  # (B, C) long
    con_scalar: torch.Tensor  # (B, C) float
    con_mask: torch.Tensor  # (B, C) bool
    valid: torch.Tensor  # (B, N) bool
    # (B, N) float: the seeds' EASE scores from an EASE fit without the request's user (model.prior_folds), which
    # the model reads in place of its own EASE rows; None: the model's own (`catalog.batch.encode_requests`)
    ease: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> RequestBatch:
        return RequestBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                               for f in fields(self)})

    def __len__(self) -> int:
        return self.seeds.shape[0]


@dataclass
class PairBatch:
    """P logged pairs as tensors (`learner.update.PairTensors`)."""

    batch: RequestBatch  # (P rows) each pair's request
    chosen: torch.Tensor  # (P, K) long
    rejected: torch.Tensor  # (P, K) long
    weights: torch.Tensor  # (P,) float32

    def __len__(self) -> int:
        return len(self.chosen)


@dataclass
class Rollouts:
    """B requests x G sampled lists, flattened request-major (row b * G + g)."""

    examples: list[Example]  # (B,)
    batch: RequestBatch  # (B*G rows) each row's request, encoded once (the sampler's input; CPU)
    items: torch.Tensor  # (B*G, K) long
    step_of: torch.Tensor  # (B*G, K) long
    behaviour_logp: torch.Tensor  # (B*G, K) float
    rewards: np.ndarray  # (B*G, C) raw reward components
    advantages: torch.Tensor  # (B*G,) float
    version: int  # weight version of the policy that sampled them
    seconds: float = 0.0  # wall time of sampling and scoring them (0 for groups split off a batch)

    @property
    def group_size(self) -> int:
        return len(self.items) // max(len(self.examples), 1)

    @property
    def requests(self) -> list[Request]:
        """The request of every row (each example's request G times, request-major)."""
        return [e.request for e in self.examples for _ in range(self.group_size)]


@dataclass
class LearnerBatch:
    """What one learner rank trains on in one step; either part may be absent."""

    rollouts: Rollouts | None
    pairs: PairBatch | None

    @property
    def n_requests(self) -> int:
        return 0 if self.rollouts is None else len(self.rollouts.examples)
