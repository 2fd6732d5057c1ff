"""Tests of the catalog: MovieLens import, Parquet I/O and its errors, title lookup, requests and request families.

The real ml-latest-small CSVs (../shared/data, or wherever `catalog.movielens.locate` finds them) are imported
once per module into a temporary directory (about 1 s); the tests skip when the data is absent. Everything else
runs on a six-item catalog built in the test. Run: `python -m pytest tests/test_catalog.py -q`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog.dataset import Dataset, benchmark_examples, family_a, family_b, training_examples
from catalog.movielens import import_movielens, locate
from catalog.requests import check_request, request_from_json, request_to_json, soft_bonus, valid_mask
from catalog.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    Catalog,
    CatalogError,
    Interactions,
    read_catalog,
    write_catalog,
)
from core.carriers import Exclude, Prefer, Recency, Request, Require
from core.config import DataConfig, RequestConfig

# ---------------------------------------------------------------- a tiny catalog built in the test

# index: item_id, title, genres, year (0 = unknown)
TINY = [
    (10, "Heat (1995)", ("Action", "Crime"), 1995),
    (20, "Toy Story (1995)", ("Animation", "Comedy"), 1995),
    (30, "Alien (1979)", ("Horror", "Sci-Fi"), 1979),
    (40, "Amelie (2001)", ("Comedy", "Romance"), 2001),
    (50, "Heat (1986)", ("Action",), 1986),
    (60, "Untitled", (), 0),
]


def tiny_catalog(rows=TINY) -> Catalog:
    n = len(rows)
    empty = Interactions(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.int64))
    return Catalog(item_ids=np.array([r[0] for r in rows], np.int64), titles=[r[1] for r in rows],
                   attributes={"genre": [r[2] for r in rows]}, years=np.array([r[3] for r in rows], np.int32),
                   popularity=np.ones(n, np.int64), interactions=empty, name="tiny")


def tiny_tables(item_ids=(1, 2, 3), inter_items=(1, 3, 3)) -> tuple[pa.Table, pa.Table]:
    items = pa.table({
        "item_id": list(item_ids),
        "title": [f"Movie {i} (2000)" for i in item_ids],
        "attributes": [[("genre", ["Drama"])] for _ in item_ids],
        "year": [2000] * len(item_ids),
        "popularity": [1] * len(item_ids),
    }, schema=ITEMS_SCHEMA)
    inter = pa.table({"user_id": [7] * len(inter_items), "item_id": list(inter_items),
                      "weight": [4.0] * len(inter_items), "timestamp": [0] * len(inter_items)},
                     schema=INTERACTIONS_SCHEMA)
    return items, inter


# ---------------------------------------------------------------- the real MovieLens data

@pytest.fixture(scope="module")
def movielens(tmp_path_factory) -> Catalog:
    try:
        source = locate()
    except CatalogError as err:
        pytest.skip(f"MovieLens ml-latest-small not available: {err}")
    out = import_movielens(source, tmp_path_factory.mktemp("movielens"))
    return read_catalog(out)


@pytest.fixture(scope="module")
def dataset(movielens) -> Dataset:
    return Dataset.build(movielens, DataConfig(split_seed=0))


def test_import_movielens_figures(movielens):
    cat = movielens
    assert cat.n_items == 9742
    assert len(cat.interactions.weights) == 100836
    assert int((cat.interactions.weights >= 4.0).sum()) == 48580
    assert int((cat.years > 0).sum()) == 9729
    assert len(cat.values("genre")) == 20 and "(no genres listed)" in cat.values("genre")
    assert len(np.unique(cat.interactions.users)) == 610
    assert cat.titles[cat.index_of(1)] == "Toy Story (1995)"
    assert cat.attributes["genre"][cat.index_of(1)] == ("Adventure", "Animation", "Children", "Comedy", "Fantasy")
    assert cat.years[cat.index_of(1)] == 1995
    assert int(cat.popularity.sum()) == 100836  # popularity = interaction count
    assert "MovieLens" in cat.license_text  # the dataset's README travels with the tables


def test_user_split_60_20_20_deterministic(movielens, dataset):
    train, val, test = dataset.train_users, dataset.val_users, dataset.test_users
    assert (len(train), len(val), len(test)) == (366, 122, 122)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert set(train) | set(val) | set(test) == set(np.unique(movielens.interactions.users).tolist())
    again = Dataset.build(movielens, DataConfig(split_seed=0))
    assert np.array_equal(again.train_users, train) and np.array_equal(again.test_users, test)
    other = Dataset.build(movielens, DataConfig(split_seed=1))
    assert not np.array_equal(other.train_users, train)
    assert sum(len(p) for p in dataset.positives.values()) == 48580


def test_family_a_seeds_and_targets_partition_positives(dataset):
    rng = np.random.default_rng(0)
    for user in dataset.train_users[:50]:
        ex = family_a(dataset, int(user), 5, 20, rng)
        pos = set(dataset.user_positives(user).tolist())
        if ex is None:
            assert len(pos) < 6
            continue
        seeds, targets = set(ex.request.seeds), set(ex.targets)
        assert len(seeds) == 5 and targets and not seeds & targets and seeds | targets == pos
        assert ex.family == "A" and ex.seed_size == 5 and ex.user == int(user)


def _check_family_b(dataset: Dataset, ex) -> None:
    cat = dataset.catalog
    genres, _ = dataset.genres
    seeds, targets = np.array(ex.request.seeds), np.array(ex.targets)
    assert len(targets) >= 1 and len(seeds) == ex.seed_size
    shared = genres[seeds].all(0)
    decades = cat.years[seeds] // 10
    assert shared.any(), "family B seeds share no genre"
    assert (cat.years[seeds] > 0).all() and len(set(decades.tolist())) == 1, "family B seeds span decades"
    # the targets are the user's positives in the seeds' facet (some shared genre, same decade)
    assert set(targets.tolist()) <= set(dataset.user_positives(ex.user).tolist())
    assert (cat.years[targets] // 10 == decades[0]).all()
    assert (genres[targets][:, shared].any(1)).all()
    (constraint,) = ex.request.constraints
    assert isinstance(constraint, (Exclude, Recency))
    assert valid_mask(cat, ex.request)[targets].all(), "a target violates the request's constraint"
    assert valid_mask(cat, ex.request).sum() >= ex.request.k


def test_family_b_examples(dataset):
    examples = benchmark_examples(dataset, dataset.val_users, RequestConfig(), seed=1)
    family_b_examples = [ex for ex in examples if ex.family == "B"]
    assert len(family_b_examples) > 50
    assert len({type(ex.request.constraints[0]) for ex in family_b_examples}) == 2  # Exclude and Recency occur
    for ex in family_b_examples:
        _check_family_b(dataset, ex)
        assert len(ex.targets) >= RequestConfig().family_b_min_targets


def test_family_b_none_when_no_facet_is_large_enough(dataset):
    user = next(u for u in dataset.train_users if len(dataset.user_positives(u)) < 6)
    assert family_b(dataset, int(user), 3, 20, 3, np.random.default_rng(0)) is None


def test_no_target_is_a_seed_and_requests_check(dataset):
    cfg = RequestConfig(family_b_share=0.5)
    examples = training_examples(dataset, cfg, 200, np.random.default_rng(0))
    examples += benchmark_examples(dataset, dataset.test_users, cfg, seed=1)
    train = set(dataset.train_users.tolist())
    assert {ex.family for ex in examples} == {"A", "B"}
    for ex in examples[:200]:
        assert ex.user in train  # training requests come from training users only
    for ex in examples:
        assert not set(ex.request.seeds) & set(ex.targets), (ex.user, ex.family)
        assert len(set(ex.request.seeds)) == len(ex.request.seeds)
        check_request(dataset.catalog, ex.request)


def test_benchmark_examples_deterministic(dataset):
    users = dataset.val_users[:20]
    first = benchmark_examples(dataset, users, RequestConfig(), seed=1)
    assert first == benchmark_examples(dataset, users, RequestConfig(), seed=1)
    assert first != benchmark_examples(dataset, users, RequestConfig(), seed=2)


def test_benchmark_examples_draws(dataset):
    users = dataset.test_users[:30]
    one = benchmark_examples(dataset, users, RequestConfig(), seed=1)
    three = benchmark_examples(dataset, users, RequestConfig(), seed=1, draws=3)
    assert len(one) < len(three) <= 3 * len(one)
    for user in users:
        exs = [ex for ex in three if ex.user == user]
        first = [ex for ex in one if ex.user == user]
        assert exs[:len(first)] == first, "the first draw is not the one-draw request set"
        keys = [(ex.family, ex.seed_size, frozenset(ex.request.seeds)) for ex in exs]
        assert len(keys) == len(set(keys)), "a user got the same seed set twice"
        for s in RequestConfig().seed_sizes:
            assert sum(ex.family == "A" and ex.seed_size == s for ex in exs) <= 3


# ---------------------------------------------------------------- Parquet I/O and its errors

def test_write_read_round_trip(tmp_path):
    items, inter = tiny_tables(item_ids=(5, 2**40, 3), inter_items=(3, 2**40, 5, 3))  # huge ids are fine
    write_catalog(tmp_path, items, inter, "licence text")
    cat = read_catalog(tmp_path)
    assert cat.item_ids.tolist() == [5, 2**40, 3]
    assert cat.interactions.items.tolist() == [2, 1, 0, 2]  # item indices, not ids
    assert cat.attributes == {"genre": [("Drama",)] * 3}
    assert cat.license_text == "licence text"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_read_missing_file(tmp_path):
    with pytest.raises(CatalogError, match=r"missing catalog file .*items\.parquet"):
        read_catalog(tmp_path)


def test_read_non_parquet_file(tmp_path):
    items, inter = tiny_tables()
    write_catalog(tmp_path, items, inter, "")
    (tmp_path / "interactions.parquet").write_text("user_id,item_id\n1,2\n")
    with pytest.raises(CatalogError, match=r"interactions\.parquet: not a readable Parquet file"):
        read_catalog(tmp_path)


def test_read_missing_column(tmp_path):
    items, inter = tiny_tables()
    write_catalog(tmp_path, items, inter, "")
    pq.write_table(items.drop_columns(["popularity", "year"]), tmp_path / "items.parquet")
    with pytest.raises(CatalogError, match=r"items\.parquet: missing column\(s\) year, popularity"):
        read_catalog(tmp_path)


def test_read_wrong_column_type(tmp_path):
    items, inter = tiny_tables()
    write_catalog(tmp_path, items, inter, "")
    pq.write_table(items.set_column(2, "attributes", pa.array([1, 2, 3])), tmp_path / "items.parquet")
    with pytest.raises(CatalogError, match=r"items\.parquet: a column has the wrong type"):
        read_catalog(tmp_path)


def test_read_unknown_item_in_interactions(tmp_path):
    items, inter = tiny_tables(item_ids=(1, 2, 3), inter_items=(1, 99, 2, -4, 4))
    pq.write_table(items, tmp_path / "items.parquet")  # write_catalog would refuse these tables
    pq.write_table(inter, tmp_path / "interactions.parquet")
    with pytest.raises(CatalogError, match=r"interactions\.parquet: row 1: item_id 99 is not among the items \(3 of 5 "
                       r"rows name unknown items, e.g. \[99, -4, 4\]\)"):
        read_catalog(tmp_path)


def test_read_duplicate_item_ids(tmp_path):
    items, inter = tiny_tables(item_ids=(1, 2, 1), inter_items=(1,))
    pq.write_table(items, tmp_path / "items.parquet")
    pq.write_table(inter, tmp_path / "interactions.parquet")
    with pytest.raises(CatalogError, match=r"items\.parquet: row 2: item_id 1 repeats row 0"):
        read_catalog(tmp_path)


# ---------------------------------------------------------------- titles

def test_find_title_exact_and_without_year():
    cat = tiny_catalog()
    assert cat.find_title("Heat (1995)") == 0
    assert cat.find_title("  toy story (1995) ") == 1  # case-insensitive, stripped
    assert cat.find_title("Toy Story") == 1  # without the year
    assert cat.find_title("Untitled") == 5
    with pytest.raises(CatalogError, match="no item titled 'Jaws'"):
        cat.find_title("Jaws")


def test_find_title_ambiguous_names_ids():
    cat = tiny_catalog()
    with pytest.raises(CatalogError, match=r"ambiguous \(2 items: 10: Heat \(1995\); 50: Heat \(1986\)\)"):
        cat.find_title("Heat")
    twins = tiny_catalog(TINY + [(70, "Heat (1995)", ("Drama",), 1995)])
    with pytest.raises(CatalogError, match=r"ambiguous.*\b10: Heat \(1995\); 70: Heat \(1995\)"):
        twins.find_title("Heat (1995)")


def test_has_value_and_index_of():
    cat = tiny_catalog()
    assert cat.has_value("genre", "Comedy").tolist() == [False, True, False, True, False, False]
    with pytest.raises(CatalogError, match=r"did you mean 'Comedy'"):
        cat.has_value("genre", "comedy")
    with pytest.raises(CatalogError, match="unknown attribute field 'studio'"):
        cat.has_value("studio", "Pixar")
    assert cat.index_of(40) == 3
    with pytest.raises(CatalogError, match="unknown item id 41"):
        cat.index_of(41)


# ---------------------------------------------------------------- requests

def test_valid_mask_hand_computed():
    cat = tiny_catalog()
    request = Request(seeds=(0,), negatives=(1,), constraints=(Exclude("genre", "Horror"), Recency(min_year=1980)))
    # 2 is Horror (and 1979), 5 has an unknown year: only 3 and 4 remain
    assert valid_mask(cat, request).tolist() == [False, False, False, True, True, False]
    request = Request(seeds=(1,), constraints=(Require("genre", "Action"), Prefer("genre", "Crime", 9.0)))
    assert valid_mask(cat, request).tolist() == [True, False, False, False, True, False]


def test_soft_bonus_hand_computed():
    """Prefer Comedy (weight 2) + Recency(half_life=10): newest year 2001, bonus 2^-(2001 - year)/10."""
    cat = tiny_catalog()
    request = Request(seeds=(5,), constraints=(Prefer("genre", "Comedy", 2.0), Recency(half_life=10.0)))
    expected = [2 ** -0.6, 2 + 2 ** -0.6, 2 ** -2.2, 2 + 1.0, 2 ** -1.5, 0.0]
    np.testing.assert_allclose(soft_bonus(cat, request), expected, rtol=1e-6)
    assert not soft_bonus(cat, Request(seeds=(0,), constraints=(Exclude("genre", "Action"),))).any()


@pytest.mark.parametrize("request_, message", [
    (Request(seeds=(), k=2), "seed set is empty"),
    (Request(seeds=(0, 2, 0), k=2), r"duplicate seed item\(s\): 10"),
    (Request(seeds=(0,), negatives=(3, 3), k=2), r"duplicate negative item\(s\): 40"),
    (Request(seeds=(9, 9), k=2), "seed index 9 is outside the catalog"),
    (Request(seeds=(-1,), k=2), "seed index -1 is outside the catalog"),
    (Request(seeds=tuple(range(33)), k=2), "33 seeds given; at most 32"),
    (Request(seeds=(0,), k=0), r"k=0 is outside 1\.\.64"),
    (Request(seeds=(0,), k=65), r"k=65 is outside 1\.\.64"),
    (Request(seeds=(0,), k=6), "only 5 items satisfy the request's constraints; k=6"),
    (Request(seeds=(0,), constraints=(Require("genre", "Comedy"),), k=3), "only 2 items satisfy"),
    (Request(seeds=(0,), constraints=(Exclude("studio", "Pixar"),), k=2), "unknown attribute field 'studio'"),
    (Request(seeds=(0,), constraints=(Exclude("genre", "Western"),), k=2), "unknown value 'Western'"),
    (Request(seeds=(0,), constraints=(Prefer("genre", "Comedy", "high"),), k=2), "weight must be a number"),
    (Request(seeds=(0,), constraints=(Exclude("genre", 1995),), k=2), "must be strings"),
    (Request(seeds=(0,), constraints=(Recency(),), k=2), "needs min_year or a positive half_life"),
    (Request(seeds=(0,), constraints=(Recency(half_life=-1.0),), k=2), "half_life must be positive"),
    (Request(seeds=(0,), constraints=(Recency(min_year="1990"),), k=2), "min_year must be an integer"),
    (Request(seeds=(0,), constraints=("no horror",), k=2), "unknown constraint 'no horror'"),
])
def test_check_request_errors(request_, message):
    with pytest.raises(CatalogError, match=message):
        check_request(tiny_catalog(), request_)


def test_check_request_returns_mask():
    cat = tiny_catalog()
    request = Request(seeds=(0, 1), constraints=(Recency(min_year=np.int64(1980)),), k=2)
    assert check_request(cat, request).tolist() == [False, False, False, True, True, False]


def test_request_from_json_titles_and_ids():
    cat = tiny_catalog()
    data = {"seeds": ["Toy Story", 10, "30"], "negatives": ["Heat (1986)"],
            "constraints": [{"type": "exclude", "field": "genre", "value": "Horror"},
                            {"type": "prefer", "field": "genre", "value": "Romance", "weight": 0.5},
                            {"type": "recency", "half_life": 5}], "k": 1}
    request = request_from_json(cat, data)
    assert request.seeds == (1, 0, 2) and request.negatives == (4,) and request.k == 1
    assert request.constraints == (Exclude("genre", "Horror"), Prefer("genre", "Romance", 0.5), Recency(half_life=5))
    assert request_from_json(cat, request_to_json(cat, request)) == request
    assert request_from_json(cat, {"seeds": [20]}, default_k=3).k == 3


@pytest.mark.parametrize("data, message", [
    ({"seeds": [10], "k": 2, "limit": 3}, "unknown request key 'limit'"),
    ({"seeds": [10], "k": "2"}, "k must be an integer"),
    ({"seeds": [10], "k": True}, "k must be an integer"),
    ({"seeds": [11], "k": 2}, "unknown item id 11"),
    ({"seeds": ["Heat"], "k": 2}, "ambiguous"),
    ({"seeds": [10.0], "k": 2}, "neither an id nor a title"),
    ({"seeds": [10, "Heat (1995)"], "k": 2}, "duplicate seed"),
    ({"seeds": [], "k": 2}, "seed set is empty"),
    ({"seeds": [10], "constraints": [{"type": "avoid", "field": "genre", "value": "Drama"}]}, "needs a type"),
    ({"seeds": [10], "constraints": [{"type": "exclude", "genre": "Drama"}]}, "bad exclude constraint"),
    ({"seeds": [10], "constraints": [{"type": "recency", "min_year": "1990"}], "k": 2}, "min_year must be an int"),
    (["Heat (1995)"], "must be a JSON object"),
])
def test_request_from_json_errors(data, message):
    with pytest.raises(CatalogError, match=message):
        request_from_json(tiny_catalog(), data)
