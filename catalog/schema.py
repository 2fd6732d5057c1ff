"""The project's catalog schema: two Parquet tables any dataset can be converted into.

`items.parquet`
    item_id: int64 (unique), title: string, attributes: map<string, list<string>> (field -> values, e.g.
    {"genre": ["Comedy"], "tag": ["funny"]}), year: int32 (null when unknown), popularity: int64
    (interaction count).
`interactions.parquet`
    user_id: int64 (the user or collection), item_id: int64 (must exist in items), weight: float32 (a rating,
    or 1.0 for implicit feedback), timestamp: int64 (seconds).

`check_items` and `check_interactions` are the one place rows are checked (ids unique and >= 0, years in
YEAR_RANGE or null, popularity >= 0, titles at most MAX_TITLE_CHARS, weights finite in 0..MAX_WEIGHT, every
interaction naming a known item, no nulls where a value is needed): `write_catalog` runs them before it writes,
`read_catalog` after it reads, and an importer may run them first with its source's line numbers.

Inside the code items are addressed by their row index 0..N-1 ("item index"); `item_id` is the external id.
A `LICENSE.txt` beside the tables carries the source data's licence.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog.output import atomic_write  # noqa: F401  (re-exported: the writer of every catalog file)
from core.errors import UserError, quoted

ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.int64()),
    ("title", pa.string()),
    ("attributes", pa.map_(pa.string(), pa.list_(pa.string()))),
    ("year", pa.int32()),
    ("popularity", pa.int64()),
])
INTERACTIONS_SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("item_id", pa.int64()),
    ("weight", pa.float32()),
    ("timestamp", pa.int64()),
])
YEAR_RANGE = (1800, 2100)  # a known release year; null when unknown
MAX_TITLE_CHARS = 1000
MAX_WEIGHT = 1e6  # a rating, a count or 1.0; beyond this float32 sums lose the small ones


class CatalogError(UserError):
    """A catalog file is missing or malformed, or an id/title/value is not in the catalog."""


@dataclass
class Interactions:
    """Interaction rows with items already mapped to item indices."""

    users: np.ndarray  # (R,) int64 external user ids
    items: np.ndarray  # (R,) int64 item indices
    weights: np.ndarray  # (R,) float32
    timestamps: np.ndarray  # (R,) int64


@dataclass
class Catalog:
    """Items (indexed 0..N-1) and their interactions."""

    item_ids: np.ndarray  # (N,) int64
    titles: list[str]
    attributes: dict[str, list[tuple[str, ...]]]  # field -> per-item values
    years: np.ndarray  # (N,) int32, 0 = unknown
    popularity: np.ndarray  # (N,) int64
    interactions: Interactions
    name: str = "catalog"
    license_text: str = ""
    _index: dict[int, int] = field(default_factory=dict, repr=False)
    _matrix_cache: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {int(i): n for n, i in enumerate(self.item_ids)}
        if len(self._index) != len(self.item_ids):
            raise CatalogError(f"{self.name}: items.parquet has duplicate item_id values")

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the item index (ids and their order): a checkpoint only fits the catalog it was made on."""
        digest = hashlib.sha256(self.item_ids.astype(np.int64).tobytes())
        return digest.hexdigest()[:16]

    def values(self, field_name: str) -> list[str]:
        """Sorted vocabulary of an attribute field."""
        if field_name not in self.attributes:
            raise CatalogError(f"unknown attribute field {field_name!r} (known: {', '.join(sorted(self.attributes))})")
        return sorted({v for vals in self.attributes[field_name] for v in vals})

    def attribute_matrix(self, field_name: str) -> tuple[np.ndarray, list[str]]:
        """(N, V) boolean multi-hot of a field and its vocabulary."""
        vocab = self.values(field_name)
        pos = {v: j for j, v in enumerate(vocab)}
        rows = self.attributes[field_name]
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        out = np.zeros((self.n_items, len(vocab)), dtype=bool)
        out[np.repeat(np.arange(len(rows)), lengths), [pos[v] for vals in rows for v in vals]] = True
        return out, vocab

    def has_value(self, field_name: str, value: str) -> np.ndarray:
        """(N,) boolean: items whose `field_name` contains `value` (an unknown field or value raises)."""
        if field_name not in self._matrix_cache:
            self._matrix_cache[field_name] = self.attribute_matrix(field_name)
        matrix, vocab = self._matrix_cache[field_name]
        if value not in vocab:
            close = [v for v in vocab if v.lower() == value.lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CatalogError(f"unknown value {value!r} for field {field_name!r}{hint}")
        return matrix[:, vocab.index(value)]

    def index_of(self, item_id: int) -> int:
        """Item index of an external id (unknown ids raise)."""
        try:
            return self._index[int(item_id)]
        except KeyError:
            raise CatalogError(f"unknown item id {item_id}") from None

    def find_title(self, text: str) -> int:
        """Item index of a title: exact (case-insensitive), with or without the trailing "(year)"."""
        key = text.strip().lower()
        hits = [n for n, t in enumerate(self.titles) if t.lower() == key]
        if not hits:
            hits = [n for n, t in enumerate(self.titles) if _strip_year(t).lower() == key]
        if not hits:
            raise CatalogError(f"no item titled {text!r}")
        if len(hits) > 1:
            listing = "; ".join(f"{self.item_ids[n]}: {self.titles[n]}" for n in hits[:8])
            raise CatalogError(f"title {text!r} is ambiguous ({len(hits)} items: {listing}); give the id instead")
        return hits[0]


def find_source(tried: list[Path], required: tuple[str, ...], explicit: str, kind: str) -> Path | None:
    """The first directory of `tried` holding every `required` file; a CatalogError when the user named one
    (`explicit`) that lacks some; None when none of the candidates has them (the caller says how to get the data)."""
    for path in tried:
        if all((path / name).is_file() for name in required):
            return path
    if explicit:
        missing = [n for n in required if not (Path(explicit) / n).is_file()]
        raise CatalogError(f"{explicit} is not {kind} directory (missing {', '.join(missing)})")
    return None


def _strip_year(title: str) -> str:
    return re.sub(r"\s*\(\d{4}\)\s*$", "", title)


def write_catalog(directory: Path, items: pa.Table, interactions: pa.Table, license_text: str) -> None:
    """Check the two tables (`check_items`, `check_interactions`: nothing is written when a check fails), then
    write them and the licence atomically (each file appears whole or not at all)."""
    directory = Path(directory)
    try:
        items, interactions = items.cast(ITEMS_SCHEMA), interactions.cast(INTERACTIONS_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise CatalogError(f"{directory}: a column has the wrong type ({quoted(str(err), 200)})") from None
    ids = check_items(items, str(directory / "items.parquet"))
    check_interactions(interactions, ids, str(directory / "interactions.parquet"))
    atomic_write(directory / "LICENSE.txt", lambda p: p.write_text(license_text))
    atomic_write(directory / "items.parquet", lambda p: pq.write_table(items, p))
    atomic_write(directory / "interactions.parquet", lambda p: pq.write_table(interactions, p))


def _read_table(path: Path, schema: pa.Schema) -> pa.Table:
    if not path.is_file():
        raise CatalogError(f"missing catalog file {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise CatalogError(f"{path}: not a readable Parquet file ({err})") from None
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise CatalogError(f"{path}: missing column(s) {', '.join(missing)} (schema: see catalog/schema.py)")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise CatalogError(f"{path}: a column has the wrong type ({err})") from None


def read_catalog(directory: str | Path) -> Catalog:
    """Load a catalog directory in the project's schema; its rows must pass `check_items` and `check_interactions`."""
    directory = Path(directory)
    items = _read_table(directory / "items.parquet", ITEMS_SCHEMA)
    inter = _read_table(directory / "interactions.parquet", INTERACTIONS_SCHEMA)
    item_ids = check_items(items, str(directory / "items.parquet"))
    idx = check_interactions(inter, item_ids, str(directory / "interactions.parquet"))
    fields = _attribute_fields(items.column("attributes"))
    years = items.column("year").fill_null(0).to_numpy().astype(np.int32)
    lic = directory / "LICENSE.txt"
    return Catalog(item_ids=item_ids, titles=items.column("title").fill_null("").to_pylist(),
                   attributes=fields, years=years, popularity=items.column("popularity").to_numpy(),
                   interactions=Interactions(inter.column("user_id").to_numpy(), idx,
                                             inter.column("weight").to_numpy(), inter.column("timestamp").to_numpy()),
                   name=directory.name, license_text=lic.read_text() if lic.is_file() else "")


def _attribute_fields(column: pa.ChunkedArray) -> dict[str, list[tuple[str, ...]]]:
    """items.parquet's attributes (N,) map<string, list<string>> -> field -> per-item value tuples (an item without
    the field, or with a null list, gets (); a key repeated within one item's map: the last wins, as in a dict).
    Arrow does the unpacking, so 1e6 items take about a second, not the half minute of one dict per item."""
    maps = column.combine_chunks().cast(pa.list_(pa.struct([("key", pa.string()), ("value", pa.list_(pa.string()))])))
    n = len(maps)
    entries = pc.list_flatten(maps)  # (E,) struct<key, value> of all items' entries, item by item
    row_of = pc.list_parent_indices(maps).to_numpy()  # (E,)
    keys = entries.field("key").to_numpy(zero_copy_only=False)
    fields: dict[str, list[tuple[str, ...]]] = {}
    for name in sorted(set(keys.tolist())):
        chosen = np.flatnonzero(keys == name)
        last = np.r_[row_of[chosen][1:] != row_of[chosen][:-1], True]  # the last entry of each item
        chosen = chosen[last]
        lists = entries.field("value").take(pa.array(chosen))  # (C,) list<string>
        lengths = pc.list_value_length(lists).fill_null(0).to_numpy()
        flat = pc.list_flatten(lists).to_pylist()
        ends = np.cumsum(lengths)
        out: list[tuple[str, ...]] = [()] * n
        for row, end, length in zip(row_of[chosen].tolist(), ends.tolist(), lengths.tolist()):
            out[row] = tuple(flat[end - length:end])
        fields[name] = out
    return fields


def _at(where: str, lines: Sequence[int] | None, row: int) -> str:
    """Where a row came from: `file:LINE` when the source's line numbers are known, else `file: row I` (0-based)."""
    return f"{where}:{lines[row]}" if lines is not None else f"{where}: row {row}"


def _refuse_first(bad: np.ndarray, where: str, lines: Sequence[int] | None, describe) -> None:
    """Raise CatalogError for the first True of `bad` (R,), with `describe(row)` saying what is wrong."""
    if bad.any():
        row = int(np.argmax(bad))
        raise CatalogError(f"{_at(where, lines, row)}: {describe(row)}")


def _refuse_nulls(table: pa.Table, columns: tuple[str, ...], where: str, lines: Sequence[int] | None,
                  names: dict[str, str]) -> None:
    for column in columns:
        nulls = table.column(column).is_null().to_numpy(zero_copy_only=False)
        _refuse_first(nulls, where, lines, lambda row: f"{names.get(column, column)} is null")


def check_items(items: pa.Table, where: str, lines: Sequence[int] | None = None,
                names: dict[str, str] | None = None) -> np.ndarray:
    """Refuse an items table (ITEMS_SCHEMA types) with no rows, a null, negative or repeated item_id, a null or
    negative popularity, a year outside YEAR_RANGE (null = unknown is fine) or a title over MAX_TITLE_CHARS.
    -> item ids (N,) int64.

    Errors are one line naming `where` and the row (`lines`: the source's line number of each row), the value
    (bounded) and the rule; `names` maps a column to the source's name for it (e.g. item_id -> movieId)."""
    names = names or {}
    if items.num_rows == 0:
        raise CatalogError(f"{where}: no items (at least one is needed)")
    _refuse_nulls(items, ("item_id", "popularity"), where, lines, names)
    ids = items.column("item_id").to_numpy().astype(np.int64)
    id_name = names.get("item_id", "item_id")
    _refuse_first(ids < 0, where, lines, lambda row: f"{id_name} {ids[row]} is negative")
    order = np.argsort(ids, kind="stable")
    repeat = np.zeros(len(ids), bool)
    repeat[order[1:][ids[order][1:] == ids[order][:-1]]] = True  # every occurrence after an id's first
    first_of = {int(ids[row]): row for row in reversed(range(len(ids)))} if repeat.any() else {}
    shown_row = (lambda r: f"line {lines[r]}") if lines is not None else (lambda r: f"row {r}")
    _refuse_first(repeat, where, lines, lambda row: f"{id_name} {ids[row]} repeats {shown_row(first_of[ids[row]])}")
    popularity = items.column("popularity").to_numpy()
    _refuse_first(popularity < 0, where, lines, lambda row: f"popularity {popularity[row]} is negative")
    low, high = YEAR_RANGE
    years = items.column("year").fill_null(low).to_numpy()
    _refuse_first((years < low) | (years > high), where, lines,
                  lambda row: f"year {years[row]} is outside {low}..{high} (null when unknown)")
    titles = items.column("title")
    lengths = pc.utf8_length(titles).fill_null(0).to_numpy(zero_copy_only=False)
    _refuse_first(lengths > MAX_TITLE_CHARS, where, lines, lambda row: f"title {quoted(titles[row].as_py())} is "
                  f"longer than {MAX_TITLE_CHARS} characters")
    return ids


def check_interactions(interactions: pa.Table, item_ids: np.ndarray, where: str, lines: Sequence[int] | None = None,
                       names: dict[str, str] | None = None) -> np.ndarray:
    """Refuse an interactions table (INTERACTIONS_SCHEMA types) with a null value, a negative user_id, a weight
    that is not a finite number in 0..MAX_WEIGHT, or an item_id not among `item_ids` (N,).
    -> the item index of every row (R,) int64. Errors as in `check_items`."""
    names = names or {}
    _refuse_nulls(interactions, tuple(INTERACTIONS_SCHEMA.names), where, lines, names)
    users = interactions.column("user_id").to_numpy()
    _refuse_first(users < 0, where, lines, lambda row: f"{names.get('user_id', 'user_id')} {users[row]} is negative")
    weights = interactions.column("weight").to_numpy()
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(weights) & (weights >= 0) & (weights <= MAX_WEIGHT))
    _refuse_first(bad, where, lines, lambda row: f"{names.get('weight', 'weight')} {weights[row]:g} is not a finite "
                  f"number in 0..{MAX_WEIGHT:g}")
    ids = interactions.column("item_id").to_numpy()
    order = np.argsort(item_ids, kind="stable")  # searchsorted, not a dense id table: ids may be huge
    pos = np.clip(np.searchsorted(item_ids[order], ids), 0, len(item_ids) - 1)
    idx = np.where(item_ids[order][pos] == ids, order[pos], -1)
    unknown = idx < 0
    examples = ids[unknown][:5].tolist()
    _refuse_first(unknown, where, lines, lambda row: f"{names.get('item_id', 'item_id')} {ids[row]} is not among "
                  f"the items ({int(unknown.sum())} of {len(ids)} rows name unknown items, e.g. {examples})")
    return idx.astype(np.int64)
