"""On-policy rollout generation (no Ray): G sampled lists per request, their trajectories, rewards and advantages.

This is what a rollout actor runs for every batch (DESIGN section 7): the requests are repeated G times, sampled
at the rollout temperature in one batched call, scored by every configured reward (a failing reward raises
`RewardError` naming it), and each reward component is z-scored within its group of G before the weighted sum
gives the advantage (DESIGN section 5).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from catalog.batch import RequestBatch, encode_requests
from catalog.requests import Example, Request
from catalog.schema import Catalog
from model.transformer import Retriever, precision
from rewards.base import Reward, RewardBatch, RewardContext
from rewards.registry import group_advantages, score_rewards
from rollout.sampler import sample_lists


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


def generate_rollouts(model: Retriever, catalog: Catalog, vocab: dict, examples: list[Example], group_size: int,
                      steps: int, temperature: float, rewards: list[tuple[Reward, float]], ctx: RewardContext,
                      version: int, generator: torch.Generator | None = None, bf16: bool = False) -> Rollouts:
    """Sample G lists for each of B training requests and score them.

    The sampler runs on the model's device (`generator`, if given, must live there too), under bf16 autocast when
    `bf16` is set and that device is a GPU; the returned tensors are on the CPU."""
    start = time.perf_counter()
    model.eval()
    repeated = [e for e in examples for _ in range(group_size)]
    batch = encode_requests(catalog, [e.request for e in repeated], vocab)
    k = examples[0].request.k
    with precision(model, bf16):
        samples = sample_lists(model, batch.to(model.device), k, steps, temperature, generator)
    items = samples.items.cpu()
    scored = score_rewards([r for r, _ in rewards], RewardBatch([e.request for e in repeated], items.numpy(),
                                                [e.targets for e in repeated]), ctx)  # (B*G, C)
    weights = np.array([w for _, w in rewards], dtype=np.float64)
    adv = group_advantages(scored.reshape(len(examples), group_size, -1), weights).reshape(-1)
    return Rollouts(examples, batch, items, samples.step_of.cpu(), samples.logp.float().cpu(), scored,
                    torch.from_numpy(adv).float(), version, time.perf_counter() - start)
