"""Logged preference data: generation from a behaviour policy, the Parquet round trip, and the validating reader.

Generation runs on the 50-item tiny catalog (conftest: item i has genre GENRES[i % 4], plus GENRES[(i + 1) % 4]
when i % 3 == 0; ids are 100 + i) with EASE as behaviour policy. The hand-made file has one bad row per reason;
Horror items are i % 4 == 3 and i in {6, 18, 30, 42}, so ids 103 and 106 break `exclude genre=Horror`.
The CLI test runs `h2po data preferences` on the real MovieLens data with `configs/tiny.yaml` (about 10 s).
Run: `python -m pytest tests/test_preferences.py -q`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.cli import main
from catalog.behaviour import draw_pairs, generate_preferences, gumbel_top_k
from catalog.dataset import Dataset
from catalog.preferences import PREFERENCES_SCHEMA, read_preferences, write_preferences
from catalog.requests import valid_mask
from catalog.schema import CatalogError, read_catalog
from core.carriers import Example, Exclude, Recency, Request
from core.config import DataConfig, RequestConfig
from evaluation.baselines import EASE, top_k

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
HORROR = '[{"type": "exclude", "field": "genre", "value": "Horror"}]'


@pytest.fixture(scope="module")
def tiny_data(tiny_catalog) -> Dataset:
    return Dataset.build(tiny_catalog, DataConfig())


def tiny_examples(catalog) -> list[Example]:
    """Six requests, half with hard constraints, each with four targets."""
    out = []
    for r in range(6):
        cons = (Exclude("genre", "Horror"), Recency(min_year=1970)) if r % 2 else ()
        request = Request(seeds=(r, r + 10), constraints=cons, k=5)
        allowed = np.flatnonzero(valid_mask(catalog, request))
        out.append(Example(request, tuple(int(i) for i in allowed[r::7][:4]), user=r, family="A", seed_size=2))
    return out


def test_draw_pairs_valid_lists_and_chosen_has_more_hits(tiny_catalog):
    """Over many noisy draws: k distinct allowed items per list, chosen hits > rejected hits, pairs + ties = R."""
    examples = tiny_examples(tiny_catalog) * 20
    scores = np.random.default_rng(0).normal(size=(len(examples), tiny_catalog.n_items))
    draw = draw_pairs(tiny_catalog, examples, scores, noise=2.0, k=5, rng=np.random.default_rng(1))
    assert len(draw.rows) + draw.ties == len(examples) and len(draw.rows) > 0
    assert (draw.chosen_hits > draw.rejected_hits).all()
    for p, row in enumerate(draw.rows):
        mask, targets = valid_mask(tiny_catalog, examples[row].request), set(examples[row].targets)
        for items, hits in ((draw.chosen[p], draw.chosen_hits[p]), (draw.rejected[p], draw.rejected_hits[p])):
            assert len(set(items.tolist())) == 5 and mask[items].all()
            assert hits == len(targets & set(items.tolist()))


def test_without_noise_lists_are_the_filtered_top_k_and_ties(tiny_catalog):
    """Noise 1e-9 cannot reorder distinct scores: Gumbel-top-k is the post-filtered top k, and both lists tie."""
    examples = tiny_examples(tiny_catalog)
    scores = np.random.default_rng(2).normal(size=(len(examples), tiny_catalog.n_items)).astype(np.float32)
    allowed = np.stack([valid_mask(tiny_catalog, e.request) for e in examples])
    lists = gumbel_top_k(scores, allowed, 1e-9, 5, np.random.default_rng(3))
    np.testing.assert_array_equal(lists, top_k(scores, examples, tiny_catalog, 5))
    draw = draw_pairs(tiny_catalog, examples, scores, noise=1e-9, k=5, rng=np.random.default_rng(3))
    assert draw.ties == len(examples) and len(draw.rows) == 0


def test_generate_round_trip_valid_and_deterministic(tiny_data, tmp_path):
    """Tiny catalog, EASE behaviour: every generated row reads back valid; same seed -> same file content."""
    ease = EASE(tiny_data.catalog, tiny_data.train_matrix, lam=1.0)
    cfg = RequestConfig(seed_sizes=[2, 3], k=8, family_b_seed_size=2, family_b_min_targets=1, family_b_share=0.3)
    table, stats = generate_preferences(tiny_data, ease, 30, 1.0, 8, seed=5, source="ease", requests=cfg, timestamp=7)
    again, _ = generate_preferences(tiny_data, ease, 30, 1.0, 8, seed=5, source="ease", requests=cfg, timestamp=7)
    assert table.equals(again) and table.schema == PREFERENCES_SCHEMA
    assert stats.users == len(tiny_data.train_users) and stats.pairs == table.num_rows > 0
    assert stats.pairs + stats.ties == stats.requests
    path = tmp_path / "prefs.parquet"
    write_preferences(table, path)
    reader = read_preferences(path, tiny_data.catalog, batch_rows=7)
    pairs = [p for batch in reader for p in batch.pairs]
    assert reader.report.bad == 0 and reader.report.rows == len(pairs) == table.num_rows
    first = table.slice(0, 1).to_pylist()[0]
    assert [int(tiny_data.catalog.item_ids[i]) for i in pairs[0].chosen] == first["chosen"]
    assert all(len(p.chosen) == len(p.rejected) == 8 and p.weight == 1.0 and p.source == "ease" for p in pairs)
    assert_chosen_wins_on_family_a(tiny_data, table, pairs)


def good_row(**changes) -> dict:
    """A valid row on the tiny catalog: seeds 100, 101, negative 102, no Horror, k=3."""
    row = {"user_id": 1, "seeds": [100, 101], "negatives": [102], "constraints": HORROR, "k": 3,
           "chosen": [104, 105, 108], "rejected": [109, 110, 112], "weight": 1.0, "source": "log", "timestamp": 5}
    return {**row, **changes}


BAD_ROWS = [  # (reason, changes) one per reason, in file order after the first good row
    ("unknown_id", {"chosen": [104, 999, 108]}),
    ("duplicate", {"chosen": [104, 104, 108]}),
    ("wrong_k", {"rejected": [109, 110]}),
    ("constraint_violation", {"chosen": [104, 103, 108]}),
    ("seed_in_list", {"rejected": [109, 100, 112]}),
    ("seed_in_list", {"rejected": [109, 102, 112]}),
    ("bad_constraints", {"constraints": '[{"type": "exclude"'}),
    ("bad_constraints", {"constraints": '[{"type": "exclude", "field": "genre", "value": "Western"}]'}),
    ("bad_request", {"seeds": []}),
    ("null_value", {"weight": None}),
    ("bad_weight", {"weight": math.nan}),
]


def test_reader_counts_each_bad_row_under_its_reason(tiny_catalog, tmp_path):
    """Row 0 and the last row are good; rows 1..11 each break one rule and are counted, with their row number."""
    rows = [good_row()] + [good_row(**changes) for _, changes in BAD_ROWS] + [good_row(constraints="[]")]
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCES_SCHEMA), path)
    reader = read_preferences(path, tiny_catalog, batch_rows=4)
    batches = list(reader)
    assert [b.rows for b in batches] == [(0,), (), (), (12,)]
    good = [p for b in batches for p in b.pairs]
    assert good[0].chosen == (4, 5, 8) and good[0].request.seeds == (0, 1) and good[0].request.negatives == (2,)
    assert good[0].request.constraints == (Exclude("genre", "Horror"),) and good[1].request.constraints == ()
    report = reader.report
    assert report.rows == 13 and report.good == 2 and report.bad == 11
    expected: dict[str, list[int]] = {}
    for row, (reason, _) in enumerate(BAD_ROWS, start=1):
        expected.setdefault(reason, []).append(row)
    assert {r: n for r, n in report.counts.items() if n} == {r: len(rs) for r, rs in expected.items()}
    assert {r: [row for row, _ in ex] for r, ex in report.examples.items()} == expected
    assert "999" in report.examples["unknown_id"][0][1] and "Western" in report.examples["bad_constraints"][1][1]
    summary = report.summary()
    assert "13 rows read: 2 valid pairs, 11 bad rows" in summary
    assert all(f"{reason}: " in summary for reason, _ in BAD_ROWS) and "row 4:" in summary


def test_reader_casts_compatible_types_and_rejects_missing_or_wrong_columns(tiny_catalog, tmp_path):
    """Narrower ints and an extra column are fine; a missing column or a non-castable one is a CatalogError."""
    table = pa.Table.from_pylist([good_row()], schema=PREFERENCES_SCHEMA)
    narrow = table.set_column(4, "k", pa.array([3], pa.int64())).set_column(
        1, "seeds", pa.array([[100, 101]], pa.list_(pa.int32()))).append_column("extra", pa.array(["x"]))
    pq.write_table(narrow, tmp_path / "narrow.parquet")
    reader = read_preferences(tmp_path / "narrow.parquet", tiny_catalog)
    assert sum(len(b) for b in reader) == 1 and reader.report.bad == 0
    pq.write_table(table.drop_columns(["weight", "source"]), tmp_path / "missing.parquet")
    with pytest.raises(CatalogError, match="missing column.*weight, source"):
        read_preferences(tmp_path / "missing.parquet", tiny_catalog)
    pq.write_table(table.set_column(3, "constraints", pa.array([[1]], pa.list_(pa.int64()))), tmp_path / "bad.parquet")
    with pytest.raises(CatalogError, match="column constraints"):
        list(read_preferences(tmp_path / "bad.parquet", tiny_catalog))
    with pytest.raises(CatalogError, match="missing preference file"):
        read_preferences(tmp_path / "absent.parquet", tiny_catalog)


def test_cli_writes_a_valid_file_on_real_data(tmp_path, capsys):
    """`h2po data preferences` on MovieLens (tiny config, one request per user): a readable file, 0 bad rows, and
    on family A rows (no constraints) the chosen list has more hits on the user's other positives."""
    threads = torch.get_num_threads()
    out = tmp_path / "prefs.parquet"
    try:
        assert main(["data", "preferences", "--out", str(out), "--config", TINY, f"out_dir={tmp_path}", "threads=1",
                     "preferences.pairs_per_user=1"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "0 bad rows" in printed and "ties skipped" in printed
    catalog = read_catalog(tmp_path / "catalog")
    reader = read_preferences(out, catalog)
    pairs = [p for batch in reader for p in batch.pairs]
    assert reader.report.bad == 0 and 50 < len(pairs) <= 366
    assert any(p.request.constraints for p in pairs)  # family B requests, their hard constraints kept
    assert_chosen_wins_on_family_a(Dataset.build(catalog, DataConfig()), pq.read_table(out), pairs)


def assert_chosen_wins_on_family_a(data: Dataset, table: pa.Table, pairs: list) -> None:
    """Rows of training users; on rows without constraints (family A: targets = positives - seeds, and lists hold no
    seed) the chosen list has more hits on the user's positives than the rejected one."""
    train = set(data.train_users.tolist())
    rows = table.select(["user_id", "constraints"]).to_pylist()
    assert len(rows) == len(pairs) and any(r["constraints"] == "[]" for r in rows)
    for pair, row in zip(pairs, rows):
        assert row["user_id"] in train
        if json.loads(row["constraints"]) == []:
            positives = set(data.user_positives(row["user_id"]).tolist())
            assert len(positives & set(pair.chosen)) > len(positives & set(pair.rejected))


def test_cli_rejects_zero_noise(tmp_path, capsys):
    """Without noise both logged lists are the same: a user error (exit 2) before any data is loaded."""
    out = tmp_path / "prefs.parquet"
    assert main(["data", "preferences", "--out", str(out), f"out_dir={tmp_path}", "preferences.noise=0"]) == 2
    assert "preferences.noise" in capsys.readouterr().err and not out.exists()
