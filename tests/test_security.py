"""Nothing executes code from data (issue 14, "Hardening", section 2): every test plants a crafted file that would
write a marker file if its code ran, and checks that the marker never appears.

- A resumable train state (`OUT_DIR/train_state`) is JSON + safetensors: a pickle planted as `buffer.pkl` is never
  opened, and a state that has only a `buffer.pkl` (the old format) is refused with a clear error.
- A learner rank's RNG streams are JSON + safetensors: a pickle planted as `rng_rank0.pt` is never opened.
- DeepSpeed's own checkpoint files are loaded with `torch.load(weights_only=True)`: a pickle planted as the model
  or optimiser states file is refused (slow: a one-rank DeepSpeed engine in a fresh process, about 20 s).
- A checkpoint header is data: a reward dotted path in its config is never imported (the module planted on
  sys.path writes the marker on import) unless the user names it, and its `out_dir` never decides where
  `h2po train` / `h2po eval` write.
Run: `python -m pytest tests/test_security.py -q`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_catalog
from safetensors.torch import save_file

from actors.train_state import DriverState, find_train_state, read_train_state, write_train_state
from app.cli import main
from catalog.batch import constraint_vocab, encode_requests
from catalog.dataset import load_catalog
from core.carriers import Example, Exclude, Prefer, Recency, Request, Rollouts
from core.config import DataConfig, config_to_dict, load_config
from core.errors import UserError
from rollout.buffer import ReplayBuffer

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


class Payload:
    """Pickles to a call of `exec` that writes `marker`: what an attacker would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code from a data file ran')",)


def rollouts_with_everything(version: int) -> Rollouts:
    """Two requests x G=2 rows whose examples carry negatives, every constraint type, targets and a facet."""
    examples = [Example(Request((1, 2), (3,), (Exclude("genre", "Horror"), Prefer("genre", "Comedy", 0.5),
                                               Recency(min_year=1990, half_life=10.0)), k=3), (4, 5), 7, "B", 2,
                        ("Comedy", 1990)),
                Example(Request((6,), k=3), (8,), 9, "A", 1)]
    items = torch.arange(12).reshape(4, 3)
    catalog = make_tiny_catalog()
    batch = encode_requests(catalog, [e.request for e in examples for _ in range(2)], constraint_vocab(catalog))
    return Rollouts(examples, batch, items, torch.ones(4, 3, dtype=torch.long), torch.full((4, 3), -0.5),
                    np.arange(8, dtype=np.float64).reshape(4, 2), torch.tensor([1.0, -1.0, 0.5, -0.5]), version, 1.25)


def test_resume_never_unpickles_the_buffer(tmp_path):
    """A complete train state with a pickle planted as buffer.pkl: reading it restores the real buffer (groups with
    their examples, tensors, rewards, counters, and out-of-fold EASE scores where a group carries them) and never
    opens the pickle."""
    marker = tmp_path / "marker"
    buffer = ReplayBuffer(2)
    buffer.put(rollouts_with_everything(3), ["a", "b"])
    carrying = rollouts_with_everything(3)  # requests that carry their out-of-fold EASE scores (model.prior_folds)
    carrying.batch.ease = torch.rand(carrying.batch.valid.shape, generator=torch.Generator().manual_seed(0))
    buffer.put(carrying, ["c", "d"])
    cfg = load_config(TINY, [f"out_dir={tmp_path}"])
    write_train_state(tmp_path, lambda d: Path(d).mkdir(), buffer.state(), DriverState(step=2, version=2), cfg)
    state_dir = find_train_state(tmp_path)
    (state_dir / "buffer.pkl").write_bytes(pickle.dumps(Payload(marker)))
    driver, state = read_train_state(state_dir)
    assert not marker.exists(), "read_train_state executed a pickle from the run directory"
    assert driver.step == 2
    restored = ReplayBuffer(2)
    restored.restore(state)
    for (id_a, a), (id_b, b) in zip(buffer.queue.groups, restored.queue.groups, strict=True):
        assert id_a == id_b and a.examples == b.examples and a.version == b.version and a.seconds == b.seconds
        for name in ("items", "step_of", "behaviour_logp", "advantages"):
            assert torch.equal(getattr(a, name), getattr(b, name)) and getattr(a, name).dtype == getattr(b, name).dtype
        assert np.array_equal(a.rewards, b.rewards) and a.rewards.dtype == b.rewards.dtype
        for name, value in vars(a.batch).items():
            other = getattr(b.batch, name)
            assert (value is None and other is None) or (torch.equal(value, other) and value.dtype == other.dtype)
    assert [g.batch.ease is None for _, g in restored.queue.groups] == [True, True, False, False]
    assert restored.stats() == buffer.stats()


def test_old_pickled_train_state_is_refused(tmp_path):
    """A train state holding only a buffer.pkl (the format before this change, or a crafted one): a clear error,
    and the pickle is never opened."""
    marker = tmp_path / "marker"
    state_dir = tmp_path / "train_state"
    state_dir.mkdir()
    (state_dir / "driver.json").write_text(json.dumps(dataclasses.asdict(DriverState(step=1, version=1))))
    (state_dir / "buffer.pkl").write_bytes(pickle.dumps(Payload(marker)))
    message = ""
    try:
        read_train_state(find_train_state(tmp_path))
    except UserError as err:
        message = str(err)
    assert not marker.exists(), "read_train_state executed a pickle from the run directory"
    assert "pickle" in message and "not loaded" in message, message


def test_learner_rng_state_is_never_unpickled(tmp_path):
    """A rank's RNG streams round-trip through safetensors + JSON (the draws after restoring repeat); a pickle planted
    under the RNG file's name is refused with a clear error and never runs. (The real learner ranks also ignore a
    planted rng_rank<r>.pt: tests/test_actors.py::test_actors_publish_weights_and_checkpoint.)"""
    from actors.learner import load_rng, save_rng

    marker, path = tmp_path / "marker", tmp_path / "rng_rank0.safetensors"
    rng, generator = np.random.default_rng([1, 2]), torch.Generator().manual_seed(3)
    save_rng(path, rng, generator)
    expected = (rng.random(4), torch.rand(4, generator=generator))
    load_rng(path, rng, generator)
    assert np.array_equal(rng.random(4), expected[0]) and torch.equal(torch.rand(4, generator=generator), expected[1])
    torch.save(Payload(marker), path)
    with pytest.raises(UserError, match="not an RNG state written by h2po"):
        load_rng(path, rng, generator)
    assert not marker.exists(), "loading the RNG state executed a pickle"


DEEPSPEED_SCRIPT = r'''
import json, sys
from pathlib import Path

import torch

from tests.one_rank import stepped_engine

marker, directory = Path(sys.argv[1]), Path(sys.argv[2])


class Payload:
    def __reduce__(self):
        return exec, (f"open({str(marker)!r}, 'w').write('code from a DeepSpeed file ran')",)


engine = stepped_engine()
engine.save_checkpoint(directory, {"version": 7})
out = {"genuine": engine.load_checkpoint(directory)["version"]}
for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
    path = directory / "step1" / name
    good = path.read_bytes()
    torch.save({"module": Payload()}, path)
    try:
        engine.load_checkpoint(directory)
        out[name] = "loaded"
    except Exception as err:
        out[name] = f"{type(err).__name__}: {err}"
    path.write_bytes(good)
print("RESULT " + json.dumps(out))
'''


@pytest.mark.slow
def test_deepspeed_checkpoint_files_load_as_tensors_only(tmp_path):
    """A genuine DeepSpeed checkpoint (ZeRO-2, one rank) loads; a pickle planted as its model states or its
    optimiser states file is refused without running (a fresh process: DeepSpeed needs its process group)."""
    script, marker = tmp_path / "deepspeed_load.py", tmp_path / "marker"
    script.write_text(DEEPSPEED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(marker), str(tmp_path / "ckpt")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert not marker.exists(), f"DeepSpeed's checkpoint load executed a pickle: {out}"
    assert out.pop("genuine") == 7
    for name, outcome in out.items():
        assert "tensors only" in outcome, (name, outcome)


EVIL_REWARD = '''
from pathlib import Path
Path({marker!r}).write_text("imported")


class Evil:
    pass
'''


@pytest.fixture(scope="module")
def movielens_catalog(tmp_path_factory) -> tuple[Path, str]:
    """The MovieLens catalog imported once (about 3 s): its directory and fingerprint."""
    directory = tmp_path_factory.mktemp("catalog")
    return directory / "catalog", load_catalog(DataConfig(), directory).fingerprint


def crafted_checkpoint(path: Path, fingerprint: str, **changes) -> Path:
    """An h2po checkpoint header (no weights) with the tiny config changed by `changes` (dotted keys)."""
    config = config_to_dict(load_config(TINY))
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "h2po-1", "config": json.dumps(config),
                                                          "catalog": fingerprint, "meta": "{}"})
    return path


def test_reward_path_in_a_checkpoint_header_is_not_imported(tmp_path, monkeypatch, movielens_catalog, capsys):
    """A checkpoint whose config names a reward module (on sys.path, writing the marker on import): `h2po train`
    refuses it before importing anything, and says how to use it; named on the command line, it is imported."""
    catalog_dir, fingerprint = movielens_catalog
    marker = tmp_path / "marker"
    (tmp_path / "evil_reward_mod.py").write_text(EVIL_REWARD.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = [{"name": "evil_reward_mod:Evil", "weight": 1.0}]
    checkpoint = crafted_checkpoint(tmp_path / "run" / "most.safetensors", fingerprint, **{
        "data.catalog": str(catalog_dir), "h2po.rewards": spec})
    assert main(["train", "--checkpoint", str(checkpoint), "--steps", "1", "threads=1"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "a reward named by a checkpoint header was imported"
    assert "evil_reward_mod:Evil" in err and "h2po.rewards" in err and "not a built-in" in err, err
    # the user's own command line may name it: then it is imported (and refused here as no Reward subclass)
    assert main(["train", "--checkpoint", str(checkpoint), "--steps", "1", "threads=1",
                 f"h2po.rewards={json.dumps(spec)}"]) == 2
    assert marker.exists() and "not a subclass of rewards.base.Reward" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "train"])
def test_out_dir_in_a_checkpoint_header_decides_no_write(command, tmp_path, capsys):
    """A checkpoint whose config points out_dir elsewhere: `h2po eval` / `h2po train` write into the checkpoint's
    own directory (here: the MovieLens import), never there; the user's out_dir=... is where they write when
    given. (The crafted checkpoint is then refused as made on another catalog: its writes happened before.)"""
    elsewhere = tmp_path / "elsewhere"
    checkpoint = crafted_checkpoint(tmp_path / "run" / "most.safetensors", "0" * 16, out_dir=str(elsewhere))
    extra = ["--out", str(tmp_path / "results.json")] if command == "eval" else ["--steps", "1"]
    assert main([command, "--checkpoint", str(checkpoint), *extra, "threads=1"]) == 2
    assert "another catalog" in capsys.readouterr().err
    assert not elsewhere.exists(), f"h2po {command} wrote where the checkpoint header said"
    assert (tmp_path / "run" / "catalog" / "items.parquet").is_file()
    assert main([command, "--checkpoint", str(checkpoint), *extra, "threads=1", f"out_dir={tmp_path / 'mine'}"]) == 2
    assert (tmp_path / "mine" / "catalog" / "items.parquet").is_file() and not elsewhere.exists()


def test_a_killed_state_write_leaves_no_temporary_behind(tmp_path):
    """A train-state directory half written by a process that died (here: a real child that exits at once) is removed
    by the next write; one of a live process (this one) is kept."""
    from catalog.output import HOST

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".train_state.tmp-{int(dead.stdout)}-{HOST}-0badc0de"
    (stale / "engine").mkdir(parents=True)
    (stale / "engine" / "big").write_bytes(b"x" * 1000)
    live = tmp_path / f".train_state.tmp-{os.getpid()}-{HOST}-00c0ffee"
    live.mkdir()
    cfg = load_config(TINY, [f"out_dir={tmp_path}"])
    write_train_state(tmp_path, lambda d: Path(d).mkdir(), ReplayBuffer(2).state(), DriverState(), cfg)
    assert not stale.exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "train_state"])
