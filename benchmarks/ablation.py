"""On-policy only vs off-policy only vs hybrid H2PO from the same MOST checkpoint with the same budget.

Run:  python benchmarks/ablation.py --run runs/default [--steps 40] [--variants hybrid,on,off] [--out FILE]
      [key=value ...]

`--run DIR` is a run directory of `h2po run` (it holds most.safetensors and preferences.parquet). Each
variant is a real distributed run (`actors.driver.train`: local Ray, DeepSpeed learner ranks, async mode) of
`--steps` learner steps into DIR/ablation/<variant>, with the run's config plus the overrides:
- hybrid: rollouts (h2po.batch_requests requests x h2po.group_size) and logged pairs (system.pairs_per_step);
- on: rollouts only (no preference file);
- off: logged pairs only (the hybrid's pairs per step, h2po.batch_requests=0: no rollouts).
Afterwards MOST and every variant are evaluated on the test split (`h2po.pipeline.run_evaluation`): the
printed table has each variant's NDCG@10 with its paired bootstrap difference to MOST and to EASE, plus the
wall time of each variant's training. The dashboard is off and no report is written for these runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from actors.driver import train
from catalog.schema import atomic_write
from h2po import pipeline
from h2po.config import load_config
from learner.checkpoint import load_checkpoint, read_header

VARIANTS = ("hybrid", "on", "off")


def run_variant(run: Path, name: str, steps: int, overrides: list[str]) -> tuple[Path, float]:
    """Train one variant into run/ablation/name.  -> (policy checkpoint, seconds)"""
    base = json.loads(read_header(run / "most.safetensors")["config"])
    fixed = [f"out_dir={run / 'ablation' / name}", "dashboard.enabled=false", "dashboard.report=false",
             "h2po.eval_every=0", "h2po.max_minutes=0"]
    cfg = load_config(None, [*fixed, *overrides], base=base)
    if name == "off":  # the hybrid's pairs per step, no rollouts
        pairs = cfg.h2po.batch_requests if cfg.system.pairs_per_step < 0 else cfg.system.pairs_per_step
        cfg = dataclasses.replace(cfg, h2po=dataclasses.replace(cfg.h2po, batch_requests=0),
                                  system=dataclasses.replace(cfg.system, pairs_per_step=pairs))
    prefs = None if name == "on" else run / "preferences.parquet"
    start = time.time()
    result = train(cfg, run / "most.safetensors", prefs, steps, "async")
    return result.checkpoint, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory of `h2po run` (most.safetensors, preferences)")
    parser.add_argument("--steps", type=int, default=40, help="learner steps per variant (the shared budget)")
    parser.add_argument("--variants", default="hybrid,on,off", help="comma-separated subset of hybrid,on,off")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every variant")
    args = parser.parse_args()
    run, names = Path(args.run), args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown or not (run / "most.safetensors").is_file() or not (run / "preferences.parquet").is_file():
        parser.error(f"need --run with most.safetensors and preferences.parquet, variants from {list(VARIANTS)}")
    trained = {name: run_variant(run, name, args.steps, args.overrides) for name in names}
    cfg = load_config(None, [f"out_dir={run}"], base=json.loads(read_header(run / "most.safetensors")["config"]))
    ws = pipeline.prepare(cfg)
    models = {"MOST": load_checkpoint(run / "most.safetensors", ws.data.catalog)[0]}
    models.update({name: load_checkpoint(path, ws.data.catalog)[0] for name, (path, _) in trained.items()})
    report = pipeline.run_evaluation(ws, models, pipeline.ease_lambda(ws))
    seconds = {name: s for name, (_, s) in trained.items()}
    print("training wall time (s): " + ", ".join(f"{n} {s:.0f}" for n, s in seconds.items()))
    if args.out:
        value = {"steps": args.steps, "overrides": args.overrides, "seconds": seconds, "results": report["results"]}
        atomic_write(Path(args.out), lambda p: p.write_text(json.dumps(value, indent=2)))


if __name__ == "__main__":
    main()
