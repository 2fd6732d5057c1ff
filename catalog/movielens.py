"""MovieLens ml-latest-small: locate, download (verified), and import into the project's Parquet schema.

Where the CSVs are looked for, in order: an explicit path (config `data.movielens` / `--source`), the
environment variable H2PO_MOVIELENS, `../shared/data/ml-latest-small` beside the working directory or the
repository, and the user's cache directory (where `h2po data download` puts it). The files are never
committed to the repository; the dataset's licence (README.txt) is copied next to everything derived.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
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

DATASET = "ml-latest-small"
URL = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
SHA256 = {  # ../shared/data/README.md
    "README.txt": "63d22ac138e80fae37021797ed8e1b9424b5239dc576a137422adf783ae3f404",
    "links.csv": "97ad18e4e56a09363c65676b6cb3482ce3e2cea2372a24620c1599c843325f31",
    "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
    "ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
    "tags.csv": "92a9f8bb7916dceef6151209845788c3643f794dfa79d1feaec7121b5960399d",
}
REQUIRED = ("README.txt", "movies.csv", "ratings.csv", "tags.csv")


def cache_dir() -> Path:
    """The user's cache directory for h2po ($H2PO_CACHE, else $XDG_CACHE_HOME/h2po, else ~/.cache/h2po)."""
    if os.environ.get("H2PO_CACHE"):
        return Path(os.environ["H2PO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "h2po"


def candidates(explicit: str = "") -> list[Path]:
    """Where the CSV directory is looked for, in order."""
    if explicit:
        return [Path(explicit)]
    found = [Path(os.environ["H2PO_MOVIELENS"])] if os.environ.get("H2PO_MOVIELENS") else []
    repo = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), repo):
        found.append(base.parent / "shared" / "data" / DATASET)
    found.append(cache_dir() / DATASET)
    return found


def locate(explicit: str = "") -> Path:
    """The first candidate directory holding the CSVs, or a CatalogError saying how to get them."""
    tried = candidates(explicit)
    found = find_source(tried, REQUIRED, explicit, f"an {DATASET}")
    if found is not None:
        return found
    listing = "\n  ".join(str(p) for p in tried)
    raise CatalogError(
        f"MovieLens {DATASET} not found. Looked in:\n  {listing}\n"
        f"Get it with `h2po data download` (fetches {URL} into {cache_dir()}), or download and unzip that file "
        "yourself and pass its folder with `data.movielens=DIR` or H2PO_MOVIELENS=DIR.")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(dest: Path | None = None, url: str = URL, timeout: float = 60.0, progress: bool = True) -> Path:
    """Fetch the official zip, verify every file against its sha256, and install it under `dest` atomically."""
    dest = Path(dest) if dest else cache_dir()
    target = dest / DATASET
    if all((target / n).is_file() and sha256(target / n) == h for n, h in SHA256.items()):
        return target
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0)
            data = _read_with_progress(response, total, progress)
    except (urllib.error.URLError, OSError) as err:
        raise CatalogError(
            f"could not download {url} ({err}). Without network access, download that file on another machine, "
            f"unzip it and pass its {DATASET} folder with `data.movielens=DIR` or H2PO_MOVIELENS=DIR.") from None
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise CatalogError(f"{url} did not return a zip archive") from None
    staging = dest / f".{DATASET}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name, expected in SHA256.items():
            try:
                blob = archive.read(f"{DATASET}/{name}")
            except KeyError:
                raise CatalogError(f"the downloaded archive lacks {DATASET}/{name}") from None
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # damaged in transit (bad CRC, bad deflate)
                raise CatalogError(f"checksum mismatch for {name} in the downloaded archive ({err}); "
                                   "not installed") from None
            if hashlib.sha256(blob).hexdigest() != expected:
                raise CatalogError(f"checksum mismatch for {name} in the downloaded archive; not installed")
            (staging / name).write_bytes(blob)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _read_with_progress(response, total: int, progress: bool) -> bytes:
    from tqdm import tqdm

    chunks = []
    with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"download {DATASET}", disable=not progress) as bar:
        for chunk in iter(lambda: response.read(1 << 16), b""):
            chunks.append(chunk)
            bar.update(len(chunk))
    return b"".join(chunks)


def _rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file, checking the header, that each record is one whole line (a quote left open
    swallows the lines after it) and has as many fields as the header (a cut line has fewer). The files have CRLF
    endings; csv handles them. Any problem is a one-line CatalogError naming the file and the line."""
    line = 1
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if header is None or any(c not in header for c in columns):
                raise CatalogError(f"{path}: expected columns {', '.join(columns)}, found {quoted(header)}")
            for record in reader:
                line, end = line + 1, reader.line_num
                if end != line:
                    raise CatalogError(f"{path}:{line}: a quoted field runs on to line {end} (a quote left open?)")
                if not record:
                    continue
                if len(record) != len(header):
                    raise CatalogError(f"{path}:{line}: {len(record)} fields where the header names {len(header)} "
                                       f"(a truncated or malformed line?): {quoted(','.join(record))}")
                yield line, dict(zip(header, record))
    except csv.Error as err:  # strict: a quote open at the end of the file, a stray quote, a NUL, a huge field
        raise CatalogError(f"{path}:{line + 1}: {str(err)[:120]} (a quote left open?)") from None
    except UnicodeDecodeError as err:
        raise CatalogError(f"{path}: not UTF-8 text ({err})") from None


def import_movielens(source: Path, out: Path) -> Path:
    """Convert the CSVs in `source` into items/interactions Parquet + LICENSE.txt in `out`.

    Every row is checked before anything is written (`catalog.schema.check_items` / `check_interactions`, with the
    CSV line numbers); a bad row is a one-line CatalogError naming the file, the line and the value."""
    source = Path(source)
    try:
        license_text = (source / "README.txt").read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CatalogError(f"{source / 'README.txt'}: not UTF-8 text ({err})") from None
    tags = _read_tags(source / "tags.csv")
    ratings, rating_lines = _read_ratings(source / "ratings.csv")
    counts = Counter(ratings["item_id"])
    items, movie_lines = _read_movies(source / "movies.csv", tags)
    items["popularity"] = [counts.get(i, 0) for i in items["item_id"]]
    items_table = pa.table({k: pa.array(v, type=ITEMS_SCHEMA.field(k).type) for k, v in items.items()})
    inter_table = pa.table(ratings, schema=INTERACTIONS_SCHEMA)
    ids = check_items(items_table, str(source / "movies.csv"), movie_lines, {"item_id": "movieId"})
    check_interactions(inter_table, ids, str(source / "ratings.csv"), rating_lines, RATING_NAMES)
    write_catalog(Path(out), items_table, inter_table, license_text)
    return Path(out)


RATING_NAMES = {"user_id": "userId", "item_id": "movieId", "weight": "rating"}
RATING_SCALE = (0.5, 5.0)  # ml-latest-small: half stars


def _read_tags(path: Path) -> dict[int, set[str]]:
    tags: dict[int, set[str]] = defaultdict(set)
    for line, row in _rows(path, ("movieId", "tag")):
        tag = row["tag"].strip().lower()
        if tag:
            tags[_int(row["movieId"], path, line, "movieId")].add(tag)
    return tags


def _read_ratings(path: Path) -> tuple[dict[str, list], list[int]]:
    """The interaction columns of ratings.csv and the line of each row."""
    columns: dict[str, list] = {"user_id": [], "item_id": [], "weight": [], "timestamp": []}
    lines = []
    for line, row in _rows(path, ("userId", "movieId", "rating", "timestamp")):
        columns["user_id"].append(_int(row["userId"], path, line, "userId"))
        columns["item_id"].append(_int(row["movieId"], path, line, "movieId"))
        columns["weight"].append(_rating(row["rating"], path, line))
        columns["timestamp"].append(_int(row["timestamp"], path, line, "timestamp"))
        lines.append(line)
    return columns, lines


def _read_movies(path: Path, tags: dict[int, set[str]]) -> tuple[dict[str, list], list[int]]:
    """The item columns of movies.csv (less popularity) and the line of each row; the year comes from the title."""
    columns: dict[str, list] = {"item_id": [], "title": [], "attributes": [], "year": []}
    lines = []
    for line, row in _rows(path, ("movieId", "title", "genres")):
        movie = _int(row["movieId"], path, line, "movieId")
        title = row["title"].strip()
        match = re.search(r"\(([0-9]{4})\)\s*$", title)
        genres = [g for g in row["genres"].split("|") if g]
        columns["item_id"].append(movie)
        columns["title"].append(title)
        columns["attributes"].append([("genre", genres), ("tag", sorted(tags.get(movie, ())))])
        columns["year"].append(int(match.group(1)) if match else None)
        lines.append(line)
    return columns, lines


def _int(text: str, path: Path, line: int, name: str) -> int:
    """A non-negative 64-bit integer written in ASCII digits."""
    if not re.fullmatch(r"[0-9]{1,18}", text.strip()):
        raise CatalogError(f"{path}:{line}: {name} {quoted(text)} is not an integer in 0..{10 ** 18 - 1}")
    return int(text)


def _rating(text: str, path: Path, line: int) -> float:
    """A rating on the MovieLens scale, written as a plain ASCII decimal number."""
    low, high = RATING_SCALE
    value = float(text) if re.fullmatch(r"[0-9]{1,3}(\.[0-9]{0,6})?", text.strip()) else None
    if value is None or not low <= value <= high:
        raise CatalogError(f"{path}:{line}: rating {quoted(text)} is not a number in {low}..{high}")
    return value
