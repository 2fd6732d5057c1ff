"""Budgets are in steps; the wall clock is a safety net that says so loudly, and an unfinished pretraining's
checkpoint says what it is (issue 13 point 5, issue 14 section 3).

- `h2po pretrain` on configs/tiny.yaml with a tiny `most.max_minutes`: one step, then a WARNING line on stderr,
  `stopped_by: max_minutes` in pretrain.json and in the checkpoint's meta, the checkpoint validated at that step,
  and a later `h2po run` does not reuse it.
- A pretraining killed (SIGKILL) after its first best checkpoint leaves `complete: false` in that checkpoint's
  meta, and `h2po retrieve` warns on stderr when it loads it; a finished pretraining's checkpoint gets no warning.
(The H2PO side, `h2po.max_minutes`, is checked in tests/test_cli.py::test_run_main_job.)
Run: `python -m pytest tests/test_budgets.py -q` (about 40 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import pipeline
from app.cli import main
from core.config import load_config
from learner.checkpoint import read_header

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


pytestmark = pytest.mark.usefixtures("restore_threads")  # conftest.py


@pytest.fixture(scope="module")
def capped_run(tmp_path_factory) -> tuple[Path, str]:
    """`h2po pretrain` on the tiny config whose clock runs out after the first step: (run dir, its stderr)."""
    run = tmp_path_factory.mktemp("capped")
    command = [sys.executable, "-m", "app.cli", "pretrain", "--config", TINY, f"out_dir={run}", "threads=1",
               "most.max_minutes=1e-6"]
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc.stderr


def test_time_cap_warns_and_is_recorded(capped_run):
    run, stderr = capped_run
    warnings = [line for line in stderr.splitlines() if line.startswith("WARNING: most.max_minutes")]
    assert len(warnings) == 1 and "after 1 of 20 steps" in warnings[0] and "budget is in steps" in warnings[0]
    record = json.loads((run / "pretrain.json").read_text())
    assert record["stopped_by"] == "max_minutes" and record["steps"] == 1 and record["history"][-1]["step"] == 1
    meta = json.loads(read_header(run / "most.safetensors")["meta"])
    assert (meta["complete"], meta["stopped_by"], meta["step"]) == (True, "max_minutes", 1)
    ws = pipeline.prepare(load_config(TINY, [f"out_dir={run}", "threads=1"]))
    assert pipeline.reusable_most(ws) is None  # a pretraining the clock ended is trained again, not reused


def test_unfinished_pretraining_is_marked_and_retrieve_warns(capped_run, tmp_path, capsys):
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "app.cli", "pretrain", "--config", TINY, f"out_dir={run}", "threads=1",
               "most.max_steps=100000", "most.eval_every=2", "most.patience=100000"]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint, deadline = run / "most.safetensors", time.time() + 600  # start-up takes minutes on a loaded machine
    while not checkpoint.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.is_file() and not (run / "pretrain.json").exists()
    assert json.loads(read_header(checkpoint)["meta"])["complete"] is False
    assert main(["retrieve", "--checkpoint", str(checkpoint), "--seeds", "1", "--k", "5"]) == 0
    err = capsys.readouterr().err
    assert f"h2po: warning: {checkpoint} comes from an unfinished MOST pretraining" in err, err
    finished = capped_run[0] / "most.safetensors"
    assert main(["retrieve", "--checkpoint", str(finished), "--seeds", "1", "--k", "5"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("zero_head", [True, False])
def test_zero_head_pretraining_keeps_step_0_unless_training_beats_it(tmp_path, zero_head):
    """With model.zero_head the untrained model is its prior, so MOST validates step 0 too and keeps the best of all
    validations (step 0 included); with a random head, validation starts after the first eval_every steps."""
    main(["pretrain", "--config", TINY, f"out_dir={tmp_path}", "threads=1", "most.max_steps=10", "most.eval_every=5",
          f"model.zero_head={str(zero_head).lower()}"])
    record = json.loads((tmp_path / "pretrain.json").read_text())
    steps = [h["step"] for h in record["history"]]
    assert steps == ([0, 5, 10] if zero_head else [5, 10])
    best = max(record["history"], key=lambda h: h["val_ndcg@10"])  # the first of equal scores, as training keeps
    assert record["best_step"] == best["step"]
    assert json.loads(read_header(tmp_path / "most.safetensors")["meta"])["step"] == best["step"]


def test_validation_draws_widen_the_validation_set(tmp_path):
    """most.val_draws = 2 with a large most.val_requests validates on every request of two draws per validation
    user (pretrain.json records how many), more than one draw has."""
    main(["pretrain", "--config", TINY, f"out_dir={tmp_path}", "threads=1", "most.max_steps=2", "most.eval_every=2",
          "most.val_draws=2", "most.val_requests=1000000"])
    ws = pipeline.prepare(load_config(TINY, [f"out_dir={tmp_path}"]))
    used = json.loads((tmp_path / "pretrain.json").read_text())["val_requests"]
    assert used == len(pipeline.examples(ws, "val", 2)) > len(pipeline.examples(ws, "val"))


def test_validation_subset_does_not_follow_the_training_seed(tmp_path):
    """MOST's validation subset is drawn with eval.request_seed: two training seeds validate on the same requests
    (their best validation scores compare), and another request seed draws another subset."""
    def subset(*overrides: str) -> list:
        ws = pipeline.prepare(load_config(TINY, [f"out_dir={tmp_path}", "most.val_draws=2", "most.val_requests=12",
                                                 *overrides]))
        picked = pipeline.validation_requests(ws)
        assert len(picked) == 12 < len(pipeline.examples(ws, "val", 2))
        return [(e.user, e.family, e.seed_size, e.request.seeds, e.targets) for e in picked]

    assert subset("seed=0") == subset("seed=7")
    assert subset("seed=0") != subset("eval.request_seed=2")
