"""The item head in chunks of items: exact log-probs, log-sum-exp and top-k with peak memory rows x chunk.

Every sampler step and every training loss needs, for M selected slot outputs, the softmax over a request's allowed
items. In one piece that is an (M, N) logit matrix (and, for training, its saved activations): at N = 1e6 and
M = 5,120 open slots, 20 GB. Here the items are cut into spans of `model.item_chunk` (`item_spans`); each span's
logits come from `masked_logits` on that span's columns (`Retriever.allowed_logits(..., span)` slices them out;
`chosen_log_probs` splits them once per call, so backward joins the spans' gradients in one piece instead of
zeroing an (N, D) gradient per span) and are reduced at once to per-row quantities (the span's
log-sum-exp, the chosen item's logit, its top k), so no (M, N) tensor exists. The results are exact: the normaliser
is the log-sum-exp of the spans' log-sum-exps, which equals the whole row's up to float rounding (a few ulp).
Training (`chosen_log_probs` with gradients on) wraps each span in `torch.utils.checkpoint`, so backward recomputes
a span's logits instead of keeping them: activation memory M x chunk too. The softmax stays exact: no sampled
softmax (docs/results.md, issue 16, says why). With N <= item_chunk there is one span and the code is the one-piece
computation it replaces, bit for bit (ml-latest-small's 9,742 and MovieTweetings' 10.5k items under the default
16,384).

Shapes: B requests, M selected rows (slot outputs) with `rows` (M,) their request, N items, D width.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from model.transformer import Context, Retriever, masked_logits


def item_spans(n: int, chunk: int) -> list[tuple[int, int]]:
    """[(lo, hi), ...] covering items 0..n-1 in order, each at most `chunk` wide; one span when n <= chunk."""
    if chunk < 1:
        raise ValueError(f"item_chunk must be >= 1, got {chunk}")
    return [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)] or [(0, 0)]


def spans_of(model: Retriever, allowed: torch.Tensor) -> list[tuple[int, int]]:
    """The item spans of `model.cfg.item_chunk` over the N columns of `allowed` (B, N)."""
    return item_spans(allowed.shape[1], model.cfg.item_chunk)


def combine_lse(parts: list[torch.Tensor]) -> torch.Tensor:
    """Log-sum-exp of per-span log-sum-exps [(M,), ...] -> (M,); one span passes through unchanged."""
    return parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts), 0)


def _span_terms(hidden: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor, targets: torch.Tensor,
                items: torch.Tensor, bias: torch.Tensor,
                prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One span's (log-sum-exp (M,), logit of each row's target where it lies in the span, else 0 (M,)), from the
    span's columns (allowed (B, n), items (n, D), bias (n,), prior (B, n) or None) and the targets relative to its
    start. A row with no allowed item in the span gets log-sum-exp -inf with gradient 0 (logsumexp's own gradient
    there is NaN)."""
    n = allowed.shape[1]
    logits = masked_logits(hidden, rows, allowed, items, bias, prior)  # (M, n)
    inside = (targets >= 0) & (targets < n)
    picked = logits.gather(1, targets.clamp(0, n - 1)[:, None]).squeeze(1)
    picked = torch.where(inside, picked, torch.zeros_like(picked))
    empty = ~allowed.any(1)[rows]  # (M,)
    if not bool(empty.any()):
        return torch.logsumexp(logits, -1), picked
    lse = torch.logsumexp(logits.masked_fill(empty[:, None], 0.0), -1)
    return lse.masked_fill(empty, float("-inf")), picked


def chosen_log_probs(model: Retriever, ctx: Context, hidden: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[m] | slot output hidden[m]) under the softmax over the items `allowed[rows[m]]` permits.

    hidden (M, D), rows (M,) long, allowed (B, N) bool, targets (M,) long -> (M,) float32, differentiable. A target
    that is not allowed gets -inf. With more than one span and gradients on, each span is checkpointed.
    """
    spans = spans_of(model, allowed)
    if len(spans) == 1:  # the one-piece computation, unchanged
        logp = torch.log_softmax(model.allowed_logits(ctx, hidden, rows, allowed), -1)
        return logp.gather(1, targets[:, None]).squeeze(1)
    # One split per tensor, so backward joins the spans' gradients once. A slice per span would allocate and zero a
    # whole (N, D) gradient for each span: at N = 1e6 (62 spans), 27 s per call where the split takes 1.4 s.
    sizes = [hi - lo for lo, hi in spans]
    items, bias = ctx.items.split(sizes), model.item_bias.split(sizes)
    priors = ctx.prior.split(sizes, 1) if ctx.prior is not None else [None] * len(spans)
    lses, chosen = [], []
    for (lo, hi), span_items, span_bias, prior in zip(spans, items, bias, priors):
        args = (hidden, rows, allowed[:, lo:hi], targets - lo, span_items, span_bias, prior)
        if torch.is_grad_enabled():
            lse, picked = checkpoint(_span_terms, *args, use_reentrant=False)
        else:
            lse, picked = _span_terms(*args)
        lses.append(lse)
        chosen.append(picked)
    return torch.stack(chosen).sum(0) - combine_lse(lses)


@torch.no_grad()
def top_log_probs(model: Retriever, ctx: Context, hidden: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely allowed items of each row, most likely first, with their exact log-probs.

    hidden (M, D), rows (M,), allowed (B, N) -> (log-probs (M, k), items (M, k)); k <= N. Rows with fewer than k
    allowed items end in -inf log-probs. Equal logits may come out in either order (as torch.topk's).
    """
    if not 1 <= k <= allowed.shape[1]:
        raise ValueError(f"k must be in 1..{allowed.shape[1]}, got {k}")
    best = items = None
    lses = []
    for lo, hi in spans_of(model, allowed):
        logits = model.allowed_logits(ctx, hidden, rows, allowed, (lo, hi))  # (M, hi - lo)
        lses.append(torch.logsumexp(logits, -1))
        values, index = logits.topk(min(k, hi - lo), -1)
        if best is None:
            best, items = values, index + lo
            continue
        merged, order = torch.cat([best, values], 1).topk(min(k, best.shape[1] + values.shape[1]), -1)
        best, items = merged, torch.cat([items, index + lo], 1).gather(1, order)
    return best - combine_lse(lses)[:, None], items
