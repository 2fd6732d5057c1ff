"""The run's metrics feed: one JSON object per line in OUT_DIR/metrics.jsonl, and the same figures as Ray gauges.

Every record has `kind` and `time` (Unix seconds). The driver writes:
- `run`: once per (re)start: `run` (directory name), `mode`, `steps`, `learners`, `rollout_actors`, `zero_stage`,
  `rewards` (names), `resumed_from` (steps already done).
- `step`: one per learner step (also exported as Ray gauges `ray_h2po_<key>`, tagged with the run): `step`
  (1-based), `version`, `reward/<name>` (mean raw score of the batch's rollouts), `reward/total` (mean weighted
  sum), `loss/total`, `loss/on`, `loss/off`, `loss/anchor`, `kl`,
  `ppo/clip_fraction`, `ppo/dropped_share` (slots dropped by the importance-weight cap), `dpo/accuracy`,
  `grad_norm`, `lambda_off`, `staleness` ({"0": groups, "1": groups, ...} of the batch), `buffer/waiting` (groups
  left in the buffer), `batch/on` (rollout groups), `batch/off` (logged pairs), `time/step`, `time/train`,
  `time/rollout` (driver waiting for rollouts), `time/sync` (weight publication), `learner/idle_fraction`
  (1 - time/train / time/step), `actors` ([{"actor", "lists_per_s", "version"}]), `rollout/restarts`,
  `rollout/skipped_batches`. Keys of absent terms are left out.
- `event`: `event` ("restart", "skipped_batch", "failed"), `actor` (index or null), `step`, `message`.
- `eval`: `step` (learner step, null for a method evaluated once), `method` ("EASE", "MOST", "H2PO", ...),
  `split`, `family`, `metrics` ({"ndcg@10": ..., ...}).
- `sample`: a rollout of the step to look at: `step`, `request` (text), `seeds` and `list` (catalog titles),
  `reward` (its weighted total advantage input).
- `end`: `status` ("done" or "failed"), `message`, `report` (path of the HTML report, when written).

Lines are appended and flushed one at a time, so a crash loses at most the line being written; `read_records`
skips a torn last line. A resumed run appends to the same file: readers keep the last record per step. A fresh run
in a directory that holds an earlier feed first sets it aside (`set_aside`: metrics.<time>.jsonl).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def _clean(value):
    """JSON-safe: NaN/inf become null (JSON has no such numbers), numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def set_aside(run_dir: str | Path, names: tuple[str, ...] = (METRICS_FILE, "results.json")) -> list[Path]:
    """Rename a previous run's feed and results in `run_dir` to `<stem>.<time of last change>.<suffix>` (a fresh run
    starts its own feed; nothing is deleted).  -> the new paths"""
    moved = []
    for name in names:
        path = Path(run_dir) / name
        if path.is_file():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
            target = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
            os.replace(path, target)
            moved.append(target)
    return moved


def read_records(run_dir: str | Path, start: int = 0) -> tuple[list[dict], int]:
    """Complete records of OUT_DIR/metrics.jsonl from byte `start` on.  -> (records, byte offset to read from next)

    A last line without its newline (being written, or torn by a crash) is left for the next read."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return [], start
    with path.open("rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash, followed by a restart's lines
    return records, start + end


def gauge_name(key: str) -> str:
    """Ray metric name of a figure: `loss/on` -> `h2po_loss_on` (Ray's endpoint shows it as `ray_h2po_loss_on`)."""
    return "h2po_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


class RayGauges:
    """The step figures as Ray gauges (`ray.util.metrics`), tagged with the run: Ray's metrics view and Prometheus
    show them. Created lazily (a gauge needs a connected Ray); without Ray, nothing is exported."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.gauges: dict = {}

    def set(self, key: str, value: float, tags: dict | None = None) -> None:
        import ray
        from ray.util.metrics import Gauge
        if not ray.is_initialized() or value is None:
            return
        tags = {"run": self.run, **(tags or {})}
        gauge = self.gauges.get(key)
        if gauge is None:
            gauge = self.gauges[key] = Gauge(gauge_name(key), description=f"h2po {key}", tag_keys=tuple(tags))
        gauge.set(float(value), tags=tags)

    def export(self, record: dict) -> None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("time", "step"):
                self.set(key, value)
        for actor in record.get("actors", []):
            for key in ("lists_per_s", "version"):
                self.set(f"rollout/{key}", actor[key], {"actor": str(actor["actor"])})


class MetricsLog:
    """Appends records to OUT_DIR/metrics.jsonl (module docstring); `step` records also go to Ray gauges."""

    def __init__(self, run_dir: str | Path, ray_metrics: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.gauges = RayGauges(Path(run_dir).resolve().name) if ray_metrics else None

    def write(self, kind: str, **fields) -> dict:
        record = _clean({"kind": kind, "time": time.time(), **fields})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if kind == "step" and self.gauges is not None:
            self.gauges.export(record)
        return record
