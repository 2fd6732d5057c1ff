"""Logged preference pairs (DESIGN section 5): their Parquet schema, an atomic writer and a validating reader.

One row is one logged comparison: a request, two lists shown for it, which one won. Production logs plug in by
writing this table (extra columns are ignored; integer and float widths are cast):

| column | type | meaning |
|---|---|---|
| `user_id` | int64 | who made the request |
| `seeds` | list<int64> | seed item ids (external `item_id`), at least one, distinct |
| `negatives` | list<int64> | items not wanted "more of" (may be empty) |
| `constraints` | string | JSON list in the batch-request form (README), `[]` for none; example below |
| `k` | int32 | requested list length, 1..64 |
| `chosen` | list<int64> | the preferred list, k distinct item ids, best first |
| `rejected` | list<int64> | the other list, same rules |
| `weight` | float32 | pair weight in the loss, finite and >= 0 |
| `source` | string | where the pair comes from (behaviour policy, experiment, ...) |
| `timestamp` | int64 | seconds since the epoch when the lists were logged |

e.g. constraints = `[{"type": "exclude", "field": "genre", "value": "Horror"}, {"type": "recency", "min_year": 1990}]`

`read_preferences` streams the file in record batches and checks every row; a row failing a check is counted
under the first failing reason, checked in this order: `null_value`; `bad_constraints` (over
MAX_CONSTRAINTS_CHARS, not JSON, not a list); `unknown_id` (any id not in the catalog); `bad_constraints` (unknown
type, field or value, a value out of range, or too few items left for k) or `bad_request` (empty or duplicate seeds,
too many seeds or negatives, k outside 1..64); `wrong_k`; `duplicate` (inside chosen or
rejected); `seed_in_list` (a seed or negative listed); `constraint_violation` (a hard constraint broken);
`bad_weight`. Bad rows are never yielded; after iterating, `reader.report.summary()` says how many rows failed
for what, with example row numbers (0-based).

The benchmark's logged data is made from real feedback by `catalog.behaviour.generate_preferences`.

Example:
    write_preferences(table, "prefs.parquet")  # any pyarrow table with these columns
    reader = read_preferences("prefs.parquet", catalog)
    for batch in reader:  # PreferenceBatch: valid PreferencePair objects (item indices) and their row numbers
        ...
    print(reader.report.summary())
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.requests import request_from_json, valid_mask
from catalog.schema import Catalog, CatalogError, atomic_write
from core.carriers import Request
from core.errors import quoted

PREFERENCES_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("seeds", pa.list_(pa.int64())), ("negatives", pa.list_(pa.int64())),
    ("constraints", pa.string()), ("k", pa.int32()), ("chosen", pa.list_(pa.int64())),
    ("rejected", pa.list_(pa.int64())), ("weight", pa.float32()), ("source", pa.string()), ("timestamp", pa.int64()),
])
REASONS = ("null_value", "bad_constraints", "unknown_id", "bad_request", "wrong_k", "duplicate", "seed_in_list",
           "constraint_violation", "bad_weight")
ITEM_COLUMNS = ("seeds", "negatives", "chosen", "rejected")
MAX_CONSTRAINTS_CHARS = 10_000  # a constraints JSON text; longer is a bad_constraints row, never parsed


@dataclass(frozen=True)
class PreferencePair:
    """One valid logged comparison; items are catalog indices."""

    request: Request
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    weight: float
    source: str


@dataclass(frozen=True)
class PreferenceBatch:
    """The valid pairs of one record batch and their row numbers in the file (0-based)."""

    pairs: tuple[PreferencePair, ...]
    rows: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass
class ValidationReport:
    """Rows read, bad rows per reason, and the first few bad rows per reason as (row, message)."""

    rows: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    max_examples: int = 3

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    @property
    def good(self) -> int:
        return self.rows - self.bad

    def add(self, row: int, reason: str, message: str) -> None:
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.max_examples:
            kept.append((row, message))

    def summary(self) -> str:
        lines = [f"{self.rows} rows read: {self.good} valid pairs, {self.bad} bad rows"]
        for reason in REASONS:
            if self.counts[reason]:
                shown = "; ".join(f"row {r}: {m}" for r, m in self.examples[reason])
                lines.append(f"  {reason}: {self.counts[reason]} (e.g. {shown})")
        return "\n".join(lines)


def write_preferences(table: pa.Table, path: str | Path) -> None:
    """Write a preference table atomically in PREFERENCES_SCHEMA."""
    table = table.select(PREFERENCES_SCHEMA.names).cast(PREFERENCES_SCHEMA)
    atomic_write(Path(path), lambda p: pq.write_table(table, p))


class PreferenceReader:
    """Streams a preference file in record batches of valid pairs; `report` counts the bad rows per reason."""

    def __init__(self, path: str | Path, catalog: Catalog, batch_rows: int = 1024) -> None:
        self.path, self.catalog, self.batch_rows = Path(path), catalog, batch_rows
        if not self.path.is_file():
            raise CatalogError(f"missing preference file {self.path}")
        try:
            schema = pq.ParquetFile(self.path).schema_arrow
        except (pa.ArrowInvalid, OSError) as err:
            raise CatalogError(f"{self.path}: not a readable Parquet file ({err})") from None
        missing = [name for name in PREFERENCES_SCHEMA.names if name not in schema.names]
        if missing:
            raise CatalogError(f"{self.path}: missing column(s) {', '.join(missing)} "
                               "(schema: see catalog/preferences.py)")
        self.index = {int(i): n for n, i in enumerate(catalog.item_ids)}
        self.report = ValidationReport()

    def __iter__(self) -> Iterator[PreferenceBatch]:
        """Each pass re-reads the file and starts a fresh `report`."""
        self.report = ValidationReport()
        batches = pq.ParquetFile(self.path).iter_batches(batch_size=self.batch_rows, columns=PREFERENCES_SCHEMA.names)
        for batch in _readable(batches, self.path):
            pairs, rows = [], []
            for offset, row in enumerate(self._typed(batch).to_pylist()):
                number = self.report.rows + offset
                checked = self.check_row(row)
                if isinstance(checked, PreferencePair):
                    pairs.append(checked)
                    rows.append(number)
                else:
                    self.report.add(number, *checked)
            self.report.rows += batch.num_rows
            yield PreferenceBatch(tuple(pairs), tuple(rows))

    def _typed(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        columns = []
        for target in PREFERENCES_SCHEMA:
            try:
                columns.append(batch.column(target.name).cast(target.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise CatalogError(f"{self.path}: column {target.name} is not {target.type} "
                                   f"({quoted(str(err), 160)})") from None
        return pa.RecordBatch.from_arrays(columns, schema=PREFERENCES_SCHEMA)

    def check_row(self, row: dict) -> PreferencePair | tuple[str, str]:
        """A valid row as a PreferencePair, else (reason, message) for the first failing check (REASONS order)."""
        null = next((n for n in PREFERENCES_SCHEMA.names if row[n] is None or (n in ITEM_COLUMNS and None in row[n])),
                    None)
        if null is not None:
            return "null_value", f"{null} is null or holds a null"
        if len(row["constraints"]) > MAX_CONSTRAINTS_CHARS:
            return "bad_constraints", f"constraints has {len(row['constraints'])} characters; at most " \
                f"{MAX_CONSTRAINTS_CHARS}: {quoted(row['constraints'])}"
        try:
            constraints = json.loads(row["constraints"])
        except (ValueError, RecursionError) as err:  # JSONDecodeError, a 5000-digit number, deep nesting
            return "bad_constraints", f"constraints is not JSON ({quoted(str(err), 120)})"
        if not isinstance(constraints, list):
            return "bad_constraints", f"constraints must be a JSON list, got {quoted(row['constraints'])}"
        unknown = next((i for n in ITEM_COLUMNS for i in row[n] if i not in self.index), None)
        if unknown is not None:
            return "unknown_id", f"unknown item id {unknown}"
        body = {"seeds": row["seeds"], "negatives": row["negatives"], "constraints": constraints, "k": row["k"]}
        try:
            request = request_from_json(self.catalog, body)
        except CatalogError as err:
            try:
                request_from_json(self.catalog, {**body, "constraints": []})
            except CatalogError:
                return "bad_request", str(err)
            return "bad_constraints", str(err)
        lists = {name: [self.index[i] for i in row[name]] for name in ("chosen", "rejected")}
        problem = self._list_problem(request, lists)
        if problem is not None:
            return problem
        if not (math.isfinite(row["weight"]) and row["weight"] >= 0):
            return "bad_weight", f"weight {row['weight']} is not a finite number >= 0"
        return PreferencePair(request, tuple(lists["chosen"]), tuple(lists["rejected"]), float(row["weight"]),
                              row["source"])

    def _list_problem(self, request: Request, lists: dict[str, list[int]]) -> tuple[str, str] | None:
        """(reason, message) for the first list rule broken: length k, distinct, no seed/negative, constraints."""
        ids = self.catalog.item_ids
        for name, items in lists.items():
            if len(items) != request.k:
                return "wrong_k", f"{name} has {len(items)} items, the request asks k={request.k}"
        for name, items in lists.items():
            twice = [i for i in items if items.count(i) > 1]
            if twice:
                return "duplicate", f"{name} lists item {ids[twice[0]]} more than once"
        banned = set(request.seeds) | set(request.negatives)
        for name, items in lists.items():
            leak = [i for i in items if i in banned]
            if leak:
                return "seed_in_list", f"{name} lists seed or negative item {ids[leak[0]]}"
        mask = valid_mask(self.catalog, request)
        for name, items in lists.items():
            broken = [i for i in items if not mask[i]]
            if broken:
                return "constraint_violation", f"{name} item {ids[broken[0]]} breaks a hard constraint of the request"
        return None


def _readable(batches: Iterator[pa.RecordBatch], path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches; a damaged page (bad page header, bad compression) is a CatalogError naming the file."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise CatalogError(f"{path}: a damaged Parquet page ({quoted(str(err), 120)})") from None
        yield batch


def read_preferences(path: str | Path, catalog: Catalog, batch_rows: int = 1024) -> PreferenceReader:
    """A validating streaming reader: iterate it for PreferenceBatch objects, then read `.report`.

    Raises CatalogError at once for a missing or unreadable file or a missing column (named), and while iterating
    for a column of the wrong type or a damaged page; bad rows are counted in `.report`, never yielded."""
    return PreferenceReader(path, catalog, batch_rows)
