"""`h2po serve --address` on a running Ray cluster: a head of its own (`ray start --head --block` on loopback, token
authentication on, its own session, killed by process id at the end as in tests/test_job_submit.py; never `ray
stop`). The command deploys the tiny checkpoint with --detach and exits; the application keeps answering from the
cluster; a second `h2po serve` with a newer checkpoint of the same catalog hot-swaps it in place, and one of another
catalog is refused with one line naming both fingerprints. Run: `python -m pytest tests/test_serve_cluster.py -q`
(about a minute on 2 cores).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import make_tiny_catalog, make_tiny_model, write_tiny_checkpoint
from raycluster import free_ports, kill_session, start_head
from test_serve import other_catalog

from learner.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """A token-authenticated Ray head on loopback: yields (GCS address, environment for its clients)."""
    ports = free_ports(4)
    proc, env, temp, log = start_head(2, ports, random.randrange(30000, 40000, 200), "rs")
    try:
        yield f"127.0.0.1:{ports[0]}", env
    finally:
        left = kill_session(proc.pid)
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray head processes left: {left}"


def serve(checkpoint: Path, address: str, env: dict, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", "serve", "--checkpoint", str(checkpoint), "--address",
                           address, "--detach", f"serve.port={port}", "serve.rivals=[]", "serve.replica_cpus=0.5",
                           "serve.threads=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def health(port: int) -> dict:
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            if time.time() > deadline:
                raise
            time.sleep(1)


def test_detached_on_a_cluster_then_hot_swapped_and_guarded(cluster, tmp_path):
    """Deployed with --detach, the model answers after the command exits; a newer checkpoint of the same catalog
    replaces it in place (the stamp changes); another catalog's checkpoint is refused, exit 2."""
    address, env = cluster
    checkpoint = write_tiny_checkpoint(tmp_path)
    port = free_ports(1)[0]
    first = serve(checkpoint, address, env, port)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "detached" in first.stdout
    old = health(port)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/retrieve", data=b'{"seeds": [100], "k": 4}')
    with urllib.request.urlopen(request, timeout=30) as response:
        assert len(json.loads(response.read())["items"]) == 4
    catalog = make_tiny_catalog()
    model, cfg, _ = load_checkpoint(checkpoint, catalog)
    newer = tmp_path / "newer" / "h2po.safetensors"
    newer.parent.mkdir()
    save_checkpoint(newer, make_tiny_model(catalog, seed=1), cfg, catalog, {"step": 1})
    second = serve(newer, address, env, port)
    assert second.returncode == 0, second.stderr[-3000:]
    swapped = health(port)
    assert swapped["checkpoint"] == "h2po.safetensors" and swapped["stamp"] != old["stamp"]
    other = tmp_path / "other" / "most.safetensors"
    other.parent.mkdir()
    save_checkpoint(other, model, cfg, other_catalog(), {"step": 2})
    third = serve(other, address, env, port)
    assert third.returncode == 2 and "another catalog" in third.stderr and catalog.fingerprint in third.stderr
    assert health(port)["stamp"] == swapped["stamp"]
