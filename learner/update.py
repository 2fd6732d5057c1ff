"""The H2PO update as a library loop on tensors (DESIGN section 5): one learner batch, `inner_epochs` steps of

    L = L_on + kl_beta * KL + lambda_off * L_off + lambda_sft * L_MOST.

    stats = h2po_update(model, ref, rollouts, pairs, step_fn, cfg, lambda_off, eps, generator, anchor)

`actors.learner.LearnerActor.train_step` passes the DeepSpeed engine's `step` as `step_fn`, `benchmarks/probe.py`
plain AdamW (`adamw_step`); both get the same loop. Per batch, once and explicitly (`fixed_log_probs`): pi_prox, the
policy's log-probs of the rollouts before the batch's first update (decoupled PPO), and pi_ref, the frozen
reference's. Then per inner epoch (`batch_loss`), top to bottom:
  1. logp: the rollouts' per-slot log-probs along their stored trajectories under the current policy (TraceRL);
  2. VRPO ELBO estimates of the logged chosen and rejected lists under policy and reference, one fresh noise draw
     each, shared by the two models (so B_theta - B_ref is exactly 0 when they are equal);
  3. the MOST anchor loss on a fresh batch of training requests (`anchor()`, when lambda_sft > 0);
  4. `h2po_losses`: tensors in, the scalar loss and its stats out; then `step_fn(loss)` -> the gradient norm.
The loss maths itself lives in `learner/h2po.py`.

Inputs are tensors only, no catalog: a rollout batch carries its requests encoded once by the rollout actor
(`RolloutTensors.batch`, one row per rollout), and logged pairs arrive encoded by the replay buffer (`PairTensors`).
Random draws, in this order per epoch: the chosen then the rejected lists' VRPO noise from `generator`, then
whatever `anchor()` draws. Dropout stays off (the policy is evaluated in eval mode, gradients still flow), so pi_prox
equals the first epoch's logp and the ratio pi_theta / pi_prox is exactly 1 before the first update.
Shapes: R rollouts (B requests x G samples), P pairs, K slots, n VRPO samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from core.carriers import RequestBatch
from core.config import H2POConfig
from learner.h2po import decoupled_ppo_loss, dpo_loss, h2po_objective, k3_kl, sample_vrpo_noise, vrpo_elbo
from model.diffusion import trajectory_log_probs
from model.transformer import Retriever, precision

StepFn = Callable[[torch.Tensor], float]  # backward + optimiser step on a loss -> the global gradient norm


class RolloutTensors(Protocol):
    """What the update reads of on-policy rollouts (`rollout.generate.Rollouts` has it)."""

    batch: RequestBatch  # (R rows) each rollout's request
    items: torch.Tensor  # (R, K) long: the sampled lists
    step_of: torch.Tensor  # (R, K) long: the sampler step that committed each slot
    behaviour_logp: torch.Tensor  # (R, K) the sampler's log-probs (pi_behav)
    advantages: torch.Tensor  # (R,)


class PairTensors(Protocol):
    """What the update reads of logged preference pairs (`rollout.buffer.PairBatch` has it)."""

    batch: RequestBatch  # (P rows) each pair's request
    chosen: torch.Tensor  # (P, K) long
    rejected: torch.Tensor  # (P, K) long
    weights: torch.Tensor  # (P,) float


@dataclass
class OnPolicyTerms:
    """One epoch's inputs of decoupled PPO and the KL, all (R, K) but the advantages (R,)."""

    logp: torch.Tensor  # the current policy's, graph attached
    prox_logp: torch.Tensor  # pi_prox: the policy before the batch's first update (fixed per batch)
    ref_logp: torch.Tensor  # the frozen reference's (fixed per batch)
    behaviour_logp: torch.Tensor  # the sampler's
    advantages: torch.Tensor


@dataclass
class OffPolicyTerms:
    """One epoch's VRPO ELBO estimates of the pairs, all (P,): policy (graph attached) and reference."""

    policy_chosen: torch.Tensor
    ref_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_rejected: torch.Tensor
    weights: torch.Tensor


def h2po_losses(on: OnPolicyTerms | None, off: OffPolicyTerms | None, anchor: torch.Tensor | None,
                cfg: H2POConfig, lambda_off: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_on + kl_beta * mean k3 KL + lambda_off * L_off + lambda_sft * L_MOST; an absent part counts 0.
    -> (the loss, graph attached; its terms and the PPO/DPO stats as floats)"""
    present = [t for t in (on and on.logp, off and off.policy_chosen, anchor) if t is not None]
    zero = torch.zeros((), device=present[0].device if present else "cpu")
    stats: dict[str, torch.Tensor] = {}
    on_loss, kl, off_loss = zero, zero, zero
    if on is not None:
        mask = torch.ones_like(on.logp, dtype=torch.bool)
        on_loss, on_stats = decoupled_ppo_loss(on.logp, on.prox_logp, on.behaviour_logp, on.advantages, mask,
                                               cfg.clip_low, cfg.clip_high, cfg.max_importance_weight)
        kl = k3_kl(on.logp, on.ref_logp).mean()
        stats.update(on_stats, kl=kl.detach())
    if off is not None:
        off_loss, off_stats = dpo_loss(off.policy_chosen, off.ref_chosen, off.policy_rejected, off.ref_rejected,
                                       cfg.dpo_beta, off.weights)
        stats.update(off_stats)
    anchor_loss = anchor if anchor is not None else zero
    total = h2po_objective(on_loss, kl, off_loss, anchor_loss, cfg.kl_beta, lambda_off, cfg.lambda_sft)
    stats.update({"loss/on": on_loss.detach(), "loss/off": off_loss.detach(), "loss/anchor": anchor_loss.detach(),
                  "loss/total": total.detach()})
    return total, {k: float(v) for k, v in stats.items()}


def rollout_log_probs(model: Retriever, rollouts: RolloutTensors) -> torch.Tensor:
    """Per-slot log-probs of the rollouts' lists along their trajectories under `model`.  -> (R, K)"""
    device = model.device
    return trajectory_log_probs(model, model.encode(rollouts.batch.to(device)), rollouts.items.to(device),
                                rollouts.step_of.to(device))


def fixed_log_probs(model: Retriever, ref: Retriever, rollouts: RolloutTensors,
                    bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """pi_prox and pi_ref of the rollouts, once per batch, before its first update.  -> (prox_logp, ref_logp) (R, K)"""
    model.eval()
    with torch.no_grad(), precision(model, bf16):
        return rollout_log_probs(model, rollouts), rollout_log_probs(ref, rollouts)


def pair_elbos(model: Retriever, ref: Retriever, pairs: PairTensors, n: int, eps: float,
               generator: torch.Generator) -> OffPolicyTerms:
    """VRPO ELBO estimates of chosen and rejected lists under policy and reference, noise shared between the two."""
    device = model.device
    batch = pairs.batch.to(device)
    chosen, rejected = pairs.chosen.to(device), pairs.rejected.to(device)
    r, k = chosen.shape
    noise_c, noise_r = (tuple(x.to(device) for x in sample_vrpo_noise(n, r, k, eps, generator)) for _ in range(2))
    ctx = model.encode(batch)
    policy_c, policy_r = vrpo_elbo(model, ctx, chosen, *noise_c), vrpo_elbo(model, ctx, rejected, *noise_r)
    with torch.no_grad():
        ref_ctx = ref.encode(batch)
        ref_c, ref_r = vrpo_elbo(ref, ref_ctx, chosen, *noise_c), vrpo_elbo(ref, ref_ctx, rejected, *noise_r)
    return OffPolicyTerms(policy_c, ref_c, policy_r, ref_r, pairs.weights.to(device))


def batch_loss(model: Retriever, ref: Retriever, rollouts: RolloutTensors | None,
               fixed: tuple[torch.Tensor, torch.Tensor] | None, pairs: PairTensors | None, cfg: H2POConfig,
               lambda_off: float, eps: float, generator: torch.Generator,
               anchor: Callable[[], torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, float]]:
    """One inner epoch's loss (graph attached) and stats (module docstring, steps 1-4); `fixed` = `fixed_log_probs`."""
    model.eval()
    on = off = anchor_loss = None
    if rollouts is not None:
        device = model.device
        on = OnPolicyTerms(rollout_log_probs(model, rollouts), *fixed, rollouts.behaviour_logp.to(device),
                           rollouts.advantages.to(device))
    if pairs is not None:
        off = pair_elbos(model, ref, pairs, cfg.vrpo_samples, eps, generator)
    if cfg.lambda_sft > 0:
        if anchor is None:
            raise ValueError("h2po.lambda_sft > 0 needs the MOST anchor (`anchor`)")
        anchor_loss = anchor()
    return h2po_losses(on, off, anchor_loss, cfg, lambda_off)


def h2po_update(model: Retriever, ref: Retriever, rollouts: RolloutTensors | None, pairs: PairTensors | None,
                step_fn: StepFn, cfg: H2POConfig, lambda_off: float, eps: float, generator: torch.Generator,
                anchor: Callable[[], torch.Tensor] | None = None, bf16: bool = False) -> dict[str, float]:
    """`cfg.inner_epochs` H2PO updates on one learner batch (module docstring).  -> mean stats over the updates,
    with `grad_norm`. bf16: autocast around the forward passes (on a GPU); the backward in `step_fn` runs outside."""
    fixed = fixed_log_probs(model, ref, rollouts, bf16) if rollouts is not None else None
    history = []
    for _ in range(cfg.inner_epochs):
        with precision(model, bf16):
            loss, stats = batch_loss(model, ref, rollouts, fixed, pairs, cfg, lambda_off, eps, generator, anchor)
        stats["grad_norm"] = step_fn(loss)
        history.append(stats)
    return {key: float(np.mean([h[key] for h in history])) for key in history[0]}


def adamw_step(model: torch.nn.Module, lr: float, grad_clip: float) -> StepFn:
    """A `step_fn` without DeepSpeed: torch AdamW (no weight decay) on the trainable parameters, with the engine's
    global gradient-norm clip (0 = none)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def step(loss: torch.Tensor) -> float:
        optimizer.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        optimizer.step()
        return float(norm)
    return step
