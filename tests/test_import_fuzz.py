"""Fuzz tests (hypothesis) of the data edges: the MovieLens importer and the Parquet preference reader.

MovieLens: generated ml-latest-small-shaped directories (rows of good and hostile cells: negative, huge or
non-ASCII ids, NaN/inf/huge/text ratings, titles with quotes, commas, newlines and unicode, repeated ids), then
possibly damaged as a whole (cut mid-row, a quote left open, a NUL). The property: `import_movielens` either writes
a catalog that `read_catalog` loads and that matches the rows, or raises a one-line CatalogError and leaves no
output directory; no other exception. Preferences: generated rows (ids from the catalog and outside it, lists of
any length, constraint JSON good and bad, k and weights of any value, nulls) -> every row is counted, every pair
yielded is valid (length k, distinct, no seed or negative, within the hard constraints, finite weight >= 0).
Each case is time-bounded (hypothesis `deadline`); the file runs in about 10 s.
Run: `python -m pytest tests/test_import_fuzz.py -q`.
"""

from __future__ import annotations

import json
import math
import tempfile
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import make_tiny_catalog
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from catalog.movielens import import_movielens
from catalog.preferences import PREFERENCES_SCHEMA, read_preferences
from catalog.requests import request_from_json, valid_mask
from catalog.schema import CatalogError, read_catalog

SETTINGS = settings(max_examples=120, deadline=timedelta(seconds=3), derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------- MovieLens CSVs

BAD_IDS = st.sampled_from(["-1", "", " 3", "1.0", "٣", "1_0", "9" * 30, "x"])
GOOD_RATINGS = st.sampled_from(["0.5", "3", "4.0", "5.0"])
BAD_RATINGS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "5.5", "1e300", "", "4,5", "½", "9" * 200])
TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)
TITLES = st.one_of(st.sampled_from(["Heat (1995)", "Amélie (2001)", '"Heat, Part 1 (1995)"', "Untitled"]), TEXT)
BAD_TITLES = st.sampled_from(["X (3000)", "Y (1066)", "x" * 2000])
GENRES = st.sampled_from(["Comedy", "Action|Drama", "", "(no genres listed)"])
STAMPS = st.integers(0, 2**31).map(str)
BAD_STAMPS = st.sampled_from(["-5", "", "1e9"])


def csv_text(header: str, rows: list[list[str]]) -> str:
    return header + "\n" + "".join(",".join(row) + "\n" for row in rows)


def spoil(draw, rows: list[list[str]], bad: dict[int, st.SearchStrategy]) -> None:
    """Replace one cell of one row with a hostile value (column -> strategy), or repeat a row's id."""
    if rows:
        row = draw(st.sampled_from(rows))
        column = draw(st.sampled_from(sorted(bad)))
        row[column] = draw(bad[column])


@st.composite
def movielens_files(draw) -> dict[str, str]:
    """movies/ratings/tags CSV texts of mostly valid rows; some files get a hostile cell or are damaged whole."""
    ids = draw(st.lists(st.integers(1, 10**6), min_size=1, max_size=6, unique=True))
    movies = [[str(i), draw(TITLES), draw(GENRES)] for i in ids]
    rated = st.sampled_from(ids)
    ratings = [[str(draw(st.integers(1, 5))), str(draw(rated)), draw(GOOD_RATINGS), draw(STAMPS)]
               for _ in range(draw(st.integers(0, 8)))]
    tags = [[str(draw(st.integers(1, 5))), str(draw(rated)), draw(TEXT).replace(",", ";").replace('"', "'"),
             draw(STAMPS)] for _ in range(draw(st.integers(0, 3)))]
    if draw(st.booleans()):
        spoil(draw, movies, {0: BAD_IDS, 1: BAD_TITLES})
    if draw(st.booleans()):
        spoil(draw, ratings, {0: BAD_IDS, 1: st.one_of(BAD_IDS, st.just("424242")), 2: BAD_RATINGS, 3: BAD_STAMPS})
    if draw(st.integers(0, 5)) == 0:
        movies.append(list(draw(st.sampled_from(movies))))  # a repeated movieId
    files = {"movies.csv": csv_text("movieId,title,genres", movies),
             "ratings.csv": csv_text("userId,movieId,rating,timestamp", ratings),
             "tags.csv": csv_text("userId,movieId,tag,timestamp", tags)}
    for name in list(files):
        damage = draw(st.sampled_from(["none"] * 8 + ["cut", "quote", "nul", "extra"]))
        text = files[name]
        at = draw(st.integers(0, len(text)))
        files[name] = {"none": text, "cut": text[:at], "quote": text[:at] + '"' + text[at:],
                       "nul": text[:at] + "\0" + text[at:], "extra": text + "1,2,3,4,5,6\n"}[damage]
    return files


@SETTINGS
@given(files=movielens_files())
def test_movielens_import_is_a_valid_catalog_or_one_line_error(files):
    with tempfile.TemporaryDirectory() as scratch:
        source, out = Path(scratch) / "source", Path(scratch) / "out"
        source.mkdir()
        (source / "README.txt").write_text("licence")
        for name, text in files.items():
            (source / name).write_text(text, encoding="utf-8")
        try:
            import_movielens(source, out)
        except CatalogError as err:
            message = str(err)
            event(f"refused: {message.split(': ', 1)[-1][:25]}")
            assert "\n" not in message and len(message) < 600, message
            assert str(source) in message
            assert not out.exists()
            return
        catalog = read_catalog(out)
        event("imported")
        assert len(set(catalog.item_ids.tolist())) == catalog.n_items >= 1
        weights = catalog.interactions.weights
        assert all(0.5 <= w <= 5.0 for w in weights.tolist())
        assert int(catalog.popularity.sum()) == len(weights)
        assert all(y == 0 or 1800 <= y <= 2100 for y in catalog.years.tolist())


# ---------------------------------------------------------------- Parquet preference rows

CATALOG = make_tiny_catalog()  # ids 100..149
HOSTILE = {  # column -> values that break a row (or must be read without harm)
    "user_id": st.none(), "seeds": st.sampled_from([[], None, [100, None], [100, 100], list(range(100, 140)), [7]]),
    "negatives": st.sampled_from([None, [103] * 3000, [2**63 - 1], list(range(100, 150)) * 20]),
    "constraints": st.one_of(TEXT, st.none(), st.sampled_from([
        '[{"type": "prefer", "field": "genre", "value": "Comedy", "weight": NaN}]', "[" * 5000,
        '[{"type": "recency", "half_life": Infinity}]', '[{"type": "require", "field": 1}]', '{"a": 1}', "null",
        "[" * 3000 + "]" * 3000, '[{"type": "exclude"}]', '[{"type": "recency", "min_year": 1' + "0" * 400 + "}]",
        '[{"type": "require", "field": "genre", "value": "Horror"}]'])),
    "k": st.one_of(st.none(), st.integers(-2**31, 2**31 - 1)),
    "chosen": st.sampled_from([None, [], [104] * 3, [104, 105], list(range(104, 134)), [100, 104, 105], [999] * 3]),
    "rejected": st.sampled_from([None, [104, 105, 106, 107], [-1, 104, 105], [103, 106, 109] * 1000]),
    "weight": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    "source": st.one_of(st.none(), TEXT), "timestamp": st.none(),
}
CONSTRAINTS = ["[]", '[{"type": "exclude", "field": "genre", "value": "Horror"}]',
               '[{"type": "recency", "min_year": 1960}]',
               '[{"type": "prefer", "field": "genre", "value": "Comedy", "weight": 2.5}]']


@st.composite
def preference_rows(draw) -> list[dict]:
    """Rows that are valid pairs on the tiny catalog, some with one column replaced by a hostile value."""
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        constraints = draw(st.sampled_from(CONSTRAINTS))
        k = draw(st.integers(1, 4))
        request = {"negatives": [], "constraints": json.loads(constraints), "k": k}
        pool = draw(st.permutations(range(CATALOG.n_items)))
        seeds, negatives, rest = pool[:2], pool[2:3], pool[3:]
        mask = valid_mask(CATALOG, request_from_json(CATALOG, {**request, "seeds": [int(CATALOG.item_ids[i])
                                                                                   for i in seeds]}))
        allowed = [int(CATALOG.item_ids[i]) for i in rest if mask[i]]
        row = {"user_id": 1, "seeds": [int(CATALOG.item_ids[i]) for i in seeds],
               "negatives": [int(CATALOG.item_ids[i]) for i in negatives], "constraints": constraints, "k": k,
               "chosen": allowed[:k], "rejected": allowed[k:2 * k], "weight": draw(st.floats(0, 10, width=32)),
               "source": "log", "timestamp": 5}
        if draw(st.booleans()):
            column = draw(st.sampled_from(sorted(HOSTILE)))
            row[column] = draw(HOSTILE[column])
        rows.append(row)
    return rows


@SETTINGS
@given(rows=preference_rows(), batch_rows=st.integers(1, 4))
def test_preference_reader_counts_every_row_and_yields_only_valid_pairs(rows, batch_rows):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "prefs.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCES_SCHEMA), path)
        reader = read_preferences(path, CATALOG, batch_rows=batch_rows)
        batches = list(reader)
    report = reader.report
    event(f"valid pairs: {report.good > 0}")
    assert report.rows == len(rows) and report.good == sum(len(b) for b in batches)
    for batch in batches:
        for pair, number in zip(batch.pairs, batch.rows):
            request = pair.request
            mask = valid_mask(CATALOG, request)
            for items in (pair.chosen, pair.rejected):
                assert len(items) == request.k and len(set(items)) == request.k
                assert all(mask[i] for i in items), (number, rows[number])
            assert math.isfinite(pair.weight) and pair.weight >= 0
    for examples in report.examples.values():
        assert all(len(message) < 400 and "\n" not in message for _, message in examples)


@SETTINGS
@given(column=st.sampled_from(PREFERENCES_SCHEMA.names),
       values=st.sampled_from([pa.array(["x"]), pa.array([1.5]), pa.array([[["a"]]]), pa.array([{"a": 1}]),
                               pa.array([2**40]), pa.array([None], pa.null())]))
def test_preference_reader_wrong_column_types_are_one_catalog_error(column, values):
    """A column of another type is cast when it can be (and the row then checked) or refused with one CatalogError."""
    table = pa.Table.from_pylist([{"user_id": 1, "seeds": [100, 101], "negatives": [], "constraints": "[]", "k": 3,
                                   "chosen": [104, 105, 108], "rejected": [109, 110, 112], "weight": 1.0,
                                   "source": "log", "timestamp": 5}], schema=PREFERENCES_SCHEMA)
    table = table.set_column(table.schema.get_field_index(column), column, values)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "prefs.parquet"
        pq.write_table(table, path)
        try:
            reader = read_preferences(path, CATALOG)
            pairs = [p for batch in reader for p in batch.pairs]
        except CatalogError as err:
            assert column in str(err) and "\n" not in str(err)
            return
    assert reader.report.rows == 1 and len(pairs) + reader.report.bad == 1
