"""`RolloutActor`: a policy copy tagged with a weight version that samples and scores rollouts (DESIGN section 7).

A Ray shell around `rollout.generate.generate_rollouts`: fresh training requests (`catalog.dataset.
training_examples`; with model.prior_folds, one fold's users, whose prior is EASE fit without them), G lists each at
the rollout temperature, rewards and group advantages, and the requests encoded once (`Rollouts.batch`, with their
out-of-fold EASE scores: the learner ranks use these tensors). `generate` returns two objects, a small summary the
driver waits for and the rollouts, which the driver passes on to the buffer as a reference. A reward that fails
raises `rewards.registry.RewardError` naming it; Ray re-raises it in the caller (the driver applies
`h2po.on_reward_error`). Resources (CPUs or a GPU) are set by the driver with `.options(...)`.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from actors.policy import ActorProcess, load_policy, load_weights
from catalog.dataset import training_examples
from core.carriers import Rollouts
from core.config import RunConfig
from learner.pretrain import draw_fold
from rewards.base import RewardContext
from rewards.registry import build_rewards
from rollout.generate import generate_rollouts


@ray.remote
class RolloutActor(ActorProcess):
    """Holds a versioned policy copy; `generate` returns Rollouts tagged with that version."""

    def __init__(self, cfg: RunConfig, checkpoint: str, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.policy = load_policy(cfg, checkpoint)
        if torch.cuda.is_available():  # Ray exposes only the GPU(s) this actor was given
            self.policy.model.cuda()
        self.rewards = build_rewards(cfg.h2po.rewards)
        ws = self.policy.ws
        self.reward_ctx = RewardContext.from_dataset(ws.data, ws.features, self.policy.relevance)
        self.version = 0

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Adopt published weights (parameters; buffers are constants) and their version."""
        load_weights(self.policy.model, state)
        self.version = version
        return version

    def weight_version(self) -> int:
        return self.version

    def reward_names(self) -> list[str]:
        return [reward.name for reward, _ in self.rewards]

    @ray.method(num_returns=2)
    def generate(self, n_requests: int, seed: int) -> tuple[dict, Rollouts]:
        """G rollouts for each of n fresh training requests, drawn with (actor seed, call seed).
        -> ({"lists", "seconds", "version"}, the rollouts)"""
        rng = np.random.default_rng([self.seed, seed])
        model = self.policy.model
        generator = torch.Generator(device=model.device).manual_seed(int(rng.integers(1 << 62)))
        ws, h2po = self.policy.ws, self.cfg.h2po
        fold = draw_fold(self.policy.folds, rng)
        examples = training_examples(ws.data, self.cfg.requests, n_requests, rng,
                                     None if fold is None else fold.users)
        rollouts = generate_rollouts(model, ws.data.catalog, ws.vocab, examples, h2po.group_size,
                                     self.cfg.sampler.steps, h2po.rollout_temperature, self.rewards, self.reward_ctx,
                                     self.version, generator, self.cfg.system.bf16, self.cfg.sampler.order,
                                     None if fold is None else fold.prior)
        return {"lists": len(rollouts.items), "seconds": rollouts.seconds, "version": rollouts.version}, rollouts
