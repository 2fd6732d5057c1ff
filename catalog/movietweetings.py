"""MovieTweetings (S. Dooms et al., CrowdRec workshop at RecSys 2013): locate a snapshot and import it into the
project's Parquet schema (catalog/schema.py).

A snapshot directory holds `ratings.dat` (`user_id::imdb_id::rating::unix_ts`, ratings 0-10), `movies.dat`
(`imdb_id::Title (Year)::Genre|Genre`, UTF-8; the genre field may be empty) and `LICENSE` (MIT). The 100K snapshot
of 2013 is in `../shared/data/movietweetings-100k`; the larger snapshots of github.com/sidooms/MovieTweetings have
the same format and import the same way. Where the directory is looked for, in order: an explicit path (config
`data.source` / `--source`), $H2PO_MOVIETWEETINGS, `../shared/data/movietweetings-100k` beside the working
directory or the repository. There is no download: the files are never committed to the repository, and the MIT
notice (LICENSE) is copied next to everything derived, as the licence asks.

Every row is checked before anything is written: a malformed line, an id that is not a non-negative integer, a
rating outside 0-10 or not finite, an empty title, bytes that are not UTF-8, and (catalog.schema's shared checks) a
duplicate movie id, a rating of a movie missing from movies.dat or a year outside 1800-2100 raise a one-line
CatalogError naming the file, the line and the problem.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa

from catalog.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    CatalogError,
    check_interactions,
    check_items,
    find_source,
    write_catalog,
)
from core.errors import quoted

DATASET = "movietweetings-100k"
URL = "https://github.com/sidooms/MovieTweetings"
REQUIRED = ("LICENSE", "movies.dat", "ratings.dat")
MAX_RATING = 10.0
_ID = re.compile(r"[0-9]{1,18}")  # fits int64; int() alone would accept "+5", " 5", "5_0" and non-ASCII digits
_YEAR = re.compile(r"\(([0-9]{4})\)\s*$")


def candidates(explicit: str = "") -> list[Path]:
    """Where the snapshot directory is looked for, in order."""
    if explicit:
        return [Path(explicit)]
    found = [Path(os.environ["H2PO_MOVIETWEETINGS"])] if os.environ.get("H2PO_MOVIETWEETINGS") else []
    repo = Path(__file__).resolve().parent.parent
    return found + [base.parent / "shared" / "data" / DATASET for base in (Path.cwd(), repo)]


def locate(explicit: str = "") -> Path:
    """The first candidate directory holding the snapshot, or a CatalogError saying how to get one."""
    tried = candidates(explicit)
    found = find_source(tried, REQUIRED, explicit, "a MovieTweetings")
    if found is not None:
        return found
    listing = "\n  ".join(str(p) for p in tried)
    raise CatalogError(f"MovieTweetings {DATASET} not found. Looked in:\n  {listing}\nGet a snapshot from {URL} "
                       "(ratings.dat, movies.dat, LICENSE) and pass its folder with `data.source=DIR` or "
                       "H2PO_MOVIETWEETINGS=DIR.")


def _lines(path: Path):
    """(line number, text) of the non-empty lines, decoded as UTF-8 one line at a time (so a bad byte is placed)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CatalogError(f"{path}: cannot be read ({err.strerror})") from None
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CatalogError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        yield number, text


def _id(text: str, what: str, where: str) -> int:
    if not _ID.fullmatch(text):
        raise CatalogError(f"{where}: {what} {quoted(text)} is not a non-negative integer")
    return int(text)


def _rating(text: str, where: str) -> float:
    try:
        if not text.isascii():  # float() would read other scripts' digits
            raise ValueError
        value = float(text)
    except ValueError:
        raise CatalogError(f"{where}: rating {quoted(text)} is not a number (expected 0-10)") from None
    if not math.isfinite(value):
        raise CatalogError(f"{where}: rating {quoted(text)} is not finite (expected 0-10)")
    if not 0.0 <= value <= MAX_RATING:
        raise CatalogError(f"{where}: rating {quoted(text)} is outside 0-10")
    return value


def read_movies(path: Path) -> tuple[dict[str, list], list[int]]:
    """The item columns of movies.dat (less popularity) and the line of each row. A title may contain '::'."""
    columns: dict[str, list] = {"item_id": [], "title": [], "attributes": [], "year": []}
    lines = []
    for number, text in _lines(path):
        where = f"{path}:{number}"
        head, sep, rest = text.partition("::")
        title, sep2, labels = rest.rpartition("::")
        if not (sep and sep2):
            raise CatalogError(f"{where}: expected imdb_id::Title (Year)::Genre|Genre, got {quoted(text)}")
        movie = _id(head, "imdb_id", where)
        title = title.strip()
        if not title:
            raise CatalogError(f"{where}: movie {movie} has an empty title")
        match = _YEAR.search(title)
        columns["item_id"].append(movie)
        columns["title"].append(title)
        columns["attributes"].append([("genre", [g.strip() for g in labels.split("|") if g.strip()])])
        columns["year"].append(int(match.group(1)) if match else None)
        lines.append(number)
    return columns, lines


def read_ratings(path: Path) -> tuple[dict[str, list], list[int]]:
    """The interaction columns of ratings.dat and the line of each row."""
    columns: dict[str, list] = {"user_id": [], "item_id": [], "weight": [], "timestamp": []}
    lines = []
    for number, text in _lines(path):
        where = f"{path}:{number}"
        parts = text.split("::")
        if len(parts) != 4:
            raise CatalogError(f"{where}: expected user_id::imdb_id::rating::unix_ts, got {quoted(text)}")
        columns["user_id"].append(_id(parts[0], "user_id", where))
        columns["item_id"].append(_id(parts[1], "imdb_id", where))
        columns["weight"].append(_rating(parts[2], where))
        columns["timestamp"].append(_id(parts[3], "timestamp", where))
        lines.append(number)
    return columns, lines


def import_movietweetings(source: Path, out: Path) -> Path:
    """Convert the snapshot in `source` into items/interactions Parquet + LICENSE.txt (the MIT notice) in `out`.

    Every row is checked before anything is written (the format here; `catalog.schema.check_items` and
    `check_interactions` for what every catalog must satisfy: unique ids, known movies, plausible years)."""
    source = Path(source)
    license_path = source / "LICENSE"
    if not license_path.is_file():
        raise CatalogError(f"{license_path}: missing (the MIT notice must travel with the data)")
    try:
        license_text = license_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CatalogError(f"{license_path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    items, movie_lines = read_movies(source / "movies.dat")
    ratings, rating_lines = read_ratings(source / "ratings.dat")
    counts = Counter(ratings["item_id"])
    items["popularity"] = [counts.get(i, 0) for i in items["item_id"]]
    items_table = pa.table({k: pa.array(v, type=ITEMS_SCHEMA.field(k).type) for k, v in items.items()})
    inter_table = pa.table(ratings, schema=INTERACTIONS_SCHEMA)
    ids = check_items(items_table, str(source / "movies.dat"), movie_lines, {"item_id": "imdb_id"})
    check_interactions(inter_table, ids, str(source / "ratings.dat"), rating_lines, {"item_id": "imdb_id"})
    write_catalog(Path(out), items_table, inter_table, license_text)
    return Path(out)
