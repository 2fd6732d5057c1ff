"""Records of the metrics feed -> the page's text panels, as plain data that the templates render (escaped).

    panels = build_panels(records, latest_steps(records), run_dir)
    # {"run": "default", "status": "running", "step": 12, "steps": 100, "version": 12, "facts": [(label, value)],
    #  "events": [...], "sample": {...} or None, "comparison": [{"group", "n", "header", "rows"}], "report": bool}

Nothing here is HTML: every string is shown through Jinja2 autoescape (`templates/`), so a catalog title or an
error message holding markup is displayed as text. The comparison table is OUT_DIR/results.json (written by the
evaluation, `app.pipeline.run_evaluation`) in the layout of `evaluation.report.format_table`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from core.table import cell

RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
COMPARISON_COLUMNS = [  # (header, key): the columns of evaluation.report.COLUMNS shown on the page
    ("Rmin@10", "recall_min@10"), ("HR@10", "hit@10"), ("NDCG@20", "ndcg@20"), ("sat", "constraint_sat"),
    ("dup", "duplicates"), ("leak", "seed_leak"), ("ILD", "ild"), ("nov", "novelty"), ("cov", "coverage"),
]


def _last(records: list[dict], kind: str) -> dict | None:
    return next((r for r in reversed(records) if r.get("kind") == kind), None)


def _clock(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else ""


def silent_after(steps: list[dict]) -> float:
    """Seconds without a new record after which a run that has not ended is shown as "silent": ten median step
    times, at least five minutes (validation probes and checkpoints make some steps much longer)."""
    times = sorted(r["time/step"] for r in steps if isinstance(r.get("time/step"), (int, float)))
    return max(300.0, 10 * times[len(times) // 2]) if times else 900.0


def run_facts(records: list[dict], steps: list[dict]) -> dict:
    """Run name, status, latest step and version, and the run record's facts as (label, value) rows."""
    run = _last(records, "run") or {}
    end = _last(records, "end")
    last = steps[-1] if steps else {}
    status = "running" if end is None or (run and run["time"] > end["time"]) else str(end.get("status"))
    quiet = time.time() - records[-1]["time"] if records and "time" in records[-1] else 0.0
    if status == "running" and quiet > silent_after(steps):
        status = "silent"  # no record for far longer than a step takes: the driver may have been killed
    first_time = next((r["time"] for r in records if "time" in r), None)
    facts = [("mode", run.get("mode")), ("learner ranks", run.get("learners")),
             ("rollout actors", run.get("rollout_actors")), ("ZeRO stage", run.get("zero_stage")),
             ("rewards", ", ".join(map(str, run.get("rewards") or []))), ("resumed from step", run.get("resumed_from")),
             ("started", _clock(first_time)), ("last record", _clock(records[-1].get("time") if records else None))]
    if end is not None and end.get("message"):
        facts.append(("end", end["message"]))
    if status == "silent":
        facts.append(("silent for", f"{quiet / 60:.0f} min; if the driver died: h2po train ... --resume"))
    return {"run": str(run.get("run") or "run"), "status": status, "step": last.get("step", 0),
            "steps": run.get("steps", "?"), "version": last.get("version", ""),
            "facts": [(label, str(v)) for label, v in facts if v not in (None, "")]}


def event_rows(records: list[dict]) -> list[dict]:
    """Restarts, skipped batches and failures, newest first, with their messages."""
    rows = [{"time": _clock(r.get("time")), "step": r.get("step"), "event": r.get("event"),
             "actor": "" if r.get("actor") is None else r["actor"], "message": r.get("message") or ""}
            for r in records if r.get("kind") == "event"]
    return rows[::-1]


def latest_sample(records: list[dict]) -> dict | None:
    sample = _last(records, "sample")
    if sample is None:
        return None
    return {"step": sample.get("step"), "request": sample.get("request") or "", "reward": sample.get("reward"),
            "seeds": [str(t) for t in sample.get("seeds") or []], "list": [str(t) for t in sample.get("list") or []]}


def comparison(run_dir: str | Path) -> list[dict]:
    """OUT_DIR/results.json as one table per group: methods as rows, NDCG@10 with its CI first, then the other
    metrics and the paired differences to each reference method.  [] without the file."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        results = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError):
        return []  # no evaluation yet (or being written: the next poll reads it)
    tables = []
    for group, by_method in results.items():
        vs_keys = list(dict.fromkeys(k for s in by_method.values() for k in s if "_vs_" in k and not k.endswith("_ci")))
        header = ["method", "NDCG@10 [95% CI]", *(h for h, _ in COMPARISON_COLUMNS)]
        header += [f"Δ{metric.upper()} vs {reference} [95% CI]" for metric, reference in
                   (key.split("_vs_") for key in vs_keys)]
        rows = [[method, cell(summary, "ndcg@10", with_ci=True), *(cell(summary, k) for _, k in COMPARISON_COLUMNS),
                 *(cell(summary, key, with_ci=True) for key in vs_keys)] for method, summary in by_method.items()]
        tables.append({"group": group, "n": next(iter(by_method.values()), {}).get("n"), "header": header,
                       "rows": rows})
    return tables


def build_panels(records: list[dict], steps: list[dict], run_dir: str | Path) -> dict:
    """Every text panel of the page (module docstring)."""
    return {**run_facts(records, steps), "events": event_rows(records), "sample": latest_sample(records),
            "comparison": comparison(run_dir), "report": (Path(run_dir) / REPORT_FILE).exists()}
