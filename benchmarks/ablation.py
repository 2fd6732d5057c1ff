"""On-policy only vs off-policy only vs hybrid H2PO from the same MOST checkpoint with the same budget.

Run:  python benchmarks/ablation.py --run runs/default [--steps 40] [--variants hybrid,on,off] [--out FILE]
      [key=value ...]

`--run DIR` is a run directory of `h2po run` (it holds most.safetensors and preferences.parquet). Each
variant is a real distributed run (`actors.driver.train`: local Ray, DeepSpeed learner ranks, async mode) of
`--steps` learner steps into DIR/ablation/<variant>, with the run's config plus the overrides:
- hybrid: rollouts (h2po.batch_requests requests x h2po.group_size) and logged pairs (h2po.pairs_per_step,
  or h2po.batch_requests when that is -1 or 0: the main job's config trains on-policy only);
- on: rollouts only (no preference file);
- off: logged pairs only (the hybrid's pairs per step, h2po.batch_requests=0: no rollouts).
Afterwards MOST and every variant are evaluated on the test split (`app.pipeline.run_evaluation`): the
printed table has each variant's NDCG@10 with its paired bootstrap difference to MOST and to EASE, plus the
wall time of each variant's training. The dashboard, validation probes and train-state checkpoints are off.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from harness import add_run_arguments, h2po_run_config, machine, write_result

from actors.driver import train
from app import pipeline
from core.config import RunConfig
from learner.checkpoint import load_checkpoint

VARIANTS = ("hybrid", "on", "off")


def variant_config(cfg: RunConfig, name: str) -> RunConfig:
    """The config of one variant from the run's config: logged pairs per step as configured, or
    h2po.batch_requests when it has none (-1 or 0); `off` samples no rollouts; `on` reads no pairs (run_variant)."""
    if name == "on":
        return cfg
    pairs = cfg.h2po.pairs() or cfg.h2po.batch_requests
    h2po = dataclasses.replace(cfg.h2po, pairs_per_step=pairs, batch_requests=0 if name == "off" else
                               cfg.h2po.batch_requests)
    return dataclasses.replace(cfg, h2po=h2po)


def run_variant(cfg: RunConfig, run: Path, name: str, steps: int) -> tuple[Path, float]:
    """Train one variant (cfg: the run's config).  -> (policy checkpoint, seconds)"""
    prefs = None if name == "on" else run / "preferences.parquet"
    start = time.time()
    result = train(variant_config(cfg, name), run / "most.safetensors", prefs, steps)
    return result.checkpoint, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(parser, steps=40)
    parser.add_argument("--variants", default="hybrid,on,off", help="comma-separated subset of hybrid,on,off")
    args = parser.parse_args()
    run, names = Path(args.run), args.variants.split(",")
    if set(names) - set(VARIANTS):
        parser.error(f"--variants: choose from {list(VARIANTS)}")
    trained = {name: run_variant(h2po_run_config(parser, run, run / "ablation" / name, args.overrides), run, name,
                                 args.steps) for name in names}
    ws = pipeline.prepare(h2po_run_config(parser, run, run, args.overrides))
    models = {"MOST": load_checkpoint(run / "most.safetensors", ws.data.catalog)[0]}
    models.update({name: load_checkpoint(path, ws.data.catalog)[0] for name, (path, _) in trained.items()})
    report = pipeline.run_evaluation(ws, models, pipeline.ease_lambda(ws))
    seconds = {name: s for name, (_, s) in trained.items()}
    print("training wall time (s): " + ", ".join(f"{n} {s:.0f}" for n, s in seconds.items()))
    write_result(args.out, {"machine": machine(), "steps": args.steps, "overrides": args.overrides,
                            "seconds": seconds, "results": report["results"]})


if __name__ == "__main__":
    main()
