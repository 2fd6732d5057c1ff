"""Absorbing-state diffusion maths over list slots, as pure functions (MDLM arXiv:2406.07524, LLaDA 2502.09992).

Forward process: at time t every slot of x0 is replaced by [MASK] independently with probability t.
The ELBO weights the masked slots' negative log-likelihood by 1/t. Noise (t and the uniform draws that
decide the mask) is always an argument, so policy and reference can share it exactly (VRPO, 2505.19223).
The trajectory log-probability of a sampled list is the sum over denoising steps of the log-probabilities
of the items committed at that step given the state before it (TraceRL, arXiv:2509.06949).
"""

from __future__ import annotations

import torch

from model.head import chosen_log_probs
from model.transformer import MASK, Context, Retriever, allowed_items


def stratified_times(batch: int, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """t_b = eps + (1 - eps) * ((u + b) / B mod 1): one uniform draw stratified across the batch.  # (B,)"""
    u = torch.rand((), generator=generator)
    return eps + (1 - eps) * ((u + torch.arange(batch)) / batch).remainder(1.0)


def corrupt(x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """xt: slot k of request b is masked where u[b, k] < t[b].  x0, u (B, K), t (B,) -> (B, K)"""
    return torch.where(u < t[:, None], torch.full_like(x0, MASK), x0)


def slot_log_probs(model: Retriever, ctx: Context, state: torch.Tensor, targets: torch.Tensor,
                   select: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """log p(targets[b, k] | state, request) at the selected (masked) slots, 0 elsewhere.

    state, targets (B, K) long; select (B, K) bool (only masked slots) -> (B, K) float.
    The distribution is the softmax over the items the request allows minus those committed in `state`, exact, in
    item chunks when N > model.item_chunk (model/head.py `chosen_log_probs`).
    """
    out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    rows, cols = select.nonzero(as_tuple=True)
    if len(rows) == 0:
        return out
    hidden = model.hidden(ctx, state, t)  # (B, K, D)
    out[rows, cols] = chosen_log_probs(model, ctx, hidden[rows, cols], rows, allowed_items(ctx.valid, state),
                                       targets[rows, cols])
    return out


def elbo_nll(model: Retriever, ctx: Context, x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-slot ELBO terms (1/t) * 1[masked] * -log p(x0_k | xt).  x0, u (B, K), t (B,) -> (B, K)

    Summing over slots gives a Monte-Carlo upper bound on -log p(x0 | request) (MDLM eq. 10, slots only).
    """
    xt = corrupt(x0, t, u)
    masked = xt == MASK
    return -slot_log_probs(model, ctx, xt, x0, masked, t) / t[:, None] * masked


def trajectory_log_probs(model: Retriever, ctx: Context, items: torch.Tensor, step_of: torch.Tensor) -> torch.Tensor:
    """Per-slot log-probs along a stored trajectory.  items, step_of (B, K) -> (B, K)

    Slot k was committed with `items[b, k]` at step `step_of[b, k]`; the state before step s holds the items
    committed at earlier steps. With unchanged weights (and dropout off) this equals the sampler's behaviour
    log-probs exactly.
    """
    out = torch.zeros(items.shape, dtype=torch.float32, device=items.device)
    for s in range(int(step_of.max()) + 1):
        state = torch.where(step_of < s, items, torch.full_like(items, MASK))
        out = out + slot_log_probs(model, ctx, state, items, step_of == s)
    return out
