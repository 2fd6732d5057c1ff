"""On-policy rollout generation (no Ray): G sampled lists per request, their trajectories, rewards and advantages.

This is what a rollout actor runs for every batch (DESIGN section 7): the requests are repeated G times, sampled
at the rollout temperature in one batched call, scored by every configured reward (a failing reward raises
`RewardError` naming it), and each reward component is z-scored within its group of G before the weighted sum
gives the advantage (DESIGN section 5).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from catalog.batch import encode_requests
from catalog.schema import Catalog
from core.carriers import Example, Rollouts
from core.numerics import Neighbours
from model.transformer import Retriever, precision
from rewards.base import Reward, RewardBatch, RewardContext
from rewards.registry import group_advantages, score_rewards
from rollout.sampler import sample_lists


def generate_rollouts(model: Retriever, catalog: Catalog, vocab: dict, examples: list[Example], group_size: int,
                      steps: int, temperature: float, rewards: list[tuple[Reward, float]], ctx: RewardContext,
                      version: int, generator: torch.Generator | None = None, bf16: bool = False,
                      order: str = "slots", ease: Neighbours | None = None) -> Rollouts:
    """Sample G lists for each of B training requests and score them; `order` (sampler.order) "score": the rewards
    score each list in the order it would be served (`served_order`), the trajectory keeps the sampler's slots.
    `ease`: the EASE the requests' prior reads, fit without their users (model.prior_folds), carried in
    `Rollouts.batch` so that the learner scores the lists with the same prior; None: the model's own.

    The sampler runs on the model's device (`generator`, if given, must live there too), under bf16 autocast when
    `bf16` is set and that device is a GPU; the returned tensors are on the CPU."""
    start = time.perf_counter()
    model.eval()
    repeated = [e for e in examples for _ in range(group_size)]
    batch = encode_requests(catalog, [e.request for e in repeated], vocab, ease)
    k = examples[0].request.k
    with precision(model, bf16):
        on_device = batch.to(model.device)
        samples = sample_lists(model, on_device, k, steps, temperature, generator, order)
    items = samples.items.cpu()
    served = samples.served.cpu().numpy()
    scored = score_rewards([r for r, _ in rewards], RewardBatch([e.request for e in repeated], served,
                                                                [e.targets for e in repeated]), ctx)  # (B*G, C)
    weights = np.array([w for _, w in rewards], dtype=np.float64)
    adv = group_advantages(scored.reshape(len(examples), group_size, -1), weights).reshape(-1)
    return Rollouts(examples, batch, items, samples.step_of.cpu(), samples.logp.float().cpu(), scored,
                    torch.from_numpy(adv).float(), version, time.perf_counter() - start)
