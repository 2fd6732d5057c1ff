"""Faults, checkpoints and resume of the distributed H2PO driver (DESIGN section 7).

- The buffer's state (waiting groups with their ids, counters, preference cursor) survives a restore: the batches
  served afterwards are those an uninterrupted buffer would have served (no Ray, fast).
- On the real local cluster (slow; the `run_dir` and `cluster` fixtures of tests/test_actors.py: a tiny MOST
  checkpoint, logged pairs, a 4-CPU Ray instance) with the tiny H2PO settings of that module:
  a rollout actor killed mid-run (`ray.kill(no_restart=False)`) is restarted and the run completes every step;
  a killed learner rank fails the next step at once with `LearnerFailed` naming the rank and `--resume`;
  a driver killed with SIGKILL after its first checkpoint resumes, and the ledger (ids trained on per step) equals
  the uninterrupted schedule's, with no id trained twice.
- Rollouts lost from the object store before they reach the buffer count as their worker gone (the call is retried).
- A rollout actor dead or restarting when a run ends answers None to the end-of-run questions (`ask_rollouts`)
  instead of failing the run after its policy was written.
- A learner rank starts and steps although a rank killed while compiling DeepSpeed's JIT op left its build lock
  behind (a fresh process, its TORCH_EXTENSIONS_DIR holding only that lock): nothing waits on the lock.
Run: `python -m pytest tests/test_faults.py -q` (the slow ones take about a minute each on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
from test_actors import ROOT, TINY_H2PO, cluster, fake_rollouts, h2po_config, run_dir  # noqa: F401

from catalog.behaviour import generate_preferences
from catalog.dataset import Dataset
from catalog.preferences import write_preferences
from catalog.schema import Catalog
from core.config import DataConfig, RequestConfig
from dashboard.feed import read_records
from evaluation.baselines import EASE
from learner.checkpoint import read_header
from rollout.buffer import PreferenceStream, ReplayBuffer

STALE_LOCK_SCRIPT = r'''
from tests.one_rank import stepped_engine

stepped_engine()
print("STEPPED")
'''


@pytest.mark.slow
def test_learner_starts_beside_a_dead_ranks_build_lock(tmp_path):
    lock = tmp_path / "extensions" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()  # what torch's FileBaton leaves when its holder is SIGKILLed mid-build
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    try:
        proc = subprocess.run([sys.executable, "-c", STALE_LOCK_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"the learner start waited on the stale lock: {str(err.stderr)[-2000:]}") from None
    assert proc.returncode == 0 and "STEPPED" in proc.stdout, proc.stderr[-3000:]
    assert lock.exists() and list(lock.parent.iterdir()) == [lock]  # nothing was built there


def preference_file(catalog: Catalog, path) -> str:
    data = Dataset.build(catalog, DataConfig())
    table, _ = generate_preferences(data, EASE(catalog, data.train_matrix, 10.0), 4, 2.0, 3, 0, "test",
                                    requests=RequestConfig(seed_sizes=[1, 2], family_b_share=0.0))  # 9 pairs
    write_preferences(table, path)
    return str(path)


def test_buffer_state_restores_groups_and_preference_cursor(tiny_catalog, tmp_path):
    """Two buffers take the same batches; one is saved after 2 takes and restored into a fresh buffer: the next
    takes (crossing the end of the 9-pair file into pass 1) serve the same ids, and no id is served twice within
    a pass."""
    prefs = preference_file(tiny_catalog, tmp_path / "prefs.parquet")

    def fresh() -> ReplayBuffer:
        buffer = ReplayBuffer(2, PreferenceStream(prefs, tiny_catalog, batch_rows=2))
        buffer.put(fake_rollouts(0, 3, version=0), ["a", "b", "c"])
        buffer.put(fake_rollouts(10, 2, version=1), ["d", "e"])
        return buffer

    reference, saved = fresh(), fresh()
    expected = [reference.take(1, 2, 4)[0].ids for _ in range(4)]
    assert [saved.take(1, 2, 4)[0].ids for _ in range(2)] == expected[:2]
    restored = ReplayBuffer(2, PreferenceStream(prefs, tiny_catalog, batch_rows=2))
    restored.restore(saved.state())
    assert [restored.take(1, 2, 4)[0].ids for _ in range(2)] == expected[2:]
    assert expected[0][:2] == ["a", "b"] and expected[2][:1] == ["e"] and expected[3][0].startswith("p")
    pass0 = [i for ids in expected for i in ids if i.startswith("p0-")]
    assert len(pass0) == 9 == len(set(pass0)) and restored.stats() == reference.stats()


def group_ids(call: int, n: int = 2) -> list[str]:
    """Group ids of rollout call `call` with one rollout actor (seed = call): `g<seed>-<request>`."""
    return [f"g{call}-{b}" for b in range(n)]


@pytest.mark.slow
def test_killed_rollout_actor_is_restarted_and_training_continues(run_dir, cluster, capsys):  # noqa: F811
    """Async, 3 steps: the rollout actor is killed (Ray restarts it) while it generates the batch of step 2; the
    driver re-pushes weights v1, retries the call, and trains every step on the scheduled groups."""
    from actors.driver import train

    def kill_rollout(step, actors):
        if step == 0:
            ray.kill(actors.rollouts[0], no_restart=False)

    result = train(h2po_config(run_dir, "h2po.checkpoint_every=0"), run_dir / "most.safetensors", None, steps=3,
                   mode="async", on_step=kill_rollout)
    assert [s["version"] for s in result.history] == [1, 2, 3]
    assert result.rollout_restarts == 1 and result.history[-1]["rollout/restarts"] == 1
    assert result.ledger == [group_ids(0), group_ids(1), group_ids(2)]
    assert result.rollout_versions == [3] and result.buffer.groups_dropped_stale == 0
    assert "rollout actor 0 restarted" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_learner_rank_fails_the_step_loudly(run_dir, cluster):  # noqa: F811
    """Sync, a train state every step: learner rank 1 is killed after step 1; step 2 raises LearnerFailed naming
    rank 1, the state of step 1 and --resume (rank 0 is left waiting in the gradient all-reduce: the driver must
    not wait for it)."""
    from actors.calls import PEER_GRACE, LearnerFailed
    from actors.driver import train

    def kill_learner(step, actors):
        if step == 0:
            ray.kill(actors.learners[1])

    start = time.time()
    with pytest.raises(LearnerFailed, match=r"learner rank 1 died during step 2.*step 1\) with `h2po train "
                                            r"\.\.\. --resume`") as err:
        train(h2po_config(run_dir, "h2po.checkpoint_every=1"), run_dir / "most.safetensors", None, steps=3,
              mode="sync", on_step=kill_learner)
    # start-up (actors, DeepSpeed) + at most PEER_GRACE for Ray to report the dead peer: far below the collective's
    # own timeout (30 min), which is what waiting for rank 0 would cost
    assert err.value.rank == 1 and time.time() - start < 120 + PEER_GRACE


@pytest.mark.slow
def test_driver_killed_after_checkpoint_resumes_without_loss_or_duplicates(run_dir, cluster, tmp_path):  # noqa: F811
    """`h2po train` (async, 4 steps, a train state every 2 steps, logged pairs, h2po.keep=best) runs in a subprocess
    joined to the test's cluster and is SIGKILLed as soon as the state of step 2 exists. `train(resume=True)`
    continues at step 2; the ledger is exactly the uninterrupted schedule: step s trains groups g<s>-0, g<s>-1 and
    the next two pairs of the preference stream, each id once; h2po.safetensors is the kept probe."""
    from actors.driver import train
    from catalog.dataset import load_catalog

    state_file = run_dir / "train_state" / "driver.json"
    for name in ("train_state", "train_state.old"):
        if (run_dir / name).exists():
            import shutil
            shutil.rmtree(run_dir / name)
    overrides = [*TINY_H2PO, "h2po.checkpoint_every=2", "h2po.eval_every=1", "h2po.keep=best"]
    command = [sys.executable, "-m", "app.cli", "train", "--checkpoint", str(run_dir / "most.safetensors"),
               "--preferences", str(run_dir / "prefs.parquet"), "--steps", "4", "--mode", "async", *overrides]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300  # a wait, not a speed check: it ends once the state exists (slow actor starts)
    while not state_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert state_file.exists(), (tmp_path / "driver.log").read_text()[-3000:]
    assert json.loads(state_file.read_text())["step"] == 2

    cfg = h2po_config(run_dir, "h2po.checkpoint_every=2", "h2po.eval_every=1", "h2po.keep=best")
    result = train(cfg, run_dir / "most.safetensors", run_dir / "prefs.parquet", steps=4, mode="async", resume=True)
    kept = json.loads(read_header(result.checkpoint)["meta"])  # the kept probe of either run, its gain recorded
    assert kept["kept"] == "best" and kept["steps"] in range(5) and len(kept["val_gain_over_start"]) == 3
    stream = PreferenceStream(run_dir / "prefs.parquet", load_catalog(cfg.data, run_dir))
    expected = []
    for step in range(4):
        stream.next_pairs(2)
        expected.append(group_ids(step) + stream.last_ids)
    assert result.resumed_from == 2 and [s["version"] for s in result.history] == [1, 2, 3, 4]
    assert result.ledger == expected
    trained = [i for ids in result.ledger for i in ids]
    assert len(trained) == len(set(trained)) == 16
    assert json.loads(state_file.read_text())["ledger"] == expected
    records, _ = read_records(run_dir)  # the feed: the killed run's records, then the resumed run's, no gap
    assert [r["resumed_from"] for r in records if r["kind"] == "run"] == [0, 2]
    assert sorted({r["step"] for r in records if r["kind"] == "step"}) == [1, 2, 3, 4]
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "done"


def until_raises(ref, errors: tuple[type[Exception], ...], seconds: float = 60.0) -> None:
    """ray.kill returns before Ray has removed what it killed: wait until getting `ref()` raises one of `errors` (a
    call or an object of the killed actor), so that what the test asks next sees it gone."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            ray.get(ref(), timeout=10)
        except errors:
            return
        time.sleep(0.2)
    raise AssertionError(f"none of {errors} within {seconds:.0f} s of the kill")


@ray.remote(num_cpus=0)
class _Answering:
    def weight_version(self) -> int:
        return 7

    def peak_memory(self) -> float:
        return 12.0


@pytest.mark.slow
def test_a_rollout_actor_away_at_the_end_does_not_fail_the_run(cluster):  # noqa: F811
    """The end-of-run questions to the rollout actors (`ask_rollouts`: weight version, peak memory) answer None for
    an actor that is dead or restarting, as when its node was lost just before the run ended (it failed the whole
    run in tests/test_multinode.py once, after the policy was written); the live actor still answers."""
    from actors.calls import ask_rollouts
    live, gone = _Answering.remote(), _Answering.remote()
    assert ray.get(gone.weight_version.remote()) == 7
    ray.kill(gone, no_restart=True)
    until_raises(gone.weight_version.remote, (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError))
    assert ask_rollouts([live, gone], "weight_version") == [7, None]
    assert ask_rollouts([gone, live], "peak_memory") == [None, 12.0]


@ray.remote
class _Owner:
    def rollouts(self) -> list:
        return [ray.put(b"x" * (1 << 20))]  # owned by this actor: lost with it, as a task's output with its node


@ray.remote
class _Buffer:
    def put(self, rollouts: bytes, ids: list[str]) -> int:
        return len(ids)


@pytest.mark.slow
def test_rollouts_lost_before_delivery_count_as_the_worker_gone(cluster):  # noqa: F811
    """Rollouts lost between the call and the buffer's put (here their owner dies; in tests/test_multinode.py their
    node went, and this once stopped the whole run): `deliver` raises WorkerGone, so the scheduler retries the call;
    rollouts still there are delivered."""
    from actors.calls import RayWorkers
    from actors.scheduler import WorkerGone
    workers = RayWorkers([], _Buffer.remote())
    owner = _Owner.remote()
    [kept], [lost] = ray.get(owner.rollouts.remote()), ray.get(owner.rollouts.remote())
    workers.deliver((None, kept), ["a"])
    ray.kill(owner, no_restart=True)
    until_raises(lambda: lost, (ray.exceptions.ObjectLostError,))
    with pytest.raises(WorkerGone, match="OwnerDied"):
        workers.deliver((None, lost), ["b"])
