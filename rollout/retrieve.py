"""Serving front end of the sampler: many requests (any mix of k) -> ranked lists, batched."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from catalog.batch import encode_requests
from catalog.schema import Catalog
from core.carriers import Request
from core.config import SamplerConfig
from model.transformer import Retriever
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
            items = sample_lists(model, batch, k, cfg.steps, cfg.temperature, generator, cfg.order).served.cpu().numpy()
            for row, n in enumerate(chunk):
                out[n] = items[row]
    return out

