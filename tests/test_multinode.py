"""H2PO on a Ray cluster of three nodes on loopback, losing a whole worker node mid-run (issue 16, points 4 and 5).

The module's cluster (tests/raycluster.py `Cluster`): a head and two worker nodes started with `ray start --block`, each
its own process session, with token authentication on, distinct ports and custom resources as node labels:
    head    4 CPUs  {learner_node: 2}
    node_a  3 CPUs  {node_a: 1, rollout_node: 4}
    node_b  3 CPUs  {node_b: 1, rollout_node: 4, learner_node: 2}
Ray's health checks run every second on it, so a lost node is declared dead within seconds. Every run is `h2po train
--config configs/cluster.yaml` submitted with `ray job submit` and the token (the repository uploaded as the working
dir), with overrides for no GPUs and the tiny sizes of tests/test_actors.py (its `run_dir`: the tiny MOST checkpoint
and logged pairs); the placement comes from `system.placement`. A node is lost by SIGKILLing its whole session:
raylet, agents and the actors on it. Teardown stops the remaining nodes by session id and checks nothing is left.

- Rollout node lost: 2 rollout actors spread over node_a and node_b, 1 learner rank; node_a is killed after step 1
  (async, 8 steps). Its rollout actor comes back on node_b and the run finishes every step, training on exactly the
  scheduled groups, each once.
- Learner node lost: 2 learner ranks spread over the head and node_b (sync, a train state every step, logged pairs);
  node_b is killed once the state of step 1 is written. The job fails with one line naming the rank and node_b;
  `--resume` (both ranks now on the head) continues, and the ledger equals the uninterrupted schedule: no accepted
  group or pair lost or trained twice.
Run: `python -m pytest tests/test_multinode.py -q` (11 minutes measured on 2 cores under a load of 15, most of it
the starts of nodes and actor processes; docs/results.md).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from raycluster import RAY, Cluster, wait_for_jobs
from test_actors import h2po_config, run_dir  # noqa: F401 - run_dir: the tiny MOST checkpoint and logged pairs
from test_job_submit import EXCLUDES, client_env

from catalog.dataset import load_catalog
from rollout.buffer import PreferenceStream

ROOT = Path(__file__).resolve().parent.parent
# a killed raylet refuses the check at once (dead in ~3 s); a busy one has 5 s to answer (2 cores, load 15)
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "5000",
                 "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "2000"}
NO_GPUS_TINY = ["system.rollout_gpus=0", "system.learner_gpus=0", "system.rollout_cpus=1", "system.learner_cpus=1",
                "threads=1", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "requests.k=8",
                "h2po.group_size=2", "h2po.batch_requests=2", "h2po.vrpo_samples=2", "most.batch_size=4",
                "h2po.lr=1e-3", "h2po.eval_every=0", "h2po.keep=last", "dashboard.enabled=false",
                "dashboard.report=false"]
JOB_TIMEOUT = 600  # seconds; on 2 cores under a load of 15 a worker node alone takes a minute to start

pytestmark = pytest.mark.slow


def alive_nodes(cluster: Cluster) -> int:
    request = urllib.request.Request(f"{cluster.dashboard}/api/v0/nodes?limit=100",
                                     headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        nodes = json.loads(response.read())["data"]["result"]["result"]
    return sum(node["state"] == "ALIVE" for node in nodes)


def nodes_up(cluster: Cluster, n: int) -> bool:
    """Whether exactly n nodes are alive (False while the head's state API cannot answer yet)."""
    try:
        return alive_nodes(cluster) == n
    except (OSError, KeyError, ValueError):
        return False


def wait_nodes(cluster: Cluster, n: int, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while True:
        assert cluster.head.poll() is None, cluster.log()
        assert time.time() < deadline, f"{n} nodes not up in {seconds} s:\n{cluster.log()}"
        if nodes_up(cluster, n):
            return
        time.sleep(1)


def add_node(cluster: Cluster, name: str, resources: dict, n: int, tries: int = 3) -> None:
    """Start a worker node (3 CPUs) and wait until `n` nodes are alive. One at a time, and again when `ray start`
    gives up: it allows a raylet 30 s to register, which a loaded 2-core machine can miss."""
    for attempt in range(tries):
        cluster.add(name, 3, resources)
        deadline = time.time() + 240
        while cluster.nodes[name].poll() is None and time.time() < deadline:
            if nodes_up(cluster, n):
                return
            time.sleep(1)
        cluster.stop(name)
    raise AssertionError(f"{name} did not start in {tries} tries:\n{cluster.log(name)}")


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(4, {"learner_node": 2}, HEALTH_CHECKS)
    try:
        wait_nodes(cluster, 1)
        add_node(cluster, "node_a", {"node_a": 1, "rollout_node": 4}, 2)
        add_node(cluster, "node_b", {"node_b": 1, "rollout_node": 4, "learner_node": 2}, 3)
        wait_for_jobs(cluster.dashboard, cluster.env["RAY_AUTH_TOKEN"], cluster.head, cluster.temp)
        yield cluster
    finally:
        left = cluster.close()
        assert not left, f"Ray processes left running: {left}"


def submit(cluster: Cluster, run_dir: Path, out: Path, steps: int, mode: str,  # noqa: F811
           *extra: str) -> subprocess.Popen:
    """`ray job submit` of `h2po train --config configs/cluster.yaml` (no GPUs, tiny sizes) into `out`; its output
    goes to OUT.log (OUT.resume.log for a --resume)."""
    runtime_env = {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": {"OMP_NUM_THREADS": "1"}}
    entrypoint = [sys.executable, "-m", "app.cli", "train", "--config", "configs/cluster.yaml", "--checkpoint",
                  str(run_dir / "most.safetensors"), "--steps", str(steps), "--mode", mode, f"out_dir={out}",
                  f"data.catalog={run_dir / 'catalog'}", *NO_GPUS_TINY, *extra]
    env = client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.env["RAY_AUTH_TOKEN"])
    log = open(log_path(out, "--resume" in extra), "w")
    return subprocess.Popen([RAY, "job", "submit", "--address", cluster.dashboard, "--runtime-env-json",
                             json.dumps(runtime_env), "--", *entrypoint], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)


def log_path(out: Path, resume: bool = False) -> Path:
    return Path(f"{out}.resume.log" if resume else f"{out}.log")


def finish(job: subprocess.Popen, out: Path, resume: bool = False) -> str:
    job.wait(timeout=JOB_TIMEOUT)
    return log_path(out, resume).read_text()


def wait_for(path: Path, ready, job: subprocess.Popen, out: Path, seconds: float = 400) -> None:
    """Wait until `ready(text of path)` holds (the run's progress), failing if the job ends first."""
    deadline = time.time() + seconds
    while not (path.is_file() and ready(path.read_text())):
        assert job.poll() is None, Path(f"{out}.log").read_text()[-4000:]
        assert time.time() < deadline, f"no progress in {seconds} s: " + Path(f"{out}.log").read_text()[-4000:]
        time.sleep(0.1)


def placed(log: str) -> tuple[list[str], list[str]]:
    """The nodes of the learner ranks and of the rollout actors from the run's `placed:` line."""
    learners, rollouts = re.search(r"placed: learner ranks on (.*) \| rollout actors on (.*)", log).groups()
    return learners.split("; "), rollouts.split("; ")


def ledger(out: Path) -> list[list[str]]:
    return json.loads((out / "train_state" / "driver.json").read_text())["ledger"]


def test_rollout_node_lost_run_continues_on_the_other_nodes(cluster, run_dir):  # noqa: F811
    out = run_dir / "lost_rollout_node"
    steps = 8  # enough that the lost node's actor still owes groups after the kill, whatever the lookahead
    job = submit(cluster, run_dir, out, steps, "async", "system.learners=1", "system.rollout_actors=2",
                 "h2po.pairs_per_step=0", f"h2po.checkpoint_every={steps}", "system.placement.rollouts=spread",
                 'system.placement.rollout_resources={"rollout_node": 1}',
                 'system.placement.learner_resources={"learner_node": 1}')
    wait_for(out / "metrics.jsonl", lambda text: '"kind": "step"' in text, job, out)
    assert cluster.kill("node_a") == []
    log = finish(job, out)
    assert job.returncode == 0 and "succeeded" in log, log[-4000:]
    _, rollouts = placed(log)
    assert sorted("node_a" in n for n in rollouts) == [False, True] and any("node_b" in n for n in rollouts), log
    assert f"H2PO done: version {steps}" in log and re.search(r"rollout actor \d restarted", log), log[-4000:]
    expected = [sorted([f"g{2 * step}-0", f"g{2 * step + 1}-0"]) for step in range(steps)]  # 2 actors: 2c, 2c+1
    assert [sorted(ids) for ids in ledger(out)] == expected
    assert (out / "h2po.safetensors").is_file()


def test_learner_node_lost_fails_loudly_and_resume_loses_nothing(cluster, run_dir):  # noqa: F811
    out = run_dir / "lost_learner_node"
    overrides = ["system.learners=2", "system.rollout_actors=1", "h2po.pairs_per_step=2", "h2po.checkpoint_every=1",
                 "system.placement.learners=spread", 'system.placement.learner_resources={"learner_node": 1}',
                 "--preferences", str(run_dir / "prefs.parquet")]
    job = submit(cluster, run_dir, out, 3, "sync", *overrides)
    wait_for(out / "train_state" / "driver.json", lambda text: '"step": 1' in text, job, out)
    assert cluster.kill("node_b") == []
    log = finish(job, out)
    assert job.returncode != 0, log[-4000:]
    learners, _ = placed(log)
    assert len(learners) == 2 and sum("node_b" in n for n in learners) == 1, log
    rank = next(r for r, n in enumerate(learners) if "node_b" in n)
    error = re.search(r"h2po: error: learner rank (\d) died during step 2 on (.*) \((node dead)\) .*--resume.*", log)
    assert error and int(error.group(1)) == rank and error.group(2) == learners[rank], log[-4000:]

    resumed = submit(cluster, run_dir, out, 3, "sync", *overrides, "--resume")
    log = finish(resumed, out, resume=True)
    assert resumed.returncode == 0 and "resumed from" in log and "H2PO done: version 3" in log, log[-4000:]
    catalog = load_catalog(h2po_config(run_dir).data, run_dir)
    stream, expected = PreferenceStream(run_dir / "prefs.parquet", catalog), []
    for step in range(3):
        stream.next_pairs(2)
        expected.append([f"g{step}-0", f"g{step}-1", *stream.last_ids])
    assert ledger(out) == expected
    trained = [i for ids in expected for i in ids]
    assert len(trained) == len(set(trained)) == 12
