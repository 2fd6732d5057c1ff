"""Serving front end of the sampler: many requests (any mix of k) -> ranked lists, batched."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from catalog.batch import encode_requests
from catalog.schema import Catalog
from core.carriers import Request, RequestBatch
from core.config import SamplerConfig
from model.transformer import MASK, Retriever
from rollout.sampler import sample_lists


def recommend(model: Retriever, catalog: Catalog, vocab: dict, requests: list[Request], cfg: SamplerConfig,
              generator: torch.Generator | None = None) -> list[np.ndarray]:
    """One list of `request.k` item indices per request, in request order, sampled in batches of equal k."""
    by_k: dict[int, list[int]] = defaultdict(list)
    for n, request in enumerate(requests):
        by_k[request.k].append(n)
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(requests)
    model.eval()
    for k, members in by_k.items():
        for start in range(0, len(members), cfg.batch_size):
            chunk = members[start:start + cfg.batch_size]
            batch = encode_requests(catalog, [requests[n] for n in chunk], vocab).to(model.device)
            items = sample_lists(model, batch, k, cfg.steps, cfg.temperature, generator).items
            if cfg.order == "score":
                items = by_first_slot(model, batch, items)
            items = items.cpu().numpy()
            for row, n in enumerate(chunk):
                out[n] = items[row]
    return out


@torch.no_grad()
def by_first_slot(model: Retriever, batch: RequestBatch, items: torch.Tensor) -> torch.Tensor:
    """(B, K) lists re-sorted by each item's logit in slot 1 of the all-masked list (sampler.order=score): the
    order the model would give one slot at a time, with no tie between slots that score an item alike."""
    ctx = model.encode(batch)
    first = model.hidden(ctx, torch.full_like(items, MASK))[:, 0]  # (B, D)
    return items.gather(1, model.item_logits(ctx, first, items).argsort(dim=1, descending=True, stable=True))
