"""Distributed H2PO throughput (issue 3's measurements): the same learner steps in sync and in async mode.

Run:  python benchmarks/system.py --run runs/default [--steps 20] [--modes sync,async] [--out FILE] [key=value ...]
      python benchmarks/system.py --run DIR --rollout-actors 1,2,4 [...]   # sync runs with 1, 2 and 4 rollout actors

`--run DIR` holds most.safetensors and preferences.parquet (an `h2po run` directory). Each mode is a real run
(`actors.driver.train`: local Ray, the configured learner ranks / rollout actors / ZeRO stage) into
DIR/system/<mode>, with the dashboard, validation probes and train-state checkpoints off so that only the loop is
timed. Figures come
from the run's own feed (OUT_DIR/metrics.jsonl, `dashboard.feed`), over the steps after the first (warm-up):
- rollout lists/s per actor: lists of a generation call / its wall time inside the actor;
- learner samples/s: (rollouts + logged pairs) of a step / the learner ranks' train time (both inner epochs);
- step time: the driver's wall time per step; learner idle: 1 - train time / step time;
- weight sync: publishing the new weights and (sync mode) waiting until every rollout actor holds them: rank 0's
  weights become one object in Ray's object store, every rollout actor is sent its reference (mean and standard
  deviation over the timed steps);
- rollout lists/s (all actors): the lists of a step's generation call over the driver's wait for it (sync mode: the
  actors generate in parallel, the learner waits);
- loop: the whole loop of `--steps` steps (from the first step's start to the last step's record);
- peak memory of every actor process (resident, MiB).
With `RAY_ADDRESS` set the runs join that cluster (e.g. docs/results.md's three-node loopback cluster), placed by
`system.placement`; `--rollout-actors` sweeps `system.rollout_actors` in sync mode (`--modes` is then ignored).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from harness import add_run_arguments, format_rows, h2po_run_config, machine, write_result

from actors.driver import train
from core.config import RunConfig
from dashboard.feed import read_records


def measure(cfg: RunConfig, run: Path, mode: str, steps: int) -> dict:
    """One timed run in `mode` into cfg.out_dir.  -> its figures (module docstring)"""
    out = Path(cfg.out_dir)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    result = train(cfg, run / "most.safetensors", run / "preferences.parquet", steps, mode)
    records, _ = read_records(out)
    step_records = [r for r in records if r["kind"] == "step"]
    timed = step_records[1:]  # the first step waits for the first generation and warms the caches up
    samples = [r["batch/on"] * cfg.h2po.group_size + r["batch/off"] for r in timed]
    lists = [r["batch/on"] * cfg.h2po.group_size for r in timed]
    rates = [a["lists_per_s"] for r in timed for a in r["actors"]]
    first_start = step_records[0]["time"] - step_records[0]["time/step"]
    return {"mode": mode, "steps": steps, "wall_s": result.seconds, "loop_s": step_records[-1]["time"] - first_start,
            "step_s": float(np.mean([r["time/step"] for r in timed])),
            "train_s": float(np.mean([r["time/train"] for r in timed])),
            "samples_per_s": float(np.sum(samples) / np.sum([r["time/train"] for r in timed])),
            "lists_per_s_per_actor": float(np.mean(rates)) if rates else None,
            "sync_s": float(np.mean([r["time/sync"] for r in timed])),
            "sync_s_sd": float(np.std([r["time/sync"] for r in timed])),
            "rollout_lists_per_s": float(np.sum(lists) / np.sum([r["time/rollout"] for r in timed])),
            "idle": float(np.mean([r["learner/idle_fraction"] for r in timed])),
            "peak_mib": result.peak_memory, "learners": cfg.system.learners,
            "rollout_actors": cfg.system.rollout_actors, "zero_stage": cfg.system.zero_stage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(parser, steps=20)
    parser.add_argument("--modes", default="sync,async", help="comma-separated subset of sync,async")
    parser.add_argument("--rollout-actors", default="", help="comma-separated rollout actor counts (sync runs)")
    args = parser.parse_args()
    run = Path(args.run)
    if args.rollout_actors:
        rows = [measure(h2po_run_config(parser, run, run / "system" / f"sync-r{n}",
                                        [*args.overrides, f"system.rollout_actors={n}"]), run, "sync", args.steps)
                for n in map(int, args.rollout_actors.split(","))]
        print(format_rows(["rollout actors", "steps", "weight sync s", "sd", "rollout lists/s (all)",
                           "lists/s/actor", "step s"],
                          [[r["rollout_actors"], r["steps"], r["sync_s"], r["sync_s_sd"], r["rollout_lists_per_s"],
                            r["lists_per_s_per_actor"], r["step_s"]] for r in rows]))
        write_result(args.out, {"machine": machine(), "overrides": args.overrides, "rows": rows})
        return
    rows = [measure(h2po_run_config(parser, run, run / "system" / mode, args.overrides), run, mode, args.steps)
            for mode in args.modes.split(",")]
    header = ["mode", "steps", "loop s", "step s", "learner train s", "learner samples/s", "rollout lists/s/actor",
              "weight sync s", "learner idle", "peak MiB (max actor)"]
    print(format_rows(header, [[r["mode"], r["steps"], r["loop_s"], r["step_s"], r["train_s"], r["samples_per_s"],
                                r["lists_per_s_per_actor"], r["sync_s"], r["idle"], max(r["peak_mib"].values())]
                               for r in rows]))
    for r in rows:
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_mib"].items())
        print(f"{r['mode']} peak memory per actor (MiB): {peaks}")
    write_result(args.out, {"machine": machine(), "overrides": args.overrides, "rows": rows})


if __name__ == "__main__":
    main()
