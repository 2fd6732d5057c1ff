"""The synthetic catalog generator (catalog/synth.py, `h2po data synth`): deterministic from its seed, a valid
catalog in the project's schema, and structure a recommender can find (item-kNN and EASE beat popularity on the
benchmark requests of its test users). Small N, a second or two in all."""

from __future__ import annotations

import numpy as np
import pytest

from app.cli import main
from catalog.dataset import Dataset, benchmark_examples
from catalog.schema import read_catalog
from catalog.synth import GENRES, MIN_PER_USER, SynthSpec, write_synth
from core.config import DataConfig, RequestConfig
from evaluation.baselines import EASE, ItemKNN, Popularity
from evaluation.metrics import item_mask, ranking_metrics

pytestmark = pytest.mark.unit
SPEC = SynthSpec(items=400, users=300, clusters=8, seed=3)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return write_synth(SPEC, tmp_path_factory.mktemp("synth") / "cat")


def test_same_seed_identical_files_other_seed_differs(synth_dir, tmp_path):
    again = write_synth(SPEC, tmp_path / "again")
    for name in ("items.parquet", "interactions.parquet", "LICENSE.txt"):
        assert (again / name).read_bytes() == (synth_dir / name).read_bytes(), name
    other = write_synth(SynthSpec(items=400, users=300, clusters=8, seed=4), tmp_path / "other")
    assert (other / "interactions.parquet").read_bytes() != (synth_dir / "interactions.parquet").read_bytes()


def test_valid_schema_and_planted_marginals(synth_dir):
    """Reads back through the catalog reader (its row checks run); popularity is the interaction count; ratings are
    half stars in 0.5..5; every user has enough rows for family A; popularity is heavy-tailed (Zipf)."""
    cat = read_catalog(synth_dir)
    inter = cat.interactions
    assert cat.n_items == SPEC.items and len(np.unique(inter.users)) == SPEC.users
    np.testing.assert_array_equal(cat.popularity, np.bincount(inter.items, minlength=cat.n_items))
    assert set(np.unique(inter.weights * 2).astype(int)) <= set(range(1, 11))
    assert np.bincount(inter.users).max() >= MIN_PER_USER and len(np.unique(inter.users * SPEC.items + inter.items)) \
        == len(inter.users)  # no repeated (user, item) pair
    assert set(cat.values("genre")) <= set(GENRES) and all(cat.attributes["genre"])
    assert ((cat.years >= 1900) & (cat.years <= 2025)).all()
    top = np.sort(cat.popularity)[::-1]
    assert top[: SPEC.items // 10].sum() > 0.4 * top.sum()  # the top 10% of items hold > 40% of the interactions
    share = (inter.weights >= 4.0).mean()
    assert 0.4 < share < 0.8, share


def test_planted_structure_is_measurable(synth_dir):
    """Family A/B requests of the test users: item-kNN and EASE on the training users beat popularity on NDCG@10
    by a wide margin (the clusters carry the signal; popularity only knows the Zipf weights)."""
    data = Dataset.build(read_catalog(synth_dir), DataConfig())
    examples = benchmark_examples(data, data.test_users, RequestConfig(), seed=0)
    assert len(examples) > 50 and {e.family for e in examples} == {"A", "B"}
    relevant = item_mask([e.targets for e in examples], data.catalog.n_items)
    ndcg = {name: ranking_metrics(scorer.recommend(examples, 10), relevant, [10])["ndcg@10"].mean()
            for name, scorer in {"pop": Popularity(data.catalog, data.train_popularity),
                                 "knn": ItemKNN(data.catalog, data.train_matrix),
                                 "ease": EASE(data.catalog, data.train_matrix, 100.0)}.items()}
    assert ndcg["knn"] > 1.5 * ndcg["pop"] and ndcg["ease"] > 1.5 * ndcg["pop"], ndcg


@pytest.mark.parametrize("flags, message", [
    (["--items", "0", "--users", "100"], "--items 0: must be between 24"),
    (["--items", "100", "--users", "2"], "--users 2: must be between 5"),
    (["--items", "100", "--users", "50", "--clusters", "101"], "--clusters 101: must be between 1 and --items"),
    (["--items", "100", "--users", "50", "--per-user", "0"], "--per-user 0: must be between 1"),
    (["--items", "100", "--users", "50", "--seed", "-1"], "--seed -1: must be a non-negative"),
])
def test_bad_arguments_one_line_error(flags, message, tmp_path, capsys):
    assert main(["data", "synth", *flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_writes_a_catalog(tmp_path, capsys):
    assert main(["data", "synth", "--items", "60", "--users", "20", "--out", str(tmp_path / "c")]) == 0
    assert "data.catalog=" in capsys.readouterr().out
    assert read_catalog(tmp_path / "c").n_items == 60
