"""The project's catalog schema: two Parquet tables any dataset can be converted into.

`items.parquet`
    item_id: int64 (unique), title: string, attributes: map<string, list<string>> (field -> values, e.g.
    {"genre": ["Comedy"], "tag": ["funny"]}), year: int32 (null when unknown), popularity: int64
    (interaction count).
`interactions.parquet`
    user_id: int64 (the user or collection), item_id: int64 (must exist in items), weight: float32 (a rating,
    or 1.0 for implicit feedback), timestamp: int64 (seconds).

Inside the code items are addressed by their row index 0..N-1 ("item index"); `item_id` is the external id.
A `LICENSE.txt` beside the tables carries the source data's licence.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from h2po.errors import UserError

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
        out = np.zeros((self.n_items, len(vocab)), dtype=bool)
        for n, vals in enumerate(self.attributes[field_name]):
            out[n, [pos[v] for v in vals]] = True
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


def _strip_year(title: str) -> str:
    return re.sub(r"\s*\(\d{4}\)\s*$", "", title)


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` and move the result into `path` only when it succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_catalog(directory: Path, items: pa.Table, interactions: pa.Table, license_text: str) -> None:
    """Write the two tables and the licence atomically (each file appears whole or not at all)."""
    directory = Path(directory)
    atomic_write(directory / "LICENSE.txt", lambda p: p.write_text(license_text))
    atomic_write(directory / "items.parquet", lambda p: pq.write_table(items.cast(ITEMS_SCHEMA), p))
    atomic_write(directory / "interactions.parquet",
                 lambda p: pq.write_table(interactions.cast(INTERACTIONS_SCHEMA), p))


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
    """Load a catalog directory in the project's schema, checking that every interaction names a known item."""
    directory = Path(directory)
    items = _read_table(directory / "items.parquet", ITEMS_SCHEMA)
    inter = _read_table(directory / "interactions.parquet", INTERACTIONS_SCHEMA)
    item_ids = items.column("item_id").to_numpy()
    fields: dict[str, list[tuple[str, ...]]] = {}
    rows = items.column("attributes").to_pylist()
    names = sorted({k for row in rows if row for k, _ in row})
    for name in names:
        fields[name] = [tuple(dict(row or []).get(name) or ()) for row in rows]
    years = items.column("year").fill_null(0).to_numpy().astype(np.int32)
    lic = directory / "LICENSE.txt"
    catalog = Catalog(item_ids=item_ids.astype(np.int64), titles=items.column("title").fill_null("").to_pylist(),
                      attributes=fields, years=years, popularity=items.column("popularity").to_numpy(),
                      interactions=Interactions(np.empty(0, np.int64), np.empty(0, np.int64),
                                                np.empty(0, np.float32), np.empty(0, np.int64)),
                      name=directory.name, license_text=lic.read_text() if lic.is_file() else "")
    if len(item_ids) == 0 or item_ids.min() < 0:
        raise CatalogError(f"{directory / 'items.parquet'}: needs at least one item and non-negative item_id values")
    ids = inter.column("item_id").to_numpy()
    order = np.argsort(item_ids, kind="stable")  # searchsorted, not a dense id table: ids may be huge
    pos = np.clip(np.searchsorted(item_ids[order], ids), 0, len(item_ids) - 1)
    idx = np.where(item_ids[order][pos] == ids, order[pos], -1)
    if (idx < 0).any():
        bad = ids[idx < 0][:5].tolist()
        path = directory / "interactions.parquet"
        raise CatalogError(f"{path}: {(idx < 0).sum()} rows name unknown items, e.g. {bad}")
    catalog.interactions = Interactions(inter.column("user_id").to_numpy(), idx,
                                        inter.column("weight").to_numpy(), inter.column("timestamp").to_numpy())
    return catalog
