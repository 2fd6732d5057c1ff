"""Tests of the distributed H2PO system: the replay buffer's logic (no Ray), and the real actors end to end on a
small local Ray cluster (4 CPUs) with DeepSpeed (gloo, ZeRO stage 2, 2 learner ranks) on the tiny config.

The buffer tests use synthetic rollouts on the 50-item conftest catalog (seconds). The Ray tests (marked slow)
share one module fixture: `h2po pretrain` on `configs/tiny.yaml` with k=8 (about 15 s), logged preference pairs
from EASE (one per training user, about 5 s) and one Ray instance; each test then places its own actors (about
10-15 s: every actor imports torch + DeepSpeed and loads the workspace). H2PO runs with B=2 requests x G=2
rollouts, 2 VRPO samples, a 4-request MOST anchor and lr 1e-3 so that 3 steps move the weights visibly.
Run: `python -m pytest tests/test_actors.py -q` (about 1.5 minutes on 2 cores).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import make_tiny_catalog
from safetensors.torch import load_file
from test_security import Payload

from app.cli import main
from catalog.batch import constraint_vocab, encode_requests
from catalog.behaviour import generate_preferences
from catalog.dataset import Dataset
from catalog.preferences import PreferencePair, write_preferences
from catalog.schema import CatalogError
from core.carriers import Example, Request, Rollouts
from core.config import DataConfig, RequestConfig, load_config
from evaluation.baselines import EASE
from learner.checkpoint import read_header
from rewards.registry import RewardError
from rollout.buffer import PreferenceStream, ReplayBuffer, RolloutQueue, request_rows, shard, split_groups

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
TINY_H2PO = ["threads=1", "requests.k=8", "h2po.group_size=2", "h2po.batch_requests=2", "h2po.vrpo_samples=2",
             "most.batch_size=4", "h2po.lr=1e-3", "h2po.eval_every=0", "dashboard.enabled=false"]


def fake_rollouts(first_seed: int, n_requests: int, version: int, g: int = 2, k: int = 3) -> Rollouts:
    """n requests x g rows; request b has seed items first_seed + b, ..., first_seed + 2b (b + 1 seeds), row r holds
    items 10 r .. 10 r + k - 1; the request rows are encoded on the 50-item test catalog."""
    examples = [Example(Request(tuple(range(first_seed + b, first_seed + 2 * b + 1)), k=k), (), 0, "A", 1)
                for b in range(n_requests)]
    rows = n_requests * g
    items = torch.arange(rows * k).reshape(rows, k) + 10
    catalog = make_tiny_catalog()
    batch = encode_requests(catalog, [e.request for e in examples for _ in range(g)], constraint_vocab(catalog))
    return Rollouts(examples, batch, items, torch.zeros(rows, k, dtype=torch.long), torch.zeros(rows, k),
                    np.zeros((rows, 1)), torch.arange(rows, dtype=torch.float32), version)


def test_split_and_shard_keep_groups_together(tiny_catalog, tiny_vocab):
    """3 requests x G=2 (1, 2 and 3 seeds) split into groups of 2 rows; 2 shards take requests [0, 1] and [2], pairs
    [0, 1] and [2]. Each shard's request tensors equal encoding its own requests (seed width 2, then 3), and
    encoded pairs keep their lists and weights."""
    rollouts = fake_rollouts(0, 3, version=5)
    groups = split_groups(rollouts)
    assert [len(g.items) for g in groups] == [2, 2, 2] and all(g.version == 5 for g in groups)
    assert torch.equal(groups[1].items, rollouts.items[2:4]) and groups[0].batch.seeds.shape == (2, 1)
    pairs = [PreferencePair(e.request, (40, 41, 42), (43, 44, 45), w, "test")
             for e, w in zip(fake_rollouts(5, 3, 0).examples, (1.0, 2.0, 0.5))]
    shards = shard(groups, pairs, 2, tiny_catalog, tiny_vocab)
    assert [s.n_requests for s in shards] == [2, 1] and [len(s.pairs) for s in shards] == [2, 1]
    assert torch.equal(torch.cat([s.rollouts.advantages for s in shards]), rollouts.advantages)
    for part, requests in ((shards[0], rollouts.examples[:2]), (shards[1], rollouts.examples[2:])):
        expected = encode_requests(tiny_catalog, [e.request for e in requests for _ in range(2)], tiny_vocab)
        got = vars(part.rollouts.batch)
        assert all(torch.equal(got[name], value) if value is not None else got[name] is None
                   for name, value in vars(expected).items())
    assert shards[1].pairs.weights.tolist() == [0.5] and shards[0].pairs.chosen.tolist() == [[40, 41, 42]] * 2
    assert request_rows([rollouts.batch], [torch.tensor([0])]).seeds.shape == (1, 1)
    assert shard([], [], 2, None, None)[1].rollouts is None


def test_queue_drops_stale_groups_and_serves_oldest_first():
    """max_staleness 1 at version 3: the version-1 groups (staleness 2) are dropped, version 2 and 3 are served."""
    queue = RolloutQueue(max_staleness=1)
    queue.put(fake_rollouts(0, 2, version=1))
    queue.put(fake_rollouts(10, 1, version=2))
    queue.put(fake_rollouts(20, 2, version=3))
    served, staleness, ids = queue.take_with_ids(current_version=3, n=2)
    assert [g.examples[0].request.seeds for g in served] == [(10,), (20,)] and ids == ["g2", "g3"]
    assert staleness == [1, 0] and [g.version for g in served] == [2, 3]
    assert (queue.stats.groups_dropped_stale, queue.stats.groups_served, queue.stats.groups_waiting) == (2, 2, 1)
    assert queue.take_with_ids(current_version=5, n=4) == ([], [], []) and queue.stats.groups_dropped_stale == 3


def test_preference_stream_serves_pairs_pass_after_pass(tiny_catalog, tmp_path):
    """A file of P valid pairs: 2P + 1 pairs take two passes; a file of only bad rows raises, naming the file."""
    data = Dataset.build(tiny_catalog, DataConfig())
    requests = RequestConfig(seed_sizes=[1, 2], family_b_share=0.0)
    table, stats = generate_preferences(data, EASE(tiny_catalog, data.train_matrix, 10.0), 4, 2.0, 3, 0, "test",
                                        requests=requests)  # 9 pairs of k=3 lists
    assert stats.pairs == 9
    path = tmp_path / "prefs.parquet"
    write_preferences(table, path)
    stream = PreferenceStream(path, tiny_catalog, batch_rows=2)
    pairs = stream.next_pairs(2 * stats.pairs + 1)
    assert stream.passes == 2 and pairs[0] == pairs[stats.pairs] and stream.served == 2 * stats.pairs + 1
    buffer = ReplayBuffer(0, stream)
    buffer.put(fake_rollouts(0, 1, version=0))
    summary, (batch,) = buffer.take(0, 4, 3)
    assert batch.n_requests == summary.n_requests == 1 and len(batch.pairs) == summary.n_pairs == 3
    assert buffer.stats().pairs_served == 2 * stats.pairs + 4
    bad = tmp_path / "bad.parquet"
    write_preferences(table.set_column(table.schema.get_field_index("k"), "k", [[2] * len(table)]), bad)
    with pytest.raises(CatalogError, match="no valid preference pairs"):
        PreferenceStream(bad, tiny_catalog).next_pairs(1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny MOST checkpoint (k=8) and logged preference pairs in one run directory."""
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("h2po_run")
    overrides = [f"out_dir={run}", "threads=1", "requests.k=8"]
    assert main(["pretrain", "--config", TINY, *overrides]) == 0
    assert main(["data", "preferences", "--out", str(run / "prefs.parquet"), "--config", TINY, *overrides,
                 "preferences.pairs_per_user=1"]) == 0
    torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def h2po_config(run_dir: Path, *extra: str):
    base = json.loads(read_header(run_dir / "most.safetensors")["config"])
    return load_config(None, [*TINY_H2PO, *extra], base=base)


@ray.remote(num_cpus=1)
def engine_two_steps(zero_stage: int) -> dict:
    """In a fresh process: a one-rank Engine on a model with a 0-dim parameter, loss = sum of all parameters."""
    import socket

    from learner.engine import Engine, EngineConfig, init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed(0, 1, port)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    model.scale = torch.nn.Parameter(torch.tensor(2.0))
    engine = Engine(model, EngineConfig(zero_stage=zero_stage, lr=0.1, grad_clip=0.0))

    def step() -> dict:
        engine.step(sum(p.sum() for p in engine.module.parameters()))
        return engine.state_dict()
    start = engine.state_dict()
    return {"start": start, "first": step(), "second": step()}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_engine_steps_and_keeps_scalar_shapes(cluster, zero_stage):
    """grad = 1 everywhere, so each Adam step moves every weight by exactly -lr = -0.1 (m_hat / sqrt(v_hat) = 1),
    and the 0-dim parameter keeps shape () through DeepSpeed's steps."""
    out = ray.get(engine_two_steps.remote(zero_stage))
    assert out["start"]["scale"].shape == () and out["second"]["scale"].shape == ()
    for name, value in out["start"].items():
        torch.testing.assert_close(out["first"][name], value - 0.1)
        torch.testing.assert_close(out["second"][name], value - 0.2)


@pytest.mark.slow
def test_sync_run_trains_and_publishes_weights(run_dir, cluster):
    """3 sync steps, 2 ranks, ZeRO 2: finite stats, versions 1..3, staleness 0, every sampled group and 2 pairs per
    step served, the rollout actor at the final version, and h2po.safetensors holding the moved final weights."""
    from actors.driver import train
    from core.config import SystemConfig

    cfg = h2po_config(run_dir, "h2po.eval_every=2", "dashboard.enabled=true")
    result = train(cfg, run_dir / "most.safetensors", run_dir / "prefs.parquet", steps=3, mode="sync",
                   system=SystemConfig(learners=2, zero_stage=2))
    assert [s["version"] for s in result.history] == [1, 2, 3]
    assert all(math.isfinite(v) for s in result.history for v in s.values() if not isinstance(v, dict))
    assert set(result.peak_memory) == {"learner0", "learner1", "rollout0", "buffer"}
    check_feed(run_dir, cfg)
    assert all(s["rollout/staleness"] == 0 and s["rollout/requests"] == 2 and s["pairs"] == 2
               for s in result.history)
    assert {"loss/on", "loss/off", "loss/anchor", "kl", "dpo/accuracy", "reward/ndcg"} <= set(result.history[0])
    assert result.version == 3 and result.rollout_versions == [3]
    assert (result.buffer.groups_served, result.buffer.groups_dropped_stale, result.buffer.pairs_served) == (6, 0, 6)
    saved = {k.removeprefix("model."): v for k, v in load_file(result.checkpoint).items()}
    start = {k.removeprefix("model."): v for k, v in load_file(run_dir / "most.safetensors").items()}
    assert all(torch.equal(saved[name], value) for name, value in result.state_dict.items())
    assert {name: value.shape for name, value in saved.items()} == {name: value.shape for name, value in start.items()}
    assert not torch.equal(saved["item_residual"], start["item_residual"])
    assert result.history[-1]["kl"] > 0


def test_a_probe_replaces_the_start_only_beyond_the_noise():
    """`improves`: nothing kept -> kept; a probe replaces the kept one when its mean is higher and its paired gain
    over the start has a 95% interval over users above zero; a gain within the users' noise, or a mean below the
    kept one, does not."""
    from actors.monitor import improves

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(100), 10)
    start = rng.random(1000)
    assert improves(start, start, None, users, 1000, 0)[0]
    jitter = rng.normal(0, 0.2, 1000)
    noise = start + jitter - jitter.mean() + 0.002  # a higher mean, well inside the noise
    better, (gain, lo, hi) = improves(noise, start, (start.mean(), 0), users, 1000, 0)
    assert noise.mean() > start.mean() and lo < 0 < hi and not better
    clear = start + 0.05 + rng.normal(0, 0.01, 1000)
    better, (gain, lo, hi) = improves(clear, start, (start.mean(), 0), users, 1000, 0)
    assert better and lo > 0 and gain == pytest.approx(clear.mean() - start.mean())
    assert not improves(clear, start, (clear.mean() + 0.01, 20), users, 1000, 0)[0]


@pytest.mark.slow
def test_keep_best_keeps_the_best_validated_policy(run_dir, cluster, tmp_path, capsys):
    """h2po.keep=best, a probe every step: h2po.safetensors holds step 0 (the MOST start) unless a probe's mean
    validation NDCG@10 beats every earlier kept one's with a paired gain over step 0 whose interval is above zero
    (as printed per probe); the last step's weights stay beside it as h2po_last.safetensors. keep=best without
    probes is refused before anything starts."""
    from actors.driver import train
    from actors.evaluate import ValidationProbe
    from core.config import SystemConfig
    from core.errors import UserError
    from dashboard.feed import read_records

    shutil.copytree(run_dir / "catalog", tmp_path / "catalog")
    cfg = h2po_config(run_dir, f"out_dir={tmp_path}", "h2po.eval_every=1", "h2po.keep=best")
    with pytest.raises(UserError, match="h2po.keep=best .* h2po.eval_every >= 1"):
        train(dataclasses.replace(cfg, h2po=dataclasses.replace(cfg.h2po, eval_every=0)), run_dir / "most.safetensors")
    capsys.readouterr()
    result = train(cfg, run_dir / "most.safetensors", None, steps=3, mode="sync", system=SystemConfig(learners=1))
    printed = re.findall(r"H2PO step (\d+): validation NDCG@10 ([\d.]+), [+-][\d.]+ \[([+-][\d.]+), ",
                         capsys.readouterr().out)
    assert [int(step) for step, _, _ in printed] == [0, 1, 2, 3]
    probe = ValidationProbe(cfg, run_dir / "most.safetensors")
    records = [r for r in read_records(tmp_path)[0] if r["kind"] == "eval" and r["method"] == "H2PO"]
    counts = {f: int((probe.families == f).sum()) for f in set(probe.families)}
    scores = [sum(r["metrics"]["ndcg@10"] * counts[r["family"]] for r in records if r["step"] == step)
              / len(probe.families) for step in range(4)]
    assert [float(score) for _, score, _ in printed] == pytest.approx(scores, abs=1e-4)
    best = 0
    for step, (_, score, lo) in enumerate(printed):
        best = step if float(lo) > 0 and scores[step] > scores[best] else best
    meta = json.loads(read_header(result.checkpoint)["meta"])
    assert (meta["kept"], meta["steps"]) == ("best", best) and meta["val_ndcg@10"] == pytest.approx(scores[best])
    assert (meta["stopped_by"], meta["last_step"], meta["complete"]) == ("steps", 3, True)
    kept, last = load_file(result.checkpoint), load_file(tmp_path / "h2po_last.safetensors")
    start = load_file(run_dir / "most.safetensors")
    assert all(torch.equal(last[f"model.{name}"], value) for name, value in result.state_dict.items())
    if best == 0:
        assert all(torch.equal(kept[name], start[name]) for name in start)
    else:
        assert not torch.equal(kept["model.item_residual"], start["model.item_residual"])
    assert best == 3 or not torch.equal(kept["model.item_residual"], last["model.item_residual"])


def check_feed(run_dir: Path, cfg) -> None:
    """The sync run's records in OUT_DIR/metrics.jsonl (`dashboard.feed`): one per step with the monitoring
    figures, validation probes at step 0 and 2 next to the baselines, a sample of catalog titles, the end."""
    from catalog.dataset import load_catalog
    from dashboard.feed import read_records

    records, _ = read_records(run_dir)
    start = max(i for i, r in enumerate(records) if r["kind"] == "run")  # the module's runs share the directory
    records = records[start:]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["staleness"] for r in steps] == [{"0": 2}] * 3
    for r in steps:
        assert (r["batch/on"], r["batch/off"], r["buffer/waiting"]) == (2, 2, 0)
        assert 0 <= r["learner/idle_fraction"] < 1 and r["time/train"] < r["time/step"]
        assert [a["actor"] for a in r["actors"]] == [0] and r["actors"][0]["lists_per_s"] > 0
        assert r["actors"][0]["version"] == r["step"] - 1  # sync: sampled by the weights before the step
        assert {"loss/on", "loss/off", "loss/anchor", "kl", "ppo/clip_fraction", "ppo/dropped_share",
                "reward/ndcg", "reward/total"} <= set(r)
    evals = [r for r in records if r["kind"] == "eval"]
    assert {(r["method"], r["step"]) for r in evals if r["method"] == "H2PO"} == {("H2PO", 0), ("H2PO", 2)}
    assert {"EASE", "popularity"} <= {r["method"] for r in evals if r["step"] is None}
    assert all(0 <= r["metrics"]["ndcg@10"] <= 1 and r["family"] in ("A", "B") for r in evals)
    titles = set(load_catalog(cfg.data, run_dir).titles)
    samples = [r for r in records if r["kind"] == "sample"]
    assert len(samples) == 3 and all(set(r["seeds"]) | set(r["list"]) <= titles for r in samples)
    assert all(len(r["list"]) == cfg.requests.k for r in samples)
    assert records[-1]["kind"] == "end" and records[-1]["status"] == "done"
    assert Path(records[-1]["report"]).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("max_staleness, pattern", [(1, [0, 1, 1]), (2, [0, 1, 2])])
def test_async_run_trains_on_rollouts_up_to_max_staleness_old(run_dir, cluster, max_staleness, pattern):
    """Async: the first batch is fresh; with h2po.max_staleness 1 later ones were sampled by the previous version,
    with 2 the calls of two steps ahead start at once (all three with version 0); none is dropped."""
    from actors.driver import train
    from core.config import SystemConfig

    result = train(h2po_config(run_dir, f"h2po.max_staleness={max_staleness}"), run_dir / "most.safetensors", None,
                   steps=3, mode="async", system=SystemConfig(learners=2, zero_stage=2))
    assert [s["rollout/staleness"] for s in result.history] == pattern
    assert all(s["pairs"] == 0 and s["loss/off"] == 0 for s in result.history)
    assert result.rollout_versions == [3] and result.buffer.groups_dropped_stale == 0


@pytest.mark.slow
def test_actors_publish_weights_and_checkpoint(run_dir, cluster):
    """Placed actors: one step changes the published weights, the rollout actor samples with them (new version,
    new behaviour log-probs for the same seed), and a DeepSpeed checkpoint restores weights and version."""
    from actors.driver import place_actors
    from core.config import SystemConfig

    actors = place_actors(h2po_config(run_dir), str(run_dir / "most.safetensors"), None,
                          SystemConfig(learners=2, zero_stage=2))
    rollout = actors.rollouts[0]
    summary, before = ray.get(list(rollout.generate.remote(2, 7)))
    assert before.version == summary["version"] == 0 and summary["lists"] == 4
    shards = shard(split_groups(before), [], 2, None, None)
    ray.get([a.train_step.remote(s, 1.0) for a, s in zip(actors.learners, shards)])
    state_ref, version_ref = actors.learners[0].weights.remote()
    assert ray.get(rollout.set_weights.remote(state_ref, ray.get(version_ref))) == 1
    after = ray.get(rollout.generate.remote(2, 7)[1])
    assert after.version == 1 and not torch.equal(after.behaviour_logp, before.behaviour_logp)
    ckpt = str(run_dir / "deepspeed")
    ray.get([a.save_checkpoint.remote(ckpt) for a in actors.learners])
    ray.get([a.train_step.remote(s, 1.0) for a, s in zip(actors.learners, shards)])
    marker = run_dir / "rng_marker"  # a pickle planted where the old format kept rank 0's RNG state: never opened
    torch.save(Payload(marker), Path(ckpt) / "rng_rank0.pt")
    assert ray.get([a.load_checkpoint.remote(ckpt) for a in actors.learners]) == [1, 1]
    assert not marker.exists(), "a learner rank executed a pickle planted in its checkpoint directory"
    restored, version = ray.get(actors.learners[1].weights.remote())
    assert version == 1 and all(torch.equal(restored[k], v) for k, v in ray.get(state_ref).items())
    actors.kill()  # the actors and their placement groups


BROKEN_REWARD = '''
import numpy as np
from rewards.base import Reward

class BrokenReward(Reward):
    name = "broken"

    def __call__(self, batch, ctx):
        return np.full(len(batch), np.nan)
'''


@pytest.mark.slow
def test_failing_reward_stops_or_skips_with_its_name(run_dir, cluster, tmp_path):
    """A reward returning NaN: generate raises RewardError naming it; the driver re-raises it ("stop") or counts
    the dropped batch ("skip")."""
    from actors.buffer import ReplayBufferActor
    from actors.calls import RayWorkers
    from actors.rollout import RolloutActor
    from actors.scheduler import RolloutScheduler

    (tmp_path / "broken_reward.py").write_text(BROKEN_REWARD)
    cfg = h2po_config(run_dir, 'h2po.rewards=[{"name": "broken_reward:BrokenReward", "weight": 1.0}]')
    rollout = RolloutActor.options(runtime_env={"env_vars": {"PYTHONPATH": str(tmp_path)}}).remote(
        cfg, str(run_dir / "most.safetensors"), 0)
    with pytest.raises(RewardError, match="'broken' returned 2 NaN"):
        ray.get(rollout.generate.remote(1, 0)[0])
    buffer = ReplayBufferActor.options(num_cpus=0).remote(cfg, None)
    stop = RolloutScheduler(RayWorkers([rollout], buffer), 1, 0, "stop")
    stop.admit(0)
    with pytest.raises(RewardError) as err:
        stop.collect(0)
    assert err.value.reward == "broken"
    skip = RolloutScheduler(RayWorkers([rollout], buffer), 1, 0, "skip")
    skip.admit(0)
    assert skip.collect(0)[0].done is None and skip.skipped == 1
    ray.kill(rollout)
    ray.kill(buffer)
