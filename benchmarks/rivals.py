"""The rivals' table: every rival tuned on validation, then scored on the test split per family and seed size.

Run:  python benchmarks/rivals.py [--config configs/default.yaml] [--workdir runs/default] [--models] [--out FILE]
                                  [key=value ...]

Tunes every rival of `evaluation/rivals.py` on the validation requests (or reads the tuning that WORKDIR/rivals.json
cached for the same data and settings: `h2po run` writes it into its run directory too), fits them, and prints the
table of `app.pipeline.run_evaluation` with the baselines, the rivals and the best rival per family (chosen on
validation), each with its 95% bootstrap interval over users and its paired NDCG@10 difference to EASE and to the
best rival. `--models` adds the MOST / H2PO checkpoints found in WORKDIR (most.safetensors, h2po.safetensors), so
their differences to the best rival are in the same table. This is the command behind the README's rival table; it
prints how long tuning and fitting took (wall clock: on a loaded machine it is longer, the figures are not).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness import add_common_arguments, machine, set_threads, workspace, write_result

from app import pipeline
from learner.checkpoint import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--models", action="store_true",
                        help="also score WORKDIR/most.safetensors and WORKDIR/h2po.safetensors when present")
    args = parser.parse_args()
    set_threads(args.threads)
    start = time.time()
    ws = workspace(args)
    lam = pipeline.ease_lambda(ws)
    models = {}
    if args.models:
        for name, file in (("MOST", "most.safetensors"), ("H2PO", "h2po.safetensors")):
            if (Path(args.workdir) / file).is_file():
                models[name] = load_checkpoint(Path(args.workdir) / file, ws.data.catalog)[0]
    report = pipeline.run_evaluation(ws, models, lam)
    report["machine"], report["total_seconds"] = machine(), time.time() - start
    print(f"rivals benchmark done in {report['total_seconds']:.0f}s (models: {', '.join(models) or 'none'})")
    write_result(args.out, report)


if __name__ == "__main__":
    main()
