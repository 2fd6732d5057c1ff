"""H2PO - Hybrid-Policy Preference Optimization losses (DESIGN section 5), the only home of their maths.

    L = L_on + kl_beta * KL + lambda_off * L_off + lambda_sft * L_MOST

- L_on: slot-level decoupled PPO (AReaL, arXiv:2505.24298) on fresh rollouts scored along their stored
  trajectories (`model.diffusion.trajectory_log_probs`); the ratio pi_theta / pi_prox is clipped asymmetrically
  and multiplied by the importance weight pi_prox / pi_behav, and slots whose weight exceeds a cap are dropped.
- KL: Schulman's k3 estimator of KL(pi_theta || pi_ref) on the rollout slots.
- L_off: DPO on VRPO ELBO estimates (LLaDA 1.5, arXiv:2505.19223): n timesteps with one mask each, the same
  noise for policy and reference, so B_theta - B_ref is exactly 0 when the two are equal.
- L_MOST: the supervised anchor, `learner.most.most_loss`.

Shapes: R rollouts (B requests x G samples) or preference pairs, K slots, n VRPO samples. Every loss takes
tensors and floats and returns a scalar plus a dict of detached 0-dim stats tensors (no host sync inside).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.diffusion import elbo_nll, stratified_times
from model.transformer import Context, Retriever


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per sample: exp(ref - l) - (ref - l) - 1 >= 0, elementwise.

    Unbiased for the KL when l = log pi(x) with x ~ pi, and 0 exactly where logp == ref_logp.  any shape -> same.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def decoupled_ppo_loss(logp: torch.Tensor, prox_logp: torch.Tensor, behav_logp: torch.Tensor,
                       advantages: torch.Tensor, slot_mask: torch.Tensor, clip_low: float, clip_high: float,
                       max_iw: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Slot-level decoupled PPO (AReaL, arXiv:2505.24298, eq. 5).

    r = exp(logp - prox_logp), w = exp(prox_logp - behav_logp) (no gradient), A_rk = advantages_r;
    objective_rk = w * min(r A, clip(r, 1 - clip_low, 1 + clip_high) A);
    kept = slot_mask & (w <= max_iw)  (a NaN weight is dropped too);
    loss = -sum_kept objective / |kept|, and 0 (still differentiable, no NaN) when nothing is kept.
    logp, prox_logp, behav_logp (R, K) float; advantages (R,); slot_mask (R, K) bool.
    Stats: ppo/clip_fraction (kept slots where the clipped term is active, i.e. the gradient is cut),
    ppo/dropped_share (slot_mask slots dropped by the weight cap), ppo/ratio_mean (mean r over kept slots).
    """
    prox_logp, behav_logp = prox_logp.detach(), behav_logp.detach()
    weight = torch.exp(prox_logp - behav_logp)  # (R, K)
    kept = slot_mask & (weight <= max_iw)
    # Zero the log-ratio and the weight outside `kept` before multiplying: an inf there would turn 0 * inf into NaN
    # in the forward or the backward pass.
    ratio = torch.exp(torch.where(kept, logp - prox_logp, torch.zeros_like(logp)))
    weight = torch.where(kept, weight, torch.zeros_like(weight))
    adv = advantages.detach()[:, None].expand_as(logp)  # (R, K)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    objective = weight * torch.minimum(unclipped, clipped)
    n_kept = kept.sum().clamp_min(1)
    loss = -objective.sum() / n_kept
    with torch.no_grad():
        stats = {
            "ppo/clip_fraction": ((clipped < unclipped) & kept).sum() / n_kept,
            "ppo/dropped_share": (slot_mask & ~kept).sum() / slot_mask.sum().clamp_min(1),
            "ppo/ratio_mean": (ratio * kept).sum() / n_kept,
        }
    return loss, stats


def sample_vrpo_noise(n: int, r: int, k: int, eps: float,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """VRPO noise: n timesteps with one mask each, per row.  -> times (n, R), u (n, R, K)

    Each row's n timesteps are stratified over [eps, 1) (`stratified_times(n)`, an independent offset per row), so
    every row's estimate B(x0) sees one timestep per stratum; u ~ U[0, 1) decides each timestep's mask.
    """
    times = torch.stack([stratified_times(n, eps, generator) for _ in range(r)], dim=1)  # (n, R)
    return times, torch.rand((n, r, k), generator=generator)


def vrpo_elbo(model: Retriever, ctx: Context, x0: torch.Tensor, times: torch.Tensor,
              masks_u: torch.Tensor) -> torch.Tensor:
    """ELBO estimate of log p(x0 | request) (VRPO, LLaDA 1.5 arXiv:2505.19223).  -> (R,)

    B(x0) = -(1/n) sum_j sum_k elbo_nll(x0, t_j, u_j)_k, one mask per timestep. The noise is an argument so that
    policy and reference see exactly the same (t, mask) and B_theta - B_ref is exactly 0 when they are equal.
    x0 (R, K) long; times (n, R); masks_u (n, R, K); ctx encodes the R requests.
    """
    total = torch.zeros(x0.shape[0], device=x0.device)
    for t, u in zip(times, masks_u, strict=True):  # n forward passes; t (R,), u (R, K)
        total = total + elbo_nll(model, ctx, x0, t, u).sum(1)
    return -total / times.shape[0]


def dpo_loss(policy_chosen: torch.Tensor, ref_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float,
             weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on ELBO estimates (Rafailov et al. arXiv:2305.18290; VRPO): per pair p,

    margin_p = beta * [(B_theta - B_ref)(chosen_p) - (B_theta - B_ref)(rejected_p)],
    L_off = sum_p weights_p * -log sigmoid(margin_p) / sum_p weights_p.
    All inputs (P,) float; the reference terms carry no gradient. Stats: dpo/accuracy (share of pairs with
    margin > 0), dpo/margin (mean margin, the implicit reward margin of TRL's `rewards/margins`).
    """
    margin = beta * ((policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach()))  # (P,)
    loss = (weights * -F.logsigmoid(margin)).sum() / weights.sum().clamp_min(1e-8)
    with torch.no_grad():
        stats = {"dpo/accuracy": (margin > 0).float().mean(), "dpo/margin": margin.mean()}
    return loss, stats


def h2po_objective(on_loss: torch.Tensor | float, kl: torch.Tensor | float, off_loss: torch.Tensor | float,
                   anchor_loss: torch.Tensor | float, kl_beta: float, lambda_off: float,
                   lambda_sft: float) -> torch.Tensor | float:
    """L = L_on + kl_beta * KL + lambda_off * L_off + lambda_sft * L_MOST (DESIGN section 5); an absent term is 0."""
    return on_loss + kl_beta * kl + lambda_off * off_loss + lambda_sft * anchor_loss


def lambda_off_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear decay of lambda_off: start at step 0, end at the last step total_steps - 1 (and after it)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    fraction = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    return start + (end - start) * fraction
