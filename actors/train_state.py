"""The driver's resumable train state: OUT_DIR/train_state/, written atomically every `h2po.checkpoint_every` steps.

    train_state/
        engine/            DeepSpeed checkpoint of every learner rank (model, optimiser partitions, version) and
                           each rank's RNG streams (rng_rank<r>.safetensors)
        buffer.json        the replay buffer's waiting groups (ids, examples, versions), counters and preference
                           cursor (pass, row)
        buffer.safetensors the waiting groups' tensors (sampled items, steps, behaviour log-probs, rewards,
                           advantages; the encoded requests as `batch.<field>`), `g<i>.<name>` for the i-th group of
                           buffer.json
        driver.json        steps done, weight version, rollout calls already in the buffer, the ledger (ids trained
                           per step), per-step stats, skipped batches, rollout restarts
        config.json        the resolved run config

Atomicity: everything is written into a fresh sibling directory first; only when it is complete is the previous
state renamed to `train_state.old`, the new one renamed into place, and the old one removed. A crash at any point
leaves either the previous or the new state whole (`find_train_state` falls back to `.old` when the rename was
interrupted in between).

The driver itself draws no random numbers: rollout seeds are derived from (actor seed, call number), so the RNG
state to carry is the learner ranks' (anchor batches, VRPO noise), saved per rank beside their engine.

Nothing here is pickled: a run directory may come from elsewhere, and reading it must never execute code. Tensors
go to safetensors, everything else to JSON, and reading rebuilds the typed objects from plain values (constraints
from a fixed table of types). A state in the older pickled format (`buffer.pkl`) is refused, never unpickled.
DeepSpeed's own files are loaded as tensors only (`learner.engine`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from catalog.output import remove_stale_temporaries, temporary_path
from core.carriers import Example, Exclude, Prefer, Recency, Request, RequestBatch, Require, Rollouts
from core.errors import UserError

STATE_DIR = "train_state"
CONSTRAINTS = {"exclude": Exclude, "require": Require, "prefer": Prefer, "recency": Recency}
GROUP_TENSORS = ("items", "step_of", "behaviour_logp", "rewards", "advantages")
BATCH_TENSORS = tuple(f.name for f in dataclasses.fields(RequestBatch))


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
    stopped_by: str = "steps"  # what ended the last run_loop: "steps", or "max_minutes" (the wall clock)


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
    tmp = temporary_path(final)  # a kill leaves it behind: the next write removes it once its process is gone
    remove_stale_temporaries(out, STATE_DIR)
    tmp.mkdir(parents=True)
    save_engines(str(tmp / "engine"))
    write_buffer_state(tmp, buffer_state)
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    (tmp / "driver.json").write_text(json.dumps(dataclasses.asdict(driver)))  # written last: marks it complete
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_train_state(path: Path) -> tuple[DriverState, dict]:
    """(driver state, buffer state) of a state directory; the engines load from `path / "engine"`.
    Raises UserError for a state in the old pickled format or a malformed one (nothing of it is executed)."""
    try:
        driver = DriverState(**json.loads((path / "driver.json").read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise UserError(f"{path / 'driver.json'}: not a train state written by h2po ({err})") from None
    if not (path / "buffer.json").is_file() and (path / "buffer.pkl").exists():
        raise UserError(f"{path}: a train state in the old pickled format (buffer.pkl) is not loaded: unpickling a "
                        "file can run any code. Start the run again without --resume (or from a state written by "
                        "this version).")
    return driver, read_buffer_state(path)


def _plain(value):
    """json.dumps' fallback: numpy scalars (item indices, years drawn from arrays) as Python numbers."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _example_to_json(example: Example) -> dict:
    request = example.request
    constraints = [{"type": type(c).__name__.lower(), **dataclasses.asdict(c)} for c in request.constraints]
    return {"seeds": list(request.seeds), "negatives": list(request.negatives), "constraints": constraints,
            "k": request.k, "targets": list(example.targets), "user": example.user, "family": example.family,
            "seed_size": example.seed_size, "facet": list(example.facet) if example.facet is not None else None}


def _ints(values) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"expected a list of integers, got {values!r}"[:200])
    return tuple(values)


def _example_from_json(data: dict) -> Example:
    constraints = []
    for c in data["constraints"]:
        args = {key: value for key, value in c.items() if key != "type"}
        if c.get("type") not in CONSTRAINTS or not all(isinstance(v, (str, int, float, type(None)))
                                                       for v in args.values()):
            raise ValueError(f"bad constraint {c!r}"[:200])
        constraints.append(CONSTRAINTS[c["type"]](**args))
    facet = data["facet"]
    if facet is not None:
        if not (isinstance(facet, list) and len(facet) == 2 and isinstance(facet[0], str)
                and isinstance(facet[1], int)):
            raise ValueError(f"bad facet {facet!r}"[:200])
        facet = (facet[0], facet[1])
    request = Request(_ints(data["seeds"]), _ints(data["negatives"]), tuple(constraints), int(data["k"]))
    return Example(request, _ints(data["targets"]), int(data["user"]), str(data["family"]), int(data["seed_size"]),
                   facet)


def write_buffer_state(directory: Path, state: dict) -> None:
    """`ReplayBuffer.state()` as buffer.json + buffer.safetensors in `directory` (module docstring)."""
    tensors, groups = {}, []
    for i, (group_id, rollouts) in enumerate(state["groups"]):
        for name in GROUP_TENSORS:
            value = getattr(rollouts, name)
            value = torch.tensor(value) if not isinstance(value, torch.Tensor) else value  # a copy: may be read-only
            tensors[f"g{i}.{name}"] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
        for name in BATCH_TENSORS:
            value = getattr(rollouts.batch, name)
            if value is not None:  # `ease` is None without model.prior_folds
                tensors[f"g{i}.batch.{name}"] = value.clone(memory_format=torch.contiguous_format)
        groups.append({"id": group_id, "version": rollouts.version, "seconds": rollouts.seconds,
                       "examples": [_example_to_json(e) for e in rollouts.examples]})
    save_file(tensors, str(Path(directory) / "buffer.safetensors"))
    (Path(directory) / "buffer.json").write_text(json.dumps({"groups": groups, "stats": state["stats"],
                                                             "preferences": state["preferences"]}, default=_plain))


def read_buffer_state(directory: Path) -> dict:
    """The inverse of `write_buffer_state`; raises UserError when the files are missing or malformed."""
    directory = Path(directory)
    try:
        plain = json.loads((directory / "buffer.json").read_text())
        tensors = load_file(str(directory / "buffer.safetensors"))
        groups = []
        for i, group in enumerate(plain["groups"]):
            parts = {name: tensors[f"g{i}.{name}"] for name in GROUP_TENSORS}
            parts["rewards"] = parts["rewards"].numpy()
            batch = RequestBatch(**{name: tensors[f"g{i}.batch.{name}"] for name in BATCH_TENSORS
                                    if f"g{i}.batch.{name}" in tensors})
            rollouts = Rollouts([_example_from_json(e) for e in group["examples"]], batch, parts["items"],
                                parts["step_of"], parts["behaviour_logp"], parts["rewards"], parts["advantages"],
                                int(group["version"]), float(group["seconds"]))
            groups.append((str(group["id"]), rollouts))
        stats = {str(key): int(value) for key, value in plain["stats"].items()}
        cursor = plain["preferences"]
        if cursor is not None:
            cursor = {key: int(cursor[key]) for key in ("passes", "row", "served")}
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{directory}: the replay buffer's state is missing or malformed "
                        f"({type(err).__name__}: {err})"[:500]) from None
    return {"groups": groups, "stats": stats, "preferences": cursor}
