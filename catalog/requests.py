"""Typed requests and constraints, their validity masks, and checking of user-supplied requests.

A request is a seed set (item indices), optional negatives, typed constraints and an output length k
(DESIGN section 1). `valid_mask` is the one definition of which items a request allows (DESIGN 3.3): not a seed,
not a negative, satisfying every hard constraint. The same mask is used in training, sampling, every
likelihood and for the baselines' post-filter.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from catalog.schema import Catalog, CatalogError

MAX_SEEDS = 32
MAX_K = 64


@dataclass(frozen=True)
class Exclude:
    """Hard: no output item has `value` in `field`."""

    field: str
    value: str


@dataclass(frozen=True)
class Require:
    """Hard: every output item has `value` in `field`."""

    field: str
    value: str


@dataclass(frozen=True)
class Prefer:
    """Soft: items with `value` in `field` should rank higher, by `weight`."""

    field: str
    value: str
    weight: float = 1.0


@dataclass(frozen=True)
class Recency:
    """Hard with `min_year` (items of unknown year fail it); soft with `half_life` (years)."""

    min_year: int | None = None
    half_life: float | None = None


Constraint = Exclude | Require | Prefer | Recency
CONSTRAINT_TYPES = (Exclude, Require, Prefer, Recency)


@dataclass(frozen=True)
class Request:
    """What a user asks for; items are catalog indices."""

    seeds: tuple[int, ...]
    negatives: tuple[int, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    k: int = 20


@dataclass(frozen=True)
class Example:
    """A request with the held-out items it is judged against (benchmark and training)."""

    request: Request
    targets: tuple[int, ...]
    user: int
    family: str  # "A" seed-set completion, "B" fine-grained intent
    seed_size: int
    facet: tuple[str, int] | None = None  # family B: the (genre, decade) the request was drawn from


def valid_mask(catalog: Catalog, request: Request) -> np.ndarray:
    """(N,) bool: items the request allows (DESIGN 3.3)."""
    mask = np.ones(catalog.n_items, dtype=bool)
    mask[list(request.seeds)] = False
    mask[list(request.negatives)] = False
    for c in request.constraints:
        if isinstance(c, Exclude):
            mask &= ~catalog.has_value(c.field, c.value)
        elif isinstance(c, Require):
            mask &= catalog.has_value(c.field, c.value)
        elif isinstance(c, Recency) and c.min_year is not None:
            mask &= catalog.years >= c.min_year
    return mask


def soft_bonus(catalog: Catalog, request: Request) -> np.ndarray:
    """(N,) float: sum of matching Prefer weights plus the Recency half-life bonus 2^-(newest - year)/half_life."""
    bonus = np.zeros(catalog.n_items, dtype=np.float32)
    for c in request.constraints:
        if isinstance(c, Prefer):
            bonus += c.weight * catalog.has_value(c.field, c.value)
        elif isinstance(c, Recency) and c.half_life:
            years = catalog.years.astype(np.float32)
            age = np.where(years > 0, years.max() - years, np.inf)
            bonus += np.exp2(-age / c.half_life).astype(np.float32)
    return bonus


def check_request(catalog: Catalog, request: Request) -> np.ndarray:
    """Validate a user request; return its valid mask. Raises CatalogError naming the first problem."""
    seeds = list(request.seeds)
    if not seeds:
        raise CatalogError("the seed set is empty")
    if len(seeds) > MAX_SEEDS:
        raise CatalogError(f"{len(seeds)} seeds given; at most {MAX_SEEDS} are supported")
    for name, ids in (("seed", seeds), ("negative", list(request.negatives))):
        bad = [i for i in ids if not 0 <= i < catalog.n_items]
        if bad:
            raise CatalogError(f"{name} index {bad[0]} is outside the catalog")
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise CatalogError(f"duplicate {name} item(s): {', '.join(str(catalog.item_ids[i]) for i in dup)}")
    if not 1 <= request.k <= MAX_K:
        raise CatalogError(f"k={request.k} is outside 1..{MAX_K}")
    for c in request.constraints:
        if not isinstance(c, CONSTRAINT_TYPES):
            raise CatalogError(f"unknown constraint {c!r}")
        if isinstance(c, Recency):
            if not (c.min_year is None or _is_number(c.min_year, numbers.Integral)) or \
                    not (c.half_life is None or _is_number(c.half_life)):
                raise CatalogError(f"Recency min_year must be an integer and half_life a number, got {c!r}")
            if c.min_year is None and not c.half_life:
                raise CatalogError("Recency needs min_year or a positive half_life")
            if c.half_life is not None and c.half_life <= 0:
                raise CatalogError(f"Recency half_life must be positive, got {c.half_life}")
        else:
            if not (isinstance(c.field, str) and isinstance(c.value, str)):
                raise CatalogError(f"{type(c).__name__} field and value must be strings, got {c!r}")
            if isinstance(c, Prefer) and not _is_number(c.weight):
                raise CatalogError(f"Prefer weight must be a number, got {c.weight!r}")
            catalog.has_value(c.field, c.value)  # raises on an unknown field or value
    mask = valid_mask(catalog, request)
    if mask.sum() < request.k:
        raise CatalogError(f"only {int(mask.sum())} items satisfy the request's constraints; k={request.k} asked")
    return mask


def _is_number(value, kind: type = numbers.Real) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def request_to_json(catalog: Catalog, request: Request) -> dict:
    """A request in the JSON form of the batch CLI (external item ids)."""
    out = {"seeds": [int(catalog.item_ids[i]) for i in request.seeds], "k": request.k}
    if request.negatives:
        out["negatives"] = [int(catalog.item_ids[i]) for i in request.negatives]
    cons = []
    for c in request.constraints:
        fields = {k: v for k, v in vars(c).items() if v is not None}
        cons.append({"type": type(c).__name__.lower(), **fields})
    if cons:
        out["constraints"] = cons
    return out


def request_from_json(catalog: Catalog, data: dict, default_k: int = 20) -> Request:
    """Parse one JSON request (external ids or exact titles for seeds/negatives); raises CatalogError."""
    if not isinstance(data, dict):
        raise CatalogError("a request must be a JSON object")
    unknown = set(data) - {"seeds", "negatives", "constraints", "k"}
    if unknown:
        raise CatalogError(f"unknown request key {min(unknown)!r} (known: seeds, negatives, constraints, k)")
    for key in ("seeds", "negatives", "constraints"):
        if not isinstance(data.get(key) or [], list):
            raise CatalogError(f"{key} must be a JSON list, got {data[key]!r}")
    kinds = {"exclude": Exclude, "require": Require, "prefer": Prefer, "recency": Recency}
    constraints = []
    for c in data.get("constraints") or []:
        if not isinstance(c, dict) or c.get("type") not in kinds:
            raise CatalogError(f"constraint {c!r} needs a type among {', '.join(kinds)}")
        args = {k: v for k, v in c.items() if k != "type"}
        try:
            constraints.append(kinds[c["type"]](**args))
        except TypeError as err:
            raise CatalogError(f"bad {c['type']} constraint {c!r}: {err}") from None
    k = data.get("k", default_k)
    if not isinstance(k, int) or isinstance(k, bool):
        raise CatalogError(f"k must be an integer, got {k!r}")
    request = Request(seeds=tuple(resolve_items(catalog, data.get("seeds") or [])),
                      negatives=tuple(resolve_items(catalog, data.get("negatives") or [])),
                      constraints=tuple(constraints), k=k)
    check_request(catalog, request)
    return request


def resolve_items(catalog: Catalog, refs: list) -> list[int]:
    """External ids (ints or digit strings) or exact titles -> item indices."""
    out = []
    for ref in refs:
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise CatalogError(f"item reference {ref!r} is neither an id nor a title")
        if isinstance(ref, int) or ref.strip().isdigit():
            out.append(catalog.index_of(int(ref)))
        else:
            out.append(catalog.find_title(ref))
    return out
