"""The driver's resumable train state: OUT_DIR/train_state/, written atomically every `h2po.checkpoint_every` steps.

    train_state/
        engine/            DeepSpeed checkpoint of every learner rank (model, optimiser partitions, version) and
                           each rank's RNG streams (rng_rank<r>.pt)
        buffer.pkl         the replay buffer's waiting groups (with ids), counters and preference cursor (pass, row)
        driver.json        steps done, weight version, rollout calls already in the buffer, the ledger (ids trained
                           per step), per-step stats, skipped batches, rollout restarts
        config.json        the resolved run config

Atomicity: everything is written into a fresh sibling directory first; only when it is complete is the previous
state renamed to `train_state.old`, the new one renamed into place, and the old one removed. A crash at any point
leaves either the previous or the new state whole (`find_train_state` falls back to `.old` when the rename was
interrupted in between).

The driver itself draws no random numbers: rollout seeds are derived from (actor seed, call number), so the RNG
state to carry is the learner ranks' (anchor batches, VRPO noise), saved per rank beside their engine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

STATE_DIR = "train_state"


@dataclass
class DriverState:
    """The loop's own progress (everything the driver needs besides the actors' state)."""

    step: int = 0  # learner steps done
    version: int = 0  # weight version of the learner after those steps
    collected_through: int = -1  # the last rollout call whose groups are already in the buffer
    ledger: list[list[str]] = field(default_factory=list)  # per step: ids of the groups and pairs trained on
    history: list[dict] = field(default_factory=list)  # per-step stats
    skipped: int = 0  # rollout batches dropped for a failing reward
    rollout_restarts: int = 0  # rollout actors restarted after dying


def find_train_state(out_dir: str | Path) -> Path | None:
    """The complete train state under `out_dir` (or the previous one left by an interrupted swap), else None."""
    for name in (STATE_DIR, f"{STATE_DIR}.old"):
        path = Path(out_dir) / name
        if (path / "driver.json").is_file():
            return path
    return None


def write_train_state(out_dir: str | Path, save_engines, buffer_state: dict, driver: DriverState,
                      config) -> Path:
    """Write a complete state next to the current one, then swap it in (module docstring).

    `save_engines(directory)` makes every learner rank write its checkpoint there and returns when all have."""
    out = Path(out_dir)
    final, old = out / STATE_DIR, out / f"{STATE_DIR}.old"
    tmp = out / f".{STATE_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_engines(str(tmp / "engine"))
    with open(tmp / "buffer.pkl", "wb") as f:
        pickle.dump(buffer_state, f)
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    (tmp / "driver.json").write_text(json.dumps(dataclasses.asdict(driver)))  # written last: marks it complete
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_train_state(path: Path) -> tuple[DriverState, dict]:
    """(driver state, buffer state) of a state directory; the engines load from `path / "engine"`."""
    driver = DriverState(**json.loads((path / "driver.json").read_text()))
    with open(path / "buffer.pkl", "rb") as f:
        return driver, pickle.load(f)
