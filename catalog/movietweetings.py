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
rating outside 0-10 or not finite, a rating of a movie missing from movies.dat, a duplicate movie id or bytes that
are not UTF-8 raise a one-line CatalogError naming the file, the line and the problem.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa

from catalog.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, CatalogError, write_catalog

DATASET = "movietweetings-100k"
URL = "https://github.com/sidooms/MovieTweetings"
REQUIRED = ("LICENSE", "movies.dat", "ratings.dat")
MAX_RATING = 10.0
_ID = re.compile(r"[0-9]{1,18}")  # fits int64; int() alone would accept "+5", " 5", "5_0" and non-ASCII digits
_YEAR = re.compile(r"\((\d{4})\)\s*$")


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
    for path in tried:
        if all((path / name).is_file() for name in REQUIRED):
            return path
    if explicit:
        missing = [n for n in REQUIRED if not (Path(explicit) / n).is_file()]
        raise CatalogError(f"{explicit} is not a MovieTweetings directory (missing {', '.join(missing)})")
    listing = "\n  ".join(str(p) for p in tried)
    raise CatalogError(f"MovieTweetings {DATASET} not found. Looked in:\n  {listing}\nGet a snapshot from {URL} "
                       "(ratings.dat, movies.dat, LICENSE) and pass its folder with `data.source=DIR` or "
                       "H2PO_MOVIETWEETINGS=DIR.")


def _quote(text: str, limit: int = 40) -> str:
    """repr of a bounded prefix, so that a huge or binary line still makes a one-line message."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


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
        raise CatalogError(f"{where}: {what} {_quote(text)} is not a non-negative integer")
    return int(text)


def _rating(text: str, where: str) -> float:
    try:
        if not text.isascii():  # float() would read other scripts' digits
            raise ValueError
        value = float(text)
    except ValueError:
        raise CatalogError(f"{where}: rating {_quote(text)} is not a number (expected 0-10)") from None
    if not math.isfinite(value):
        raise CatalogError(f"{where}: rating {_quote(text)} is not finite (expected 0-10)")
    if not 0.0 <= value <= MAX_RATING:
        raise CatalogError(f"{where}: rating {_quote(text)} is outside 0-10")
    return value


def read_movies(path: Path) -> tuple[list[int], list[str], list[list[str]], list[int | None]]:
    """movies.dat -> (ids, titles, genre lists, years or None). A title may itself contain '::'."""
    ids, titles, genres, years = [], [], [], []
    first: dict[int, int] = {}
    for number, text in _lines(path):
        where = f"{path}:{number}"
        head, sep, rest = text.partition("::")
        title, sep2, labels = rest.rpartition("::")
        if not (sep and sep2):
            raise CatalogError(f"{where}: expected imdb_id::Title (Year)::Genre|Genre, got {_quote(text)}")
        movie = _id(head, "movie id", where)
        if movie in first:
            raise CatalogError(f"{where}: duplicate movie id {movie} (first on line {first[movie]})")
        first[movie] = number
        title = title.strip()
        if not title:
            raise CatalogError(f"{where}: movie {movie} has an empty title")
        match = _YEAR.search(title)
        ids.append(movie)
        titles.append(title)
        genres.append([g.strip() for g in labels.split("|") if g.strip()])
        years.append(int(match.group(1)) if match else None)
    if not ids:
        raise CatalogError(f"{path}: no movies")
    return ids, titles, genres, years


def read_ratings(path: Path, known: set[int]) -> tuple[list[int], list[int], list[float], list[int]]:
    """ratings.dat -> (users, movies, ratings, timestamps); every movie must be in `known`."""
    users, items, weights, stamps = [], [], [], []
    for number, text in _lines(path):
        where = f"{path}:{number}"
        parts = text.split("::")
        if len(parts) != 4:
            raise CatalogError(f"{where}: expected user_id::imdb_id::rating::unix_ts, got {_quote(text)}")
        movie = _id(parts[1], "movie id", where)
        if movie not in known:
            raise CatalogError(f"{where}: movie id {movie} is not in movies.dat")
        users.append(_id(parts[0], "user id", where))
        items.append(movie)
        weights.append(_rating(parts[2], where))
        stamps.append(_id(parts[3], "timestamp", where))
    return users, items, weights, stamps


def import_movietweetings(source: Path, out: Path) -> Path:
    """Convert the snapshot in `source` into items/interactions Parquet + LICENSE.txt (the MIT notice) in `out`.
    Nothing is written unless every row is valid."""
    source = Path(source)
    license_path = source / "LICENSE"
    if not license_path.is_file():
        raise CatalogError(f"{license_path}: missing (the MIT notice must travel with the data)")
    try:
        license_text = license_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CatalogError(f"{license_path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    ids, titles, genres, years = read_movies(source / "movies.dat")
    users, items, weights, stamps = read_ratings(source / "ratings.dat", set(ids))
    counts = Counter(items)
    columns = {"item_id": ids, "title": titles, "attributes": [[("genre", g)] for g in genres], "year": years,
               "popularity": [counts.get(i, 0) for i in ids]}
    items_table = pa.table({k: pa.array(v, type=ITEMS_SCHEMA.field(k).type) for k, v in columns.items()})
    inter_table = pa.table({"user_id": users, "item_id": items, "weight": weights, "timestamp": stamps},
                           schema=INTERACTIONS_SCHEMA)
    write_catalog(Path(out), items_table, inter_table, license_text)
    return Path(out)
