"""What a training run shows while it goes: the metrics feed (`dashboard.feed`), validation probes
(`actors.evaluate`), the live dashboard page and, at the end, the HTML report (`dashboard`).

    monitor = Monitor(cfg, checkpoint, rewards, catalog, resume)   # prints the dashboard URL
    monitor.start(facts, resumed_from)                     # `run` record; baselines + step-0 policy on validation
    monitor.step(stats, batch, calls, events, weights)     # after every learner step
    monitor.finish("done" | "failed", message)             # `end` record, report.html, page stopped
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import ray

from actors.evaluate import ValidationProbe
from catalog.requests import request_to_json
from core.config import RunConfig
from core.errors import UserError
from dashboard.feed import MetricsLog, set_aside
from evaluation.metrics import paired_bootstrap
from rollout.buffer import BatchSummary


def metrics_urls(nodes: list[dict]) -> str:
    """The Prometheus endpoints of the live nodes (`ray.nodes()`). A node whose Ray runs without its metrics agent
    (Ray installed without the `default` extra) reports port -1: it exports nothing, and the line says so."""
    live = {(n["NodeManagerAddress"], n.get("MetricsExportPort")) for n in nodes if n.get("Alive")}
    urls = [f"http://{address}:{port}/metrics" for address, port in sorted(live) if port and port > 0]
    return ", ".join(urls) or "none (Ray's metrics agent is not running: Ray without its `default` extra)"


def actor_figures(calls: list) -> list[dict]:
    """Per rollout actor of the step's generation calls: lists/s and the weight version its rollouts came from."""
    done = [c for c in calls if c.done]
    return [{"actor": c.worker, "lists_per_s": c.done["lists"] / max(c.done["seconds"], 1e-9),
             "version": c.done["version"]} for c in done]


def sample_record(batch: BatchSummary, catalog, weights: np.ndarray) -> dict | None:
    """The best-scored rollout of the batch's first request, as catalog titles (the page's sample panel)."""
    if batch.sample is None:
        return None
    r = batch.sample
    total = r.rewards[: r.group_size] @ weights
    best = int(np.argmax(total))
    request = r.examples[0].request
    constraints = {k: v for k, v in request_to_json(catalog, request).items() if k != "seeds"}
    return {"request": json.dumps(constraints), "seeds": [catalog.titles[i] for i in request.seeds],
            "list": [catalog.titles[i] for i in r.items[best].tolist()], "reward": float(total[best])}


def best_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "h2po_best.safetensors"


def kept_best(out_dir: str | Path) -> tuple[float, int] | None:
    """(validation NDCG@10, step) of the best policy a resumed run has kept so far, None when it has none."""
    from learner.checkpoint import read_header

    if not best_path(out_dir).is_file():
        return None
    meta = json.loads(read_header(best_path(out_dir))["meta"])
    return float(meta["val_ndcg@10"]), int(meta["steps"])


def improves(ndcg: np.ndarray, start: np.ndarray, best: tuple[float, int] | None, users: np.ndarray,
             resamples: int, seed: int) -> tuple[bool, tuple[float, float, float]]:
    """(whether a probe replaces the kept policy, its paired gain over the start (mean, lo, hi)): `ndcg` and
    `start` are per-request validation NDCG@10, `best` the kept (score, step) or None. It does when nothing is kept,
    or when its mean beats the kept one's and the 95% interval of its gain over the start, resampling validation
    users, lies above zero: a policy that beats its start by less than the noise never replaces it."""
    gain = paired_bootstrap(ndcg, start, resamples, seed, users)
    return best is None or (float(ndcg.mean()) > best[0] and gain[1] > 0), gain


class Monitor:
    """The feed, probes and page of one training run (module docstring).

    Built before the actors are placed, so that a dashboard port that cannot be bound fails the run at once. A
    fresh (not resumed) run first moves the previous run's feed and results aside (`dashboard.feed.set_aside`), so
    that the page shows this run only; a resumed run appends to its feed."""

    def __init__(self, cfg: RunConfig, checkpoint: str, rewards: list[tuple[str, float]], catalog,
                 resume: bool) -> None:
        self.cfg, self.catalog = cfg, catalog
        self.rewards = rewards
        self.weights = np.array([w for _, w in rewards])
        if not resume:
            for moved in set_aside(cfg.out_dir):
                print(f"previous run's {moved.name.split('.')[0]} kept as {moved}", flush=True)
        self.log = MetricsLog(cfg.out_dir)
        self.probe = ValidationProbe(cfg, checkpoint) if cfg.h2po.eval_every > 0 else None
        self.checkpoint = checkpoint
        self.best = None  # (validation NDCG@10, step) of the kept probe (h2po.keep=best)
        if resume and cfg.h2po.keep == "best":  # the probe's policy is the start until weights are published
            self.start_ndcg, self.best = self.probe.policy_ndcg({}), kept_best(cfg.out_dir)
            if self.best is None:
                self.keep(self.start_ndcg, 0)
        self.server = None
        if cfg.dashboard.enabled:
            from dashboard.server import start_dashboard

            try:
                self.server = start_dashboard(cfg.out_dir, cfg.dashboard.host, cfg.dashboard.port)
            except OSError as err:
                raise UserError(f"dashboard.host/dashboard.port: cannot serve the dashboard on "
                                f"{cfg.dashboard.host}:{cfg.dashboard.port} ({err}); choose another port, 0 for a "
                                f"free one, or dashboard.enabled=false") from None
            print(f"dashboard: {self.server.url}", flush=True)

    def start(self, facts: dict, resumed_from: int) -> None:
        """The `run` record, the Ray metrics endpoints, and (fresh runs) baselines + the start policy on validation."""
        self.log.write("run", resumed_from=resumed_from, **facts)
        print(f"Ray metrics (Prometheus, ray_h2po_*): {metrics_urls(ray.nodes())}", flush=True)
        if self.probe is not None and resumed_from == 0:
            start = time.time()
            ndcg = self.probe.policy_ndcg({})
            records = self.probe.baselines() + self.probe.records("H2PO", ndcg, 0)
            for record in records:
                self.log.write("eval", **record)
            self.keep(ndcg, 0)
            start_ndcg = {r["family"]: r["metrics"]["ndcg@10"] for r in records if r["step"] == 0}
            print(f"validation probe: baselines and the start policy in {time.time() - start:.1f}s (start NDCG@10 "
                  + ", ".join(f"{f} {v:.4f}" for f, v in start_ndcg.items()) + f"; again every "
                  f"{self.cfg.h2po.eval_every} steps)", flush=True)
    def step(self, stats: dict, batch: BatchSummary, calls: list, events: list[dict], state_ref) -> None:
        """Write the step's record, its events and sample, and a validation probe when one is due."""
        step = stats["step"]
        self.log.write("step", actors=actor_figures(calls), **stats)
        for event in events:
            self.log.write("event", step=step, **event)
        sample = sample_record(batch, self.catalog, self.weights)
        if sample is not None:
            self.log.write("sample", step=step, **sample)
        every = self.cfg.h2po.eval_every
        if self.probe is not None and every > 0 and step % every == 0:
            ndcg = self.probe.policy_ndcg(ray.get(state_ref))
            for record in self.probe.records("H2PO", ndcg, step):
                self.log.write("eval", **record)
            self.keep(ndcg, step)

    def keep(self, ndcg: np.ndarray, step: int) -> None:
        """h2po.keep=best: the probed policy (the probe's model holds its weights now), with per-request validation
        NDCG@10 `ndcg`, becomes OUT_DIR/h2po_best.safetensors when `improves` says so; step 0 (the start) is kept
        first."""
        if self.cfg.h2po.keep != "best":
            return
        if step == 0:
            self.start_ndcg = ndcg
        better, gain = improves(ndcg, self.start_ndcg, self.best, self.probe.users, self.cfg.eval.bootstrap,
                                self.cfg.seed)
        score = float(ndcg.mean())
        print(f"H2PO step {step}: validation NDCG@10 {score:.4f}, {gain[0]:+.4f} [{gain[1]:+.4f}, {gain[2]:+.4f}] "
              "over step 0 (95% interval over validation users)", flush=True)
        if better:
            from learner.checkpoint import save_checkpoint

            meta = {"from": self.checkpoint, "steps": step, "kept": "best", "val_ndcg@10": score,
                    "val_gain_over_start": list(gain)}
            save_checkpoint(best_path(self.cfg.out_dir), self.probe.policy.model, self.cfg, self.catalog, meta)
            self.best = (score, step)

    def keep_best(self, policy: Path, run: dict) -> None:
        """h2po.keep=best, at the end: `policy` (OUT_DIR/h2po.safetensors) becomes the best probe, with the run's
        meta `run` (mode, stopped_by, last_step); the last step's policy stays beside it as h2po_last.safetensors."""
        if self.cfg.h2po.keep != "best" or self.best is None:
            return
        from learner.checkpoint import finish_checkpoint

        score, step = self.best
        last, copy = policy.with_name("h2po_last.safetensors"), policy.with_name(".h2po.kept.tmp")
        shutil.copyfile(best_path(self.cfg.out_dir), copy)  # first, so a failed copy leaves h2po.safetensors as it was
        finish_checkpoint(copy, run)
        os.replace(policy, last)
        os.replace(copy, policy)
        why = "the start checkpoint: no probe beat it by more than the noise" if step == 0 else "the best probe"
        print(f"H2PO: kept the policy of step {step} of {run['last_step']} (h2po.keep=best: validation NDCG@10 "
              f"{score:.4f}, {why}); the last step's is {last}", flush=True)

    def failed(self, message: str) -> None:
        """A `failed` event, then `finish("failed")`; an error while reporting is printed, never raised (the run's
        own error stays in front)."""
        try:
            self.log.write("event", event="failed", actor=None, step=None, message=message)
            self.finish("failed", message)
        except Exception as report_err:
            print(f"could not write the failure to the feed and report: {report_err}", flush=True)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the page (idempotent)."""
        if self.server is not None:
            self.server.stop()

    def finish(self, status: str, message: str = "") -> None:
        """The `end` record, then the report (it shows the end), then the page stops."""
        report = Path(self.cfg.out_dir) / "report.html" if self.cfg.dashboard.report else None
        self.log.write("end", status=status, message=message, report=str(report) if report else None)
        try:
            if report is not None:
                from dashboard.report import write_report

                print(f"report: {write_report(self.cfg.out_dir)}", flush=True)
        finally:
            self.close()
