"""Bad input at the data edges: MovieLens CSV rows, hand-made catalog Parquet files and preference Parquet rows.

Each case is one input class of issue 14: a truncated `ratings.csv`, a duplicate movieId, non-finite or out-of-scale
ratings, an unterminated quote in `movies.csv`, a huge value (quoted as a bounded prefix), and Parquet tables with
duplicate ids, non-finite weights or negative popularity. Every one must end in a one-line CatalogError naming the
file, the line (or row) and the problem, and leave no output behind. The preference reader must count bad rows in
its report (or raise a CatalogError for a damaged file), never crash or hang. Tiny files written in the test;
a few seconds in all. Run: `python -m pytest tests/test_import_edges.py -q`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog.movielens import import_movielens
from catalog.preferences import PREFERENCES_SCHEMA, read_preferences
from catalog.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, CatalogError, read_catalog, write_catalog

MOVIES = ('movieId,title,genres\n1,Toy Story (1995),Adventure|Comedy\n2,"Heat, Part 1 (1995)",Action\n'
          '3,Amélie (2001),\n')
RATINGS = "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,0.5,964981247\n2,3,5.0,964982224\n"
TAGS = "userId,movieId,tag,timestamp\n2,1,pixar,1445714994\n"


def movielens_dir(root: Path, movies: str = MOVIES, ratings: str = RATINGS, tags: str = TAGS) -> Path:
    """An ml-latest-small-shaped directory holding the given CSV texts."""
    source = root / "source"
    source.mkdir(parents=True)
    for name, text in (("README.txt", "licence"), ("movies.csv", movies), ("ratings.csv", ratings),
                       ("tags.csv", tags)):
        (source / name).write_text(text, encoding="utf-8")
    return source


def import_error(tmp_path: Path, **texts: str) -> str:
    """The CatalogError message of importing the CSVs; asserts it is one line and that nothing was written."""
    out = tmp_path / "catalog"
    with pytest.raises(CatalogError) as caught:
        import_movielens(movielens_dir(tmp_path, **texts), out)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    assert not out.exists()
    return message


def test_valid_csvs_import_with_quotes_and_unicode(tmp_path):
    catalog = read_catalog(import_movielens(movielens_dir(tmp_path), tmp_path / "catalog"))
    assert catalog.titles == ["Toy Story (1995)", "Heat, Part 1 (1995)", "Amélie (2001)"]
    assert catalog.years.tolist() == [1995, 1995, 2001] and catalog.popularity.tolist() == [1, 1, 1]
    assert catalog.interactions.weights.tolist() == [4.0, 0.5, 5.0]


def test_truncated_ratings_line(tmp_path):
    """The last line cut mid-row (today: TypeError from float(None))."""
    message = import_error(tmp_path, ratings=RATINGS + "2,1")
    assert "ratings.csv:5:" in message and "2 fields" in message and "truncated" in message


def test_duplicate_movie_id_refused_at_import(tmp_path):
    """Today the import succeeds and only loading fails."""
    message = import_error(tmp_path, movies=MOVIES + "2,Heat again (1996),Action\n")
    assert "movies.csv:5:" in message and "movieId 2" in message and "line 3" in message


@pytest.mark.parametrize("rating", ["nan", "NaN", "inf", "-inf", "-7", "5.5", "1e300", "0", "½", "٣"])
def test_rating_outside_the_scale(tmp_path, rating):
    """Non-finite, negative, too large or non-ASCII ratings (today: stored as they are)."""
    message = import_error(tmp_path, ratings=RATINGS + f"2,1,{rating},964982224\n")
    assert "ratings.csv:5:" in message and "rating" in message and "0.5..5" in message


@pytest.mark.parametrize("movies, line", [
    ('movieId,title,genres\n1,"Toy Story (1995),Adventure\n2,Heat (1995),Action\n3,Amélie (2001),\n', 2),
    ('movieId,title,genres\n1,Toy Story (1995),Adventure\n2,"Heat (1995),Action\n3,Amélie (2001),Drama\n', 3),
    ('movieId,title,genres\n1,Toy Story (1995),Adventure\n2,"Heat (1995),Action\n3,"Amélie (2001)",Drama\n', 3),
])
def test_unterminated_quote_in_movies(tmp_path, movies, line):
    """A quote left open swallows the next lines (today: 'missing movies' or an AttributeError)."""
    message = import_error(tmp_path, movies=movies)
    assert f"movies.csv:{line}:" in message and "quote" in message


def test_huge_values_are_quoted_as_a_bounded_prefix(tmp_path):
    message = import_error(tmp_path, ratings=RATINGS + f"2,1,{'9' * 100_000},964982224\n")
    assert "ratings.csv:5:" in message and "'9999" in message and "..." in message
    message = import_error(tmp_path / "b", ratings=RATINGS + f"2,{'7' * 5000},4.0,964982224\n")
    assert "ratings.csv:5:" in message and "movieId" in message


@pytest.mark.parametrize("column, values, expected", [
    ("item_id", [1, 2, 1], "row 2: item_id 1 repeats row 0"),
    ("item_id", [1, None, 3], "row 1: item_id is null"),
    ("popularity", [1, -5, 1], "row 1: popularity -5 is negative"),
    ("year", [2000, 99999, None], "row 1: year 99999 is outside"),
])
def test_read_catalog_refuses_bad_item_rows(tmp_path, column, values, expected):
    """A hand-made items.parquet (today: duplicates fail with no row; negative popularity or a year 99999 load)."""
    items, inter = tables()
    pq.write_table(items.set_column(items.schema.get_field_index(column), column,
                                    pa.array(values, ITEMS_SCHEMA.field(column).type)), tmp_path / "items.parquet")
    pq.write_table(inter, tmp_path / "interactions.parquet")
    with pytest.raises(CatalogError, match=r"items\.parquet: " + expected):
        read_catalog(tmp_path)


@pytest.mark.parametrize("weight", [math.nan, math.inf, -1.0])
def test_read_catalog_refuses_bad_weights(tmp_path, weight):
    """Non-finite or negative interaction weights in a hand-made interactions.parquet (today: loaded)."""
    items, inter = tables()
    pq.write_table(items, tmp_path / "items.parquet")
    pq.write_table(inter.set_column(2, "weight", pa.array([4.0, weight], pa.float32())),
                   tmp_path / "interactions.parquet")
    with pytest.raises(CatalogError, match=r"interactions\.parquet: row 1: weight .* is not a finite number in 0"):
        read_catalog(tmp_path)


def test_write_catalog_refuses_bad_tables_and_writes_nothing(tmp_path):
    items, inter = tables()
    bad = inter.set_column(2, "weight", pa.array([4.0, math.nan], pa.float32()))
    with pytest.raises(CatalogError, match=r"interactions\.parquet: row 1: weight nan"):
        write_catalog(tmp_path / "out", items, bad, "licence")
    assert not (tmp_path / "out").exists()


def tables() -> tuple[pa.Table, pa.Table]:
    """Three valid items (ids 1, 2, 3) and two interactions."""
    items = pa.table({"item_id": [1, 2, 3], "title": ["A (2000)", "B (2001)", "C"],
                      "attributes": [[("genre", ["Drama"])]] * 3, "year": [2000, 2001, None],
                      "popularity": [1, 1, 0]}, schema=ITEMS_SCHEMA)
    inter = pa.table({"user_id": [7, 7], "item_id": [1, 2], "weight": [4.0, 3.0], "timestamp": [0, 1]},
                     schema=INTERACTIONS_SCHEMA)
    return items, inter


# ---------------------------------------------------------------- the preference reader

HORROR = '[{"type": "exclude", "field": "genre", "value": "Horror"}]'


def good_row(**changes) -> dict:
    """A valid row on the conftest tiny catalog (ids 100..149): seeds 100, 101, negative 102, k=3."""
    row = {"user_id": 1, "seeds": [100, 101], "negatives": [102], "constraints": HORROR, "k": 3,
           "chosen": [104, 105, 108], "rejected": [109, 110, 112], "weight": 1.0, "source": "log", "timestamp": 5}
    return {**row, **changes}


def read_rows(catalog, path: Path, rows: list[dict]):
    pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCES_SCHEMA), path)
    reader = read_preferences(path, catalog)
    pairs = [p for batch in reader for p in batch.pairs]
    return pairs, reader.report


@pytest.mark.parametrize("changes, reason", [
    ({"constraints": "[" * 100_000 + "]" * 100_000}, "bad_constraints"),  # today: RecursionError
    ({"constraints": "[" + ", ".join(["[]"] * 20_000) + "]"}, "bad_constraints"),
    ({"negatives": [103] * 200_000}, "bad_request"),  # today: quadratic duplicate check (minutes)
    ({"seeds": list(range(100, 150)) * 1000}, "bad_request"),
    ({"chosen": [104] * 1_000_000}, "wrong_k"),
    ({"constraints": '[{"type": "prefer", "field": "genre", "value": "Comedy", "weight": NaN}]'}, "bad_constraints"),
    ({"constraints": '[{"type": "recency", "min_year": 1' + "0" * 5000 + '}]'}, "bad_constraints"),
    ({"weight": math.inf}, "bad_weight"),
    ({"weight": -0.5}, "bad_weight"),
])
def test_preference_reader_counts_hostile_rows(tiny_catalog, tmp_path, changes, reason):
    """Deep or long JSON, huge lists and bad weights: counted under a reason in well under a second each."""
    start = time.perf_counter()
    pairs, report = read_rows(tiny_catalog, tmp_path / "p.parquet", [good_row(), good_row(**changes)])
    assert time.perf_counter() - start < 5.0
    assert len(pairs) == 1 and report.counts == {reason: 1}, report.summary()
    assert all(len(message) < 300 for examples in report.examples.values() for _, message in examples)


def test_preference_reader_refuses_a_damaged_file(tiny_catalog, tmp_path):
    """A file whose data pages are damaged after a valid footer: a CatalogError, not an Arrow traceback."""
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([good_row()] * 50, schema=PREFERENCES_SCHEMA), path,
                   compression="snappy", use_dictionary=False)
    data = bytearray(path.read_bytes())
    data[8:400] = b"\xff" * 392  # the first column chunks; the footer at the end stays intact
    path.write_bytes(bytes(data))
    with pytest.raises(CatalogError, match=r"p\.parquet"):
        list(read_preferences(path, tiny_catalog))
