"""Requests -> padded tensors for the model (one batch of B requests).

Constraint tokens carry (type, field=value id, scalar): the scalar is the Prefer weight, the minimum year
scaled as (year - 1990) / 30, or the half-life in decades. Value ids index `constraint_vocab(catalog)`,
every (field, value) pair of the catalog, 0 meaning "no value" (Recency).
"""

from __future__ import annotations

import numpy as np
import torch

from catalog.requests import valid_mask
from catalog.schema import Catalog
from core.carriers import CONSTRAINT_KINDS, Exclude, Prefer, Recency, Request, RequestBatch, Require
from core.numerics import Neighbours, seed_row_sum


def constraint_vocab(catalog: Catalog) -> dict[tuple[str, str], int]:
    """(field, value) -> id >= 1, deterministic for a catalog."""
    pairs = [(f, v) for f in sorted(catalog.attributes) for v in catalog.values(f)]
    return {pair: n + 1 for n, pair in enumerate(pairs)}


def _pad(rows: list[list], fill, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    values = torch.full((len(rows), width), fill, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        if row:
            values[b, : len(row)] = torch.tensor(row, dtype=dtype)
            mask[b, : len(row)] = True
    return values, mask


def _constraint_token(c, vocab: dict[tuple[str, str], int]) -> tuple[int, int, float]:
    if isinstance(c, Exclude):
        return CONSTRAINT_KINDS["exclude"], vocab[(c.field, c.value)], 1.0
    if isinstance(c, Require):
        return CONSTRAINT_KINDS["require"], vocab[(c.field, c.value)], 1.0
    if isinstance(c, Prefer):
        return CONSTRAINT_KINDS["prefer"], vocab[(c.field, c.value)], float(c.weight)
    assert isinstance(c, Recency)
    if c.min_year is not None:
        return CONSTRAINT_KINDS["min_year"], 0, (c.min_year - 1990.0) / 30.0
    return CONSTRAINT_KINDS["half_life"], 0, float(c.half_life) / 10.0


def encode_requests(catalog: Catalog, requests: list[Request], vocab: dict[tuple[str, str], int],
                    ease: Neighbours | None = None) -> RequestBatch:
    """Pad B requests into a RequestBatch (Recency with both min_year and half_life yields two tokens). `ease`: an
    EASE fit without the requests' users (a training fold's, model.prior_folds), whose seed scores the batch carries
    for the model to read in place of its own EASE rows."""
    tokens = []
    for r in requests:
        row = []
        for c in r.constraints:
            if isinstance(c, Recency) and c.min_year is not None and c.half_life:
                row += [_constraint_token(Recency(min_year=c.min_year), vocab),
                        _constraint_token(Recency(half_life=c.half_life), vocab)]
            else:
                row.append(_constraint_token(c, vocab))
        tokens.append(row)
    seeds, seed_mask = _pad([list(r.seeds) for r in requests], 0, torch.long)
    negatives, negative_mask = _pad([list(r.negatives) for r in requests], 0, torch.long)
    kind, con_mask = _pad([[t[0] for t in row] for row in tokens], 0, torch.long)
    value, _ = _pad([[t[1] for t in row] for row in tokens], 0, torch.long)
    scalar, _ = _pad([[t[2] for t in row] for row in tokens], 0.0, torch.float32)
    valid = torch.from_numpy(np.stack([valid_mask(catalog, r) for r in requests]))
    scores = None
    if ease is not None:
        device = ease.indices.device
        scores = seed_row_sum(ease, seeds.to(device), seed_mask.to(device)).cpu()
    return RequestBatch(seeds, seed_mask, negatives, negative_mask, kind, value, scalar, con_mask, valid, scores)
