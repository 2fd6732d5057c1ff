"""End-to-end tests of the `h2po` command line on the real MovieLens data with `configs/tiny.yaml`.

A module fixture pretrains the tiny model once (20 steps, about 20 s on one thread) into a temporary run
directory; the retrieval, batch, eval and error tests reuse its checkpoint. `test_run_main_job` runs the whole
main job (import, EASE tuning, pretraining, evaluation: 30-60 s) and is marked slow (it still runs by default).
User errors run as subprocesses, so "exit 2, one `h2po: error:` line on stderr, no traceback" is checked on a real
process. Outputs are atomic: an interrupted write (simulated by a `write_text` that writes half the temporary
file and raises KeyboardInterrupt) leaves no output file and no temporary file behind.
Run: `python -m pytest tests/test_cli.py -q`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from app.cli import main
from catalog.schema import read_catalog, write_catalog
from learner.checkpoint import read_header

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BASELINES = ("popularity", "item-kNN", "EASE")


pytestmark = pytest.mark.usefixtures("restore_threads")  # conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """`h2po pretrain` on the tiny config, once per module: the path of the best checkpoint."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    assert main(["pretrain", "--config", TINY, f"out_dir={run_dir}", "threads=1"]) == 0
    return run_dir / "most.safetensors"


@pytest.fixture(scope="module")
def catalog(checkpoint):
    """The MovieLens catalog the pretraining imported into its run directory."""
    return read_catalog(checkpoint.parent / "catalog")


@pytest.fixture(scope="module")
def other_catalog(tmp_path_factory) -> Path:
    """A 40-item, 10-user catalog in the project schema whose item ids (1000..1039) MovieLens does not share."""
    n, directory = 40, tmp_path_factory.mktemp("other_catalog")
    items = pa.table({
        "item_id": pa.array(range(1000, 1000 + n), pa.int64()),
        "title": [f"Film {i} (2001)" for i in range(n)],
        "attributes": pa.array([[("genre", ["Drama" if i % 2 else "Comedy"])] for i in range(n)],
                               pa.map_(pa.string(), pa.list_(pa.string()))),
        "year": pa.array([2001] * n, pa.int32()), "popularity": pa.array([2] * n, pa.int64())})
    users = [u for u in range(10) for _ in range(8)]
    item_ids = [1000 + (3 * u + 5 * j) % n for u in range(10) for j in range(8)]
    inter = pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(item_ids, pa.int64()),
                      "weight": pa.array([5.0] * len(users), pa.float32()),
                      "timestamp": pa.array(range(len(users)), pa.int64())})
    write_catalog(directory, items, inter, "test data, no licence terms")
    return directory


def h2po(*args) -> subprocess.CompletedProcess:
    """`python -m app.cli ARGS` in a fresh process (one torch thread)."""
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], check=False, capture_output=True,
                          text=True,
                          env=ENV, cwd=ROOT, timeout=300)


def retrieve(capsys, checkpoint: Path, *args: str) -> list[dict]:
    """In-process `h2po retrieve --json`: the returned rows (rank, item_id, title)."""
    capsys.readouterr()
    assert main(["retrieve", "--checkpoint", str(checkpoint), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["items"]


def check_results(path: Path) -> dict:
    """results.json: {"results": {family: {method: {metric: value}}}, "config", "dataset"}; MOST valid lists."""
    report = json.loads(path.read_text())
    assert {"results", "config", "dataset"} <= set(report)
    results = report["results"]
    assert {"A", "B"} <= set(results)
    for methods in results.values():
        assert {*BASELINES, "MOST"} <= set(methods)
        for metrics in methods.values():
            assert 0.0 <= metrics["ndcg@10"] <= 1.0
            assert all(isinstance(v, (int, float, list)) for v in metrics.values())
    for family in ("A", "B"):
        most = results[family]["MOST"]
        assert (most["constraint_sat"], most["duplicates"], most["seed_leak"]) == (1.0, 0.0, 0.0)
        assert {"ALS", "two-tower", "Mult-VAE", "EASE + intent", "best rival"} <= set(results[family])
        assert report["dataset"]["best_rival"][family] in results[family]  # chosen on validation per family
        assert "ndcg@10_vs_best rival" in most and "recall_min@10" in most
    assert report["config"]["model"]["d_model"] == 32 and report["dataset"]["n_items"] > 9000
    return report


def test_pretrain_writes_checkpoint_and_licence(checkpoint):
    """Pretraining leaves the checkpoint, its curve and the dataset's licence in the run directory."""
    assert checkpoint.is_file() and (checkpoint.parent / "pretrain.json").is_file()
    licence = (checkpoint.parent / "catalog" / "LICENSE.txt").read_text()
    assert "MovieLens" in licence and "GroupLens" in licence


@pytest.mark.slow
def test_run_main_job(tmp_path, capsys):
    """`h2po run` on the tiny config with the main job's on-policy-only mix: MOST, logged preferences (written, not
    read), H2PO on a local Ray instance (2 learner ranks, ZeRO-2; stopped by its time budget after one step), then
    the table with MOST and H2PO and the report. A second run with the same settings reuses the MOST checkpoint."""
    assert main(["run", "--config", TINY, f"out_dir={tmp_path}", "threads=1", "h2po.steps=4",
                 "h2po.max_minutes=1e-6", "h2po.pairs_per_step=0"]) == 0
    out, err = capsys.readouterr()
    assert all(name in out for name in (*BASELINES, "MOST", "H2PO", "NDCG@10", "dNDCG@10 vs MOST"))
    assert f"logged pairs: {tmp_path / 'preferences.parquet'} not read (h2po.pairs_per_step=0" in out
    assert "dashboard: http://127.0.0.1:" in out
    assert "WARNING: h2po.max_minutes (1e-06) spent: stopping after step 1 of 4" in err  # loud, and recorded:
    assert json.loads(read_header(tmp_path / "h2po.safetensors")["meta"])["stopped_by"] == "max_minutes"
    assert json.loads(read_header(tmp_path / "most.safetensors")["meta"])["complete"] is True
    for name in ("most.safetensors", "catalog/LICENSE.txt", "preferences.parquet", "h2po.safetensors",
                 "metrics.jsonl", "report.html", "train_state/driver.json"):
        assert (tmp_path / name).is_file(), name
    report = check_results(tmp_path / "results.json")
    assert report["config"]["out_dir"] == str(tmp_path)
    for family in ("A", "B"):
        h2po = report["results"][family]["H2PO"]
        assert (h2po["constraint_sat"], h2po["duplicates"], h2po["seed_leak"]) == (1.0, 0.0, 0.0)
        assert "ndcg@10_vs_MOST" in h2po and "ndcg@10_vs_EASE" in h2po
    assert main(["run", "--config", TINY, f"out_dir={tmp_path}", "threads=1", "h2po.steps=0"]) == 0
    assert f"MOST: reusing {tmp_path / 'most.safetensors'}" in capsys.readouterr().out


def test_eval_writes_results(checkpoint, tmp_path, capsys):
    """`h2po eval` compares the checkpoint with the baselines and writes results.json (into a new folder)."""
    out = tmp_path / "new" / "results.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert "MOST" in capsys.readouterr().out
    check_results(out)


def test_retrieve_distinct_non_seed_items(checkpoint, catalog, capsys):
    """Seeds by id and by title: k distinct items, ranked 1..k, none of them a seed."""
    rows = retrieve(capsys, checkpoint, "--seeds", "1", "Heat (1995)", "--k", "5")
    ids = [r["item_id"] for r in rows]
    heat = int(catalog.item_ids[catalog.find_title("Heat (1995)")])
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and len(set(ids)) == 5
    assert not {1, heat} & set(ids)
    assert all(catalog.titles[catalog.index_of(r["item_id"])] == r["title"] for r in rows)


@pytest.mark.parametrize("args, ok", [
    (["--exclude", "genre=Comedy"], lambda cat, i: "Comedy" not in cat.attributes["genre"][i]),
    (["--min-year", "2000"], lambda cat, i: cat.years[i] >= 2000),
    (["--require", "genre=Horror", "--min-year", "1990"],
     lambda cat, i: "Horror" in cat.attributes["genre"][i] and cat.years[i] >= 1990),
    (["--prefer", "genre=Drama:0.5", "--half-life", "10"], lambda cat, i: True),
], ids=["exclude", "min-year", "require+min-year", "prefer+half-life"])
def test_retrieve_respects_constraints(checkpoint, catalog, capsys, args, ok):
    """Every item satisfies the hard constraints (checked on the catalog); soft ones are accepted."""
    rows = retrieve(capsys, checkpoint, "--seeds", "1", "Heat (1995)", "--k", "5", *args)
    assert len({r["item_id"] for r in rows}) == 5
    assert all(ok(catalog, catalog.index_of(r["item_id"])) for r in rows)


def test_retrieve_batch_answers_good_lines_and_reports_bad(checkpoint, tmp_path, capsys):
    """Batch: one output line per input line in order; bad lines get {"line", "error"}; exit 1; stderr names them."""
    requests = tmp_path / "requests.jsonl"
    no_horror = '{"type": "exclude", "field": "genre", "value": "Horror"}'
    requests.write_text('{"seeds": [1, "Heat (1995)"], "k": 3}\n'
                        f'{{"seeds": [2], "k": 7, "constraints": [{no_horror}]}}\n'
                        '{"seeds": [99999999]}\n'
                        '{"seeds": [1,\n')
    out = tmp_path / "lists.jsonl"
    assert main(["retrieve", "--checkpoint", str(checkpoint), "--requests", str(requests), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{requests}:3:" in err and "99999999" in err and f"{requests}:4:" in err
    assert f"{requests}:1:" not in err and f"{requests}:2:" not in err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in lines] == [1, 2, 3, 4]
    assert [len(r["items"]) for r in lines[:2]] == [3, 7]
    assert len({i["item_id"] for i in lines[1]["items"]}) == 7 and 2 not in {i["item_id"] for i in lines[1]["items"]}
    assert "error" in lines[2] and "error" in lines[3] and "items" not in lines[2]


def test_retrieve_batch_wrong_json_types_are_line_errors(checkpoint, tmp_path, capsys):
    """Non-list seeds/constraints are a per-line error, not a crash of the whole batch (regression)."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"seeds": 5}\n{"seeds": [1], "constraints": 3}\n[1]\n{"seeds": [1], "k": 2}\n')
    out = tmp_path / "lists.jsonl"
    assert main(["retrieve", "--checkpoint", str(checkpoint), "--requests", str(requests), "--out", str(out)]) == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert ["error" in r for r in lines] == [True, True, True, False] and len(lines[3]["items"]) == 2
    assert "seeds must be a JSON list" in lines[0]["error"]


USER_ERRORS = [  # (id, arguments, fragment of the message); {C} checkpoint, {OUT} an output path, {AMBIGUOUS} title
    ("ambiguous-title", ["retrieve", "--checkpoint", "{C}", "--seeds", "{AMBIGUOUS}"], "is ambiguous"),
    ("unknown-id", ["retrieve", "--checkpoint", "{C}", "--seeds", "99999999"], "unknown item id 99999999"),
    ("duplicate-seeds", ["retrieve", "--checkpoint", "{C}", "--seeds", "1", "Toy Story (1995)"], "duplicate seed"),
    ("unknown-field", ["retrieve", "--checkpoint", "{C}", "--seeds", "1", "--exclude", "colour=red"],
     "unknown attribute field 'colour'"),
    ("unknown-genre", ["retrieve", "--checkpoint", "{C}", "--seeds", "1", "--exclude", "genre=Cmedy"],
     "unknown value 'Cmedy'"),
    ("k-over-pool", ["retrieve", "--checkpoint", "{C}", "--seeds", "1", "--require", "genre=Film-Noir",
                     "--min-year", "2015", "--k", "50"], "items satisfy"),
    ("k-zero", ["retrieve", "--checkpoint", "{C}", "--seeds", "1", "--k", "0"], "k=0 is outside"),
    ("unknown-config-key", ["run", "notakey=1"], "unknown config key notakey"),
    ("wrong-config-type", ["run", "most.lr=abc"], "most.lr"),
    ("missing-checkpoint", ["retrieve", "--checkpoint", "{OUT}.safetensors", "--seeds", "1"], "checkpoint not found"),
    ("batch-missing-checkpoint", ["retrieve", "--checkpoint", "{OUT}.safetensors", "--requests", "{REQUESTS}",
                                  "--out", "{OUT}"], "checkpoint not found"),
    ("eval-missing-checkpoint", ["eval", "--checkpoint", "{OUT}.safetensors", "--out", "{OUT}"],
     "checkpoint not found"),
]


@pytest.mark.parametrize("args, message", [case[1:] for case in USER_ERRORS], ids=[case[0] for case in USER_ERRORS])
def test_user_errors_exit_2_with_one_line(checkpoint, catalog, tmp_path, args, message):
    """Exit 2, exactly one `h2po: error: ...` line on stderr, no traceback, and no --out file."""
    ambiguous = next(title for title, count in Counter(catalog.titles).items() if count > 1)
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"seeds": [1]}\n')
    out = tmp_path / "out.json"
    subs = {"{C}": str(checkpoint), "{OUT}": str(out), "{AMBIGUOUS}": ambiguous, "{REQUESTS}": str(requests)}
    for key, value in subs.items():
        args = [a.replace(key, value) for a in args]
    proc = h2po(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("h2po: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_checkpoint_on_another_catalog(checkpoint, other_catalog, tmp_path):
    """`h2po eval` with a catalog the checkpoint was not trained on: exit 2, says so, writes nothing."""
    out = tmp_path / "results.json"
    proc = h2po("eval", "--checkpoint", checkpoint, "--out", out, f"data.catalog={other_catalog}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("h2po: error:") and "another catalog" in lines[0]
    assert not out.exists()


def torn_writes(monkeypatch, out: Path) -> None:
    """Make writes of `out`'s temporary file stop half-way with KeyboardInterrupt (Ctrl-C mid-write)."""
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name.startswith(f".{out.name}."):
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return real(self, data, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", write_text)


def test_interrupted_batch_keeps_previous_output(checkpoint, tmp_path, monkeypatch, capsys):
    """An interrupted batch write exits 130 and leaves the previous --out file intact and no temporary file."""
    requests, out = tmp_path / "requests.jsonl", tmp_path / "lists.jsonl"
    requests.write_text('{"seeds": [1], "k": 3}\n{"seeds": [2], "k": 3}\n')
    out.write_text("previous\n")
    torn_writes(monkeypatch, out)
    assert main(["retrieve", "--checkpoint", str(checkpoint), "--requests", str(requests), "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == [out.name, requests.name]


def test_interrupted_eval_leaves_no_output(checkpoint, tmp_path, monkeypatch):
    """An eval interrupted while writing results.json leaves neither it nor a temporary file (evaluation stubbed)."""
    out = tmp_path / "results.json"
    monkeypatch.setattr("app.pipeline.evaluate_methods", lambda *args, **kwargs: {"A": {}})
    torn_writes(monkeypatch, out)
    assert main(["eval", "--checkpoint", str(checkpoint), "--out", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_config_and_help(capsys):
    """`h2po config` lists keys with help text; `--help` of the program and of a subcommand exit 0."""
    assert main(["config"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "learning rate" in rows["most.lr"] and "Width" in rows["model.d_model"]
    for argv, expected in ((["--help"], "retrieve"), (["retrieve", "--help"], "--exclude")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0 and expected in capsys.readouterr().out
