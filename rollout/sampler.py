"""Batched constrained sampler: low-confidence remasking (LLaDA arXiv:2502.09992, MaskGIT arXiv:2202.04200).

Start with k masked slots. Each step: one forward pass; invalid and already-committed items are masked out;
every open slot draws a candidate (Gumbel-max at temperature T; T = 0 is greedy); when two open slots draw the
same item the more confident keeps it; the most confident open slots are committed, ceil(open / steps left) of
them, so all k are filled after S steps (a step that loses slots to collisions commits fewer, and the loop runs
on until every slot is filled). Validity therefore holds by construction: no duplicates, no seeds or negatives,
no hard-constraint violators, whatever the scores are: a step whose draw is not an allowed item with a finite
log-prob (a NaN or infinity reached the logits: a non-finite soft weight that bypassed the request edge, an
overflow) is drawn again from `finite_logits` (allowed items finite, all others -inf). The check costs O(M) per
step; a sound model never takes the second path, so its draws are unchanged. The trajectory (step of each slot,
its item, and the behaviour log-prob under the model's T = 1 distribution given the state before the step) is
returned for H2PO's trajectory likelihood. The draws run over item spans of `model.item_chunk` (`draw_items`,
model/head.py): the open slots' logits never exist as one (open slots x N) matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.carriers import RequestBatch
from model.head import combine_lse, spans_of
from model.transformer import MASK, Context, Retriever


@dataclass
class Samples:
    """Sampled lists with their trajectories."""

    items: torch.Tensor  # (B, K) long item indices, slot order = rank order
    step_of: torch.Tensor  # (B, K) long: denoising step at which each slot was committed
    logp: torch.Tensor  # (B, K) float: behaviour log-prob of each committed item
    served: torch.Tensor  # (B, K) long: `items` in the order they are served (sampler.order, `served_order`)


LOGIT_BOUND = 1e4  # far beyond any logit a trained model gives; keeps logits / T and the log-sum-exp finite


def finite_logits(logits: torch.Tensor, allowed: torch.Tensor, bound: float = LOGIT_BOUND) -> torch.Tensor:
    """(M, N) scores, in place: allowed items finite (NaN -> -bound, the rest clipped to +-bound), every other item
    -inf, so an argmax always picks an allowed item. Values inside the bound are unchanged (a sound model's
    distribution is untouched)."""
    return logits.nan_to_num_(nan=-bound).clamp_(-bound, bound).masked_fill_(~allowed, float("-inf"))


def span_draw(logits: torch.Tensor, allowed: torch.Tensor | None, temperature: float,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One candidate per row of logits (M, n): Gumbel-max at `temperature` (argmax at 0).  -> pick (M,), its
    perturbed score (M,) (= its logit at T = 0), its logit (M,), the rows' log-sum-exp (M,). `allowed` (M, n) given:
    re-bound the perturbed scores too (logits / T may overflow)."""
    if temperature > 0:
        noise = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-10, 1.0)
        noise.log_().neg_().log_().neg_()  # Gumbel(0, 1), in place
        scores = noise.add_(logits, alpha=1.0 / temperature)
        if allowed is not None:
            scores = finite_logits(scores, allowed, torch.finfo(scores.dtype).max)
        best, pick = scores.max(-1)
        top = logits.gather(1, pick[:, None]).squeeze(1)
    else:
        top, pick = logits.max(-1)
        best = top
    return pick, best, top, torch.logsumexp(logits, -1)


def draw(logits: torch.Tensor, allowed: torch.Tensor, temperature: float, generator: torch.Generator | None,
         bounded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidate per row of logits (M, N): Gumbel-max at `temperature` (argmax at 0).  -> pick (M,), its log-prob
    under the T = 1 distribution (M,). `bounded`: re-bound the perturbed scores too (logits / T may overflow)."""
    pick, _, top, lse = span_draw(logits, allowed if bounded else None, temperature, generator)
    return pick, top - lse


def draw_items(model: Retriever, ctx: Context, hidden: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor,
               temperature: float, generator: torch.Generator | None,
               bounded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw` over `model.allowed_logits(ctx, hidden, rows, allowed)` (M, N), one item span at a time (model/head.py):
    the best perturbed score over the spans (ties to the lower item, as argmax) and the exact log-sum-exp, so the
    draw's distribution and log-prob are `draw`'s. One span (N <= model.item_chunk) is `draw` itself, noise included;
    more spans draw their Gumbel noise span by span, so a seeded generator gives other (equally distributed) picks.
    `bounded`: the `finite_logits` path (non-finite logits bounded, re-bounded scores)."""
    pick = best = top = None
    lses = []
    for lo, hi in spans_of(model, allowed):
        logits = model.allowed_logits(ctx, hidden, rows, allowed, (lo, hi))  # (M, hi - lo)
        span_allowed = allowed[rows, lo:hi] if bounded else None
        if bounded:
            logits = finite_logits(logits, span_allowed)
        p, score, t, lse = span_draw(logits, span_allowed, temperature, generator)
        lses.append(lse)
        if pick is None:
            pick, best, top = p + lo, score, t
            continue
        better = score > best
        pick, top = torch.where(better, p + lo, pick), torch.where(better, t, top)
        best = torch.where(better, score, best)
    return pick, top - combine_lse(lses)


def resolve_collisions(candidate: torch.Tensor, confidence: torch.Tensor, open_: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: open slots that keep their candidate (the most confident per item; ties go to the lower slot)."""
    same = (candidate[:, :, None] == candidate[:, None, :]) & open_[:, None, :]  # (B, K, K)
    k = candidate.shape[1]
    lower = torch.arange(k, device=candidate.device)[None, :] < torch.arange(k, device=candidate.device)[:, None]
    beats = (confidence[:, None, :] > confidence[:, :, None]) | ((confidence[:, None, :] == confidence[:, :, None])
                                                                 & lower[None])
    return open_ & ~(same & beats).any(-1)


def served_order(model: Retriever, ctx: Context, items: torch.Tensor, order: str) -> torch.Tensor:
    """(B, K) lists as served (sampler.order): "slots" as the sampler filled them; "score" re-sorted by each item's
    logit in slot 1 of the all-masked list, the order the model would give one slot at a time, with no tie between
    slots that score an item alike (one more forward pass)."""
    if order == "slots":
        return items
    first = model.hidden(ctx, torch.full_like(items, MASK))[:, 0]  # (B, D)
    return items.gather(1, model.item_logits(ctx, first, items).argsort(dim=1, descending=True, stable=True))


@torch.no_grad()
def sample_lists(model: Retriever, batch: RequestBatch, k: int, steps: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None, order: str = "slots") -> Samples:
    """Generate B lists of k distinct valid items in about `steps` forward passes; `order` (sampler.order) sets
    `Samples.served`."""
    b = len(batch)
    device = batch.valid.device
    if (batch.valid.sum(1) < k).any():
        raise ValueError(f"a request allows fewer than k={k} items (check_request refuses such requests)")
    ctx = model.encode(batch)
    slots = torch.full((b, k), MASK, dtype=torch.long, device=device)
    step_of = torch.full((b, k), -1, dtype=torch.long, device=device)
    logp_out = torch.zeros((b, k), device=device)
    allowed = batch.valid.clone()
    step = 0
    while (slots == MASK).any():
        open_ = slots == MASK
        rows, cols = open_.nonzero(as_tuple=True)  # only open slots need logits
        hidden = model.hidden(ctx, slots)[rows, cols]  # (M, D)
        pick, conf = draw_items(model, ctx, hidden, rows, allowed, temperature, generator)  # conf: log p at T = 1
        # a NaN or +inf anywhere in a row makes its log-sum-exp, so conf, non-finite: caught here in O(M)
        if not bool((allowed[rows, pick].all() & torch.isfinite(conf).all())):
            pick, conf = draw_items(model, ctx, hidden, rows, allowed, temperature, generator, bounded=True)
        candidate = torch.full_like(slots, MASK).index_put_((rows, cols), pick)
        confidence = torch.full((b, k), float("-inf"), device=device).index_put_((rows, cols), conf)
        keeps = resolve_collisions(candidate, confidence, open_)
        n_commit = -(-open_.sum(1) // max(steps - step, 1))  # ceil(open / steps left)  # (B,)
        rank = confidence.masked_fill(~keeps, float("-inf")).argsort(1, descending=True).argsort(1)
        commit = keeps & (rank < n_commit[:, None])
        slots = torch.where(commit, candidate, slots)
        step_of = torch.where(commit, torch.full_like(step_of, step), step_of)
        logp_out = torch.where(commit, confidence, logp_out)
        done_rows, done_cols = commit.nonzero(as_tuple=True)
        allowed[done_rows, slots[done_rows, done_cols]] = False  # = allowed_items(batch.valid, slots), in place
        step += 1
    return Samples(slots, step_of, logp_out, served_order(model, ctx, slots, order))
