"""Tests of the MovieTweetings importer (catalog/movietweetings.py) and the data.format switch.

A dozen-movie snapshot in the MovieTweetings format is written by the test itself (a movie without genres, unicode
titles, IMDb ids with leading zeros, a title holding '::', one without a year) and imported; read_catalog gives
back the expected ids, genres, years, popularity, ratings and the MIT notice. Each class of malformed line is
refused with a one-line CatalogError naming the file and line, and nothing is written. A hypothesis fuzz test feeds
generated lines (truncated, wrong separators, NaN/huge ratings, bad UTF-8 bytes): the answer is a valid catalog or
a one-line CatalogError, never another exception, and a refused import leaves no output.
Run: `python -m pytest tests/test_movietweetings.py -q`.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from catalog.dataset import license_note, locate_source
from catalog.movietweetings import import_movietweetings, locate
from catalog.schema import CatalogError, read_catalog
from core.config import ConfigError, DataConfig

LICENSE = "The MIT License (MIT)\n\nCopyright (c) 2013 Simon Dooms\n\nPermission is hereby granted...\n"
MOVIES = [  # (file id text, title, genres field)
    ("0002844", "Fantômas - À l'ombre de la guillotine (1913)", "Crime|Drama"),
    ("0004936", "The Bank (1915)", "Comedy|Short"),
    ("0021283", "Rakudai wa shitakeredo (1930)", ""),  # no genre
    ("0052854", "Goha (1958)", "Drama"),
    ("0104257", "A Few Good Men (1992)", "Crime|Drama|Mystery|Thriller"),
    ("0211915", "Amélie (2001)", "Comedy|Romance"),
    ("0245429", "千と千尋の神隠し (2001)", "Animation|Adventure|Family"),
    ("0372784", "Batman Begins (2005)", "Action|Adventure"),
    ("1074638", "Skyfall (2012)", "Action|Adventure|Thriller"),
    ("1853728", "Django Unchained (2012)", "Drama|Western"),
    ("0076759", "Star Wars::A New Hope (1977)", "Action|Adventure|Fantasy|Sci-Fi"),  # '::' inside the title
    ("9999999", "Untitled Project", "Documentary"),  # no year
]
IDS = [int(m[0]) for m in MOVIES]


def ratings_lines() -> list[str]:
    """36 ratings: user u (1..6) rates movies u-1, u+1, ..., u+11 (every other one, mod 12), ratings 0..10."""
    lines = []
    for user in range(1, 7):
        for j in range(6):
            movie = IDS[(user - 1 + 2 * j) % len(IDS)]
            lines.append(f"{user}::{movie}::{(user + 3 * j) % 11}::{1365000000 + 100 * user + j}")
    return lines


def write_snapshot(directory: Path, movies: list[str] | bytes, ratings: list[str] | bytes,
                   license_text: str = LICENSE) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in (("movies.dat", movies), ("ratings.dat", ratings)):
        data = content if isinstance(content, bytes) else ("\n".join(content) + "\n").encode()
        (directory / name).write_bytes(data)
    (directory / "LICENSE").write_text(license_text, encoding="utf-8")
    return directory


def movie_lines() -> list[str]:
    return [f"{i}::{t}::{g}" for i, t, g in MOVIES]


def test_round_trip(tmp_path):
    source = write_snapshot(tmp_path / "mt", movie_lines(), ratings_lines())
    cat = read_catalog(import_movietweetings(source, tmp_path / "catalog"))
    assert cat.item_ids.tolist() == IDS  # leading zeros dropped, file order kept
    assert cat.titles[0] == "Fantômas - À l'ombre de la guillotine (1913)"
    assert cat.titles[6] == "千と千尋の神隠し (2001)"
    assert cat.titles[10] == "Star Wars::A New Hope (1977)"
    assert cat.attributes["genre"][2] == () and cat.attributes["genre"][4] == ("Crime", "Drama", "Mystery", "Thriller")
    assert sorted(cat.attributes) == ["genre"]
    assert cat.years.tolist() == [1913, 1915, 1930, 1958, 1992, 2001, 2001, 2005, 2012, 2012, 1977, 0]
    assert cat.license_text == LICENSE
    # users 1, 3, 5 rate the six even-indexed movies, users 2, 4, 6 the six odd-indexed ones: 3 ratings each
    assert cat.popularity.tolist() == [3] * 12
    inter = cat.interactions
    assert len(inter.users) == 36 and inter.users[:6].tolist() == [1] * 6
    assert cat.item_ids[inter.items[:3]].tolist() == [2844, 21283, 104257]
    assert inter.weights[:3].tolist() == [1.0, 4.0, 7.0] and inter.timestamps[1] == 1365000101
    assert cat.find_title("Amélie") == 5


def test_cli_import_and_config_switch(tmp_path, monkeypatch):
    from app.cli import main

    source = write_snapshot(tmp_path / "mt", movie_lines(), ratings_lines())
    assert main(["data", "import", "--format", "movietweetings", "--source", str(source),
                 "--out", str(tmp_path / "out")]) == 0
    assert read_catalog(tmp_path / "out").n_items == 12
    cfg = DataConfig(format="movietweetings", source=str(source))
    assert locate_source(cfg) == source
    assert "MIT" in license_note(cfg) and "MovieLens" in license_note(DataConfig())
    monkeypatch.setenv("H2PO_MOVIETWEETINGS", str(source))
    assert locate() == source
    with pytest.raises(ConfigError, match="data.movielens is set but data.format is 'movietweetings'"):
        locate_source(DataConfig(format="movietweetings", movielens=str(source)))
    with pytest.raises(CatalogError, match="missing LICENSE, movies.dat, ratings.dat"):
        locate(str(tmp_path / "nowhere"))


def test_load_catalog_imports_once_per_format_and_source(tmp_path):
    from catalog.dataset import load_catalog
    from catalog.movielens import REQUIRED

    source = write_snapshot(tmp_path / "mt", movie_lines(), ratings_lines())
    cfg = DataConfig(format="movietweetings", source=str(source))
    assert load_catalog(cfg, tmp_path / "run").n_items == 12
    stamp = tmp_path / "run" / "catalog" / "SOURCE"
    assert stamp.read_text() == f"movietweetings:{source.resolve()}"
    (source / "movies.dat").write_text("garbage\n")  # same format and source: the imported catalog is reused
    assert load_catalog(cfg, tmp_path / "run").license_text == LICENSE
    movielens_dir = tmp_path / "ml"
    movielens_dir.mkdir()
    for name in REQUIRED:
        (movielens_dir / name).write_text("")
    old_spelling = DataConfig(movielens=str(movielens_dir))
    assert locate_source(old_spelling) == locate_source(DataConfig(source=str(movielens_dir))) == movielens_dir
    with pytest.raises(ConfigError, match="data.movielens .* and data.source .* disagree"):
        locate_source(DataConfig(movielens=str(movielens_dir), source=str(source)))


GOOD_MOVIES = movie_lines()
BAD = [  # (file, replacement for line 3 of that file, message pattern)
    ("ratings.dat", "1::2844::7", r"ratings\.dat:3: expected user_id::imdb_id::rating::unix_ts, got '1::2844::7'"),
    ("ratings.dat", "1:2844:7:1365000000", r"ratings\.dat:3: expected user_id::imdb_id::rating::unix_ts"),
    ("ratings.dat", "u1::2844::7::1365000000", r"ratings\.dat:3: user_id 'u1' is not a non-negative integer"),
    ("ratings.dat", "1::-2844::7::1365000000", r"ratings\.dat:3: imdb_id '-2844' is not a non-negative integer"),
    ("ratings.dat", "1::2844::11::1365000000", r"ratings\.dat:3: rating '11' is outside 0-10"),
    ("ratings.dat", "1::2844::-0.5::1365000000", r"ratings\.dat:3: rating '-0.5' is outside 0-10"),
    ("ratings.dat", "1::2844::nan::1365000000", r"ratings\.dat:3: rating 'nan' is not finite"),
    ("ratings.dat", "1::2844::1e400::1365000000", r"ratings\.dat:3: rating '1e400' is not finite"),
    ("ratings.dat", "1::2844::seven::1365000000", r"ratings\.dat:3: rating 'seven' is not a number"),
    ("ratings.dat", "1::2844::٥::1365000000", r"ratings\.dat:3: rating '٥' is not a number"),
    ("ratings.dat", "1::4242::7::1365000000", r"ratings\.dat:3: imdb_id 4242 is not among the items \(1 of 36 "),
    ("ratings.dat", "1::2844::7::1.5e9", r"ratings\.dat:3: timestamp '1.5e9' is not a non-negative integer"),
    ("movies.dat", "0002844::Duplicate (1999)::Drama", r"movies\.dat:3: imdb_id 2844 repeats line 1"),
    ("movies.dat", "tt0021283::Rakudai (1930)::Drama", r"movies\.dat:3: imdb_id 'tt0021283' is not a non-neg"),
    ("movies.dat", "0021283::Rakudai (1030)::Drama", r"movies\.dat:3: year 1030 is outside 1800\.\.2100"),
    ("movies.dat", "0021283\tRakudai (1930)\tDrama", r"movies\.dat:3: expected imdb_id::Title \(Year\)::Genre"),
    ("movies.dat", "0021283::Rakudai (1930)", r"movies\.dat:3: expected imdb_id::Title \(Year\)::Genre"),
    ("movies.dat", "0021283::  ::Drama", r"movies\.dat:3: movie 21283 has an empty title"),
]


@pytest.mark.parametrize("name, line, pattern", BAD, ids=[f"{b[0]}-{b[1][:24]}" for b in BAD])
def test_malformed_line_refused(tmp_path, name, line, pattern):
    movies, ratings = list(GOOD_MOVIES), ratings_lines()
    (movies if name == "movies.dat" else ratings)[2] = line
    if name == "movies.dat" and "Duplicate" not in line:  # keep every rated movie known
        ratings = [r for r in ratings if r.split("::")[1] != "21283"]
    source = write_snapshot(tmp_path / "mt", movies, ratings)
    with pytest.raises(CatalogError, match=pattern) as err:
        import_movietweetings(source, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["movies.dat", "ratings.dat"])
def test_bad_utf8_names_file_and_line(tmp_path, name):
    movies = ("\n".join(GOOD_MOVIES) + "\n").encode()
    ratings = ("\n".join(ratings_lines()) + "\n").encode()
    broken = b"0000001::Caf\xe9 (1999)::Drama\n" if name == "movies.dat" else b"1::2844::\xff7::1365000000\n"
    movies, ratings = (movies + broken, ratings) if name == "movies.dat" else (movies, ratings + broken)
    source = write_snapshot(tmp_path / "mt", movies, ratings)
    line = 13 if name == "movies.dat" else 37
    with pytest.raises(CatalogError, match=rf"{name}:{line}: not UTF-8 text \(invalid .* at byte \d+\)"):
        import_movietweetings(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_huge_line_quoted_briefly_and_crlf_blank_lines_accepted(tmp_path):
    source = write_snapshot(tmp_path / "mt", GOOD_MOVIES, ratings_lines()[:2] + ["1::" + "9" * 100_000])
    with pytest.raises(CatalogError, match=r"ratings\.dat:3: expected") as err:
        import_movietweetings(source, tmp_path / "out")
    assert len(str(err.value)) < 200
    crlf = ("\r\n".join(GOOD_MOVIES) + "\r\n\r\n").encode()
    source = write_snapshot(tmp_path / "crlf", crlf, ["", *ratings_lines(), ""])
    assert len(read_catalog(import_movietweetings(source, tmp_path / "ok")).interactions.users) == 36


def test_missing_license_or_no_movies_refused(tmp_path):
    source = write_snapshot(tmp_path / "mt", GOOD_MOVIES, ratings_lines())
    (source / "LICENSE").unlink()
    with pytest.raises(CatalogError, match="LICENSE: missing"):
        import_movietweetings(source, tmp_path / "out")
    source = write_snapshot(tmp_path / "empty", [], [])
    with pytest.raises(CatalogError, match=r"movies\.dat: no items"):
        import_movietweetings(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


CHARS = st.characters(blacklist_categories=("Cs",))  # text a UTF-8 file can hold (no lone surrogates)
BAD_TOKENS = st.one_of(st.sampled_from(["", "x", "-1", " 5", "+5", "nan", "inf", "-inf", "1e400", "1e308", "11",
                                        "٥", "7.5", "9" * 30, "4242"]),
                       st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(CHARS, max_size=5))
HOW = st.sampled_from(["clean"] * 40 + ["truncate", "separator", "bytes", "token"])  # about 1 line in 11 damaged
TITLES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=12).map(
    lambda t: "T" + t)


def damage(draw, fields: list[str], how: str) -> bytes:
    """A line of `fields` joined by '::', damaged as `how` says (a token replaced, a separator changed, the line
    truncated, raw bytes inserted)."""
    if how == "token":
        fields[draw(st.integers(0, len(fields) - 1))] = draw(BAD_TOKENS)
    text = "::".join(fields)
    if how == "separator":
        text = text.replace("::", draw(st.sampled_from([":", ";", "\t", ":::", ""])), 1)
    data = text.encode("utf-8")
    if how == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    if how == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at:]
    return data


@st.composite
def snapshots(draw) -> tuple[bytes, bytes, bool, int, int]:
    """(movies.dat, ratings.dat, every line clean and ids unique, movie lines, rating lines): mostly well-formed
    lines, some damaged, sometimes a duplicate or unknown movie id."""
    ids = draw(st.lists(st.integers(0, 10**7), min_size=1, max_size=8, unique=True))
    clean = True
    if draw(st.integers(0, 9)) == 0:
        ids.append(ids[0])
        clean = False
    movies = []
    for movie in ids:
        how = draw(HOW)
        clean &= how == "clean"
        title = draw(TITLES) + draw(st.sampled_from([" (2001)", " (1899)", " (19x9)", ""]))
        genres = "|".join(draw(st.lists(st.sampled_from(["Drama", "Sci-Fi", "Film-Noir", ""]), max_size=3)))
        movies.append(damage(draw, [str(movie).zfill(draw(st.integers(1, 8))), title, genres], how))
    ratings = []
    for _ in range(draw(st.integers(0, 12))):
        how = draw(HOW)
        clean &= how == "clean"
        fields = [str(draw(st.integers(0, 50))), str(draw(st.sampled_from(ids))),
                  draw(st.sampled_from([str(r) for r in range(11)] + ["7.5", "0.0"])), str(draw(st.integers(0, 2**40)))]
        ratings.append(damage(draw, fields, how))
    return b"\n".join(movies), b"\r\n".join(ratings), clean, len(movies), len(ratings)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshot=snapshots())
def test_fuzzed_snapshots_give_a_catalog_or_one_line_error(snapshot):
    """Well-formed snapshots import whole; damaged ones import or give a one-line CatalogError and no output."""
    movies, ratings, clean, n_movies, n_ratings = snapshot
    with tempfile.TemporaryDirectory() as tmp:
        source = write_snapshot(Path(tmp) / "mt", movies, ratings)
        out = Path(tmp) / "out"
        try:
            cat = read_catalog(import_movietweetings(source, out))
        except CatalogError as err:
            event("refused: " + str(err).split(": ", 1)[-1][:16])
            assert not clean, f"a well-formed snapshot was refused: {err}"
            assert "\n" not in str(err) and len(str(err)) < 400
            assert not out.exists()
            return
        event("imported")
        weights = cat.interactions.weights
        if clean:
            assert cat.n_items == n_movies and len(weights) == n_ratings
        assert all(math.isfinite(w) and 0 <= w <= 10 for w in weights.tolist()) and (cat.item_ids >= 0).all()
        assert np.array_equal(np.bincount(cat.interactions.items, minlength=cat.n_items), cat.popularity)
