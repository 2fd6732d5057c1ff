"""Typed requests and constraints, their validity masks, and checking of user-supplied requests.

A request is a seed set (item indices), optional negatives, typed constraints and an output length k
(DESIGN section 1). `valid_mask` is the one definition of which items a request allows (DESIGN 3.3): not a seed,
not a negative, satisfying every hard constraint. The same mask is used in training, sampling, every
likelihood and for the baselines' post-filter.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
from collections import Counter
from collections.abc import Iterator
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np

from catalog.schema import Catalog, CatalogError
from core.carriers import CONSTRAINT_TYPES, Constraint, Exclude, Prefer, Recency, Request, Require
from core.errors import quoted

# limits of a user request (the edge refuses anything beyond them with one line naming the limit)
MAX_SEEDS = 32
MAX_K = 64
MAX_NEGATIVES = 512
MAX_CONSTRAINTS = 32
MAX_TITLE_CHARS = 300  # an item reference (a title or a digit string)
MAX_TEXT_CHARS = 200  # a constraint's field or value
MAX_LINE_BYTES = 1_000_000  # a line of a JSONL requests file
MAX_WEIGHT = 100.0  # |Prefer weight|
MAX_HALF_LIFE = 1000.0  # Recency half_life, years
YEAR_RANGE = (1, 9999)  # Recency min_year (0 means "unknown year" in the catalog)


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


def check_request(catalog: Catalog, request: Request, max_k: int = MAX_K) -> np.ndarray:
    """Validate a user request; return its valid mask. Raises CatalogError naming the first problem, its value (a
    bounded quote) and the allowed range. Every number must be finite and in range (a NaN weight once made every
    slot take the same item)."""
    _check_sizes(len(request.seeds), len(request.negatives), len(request.constraints))
    seeds = list(request.seeds)
    if not seeds:
        raise CatalogError("the seed set is empty")
    for name, ids in (("seed", seeds), ("negative", list(request.negatives))):
        bad = [i for i in ids if not (_is_number(i, numbers.Integral) and 0 <= i < catalog.n_items)]
        if bad:
            raise CatalogError(f"{name} index {quoted(bad[0])} is outside the catalog (0..{catalog.n_items - 1})")
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)  # linear: 100k negatives took minutes with count()
        if dup:
            listing = ", ".join(str(catalog.item_ids[i]) for i in dup[:8]) + (", ..." if len(dup) > 8 else "")
            raise CatalogError(f"duplicate {name} item(s): {listing}")
    max_k = min(max_k, MAX_K)
    if not _is_number(request.k, numbers.Integral) or not 1 <= request.k <= max_k:
        raise CatalogError(f"k={quoted(request.k)} is outside 1..{max_k}")
    for c in request.constraints:
        _check_constraint(catalog, c)
    mask = valid_mask(catalog, request)
    if mask.sum() < request.k:
        raise CatalogError(f"only {int(mask.sum())} items satisfy the request's constraints; k={request.k} asked")
    return mask


def _check_sizes(n_seeds: int, n_negatives: int, n_constraints: int) -> None:
    for name, n, limit in (("seeds", n_seeds, MAX_SEEDS), ("negatives", n_negatives, MAX_NEGATIVES),
                           ("constraints", n_constraints, MAX_CONSTRAINTS)):
        if n > limit:
            raise CatalogError(f"{n} {name} given; at most {limit} are supported")


def _check_constraint(catalog: Catalog, c) -> None:
    """Raise CatalogError unless `c` is a constraint whose every value is of the right type and in range."""
    if not isinstance(c, CONSTRAINT_TYPES):
        raise CatalogError(f"unknown constraint {quoted(c)}")
    if isinstance(c, Recency):
        if not (c.min_year is None or _is_number(c.min_year, numbers.Integral)) or \
                not (c.half_life is None or _is_number(c.half_life)):
            raise CatalogError(f"Recency min_year must be an integer and half_life a number, got {quoted(c)}")
        if c.min_year is None and c.half_life is None:
            raise CatalogError("Recency needs min_year or a positive half_life")
        if c.min_year is not None and not YEAR_RANGE[0] <= c.min_year <= YEAR_RANGE[1]:
            raise CatalogError(f"Recency min_year {_shown(c.min_year)} is outside {YEAR_RANGE[0]}..{YEAR_RANGE[1]}")
        if c.half_life is not None and not (_is_finite(c.half_life) and 0 < c.half_life <= MAX_HALF_LIFE):
            raise CatalogError(f"Recency half_life must be positive and finite: {_shown(c.half_life)} is outside "
                               f"0..{MAX_HALF_LIFE:g} years")
        return
    if not (isinstance(c.field, str) and isinstance(c.value, str)):
        raise CatalogError(f"{type(c).__name__} field and value must be strings, got {quoted(c)}")
    for name in ("field", "value"):
        if len(getattr(c, name)) > MAX_TEXT_CHARS:
            raise CatalogError(f"{type(c).__name__} {name} {quoted(getattr(c, name))} is longer than "
                               f"{MAX_TEXT_CHARS} characters")
    if isinstance(c, Prefer):
        if not _is_number(c.weight):
            raise CatalogError(f"Prefer weight must be a number, got {quoted(c.weight)}")
        if not (_is_finite(c.weight) and abs(c.weight) <= MAX_WEIGHT):
            raise CatalogError(f"Prefer weight {_shown(c.weight)} is outside -{MAX_WEIGHT:g}..{MAX_WEIGHT:g} "
                               "(a finite number)")
    catalog.has_value(c.field, c.value)  # raises on an unknown field or value


def _is_number(value, kind: type = numbers.Real) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """A real number (not a bool) that is finite as a float (a 400-digit integer is not)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _shown(value) -> str:
    """A number as the user wrote it, short: 1e+15, nan, -inf; anything else quoted."""
    return f"{value:g}" if isinstance(value, float) else quoted(value)


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


def request_from_json(catalog: Catalog, data: dict, default_k: int = 20, max_k: int = MAX_K) -> Request:
    """Parse one JSON request (external ids or exact titles for seeds/negatives); raises CatalogError."""
    if not isinstance(data, dict):
        raise CatalogError(f"a request must be a JSON object, got {quoted(data)}")
    unknown = set(data) - {"seeds", "negatives", "constraints", "k"}
    if unknown:
        raise CatalogError(f"unknown request key {quoted(min(unknown))} (known: seeds, negatives, constraints, k)")
    for key in ("seeds", "negatives", "constraints"):
        if not isinstance(data.get(key) or [], list):
            raise CatalogError(f"{key} must be a JSON list, got {quoted(data[key])}")
    k = data.get("k", default_k)
    if not _is_number(k, numbers.Integral):
        raise CatalogError(f"k must be an integer, got {quoted(k)}")
    constraints = data.get("constraints") or []
    _check_sizes(len(data.get("seeds") or []), len(data.get("negatives") or []), len(constraints))
    return request_from_refs(catalog, data.get("seeds") or [], data.get("negatives") or [],
                             tuple(_constraint_from_json(c) for c in constraints), k, max_k)


def _constraint_from_json(c) -> Constraint:
    kinds = {"exclude": Exclude, "require": Require, "prefer": Prefer, "recency": Recency}
    if not isinstance(c, dict) or not isinstance(c.get("type"), str) or c["type"] not in kinds:
        raise CatalogError(f"constraint {quoted(c)} needs a type among {', '.join(kinds)}")
    cls = kinds[c["type"]]
    known = [f.name for f in fields(cls)]
    args = {k: v for k, v in c.items() if k != "type"}
    unknown = sorted(set(args) - set(known), key=str)
    if unknown:
        raise CatalogError(f"bad {c['type']} constraint: unknown key {quoted(unknown[0])} (known: {', '.join(known)})")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in args]
    if missing:
        raise CatalogError(f"bad {c['type']} constraint: it needs {', '.join(missing)}")
    return cls(**args)


def request_from_refs(catalog: Catalog, seeds: list, negatives: list, constraints: tuple, k: int,
                      max_k: int = MAX_K) -> Request:
    """The one edge of a user request (CLI flags and JSON lines): sizes, then items, then `check_request`."""
    _check_sizes(len(seeds), len(negatives), len(constraints))
    request = Request(tuple(resolve_items(catalog, seeds)), tuple(resolve_items(catalog, negatives)),
                      tuple(constraints), k)
    check_request(catalog, request, max_k)
    return request


def resolve_items(catalog: Catalog, refs: list) -> list[int]:
    """External ids (ints or digit strings) or exact titles -> item indices."""
    out = []
    for ref in refs:
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise CatalogError(f"item reference {quoted(ref)} is neither an id nor a title")
        if isinstance(ref, str) and len(ref) > MAX_TITLE_CHARS:
            raise CatalogError(f"item reference {quoted(ref)} is longer than {MAX_TITLE_CHARS} characters")
        if isinstance(ref, str) and ref.strip().isdecimal():  # isdecimal: exactly what int() accepts ("²" is not)
            ref = int(ref)
        if isinstance(ref, int):
            if not -2 ** 63 <= ref < 2 ** 63:
                raise CatalogError(f"unknown item id {quoted(ref)} (ids are 64-bit integers)")
            out.append(catalog.index_of(ref))
        else:
            out.append(catalog.find_title(ref))
    return out


def parse_request_line(catalog: Catalog, line: str, default_k: int = 20, max_k: int = MAX_K) -> Request:
    """One line of a JSONL requests file -> a checked Request; any problem is a CatalogError (a short line)."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, a 5000-digit number, deep nesting
        raise CatalogError(f"not a JSON request: {quoted(str(err), 120)}") from None
    return request_from_json(catalog, data, default_k, max_k)


def request_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, problem) for each line of a JSONL file, read a line at a time: a line longer than
    MAX_LINE_BYTES is skipped unread (problem says so), as is one that is not UTF-8."""
    with open(path, "rb") as f:
        for line_no in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(1 << 20)
                yield line_no, None, f"line longer than {MAX_LINE_BYTES} bytes"
                continue
            try:
                yield line_no, raw.decode("utf-8"), None
            except UnicodeDecodeError:
                yield line_no, None, "line is not UTF-8 text"
