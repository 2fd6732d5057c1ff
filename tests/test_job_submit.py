"""`h2po train` submitted with `ray job submit` to a real Ray head that has token authentication on (Ray's default).

The test starts its own head (`ray start --head --block`, tests/raycluster.py) on loopback, on free ports and its own
temp dir, as its own process session, with a fresh random token passed as RAY_AUTH_TOKEN (so ~/.ray/auth_token is
neither read nor written); it never runs `ray stop` (that would stop every Ray instance on the machine). Teardown
kills exactly the processes of that session (SIGTERM, then SIGKILL) and checks that none is left.

Then: the tiny MOST checkpoint (k=8, as in tests/test_actors.py), a submit without a token and one with a wrong
token (both refused by the dashboard), and a 2-step sync run (1 learner rank, ZeRO 2, 1 rollout actor) submitted
with the token, uploading the repository as the working dir; the job must succeed and write h2po.safetensors.
Run: `python -m pytest tests/test_job_submit.py -q` (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from raycluster import RAY, free_ports, kill_session, start_head, wait_for_jobs

from app.cli import main
from catalog.movielens import locate

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
TINY_H2PO = ["threads=1", "requests.k=8", "h2po.group_size=2", "h2po.batch_requests=2", "h2po.vrpo_samples=2",
             "most.batch_size=4", "h2po.lr=1e-3"]
EXCLUDES = [".git", ".venv", "runs", ".pytest_cache", ".ruff_cache", "*.egg-info", "__pycache__", ".ci"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    """A token-authenticated Ray head on loopback: yields (dashboard address, token)."""
    ports = free_ports(4)
    proc, env, temp, log = start_head(4, ports, random.randrange(20000, 30000, 200), "rj")
    token = env["RAY_AUTH_TOKEN"]
    address = f"http://127.0.0.1:{ports[1]}"
    try:
        wait_for_jobs(address, token, proc, temp)
        yield address, token
    finally:
        left = kill_session(proc.pid)
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray head processes left running: {left}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("h2po_job")
    assert main(["pretrain", "--config", TINY, f"out_dir={run}", "threads=1", "requests.k=8"]) == 0
    torch.set_num_threads(threads)
    return run


def submit(address: str, env: dict, entrypoint: list[str], runtime_env: dict | None = None,
           timeout: float = 150) -> subprocess.CompletedProcess:
    args = [RAY, "job", "submit", "--address", address]
    if runtime_env:
        args += ["--runtime-env-json", json.dumps(runtime_env)]
    return subprocess.run([*args, "--", *entrypoint], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def client_env(**auth: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return {**env, "HOME": tempfile.gettempdir() + "/rj-nohome", **auth}  # no ~/.ray/auth_token to fall back on


def test_submit_without_or_with_a_wrong_token_is_refused(head):
    address, _ = head
    for env, why in ((client_env(), "Missing authentication token"),
                     (client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64), "Invalid authentication token")):
        out = submit(address, env, [sys.executable, "-c", "print('should not run')"], timeout=60)
        assert out.returncode != 0 and why in out.stdout + out.stderr, out.stdout + out.stderr


def test_h2po_train_job_succeeds(head, run_dir):
    address, token = head
    runtime_env = {"working_dir": str(ROOT), "excludes": EXCLUDES,
                   "env_vars": {"H2PO_MOVIELENS": str(locate()), "OMP_NUM_THREADS": "1"}}
    entrypoint = [sys.executable, "-m", "app.cli", "train", "--checkpoint", str(run_dir / "most.safetensors"),
                  "--steps", "2", "--mode", "sync", f"out_dir={run_dir}", "system.learners=1", "system.zero_stage=2",
                  "system.rollout_actors=1", "h2po.checkpoint_every=0", *TINY_H2PO]
    start = time.time()
    out = submit(address, client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), entrypoint, runtime_env)
    text = out.stdout + out.stderr
    print(f"job took {time.time() - start:.1f}s\n{text[-4000:]}")
    assert out.returncode == 0, text[-4000:]
    assert "succeeded" in text and "H2PO done: version 2" in text, text[-4000:]
    assert (run_dir / "h2po.safetensors").is_file()
