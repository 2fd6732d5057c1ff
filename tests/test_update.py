"""Tests of the H2PO update loop on tensors (`learner/update.py`), with no catalog: small tensors whose loss and
gradient are computed by hand, and a tiny Retriever (N=12 items, D=32, K=4) on hand-made request tensors.
Run: `PYTHONPATH=. python -m pytest tests/test_update.py -q` (seconds).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import N_FEATURES, TINY_MODEL_CONFIG, randomise

from core.carriers import RequestBatch
from core.config import H2POConfig
from learner.update import (
    OffPolicyTerms,
    OnPolicyTerms,
    adamw_step,
    fixed_log_probs,
    h2po_losses,
    h2po_update,
    rollout_log_probs,
)
from model.transformer import Retriever
from rollout.sampler import sample_lists

pytestmark = pytest.mark.usefixtures("single_thread")
N, K = 12, 4
CFG = H2POConfig(kl_beta=0.04, dpo_beta=0.1, lambda_sft=0.1, vrpo_samples=2, inner_epochs=2)


# ---------------------------------------------------------------- h2po_losses: tensors in, loss out


def hand_terms() -> tuple[OnPolicyTerms, OffPolicyTerms]:
    """On-policy: r = pi / pi_prox = ((1.25, 1.5), (0.5, 0.85)), prox = behav = ref = 0, A = (2, -1). Off-policy:
    the pairs of tests/test_h2po.py::test_dpo_loss_hand_computed (margins 0.4 and -0.2, weights 1)."""
    logp = torch.log(torch.tensor([[1.25, 1.5], [0.5, 0.85]])).requires_grad_()
    zeros = torch.zeros(2, 2)
    on = OnPolicyTerms(logp, zeros, zeros, zeros, torch.tensor([2.0, -1.0]))
    policy_chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    off = OffPolicyTerms(policy_chosen, torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -1.0]),
                         torch.tensor([-2.0, -2.0]), torch.ones(2))
    return on, off


def test_h2po_losses_hand_computed():
    """L_on = -0.8525 (the asymmetric-clip example: 1.5 clipped to 1.28, 0.5 to 0.8). k3 with ref = 0 is
    1/r + log r - 1 = (0.0231436, 0.0721318, 0.3068528, 0.0139517), mean 0.1040199. L_off = 0.6555771.
    Anchor 3. L = -0.8525 + 0.04 * 0.1040199 + 0.5 * 0.6555771 + 0.1 * 3 = -0.2205507 (lambda_off 0.5).
    d L / d logp = PPO's (-0.625, 0, 0, 0.2125) + 0.04 (1 - 1/r) / 4 = (0.002, 0.0033333, -0.01, -0.0017647)
    -> (-0.623, 0.0033333, -0.01, 0.2107353); d L / d policy_chosen_0 = 0.5 * -0.1 sigmoid(-0.4) / 2 = -0.0100328."""
    on, off = hand_terms()
    loss, stats = h2po_losses(on, off, torch.tensor(3.0), CFG, lambda_off=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(-0.2205507, abs=1e-6)
    assert stats["loss/on"] == pytest.approx(-0.8525, abs=1e-6) and stats["kl"] == pytest.approx(0.1040199, abs=1e-6)
    assert stats["loss/off"] == pytest.approx(0.6555771, abs=1e-6) and stats["loss/anchor"] == 3.0
    assert stats["loss/total"] == pytest.approx(-0.2205507, abs=1e-6) and stats["dpo/accuracy"] == 0.5
    torch.testing.assert_close(on.logp.grad, torch.tensor([[-0.623, 0.0033333], [-0.01, 0.2107353]]), atol=1e-6,
                               rtol=0)
    assert off.policy_chosen.grad[0].item() == pytest.approx(-0.0100328, abs=1e-6)


def test_h2po_losses_absent_parts_count_zero():
    """Only the anchor (2.0): L = 0.1 * 2 = 0.2, every other term 0 and no PPO/DPO stats; nothing at all: 0."""
    loss, stats = h2po_losses(None, None, torch.tensor(2.0), CFG, lambda_off=1.0)
    assert loss.item() == pytest.approx(0.2) and stats["loss/on"] == stats["loss/off"] == 0.0
    assert "kl" not in stats and "dpo/margin" not in stats
    assert h2po_losses(None, None, None, CFG, 1.0)[0].item() == 0.0


# ---------------------------------------------------------------- the loop, on a tiny model without a catalog


def tiny_model(seed: int = 0) -> Retriever:
    """A randomised 2-layer D=32 Retriever over N=12 items with random features and 3 constraint values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Retriever(TINY_MODEL_CONFIG, torch.randn(N, N_FEATURES, generator=generator), n_values=3)
    return randomise(model, seed)


def requests(rows: int) -> RequestBatch:
    """`rows` requests by hand: request b has seeds {b % N, (b + 1) % N}, no negatives, no constraints; the seeds are
    invalid outputs, every other item valid."""
    seeds = torch.tensor([[b % N, (b + 1) % N] for b in range(rows)])
    valid = torch.ones(rows, N, dtype=torch.bool)
    valid.scatter_(1, seeds, False)
    empty = torch.zeros(rows, 0, dtype=torch.long)
    return RequestBatch(seeds, torch.ones_like(seeds, dtype=torch.bool), empty, empty.bool(), empty, empty,
                        empty.float(), empty.bool(), valid)


def rollouts(model: Retriever, advantages: list[float], seed: int = 1) -> SimpleNamespace:
    """Lists sampled at T = 1 in 2 steps with their trajectories (`learner.update.RolloutTensors`)."""
    batch = requests(len(advantages))
    out = sample_lists(model, batch, K, 2, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    return SimpleNamespace(batch=batch, items=out.items, step_of=out.step_of, behaviour_logp=out.logp,
                           advantages=torch.tensor(advantages))


class RecordingStep:
    """A step_fn: records each loss, then (lr > 0) plain SGD on the model's parameters; returns 0 as the norm."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.0) -> None:
        self.model, self.lr, self.losses = model, lr, []

    def __call__(self, loss: torch.Tensor) -> float:
        self.losses.append(loss.item())
        if self.lr > 0:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        p.sub_(self.lr * g)
        return 0.0


def test_first_epoch_has_ratio_one_and_loss_minus_mean_advantage():
    """Unchanged weights: pi_prox = pi_behav = logp and pi_ref = pi, so r = w = 1, nothing is clipped, KL = 0 and
    L_on = -mean_r A = -(1 - 0.5 + 0.25 + 2) / 4 = -0.6875 (every row keeps all K slots); lambda_sft = 0, no pairs."""
    model = tiny_model()
    ref = copy.deepcopy(model)
    data = rollouts(model, [1.0, -0.5, 0.25, 2.0])
    prox, ref_logp = fixed_log_probs(model, ref, data)
    torch.testing.assert_close(prox, data.behaviour_logp, atol=1e-5, rtol=0)
    assert torch.equal(prox, ref_logp)
    step = RecordingStep(model)
    stats = h2po_update(model, ref, data, None, step, H2POConfig(lambda_sft=0.0, inner_epochs=1), 1.0, 1e-3,
                        torch.Generator().manual_seed(0))
    assert step.losses == [pytest.approx(-0.6875, abs=1e-4)]
    assert stats["loss/on"] == pytest.approx(-0.6875, abs=1e-4) and stats["kl"] == pytest.approx(0.0, abs=1e-7)
    assert stats["ppo/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and stats["ppo/clip_fraction"] == 0.0
    assert stats["grad_norm"] == 0.0


def test_prox_and_reference_are_fixed_per_batch():
    """Two inner epochs with SGD (lr 0.5) between them: the second epoch's loss is `h2po_losses` of the moved
    policy's logp against the *first* epoch's pi_prox and pi_ref (not recomputed), so r != 1 and KL > 0; the loop
    returns the mean of the two epochs' stats."""
    model = tiny_model()
    ref = copy.deepcopy(model)
    data = rollouts(model, [1.0, -1.0, 0.5, -0.5])
    prox, ref_logp = fixed_log_probs(model, ref, data)
    cfg = H2POConfig(lambda_sft=0.0, inner_epochs=2)
    step = RecordingStep(model, lr=0.5)
    stats = h2po_update(model, ref, data, None, step, cfg, 1.0, 1e-3, torch.Generator().manual_seed(0))
    once = tiny_model()  # the same start, one epoch: the weights the two-epoch run had at its second epoch
    h2po_update(once, ref, data, None, RecordingStep(once, lr=0.5), H2POConfig(lambda_sft=0.0, inner_epochs=1), 1.0,
                1e-3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = rollout_log_probs(once, data)
    expected, expected_stats = h2po_losses(OnPolicyTerms(logp, prox, ref_logp, data.behaviour_logp, data.advantages),
                                           None, None, cfg, 1.0)
    assert step.losses[1] == pytest.approx(expected.item(), abs=1e-6)
    assert abs(expected_stats["ppo/ratio_mean"] - 1) > 1e-4 and expected_stats["kl"] > 0
    assert stats["loss/total"] == pytest.approx(sum(step.losses) / 2, abs=1e-6)


def test_pairs_with_policy_equal_to_reference_give_log_two():
    """Logged pairs only, policy = reference, shared VRPO noise: every margin is 0, so L_off = log 2 = 0.693147 and
    L = lambda_off * log 2 = 0.5 * 0.693147; two epochs draw fresh noise (the generator moves) and agree."""
    model = tiny_model()
    ref = copy.deepcopy(model)
    chosen = rollouts(model, [0.0, 0.0, 0.0], seed=3).items
    rejected = rollouts(model, [0.0, 0.0, 0.0], seed=4).items
    pairs = SimpleNamespace(batch=requests(3), chosen=chosen, rejected=rejected, weights=torch.tensor([1.0, 2.0, 0.5]))
    step = RecordingStep(model)
    generator = torch.Generator().manual_seed(0)
    stats = h2po_update(model, ref, None, pairs, step, H2POConfig(lambda_sft=0.0, vrpo_samples=2), 0.5, 1e-3, generator)
    assert step.losses == [pytest.approx(0.5 * math.log(2), abs=1e-6)] * 2
    assert stats["dpo/margin"] == 0.0 and stats["loss/off"] == pytest.approx(math.log(2), abs=1e-6)
    assert not torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())


def test_anchor_is_called_once_per_epoch_and_required():
    """lambda_sft 0.1 and an anchor returning 2: L = 0.1 * 2 = 0.2 in each of 3 epochs (no rollouts, no pairs);
    without an anchor the loop refuses to start."""
    model = tiny_model()
    calls = []

    def anchor():
        calls.append(1)
        return torch.tensor(2.0)
    step = RecordingStep(model)
    h2po_update(model, model, None, None, step, H2POConfig(lambda_sft=0.1, inner_epochs=3), 1.0, 1e-3,
                torch.Generator(), anchor)
    assert len(calls) == 3 and step.losses == [pytest.approx(0.2)] * 3
    with pytest.raises(ValueError, match="anchor"):
        h2po_update(model, model, None, None, step, H2POConfig(lambda_sft=0.1), 1.0, 1e-3, torch.Generator())


def test_adamw_step_returns_the_norm_and_moves_by_lr():
    """loss = sum(3 w) over 4 weights: gradient 3 each, global norm sqrt(4 * 9) = 6 (returned before clipping);
    Adam's first step moves every weight by exactly -lr (m_hat / sqrt(v_hat) = 1), clip 1 or none (0)."""
    for clip in (1.0, 0.0):
        weights = torch.nn.Parameter(torch.zeros(4))
        module = torch.nn.Module()
        module.w = weights
        norm = adamw_step(module, lr=0.1, grad_clip=clip)((3 * weights).sum())
        assert norm == pytest.approx(6.0)
        torch.testing.assert_close(weights.detach(), torch.full((4,), -0.1))
