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
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from catalog.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, CatalogError, write_catalog

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
    for path in tried:
        if all((path / name).is_file() for name in REQUIRED):
            return path
    if explicit:
        missing = [n for n in REQUIRED if not (Path(explicit) / n).is_file()]
        raise CatalogError(f"{explicit} is not an {DATASET} directory (missing {', '.join(missing)})")
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


def _rows(path: Path, columns: tuple[str, ...]):
    """CSV rows as dicts, checking the header (the files have CRLF endings; csv handles them)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or any(c not in reader.fieldnames for c in columns):
                raise CatalogError(f"{path}: expected columns {', '.join(columns)}, found {reader.fieldnames}")
            yield from enumerate(reader, start=2)
    except UnicodeDecodeError as err:
        raise CatalogError(f"{path}: not UTF-8 text ({err})") from None


def import_movielens(source: Path, out: Path) -> Path:
    """Convert the CSVs in `source` into items/interactions Parquet + LICENSE.txt in `out`."""
    source = Path(source)
    tags: dict[int, set[str]] = defaultdict(set)
    for line, row in _rows(source / "tags.csv", ("movieId", "tag")):
        tag = (row["tag"] or "").strip().lower()
        if tag:
            tags[_int(row["movieId"], source / "tags.csv", line)].add(tag)
    users, items, weights, stamps = [], [], [], []
    for line, row in _rows(source / "ratings.csv", ("userId", "movieId", "rating", "timestamp")):
        path = source / "ratings.csv"
        users.append(_int(row["userId"], path, line))
        items.append(_int(row["movieId"], path, line))
        try:
            weights.append(float(row["rating"]))
        except ValueError:
            raise CatalogError(f"{path}:{line}: rating {row['rating']!r} is not a number") from None
        stamps.append(_int(row["timestamp"], path, line))
    counts: dict[int, int] = defaultdict(int)
    for item in items:
        counts[item] += 1
    ids, titles, attrs, years = [], [], [], []
    for line, row in _rows(source / "movies.csv", ("movieId", "title", "genres")):
        movie = _int(row["movieId"], source / "movies.csv", line)
        title = row["title"].strip()
        match = re.search(r"\((\d{4})\)\s*$", title)
        genres = [g for g in row["genres"].split("|") if g]
        ids.append(movie)
        titles.append(title)
        attrs.append([("genre", genres), ("tag", sorted(tags.get(movie, ())))])
        years.append(int(match.group(1)) if match else None)
    known = set(ids)
    unknown = sorted({i for i in items if i not in known})
    if unknown:
        raise CatalogError(f"{source / 'ratings.csv'}: {len(unknown)} ratings name movies missing from movies.csv")
    columns = {"item_id": ids, "title": titles, "attributes": attrs, "year": years,
               "popularity": [counts.get(i, 0) for i in ids]}
    items_table = pa.table({k: pa.array(v, type=ITEMS_SCHEMA.field(k).type) for k, v in columns.items()})
    inter_table = pa.table({"user_id": users, "item_id": items, "weight": weights, "timestamp": stamps},
                           schema=INTERACTIONS_SCHEMA)
    write_catalog(Path(out), items_table, inter_table, (source / "README.txt").read_text(encoding="utf-8"))
    return Path(out)


def _int(text: str, path: Path, line: int) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise CatalogError(f"{path}:{line}: {text!r} is not an integer") from None
