"""serve.after_training: `h2po run` on configs/tiny.yaml (the tiny main job on real MovieLens data) serves the policy
it just wrote, on a loopback port, until Ctrl-C. Slow: the run, then Ray Serve (about 3 minutes on 2 cores).
Run: `python -m pytest tests/test_serve_training.py -q`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_dashboard import free_port
from test_serve import one, run, stop

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.mark.slow
def test_run_serves_its_new_policy_after_training(tmp_path):
    out_dir, port = tmp_path / "run", free_port()
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "app.cli", "run", "--config", TINY, f"out_dir={out_dir}", "threads=1",
               "dashboard.enabled=false", "dashboard.report=false", "eval.rivals=false", "serve.after_training=true",
               f"serve.port={port}", "serve.rivals=[]", "serve.replica_cpus=0.5"]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=ROOT,
                                   env={**os.environ, "RAY_AUTH_MODE": "token"}, start_new_session=True)
    try:
        deadline = time.time() + 900
        while "try it:" not in out.read_text() and process.poll() is None and time.time() < deadline:
            time.sleep(1)
        log = out.read_text()
        assert "try it:" in log, f"no server after the run: {err.read_text()[-3000:]}"
        assert f"serve.after_training: serving {out_dir / 'h2po.safetensors'}" in log
        url = f"http://127.0.0.1:{port}/"
        status, _, health = run(one(url + "health", token=False))
        assert status == 200 and health["checkpoint"] == "h2po.safetensors"
        status, _, got = run(one(url + "retrieve", {"seeds": [1, 2, 3], "k": 5}, token=False))
        assert status == 200 and got["method"] == "h2po" and len({row["item_id"] for row in got["items"]}) == 5
        assert not {1, 2, 3} & {row["item_id"] for row in got["items"]}
    finally:
        stop(process)
