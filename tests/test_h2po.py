"""Tests of the H2PO losses (DESIGN section 5): k3 KL, decoupled PPO, VRPO ELBO + DPO, the objective and schedule.

Hand-computed values are in the docstrings; the model tests use the tiny randomised Retriever of conftest.py.
Run: `PYTHONPATH=. python -m pytest tests/test_h2po.py -q`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from catalog.batch import encode_requests
from core.carriers import Exclude, Recency, Request
from learner.h2po import (
    decoupled_ppo_loss,
    dpo_loss,
    h2po_objective,
    k3_kl,
    lambda_off_at,
    sample_vrpo_noise,
    vrpo_elbo,
)
from model.diffusion import elbo_nll, trajectory_log_probs
from rollout.sampler import sample_lists

pytestmark = pytest.mark.usefixtures("single_thread")
K = 8
CLIP = {"clip_low": 0.2, "clip_high": 0.28, "max_iw": 5.0}


# ---------------------------------------------------------------- k3 KL


def test_k3_kl_hand_computed():
    """logp = (0, 0, -1), ref = (0, -1, 0): delta = ref - logp = (0, -1, 1) ->
    (1 - 0 - 1, e^-1 + 1 - 1, e - 1 - 1) = (0, 0.367879, 0.718282)."""
    kl = k3_kl(torch.tensor([0.0, 0.0, -1.0]), torch.tensor([0.0, -1.0, 0.0]))
    torch.testing.assert_close(kl, torch.tensor([0.0, math.exp(-1), math.e - 2]), atol=1e-6, rtol=0)


def test_k3_kl_zero_iff_equal():
    """k3 = e^d - d - 1 is 0 at d = 0 exactly and > 0 for every d != 0 (random log-probs, seeded)."""
    generator = torch.Generator().manual_seed(0)
    logp = -torch.rand((4, K), generator=generator) * 5
    ref = -torch.rand((4, K), generator=generator) * 5
    assert torch.equal(k3_kl(logp, logp), torch.zeros_like(logp))
    assert (k3_kl(logp, ref) > 0).all()


# ---------------------------------------------------------------- decoupled PPO


def plain_ppo_loss(logp, old_logp, advantages, mask, eps_low, eps_high):
    """The textbook clipped PPO surrogate, per slot, averaged over the masked slots."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    objective = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    return -(objective * mask).sum() / mask.sum()


def test_decoupled_ppo_equals_plain_ppo_when_prox_is_behaviour():
    """prox == behav: every importance weight is 1, nothing is dropped, and loss and d loss / d logp equal the plain
    clipped PPO surrogate (random log-probs with ratios spread over both clip bounds, seeded)."""
    generator = torch.Generator().manual_seed(1)
    old = -torch.rand((6, K), generator=generator) * 4
    logp = (old + 0.5 * torch.randn((6, K), generator=generator)).requires_grad_()
    advantages = torch.randn(6, generator=generator)
    mask = torch.rand((6, K), generator=generator) < 0.8
    loss, stats = decoupled_ppo_loss(logp, old, old, advantages, mask, **CLIP)
    (grad,) = torch.autograd.grad(loss, logp)
    logp_plain = logp.detach().clone().requires_grad_()
    expected = plain_ppo_loss(logp_plain, old, advantages, mask, 0.2, 0.28)
    (grad_plain,) = torch.autograd.grad(expected, logp_plain)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, grad_plain, atol=1e-7, rtol=1e-6)
    assert stats["ppo/dropped_share"].item() == 0.0
    assert 0.0 < stats["ppo/clip_fraction"].item() < 1.0


def test_decoupled_ppo_asymmetric_clip_hand_computed():
    """w = 1. Row 0, A = +2, r = (1.25, 1.5): 1.25 < 1.28 is not clipped -> 2.5; 1.5 is clipped to 1.28 -> 2.56.
    Row 1, A = -1, r = (0.5, 0.85): min(-0.5, -0.8) = -0.8 (clipped); 0.85 > 0.8 is not clipped -> -0.85.
    loss = -(2.5 + 2.56 - 0.8 - 0.85) / 4 = -0.8525 (a symmetric 0.2 clip would give -(2.5 + 2.4 - 1.65) / 4).
    Clip fraction 2/4, mean ratio 4.1 / 4 = 1.025. d loss / d logp = -A r / 4 where unclipped, 0 where clipped:
    (-0.625, 0, 0, 0.2125)."""
    logp = torch.log(torch.tensor([[1.25, 1.5], [0.5, 0.85]])).requires_grad_()
    zeros = torch.zeros(2, 2)
    loss, stats = decoupled_ppo_loss(logp, zeros, zeros, torch.tensor([2.0, -1.0]), torch.ones(2, 2, dtype=torch.bool),
                                     **CLIP)
    loss.backward()
    assert loss.item() == pytest.approx(-0.8525, abs=1e-6)
    assert stats["ppo/clip_fraction"].item() == pytest.approx(0.5)
    assert stats["ppo/ratio_mean"].item() == pytest.approx(1.025, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.625, 0.0], [0.0, 0.2125]]), atol=1e-6, rtol=0)


def test_decoupled_ppo_importance_weight_and_cap():
    """r = 1 (logp = prox); w = prox / behav = ((2, 6), (1, 0.5)); slot (1, 1) is outside slot_mask; A = (1.5, -1).
    Slot (0, 1) has w = 6 > 5 and is dropped: kept (0, 0) -> 2 * 1.5 = 3 and (1, 0) -> 1 * -1 = -1, loss =
    -(3 - 1) / 2 = -1; dropped share 1/3 (of the 3 slot_mask slots). d loss / d logp = -w A r / 2 on kept slots:
    (-1.5, 0, 0.5, 0)."""
    prox = torch.full((2, 2), -2.0)
    behav = prox - torch.log(torch.tensor([[2.0, 6.0], [1.0, 0.5]]))
    logp = prox.clone().requires_grad_()
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = decoupled_ppo_loss(logp, prox, behav, torch.tensor([1.5, -1.0]), mask, **CLIP)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)
    assert stats["ppo/dropped_share"].item() == pytest.approx(1 / 3)
    assert stats["ppo/ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.5, 0.0], [0.5, 0.0]]), atol=1e-6, rtol=0)


def test_decoupled_ppo_all_dropped_is_zero_without_nan():
    """Weights e^100 (inf in float32) and e^10 both exceed 5: nothing is kept -> loss 0, gradient 0, no NaN."""
    prox = torch.zeros(1, 2)
    behav = torch.tensor([[-100.0, -10.0]])
    logp = torch.tensor([[3.0, -3.0]], requires_grad=True)
    loss, stats = decoupled_ppo_loss(logp, prox, behav, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
                                     **CLIP)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros(1, 2))
    assert stats["ppo/dropped_share"].item() == 1.0
    assert all(torch.isfinite(v) for v in stats.values())


# ---------------------------------------------------------------- with the tiny model


@pytest.fixture(scope="module")
def requests() -> list[Request]:
    """Six requests with seeds, negatives and hard constraints, each allowing >= K items of the 50."""
    return [Request((0, 1, 2), k=K), Request((5,), (6, 7), (Exclude("genre", "Drama"),), K),
            Request((10, 20), constraints=(Recency(min_year=1980),), k=K), Request((33, 34, 35, 36), k=K),
            Request((3,), (40,), k=K), Request((12, 13), constraints=(Exclude("genre", "Action"),), k=K)]


def test_unchanged_weights_give_ratio_one(tiny_catalog, tiny_vocab, tiny_model, requests):
    """Rollouts at T = 1, re-scored along their trajectories with unchanged weights: logp = behaviour logp (1e-5), so
    r = w = 1, nothing is clipped or dropped and the loss is -mean_r A (every row has K kept slots); policy = reference
    gives k3 exactly 0. The loss backpropagates into the model with finite gradients."""
    batch = encode_requests(tiny_catalog, requests, tiny_vocab)
    out = sample_lists(tiny_model, batch, K, 3, temperature=1.0, generator=torch.Generator().manual_seed(2))
    logp = trajectory_log_probs(tiny_model, tiny_model.encode(batch), out.items, out.step_of)  # (B, K)
    torch.testing.assert_close(logp.detach(), out.logp, atol=1e-5, rtol=0)
    advantages = torch.tensor([1.0, -0.5, 0.25, 2.0, -1.5, 0.0])
    mask = torch.ones_like(out.items, dtype=torch.bool)
    loss, stats = decoupled_ppo_loss(logp, out.logp, out.logp, advantages, mask, **CLIP)
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-4)
    assert stats["ppo/ratio_mean"].item() == pytest.approx(1.0, abs=1e-5)
    assert stats["ppo/clip_fraction"].item() == 0.0 and stats["ppo/dropped_share"].item() == 0.0
    loss.backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():
        ref_logp = trajectory_log_probs(reference, reference.encode(batch), out.items, out.step_of)
    assert torch.equal(k3_kl(logp.detach(), ref_logp), torch.zeros_like(ref_logp))


# ---------------------------------------------------------------- VRPO ELBO and DPO


def test_sample_vrpo_noise_shapes_and_strata():
    """times (n, R): each row's n timesteps fall one per stratum [j/n, (j+1)/n) of [eps, 1) after the affine map;
    u (n, R, K) in [0, 1); the same generator seed gives the same noise."""
    times, u = sample_vrpo_noise(8, 5, K, 1e-3, torch.Generator().manual_seed(0))
    assert times.shape == (8, 5) and u.shape == (8, 5, K)
    strata = ((times - 1e-3) / (1 - 1e-3) * 8).floor().long().sort(0).values
    assert torch.equal(strata, torch.arange(8)[:, None].expand(8, 5))
    assert (u >= 0).all() and (u < 1).all()
    again = sample_vrpo_noise(8, 5, K, 1e-3, torch.Generator().manual_seed(0))
    assert torch.equal(times, again[0]) and torch.equal(u, again[1])


@pytest.fixture
def pairs(tiny_catalog, tiny_vocab, tiny_model, requests):
    """A request batch with two sampled lists per request (chosen, rejected) and shared VRPO noise for each."""
    batch = encode_requests(tiny_catalog, requests, tiny_vocab)
    chosen = sample_lists(tiny_model, batch, K, 3, temperature=1.0, generator=torch.Generator().manual_seed(3)).items
    rejected = sample_lists(tiny_model, batch, K, 3, temperature=1.0, generator=torch.Generator().manual_seed(4)).items
    generator = torch.Generator().manual_seed(5)
    noise = {name: sample_vrpo_noise(4, len(requests), K, 1e-3, generator) for name in ("chosen", "rejected")}
    return batch, chosen, rejected, noise


def test_vrpo_elbo_is_mean_of_elbo_terms(tiny_model, pairs):
    """B(x0) = -(1/n) sum_j sum_k elbo_nll(x0, t_j, u_j): the loop of n = 4 written out; B <= 0."""
    batch, chosen, _, noise = pairs
    times, u = noise["chosen"]
    with torch.no_grad():
        ctx = tiny_model.encode(batch)
        b = vrpo_elbo(tiny_model, ctx, chosen, times, u)
        direct = -torch.stack([elbo_nll(tiny_model, ctx, chosen, times[j], u[j]).sum(1) for j in range(4)]).mean(0)
    assert b.shape == (len(batch),)
    torch.testing.assert_close(b, direct, atol=1e-5, rtol=1e-6)
    assert (b <= 0).all()


def elbo_differences(policy, reference, pairs):
    """(B_theta - B_ref)(chosen), (B_theta - B_ref)(rejected) and the four estimates, with shared noise."""
    batch, chosen, rejected, noise = pairs
    out = {}
    for name, model in (("policy", policy), ("ref", reference)):
        ctx = model.encode(batch)
        out[name] = [vrpo_elbo(model, ctx, x0, *noise[key]) for key, x0 in (("chosen", chosen), ("rejected", rejected))]
    return out["policy"][0] - out["ref"][0], out["policy"][1] - out["ref"][1], out


@pytest.mark.parametrize("copy_reference", [False, True])
def test_shared_noise_policy_equals_reference(tiny_model, pairs, copy_reference):
    """Policy = reference (the same object or a deep copy) with shared noise: B_theta - B_ref is exactly 0 on chosen
    and rejected lists, so every margin is 0 and the DPO loss is -log sigmoid(0) = log 2 = 0.693147 per pair, and
    so is its weighted mean (weights 1, 2, 3, 0.5, 1, 1)."""
    reference = copy.deepcopy(tiny_model) if copy_reference else tiny_model
    with torch.no_grad():
        d_chosen, d_rejected, b = elbo_differences(tiny_model, reference, pairs)
    assert torch.equal(d_chosen, torch.zeros_like(d_chosen)) and torch.equal(d_rejected, torch.zeros_like(d_rejected))
    weights = torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0, 1.0])
    loss, stats = dpo_loss(b["policy"][0], b["ref"][0], b["policy"][1], b["ref"][1], 0.1, weights)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["dpo/margin"].item() == 0.0 and stats["dpo/accuracy"].item() == 0.0


def test_shared_noise_perturbed_policy_differs(tiny_model, pairs):
    """A perturbed deep copy as policy (seeded noise, std 0.01) gives nonzero B_theta - B_ref, a DPO loss != log 2,
    and a finite gradient on the policy only."""
    reference = copy.deepcopy(tiny_model)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    d_chosen, d_rejected, b = elbo_differences(tiny_model, reference, pairs)
    assert d_chosen.abs().sum() > 1e-4 and d_rejected.abs().sum() > 1e-4
    loss, _ = dpo_loss(b["policy"][0], b["ref"][0], b["policy"][1], b["ref"][1], 0.1, torch.ones(len(d_chosen)))
    assert abs(loss.item() - math.log(2)) > 1e-6
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)


def test_dpo_loss_hand_computed():
    """beta 0.1. Pair 0: (-1 + 3) - (-4 + 2) = 4 -> margin 0.4, -log sigmoid(0.4) = log(1 + e^-0.4) = 0.513015.
    Pair 1: (-2 + 1) - (-1 + 2) = -2 -> margin -0.2, log(1 + e^0.2) = 0.798139.
    Weights (1, 1): 0.655577; (2, 2) the same; (3, 1): (3 * 0.513015 + 0.798139) / 4 = 0.584296; (1, 0): 0.513015.
    Accuracy 1/2, mean margin (0.4 - 0.2) / 2 = 0.1. With weights (1, 1), d L / d policy_chosen_0 =
    -beta sigmoid(-0.4) / 2 = -0.0200656, and the reference inputs get no gradient."""
    policy_chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref_chosen = torch.tensor([-3.0, -1.0], requires_grad=True)
    policy_rejected, ref_rejected = torch.tensor([-4.0, -1.0]), torch.tensor([-2.0, -2.0])
    args = (policy_chosen, ref_chosen, policy_rejected, ref_rejected, 0.1)
    loss, stats = dpo_loss(*args, torch.ones(2))
    assert loss.item() == pytest.approx(0.6555771, abs=1e-6)
    assert stats["dpo/accuracy"].item() == 0.5 and stats["dpo/margin"].item() == pytest.approx(0.1, abs=1e-6)
    assert dpo_loss(*args, torch.full((2,), 2.0))[0].item() == pytest.approx(0.6555771, abs=1e-6)
    assert dpo_loss(*args, torch.tensor([3.0, 1.0]))[0].item() == pytest.approx(0.5842962, abs=1e-6)
    assert dpo_loss(*args, torch.tensor([1.0, 0.0]))[0].item() == pytest.approx(0.5130153, abs=1e-6)
    loss.backward()
    assert policy_chosen.grad[0].item() == pytest.approx(-0.0200656, abs=1e-6)
    assert ref_chosen.grad is None


# ---------------------------------------------------------------- objective and schedule


def test_h2po_objective_hand_computed():
    """L_on 1, KL 0.5, L_off 2, L_MOST 3, kl_beta 0.04, lambda_off 0.5, lambda_sft 0.1:
    1 + 0.02 + 1 + 0.3 = 2.32; with tensors the result keeps the graph."""
    assert h2po_objective(1.0, 0.5, 2.0, 3.0, 0.04, 0.5, 0.1) == pytest.approx(2.32)
    on = torch.tensor(1.0, requires_grad=True)
    total = h2po_objective(on, torch.tensor(0.5), torch.tensor(2.0), torch.tensor(3.0), 0.04, 0.5, 0.1)
    total.backward()
    assert total.item() == pytest.approx(2.32, abs=1e-6) and on.grad.item() == 1.0


def test_lambda_off_at_linear_decay():
    """start 1.0, end 0.3, 11 steps: step 0 -> 1.0, step 5 (midpoint) -> 0.65, step 10 (last) -> 0.3, later -> 0.3;
    a single-step run stays at start; total_steps 0 raises."""
    assert lambda_off_at(0, 11, 1.0, 0.3) == pytest.approx(1.0)
    assert lambda_off_at(5, 11, 1.0, 0.3) == pytest.approx(0.65)
    assert lambda_off_at(10, 11, 1.0, 0.3) == pytest.approx(0.3)
    assert lambda_off_at(50, 11, 1.0, 0.3) == pytest.approx(0.3)
    assert lambda_off_at(0, 1, 1.0, 0.3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="total_steps"):
        lambda_off_at(0, 0, 1.0, 0.3)
