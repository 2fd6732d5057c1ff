"""One H2PO update on plain tensors (DESIGN section 5): L = L_on + beta KL + lambda_off L_off + lambda_sft L_MOST.

The learner (a DeepSpeed engine per rank, or a plain optimizer in the single-process loop) calls `h2po_losses`
and steps. The loss maths lives in `learner/h2po.py` and `learner/most.py`; this file only gathers the inputs:
trajectory log-probs of the rollouts under the policy and the frozen reference, shared-noise VRPO ELBO estimates
of logged chosen/rejected lists, and a fresh MOST anchor batch. Dropout stays off (the policy is evaluated in
eval mode, gradients still flow) so that the ratio pi_theta / pi_prox is exactly 1 before the first update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from catalog.batch import encode_requests
from catalog.dataset import Dataset
from catalog.schema import Catalog
from h2po.config import H2POConfig, MostConfig, RequestConfig
from learner.h2po import decoupled_ppo_loss, dpo_loss, h2po_objective, k3_kl, sample_vrpo_noise, vrpo_elbo
from learner.pretrain import most_step
from model.diffusion import trajectory_log_probs
from model.transformer import Retriever
from rollout.generate import Rollouts


@dataclass
class AnchorInputs:
    """What the MOST anchor needs to draw and score a fresh batch of training requests."""

    data: Dataset
    features: np.ndarray  # (N, F) unit rows
    relevance_matrix: torch.Tensor  # (N, N) EASE B (float16)
    requests: RequestConfig
    most: MostConfig


def rollout_log_probs(model: Retriever, catalog: Catalog, vocab: dict, rollouts: Rollouts) -> torch.Tensor:
    """Per-slot log-probs of the rollouts' lists along their trajectories under `model`.  -> (B*G, K)"""
    batch = encode_requests(catalog, rollouts.requests, vocab).to(model.device)
    return trajectory_log_probs(model, model.encode(batch), rollouts.items.to(model.device),
                                rollouts.step_of.to(model.device))


def on_policy_terms(model: Retriever, ref: Retriever, catalog: Catalog, vocab: dict, rollouts: Rollouts,
                    cache: dict, cfg: H2POConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Decoupled-PPO loss and mean k3 KL to the reference over the rollouts' slots.

    `cache` is per learner batch: the first call fills `prox` (the policy's log-probs before the batch's first
    update, pi_prox of decoupled PPO: exactly this call's, detached) and `ref` (the frozen reference's); later
    inner epochs reuse both instead of recomputing them."""
    if cache.setdefault("rollouts", rollouts) is not rollouts:
        raise ValueError("on_policy_terms: this cache belongs to another learner batch; use a fresh dict per batch")
    logp = rollout_log_probs(model, catalog, vocab, rollouts)
    if "ref" not in cache:
        with torch.no_grad():
            cache["ref"] = rollout_log_probs(ref, catalog, vocab, rollouts)
        cache["prox"] = logp.detach()
    ref_logp = cache["ref"]
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss, stats = decoupled_ppo_loss(logp, cache["prox"], rollouts.behaviour_logp.to(logp.device),
                                     rollouts.advantages.to(logp.device), mask, cfg.clip_low, cfg.clip_high,
                                     cfg.max_importance_weight)
    kl = k3_kl(logp, ref_logp).mean()
    stats["kl"] = kl.detach()
    return loss, kl, stats


def off_policy_term(model: Retriever, ref: Retriever, catalog: Catalog, vocab: dict, pairs: list,
                    cfg: H2POConfig, eps: float, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """DPO on VRPO ELBO estimates of logged chosen/rejected lists, noise shared by policy and reference."""
    device = model.device
    batch = encode_requests(catalog, [p.request for p in pairs], vocab).to(device)
    chosen = torch.tensor([p.chosen for p in pairs], dtype=torch.long, device=device)
    rejected = torch.tensor([p.rejected for p in pairs], dtype=torch.long, device=device)
    weights = torch.tensor([p.weight for p in pairs], dtype=torch.float32, device=device)
    n, r, k = cfg.vrpo_samples, len(pairs), chosen.shape[1]
    noise_c, noise_r = (tuple(x.to(device) for x in sample_vrpo_noise(n, r, k, eps, generator)) for _ in range(2))
    ctx = model.encode(batch)
    policy_c, policy_r = vrpo_elbo(model, ctx, chosen, *noise_c), vrpo_elbo(model, ctx, rejected, *noise_r)
    with torch.no_grad():
        ref_ctx = ref.encode(batch)
        ref_c, ref_r = vrpo_elbo(ref, ref_ctx, chosen, *noise_c), vrpo_elbo(ref, ref_ctx, rejected, *noise_r)
    return dpo_loss(policy_c, ref_c, policy_r, ref_r, cfg.dpo_beta, weights)


def h2po_losses(model: Retriever, ref: Retriever, catalog: Catalog, vocab: dict, rollouts: Rollouts | None,
                cache: dict, pairs: list | None, anchor: AnchorInputs, cfg: H2POConfig,
                lambda_off: float, rng: np.random.Generator, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The total H2PO loss (graph attached) and its terms; either data source may be absent (ablations).
    `cache`: an empty dict per learner batch, reused across its inner epochs (`on_policy_terms`)."""
    model.eval()
    zero = torch.zeros((), device=model.device)
    stats: dict = {}
    on_loss, kl = zero, zero
    if rollouts is not None:
        on_loss, kl, on_stats = on_policy_terms(model, ref, catalog, vocab, rollouts, cache, cfg)
        stats.update(on_stats)
    off_loss = zero
    if pairs:
        off_loss, off_stats = off_policy_term(model, ref, catalog, vocab, pairs, cfg, anchor.most.eps, generator)
        stats.update(off_stats)
    anchor_loss = zero
    if cfg.lambda_sft > 0:
        anchor_loss = most_step(model, anchor.data, vocab, anchor.features, anchor.relevance_matrix,
                                anchor.requests, anchor.most, rng, generator)
    total = h2po_objective(on_loss, kl, off_loss, anchor_loss, cfg.kl_beta, lambda_off, cfg.lambda_sft)
    stats.update({"loss/on": on_loss.detach(), "loss/off": off_loss.detach(), "loss/anchor": anchor_loss.detach(),
                  "loss/total": total.detach()})
    return total, {k: float(v) for k, v in stats.items()}
