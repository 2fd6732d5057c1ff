"""Device and precision paths of H2PO: bf16 autocast of the forward passes, and the GPU placement of rollouts,
losses and the DeepSpeed engine.

The autocast test runs everywhere (CPU bf16 autocast exercises the same dtype mixing as CUDA's). The `cuda`
tests run only where a GPU is visible; on a CPU machine they are reported as skipped, not passed.
Run: `PYTHONPATH=. python -m pytest tests/test_device.py -q`.
"""

from __future__ import annotations

import copy
import socket

import numpy as np
import pytest
import torch

from catalog.dataset import Dataset, training_examples
from catalog.preferences import PreferencePair
from catalog.requests import valid_mask
from core.carriers import Rollouts
from core.config import DataConfig, H2POConfig, MostConfig, RequestConfig
from learner.pretrain import most_step
from learner.update import batch_loss, fixed_log_probs, rollout_log_probs
from rewards.base import RewardContext
from rewards.registry import build_rewards
from rollout.buffer import encode_pairs
from rollout.generate import generate_rollouts

pytestmark = pytest.mark.usefixtures("single_thread")
K = 4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def inputs(tiny_catalog, tiny_vocab, tiny_prior_model):
    """The tiny prior model, its frozen reference, fresh requests, two logged pairs and MOST anchor inputs."""
    data = Dataset.build(tiny_catalog, DataConfig())
    requests = RequestConfig(seed_sizes=[1, 2], family_b_share=0.0, k=K)
    examples = training_examples(data, requests, 3, np.random.default_rng(0))
    allowed = [np.flatnonzero(valid_mask(tiny_catalog, e.request)).tolist() for e in examples[:2]]
    pairs = [PreferencePair(e.request, tuple(a[:K]), tuple(a[-K:]), 1.0, "test") for e, a in zip(examples, allowed)]
    relevance = tiny_prior_model.prior
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)

    def anchor():
        return most_step(tiny_prior_model, data, tiny_vocab, np.eye(tiny_catalog.n_items, 8), relevance, requests,
                         MostConfig(batch_size=3), rng, generator)
    pairs = encode_pairs(tiny_catalog, pairs, tiny_vocab)
    ctx = RewardContext.from_dataset(data, np.eye(tiny_catalog.n_items, 8), relevance)
    reference = copy.deepcopy(tiny_prior_model).requires_grad_(False)
    return tiny_prior_model, reference, examples, pairs, anchor, ctx


def rollouts_and_loss(inputs, tiny_catalog, tiny_vocab, device: str, bf16: bool, seed: int = 0):
    """Rollouts (3 requests x G=2) and the full H2PO loss on `device`; bf16 = autocast there."""
    model, reference, examples, pairs, anchor, ctx = inputs
    model.to(device), reference.to(device)
    rewards = build_rewards([{"name": "ndcg", "weight": 1.0}])
    generator = torch.Generator(device=device).manual_seed(seed)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        rollouts = generate_rollouts(model, tiny_catalog, tiny_vocab, examples, 2, 2, 1.0, rewards, ctx, 0,
                                     generator)
        fixed = fixed_log_probs(model, reference, rollouts)
        loss, stats = batch_loss(model, reference, rollouts, fixed, pairs, H2POConfig(vrpo_samples=2), 1.0, 1e-3,
                                 torch.Generator().manual_seed(seed), anchor)
    return rollouts, loss, stats


def assert_valid(rollouts: Rollouts, tiny_catalog) -> None:
    """CPU tensors; every list has K distinct items, none of them a seed."""
    assert rollouts.items.device.type == rollouts.behaviour_logp.device.type == "cpu"
    for row, items in enumerate(rollouts.items.tolist()):
        seeds = rollouts.examples[row // rollouts.group_size].request.seeds
        assert len(set(items)) == K and not set(items) & set(seeds)


def test_bf16_autocast_keeps_fp32_weights_head_and_finite_gradients(inputs, tiny_catalog, tiny_vocab):
    """Under bf16 autocast the losses stay finite, gradients reach fp32 parameters, the item head's logits are
    fp32, and the rollouts' trajectory log-probs re-scored in fp32 stay close to bf16's behaviour ones (the
    decoupled-PPO weight pi_prox / pi_behav corrects the rest)."""
    rollouts, loss, stats = rollouts_and_loss(inputs, tiny_catalog, tiny_vocab, "cpu", bf16=True)
    assert_valid(rollouts, tiny_catalog)
    assert torch.isfinite(loss) and all(np.isfinite(v) for v in stats.values())
    loss.backward()
    model = inputs[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        fp32 = rollout_log_probs(model, rollouts)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            ctx = model.encode(rollouts.batch)
            assert model.logits(ctx, model.hidden(ctx, rollouts.items)).dtype == torch.float32
    assert rollouts.behaviour_logp.dtype == torch.float32
    assert_bf16_close(fp32, rollouts.behaviour_logp)


def assert_bf16_close(fp32: torch.Tensor, bf16: torch.Tensor) -> None:
    """bf16 log-probs: mean absolute gap to fp32 under 0.05 nats and every slot's under 0.5 (importance weight
    pi_prox / pi_behav within [0.6, 1.65], well inside the cap of 5)."""
    gap = (fp32 - bf16).abs()
    assert gap.mean() < 0.05 and gap.max() < 0.5, (gap.mean(), gap.max())


@cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_rollouts_and_losses_on_cuda(inputs, tiny_catalog, tiny_vocab, bf16):
    """Model on the GPU: rollouts come back as valid CPU tensors, the loss backpropagates into GPU parameters, and
    fp32 re-scoring on the GPU matches the behaviour log-probs (to 1e-4 in fp32, `assert_bf16_close` under bf16)."""
    rollouts, loss, _ = rollouts_and_loss(inputs, tiny_catalog, tiny_vocab, "cuda", bf16)
    assert_valid(rollouts, tiny_catalog)
    loss.backward()
    model = inputs[0]
    assert model.device.type == "cuda" and all(p.grad.is_cuda for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        fp32 = rollout_log_probs(model, rollouts).cpu()
    if bf16:
        assert_bf16_close(fp32, rollouts.behaviour_logp)
    else:
        torch.testing.assert_close(fp32, rollouts.behaviour_logp, atol=1e-4, rtol=0)


@cuda
def test_engine_steps_on_cuda_with_nccl(inputs, tiny_catalog, tiny_vocab):
    """One DeepSpeed rank on the GPU: nccl, the policy moved to the GPU, a step changes the weights, and the
    published state dict is fp32 on the CPU."""
    import torch.distributed as dist

    from learner.engine import Engine, EngineConfig, backend, init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed(0, 1, port)
    try:
        assert backend() == "nccl"
        model = inputs[0]
        engine = Engine(model, EngineConfig(zero_stage=2, lr=1e-3, grad_clip=1.0))
        assert engine.module.device.type == "cuda"
        before = engine.state_dict(buffers=False)
        _, loss, _ = rollouts_and_loss(inputs, tiny_catalog, tiny_vocab, "cuda", bf16=True)
        engine.step(loss)
        after = engine.state_dict(buffers=False)
        assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in after.values())
        assert any(not torch.equal(before[k], after[k]) for k in before)
    finally:
        dist.destroy_process_group()


@cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_served_policy_on_cuda(tiny_checkpoint, tiny_catalog, bf16):
    """`serve.replica_gpus` > 0: the replica's lister holds the model on the GPU and says so (with bf16 when
    serve.bf16); its greedy lists are valid (k distinct items, no seed, the hard constraint kept), and in fp32
    they are the CPU lister's lists."""
    from core.carriers import Exclude, Request
    from serving.lists import load_policy

    lister = load_policy(tiny_checkpoint, device="cuda", bf16=bf16)
    assert lister.facts["device"].startswith("cuda") and lister.facts["precision"] == ("bf16" if bf16 else "fp32")
    requests = [Request((0, 1), k=8), Request((5,), (), (Exclude("genre", "Horror"),), 12), Request((2, 3, 4), k=5)]
    lists = lister.lists(requests)
    assert [len(x) for x in lists] == [8, 12, 5] and all(len(set(x)) == len(x) for x in lists)
    assert all(not set(r.seeds) & set(x) for r, x in zip(requests, lists))
    assert not tiny_catalog.has_value("genre", "Horror")[lists[1]].any()
    if not bf16:
        cpu = load_policy(tiny_checkpoint).lists(requests)
        assert [sorted(x) for x in lists] == [sorted(x) for x in cpu]
