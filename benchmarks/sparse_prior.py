"""Quality of the sparse prior against the dense one (issue 16 point 1), NDCG@10 on validation and test requests.

Run:  PYTHONPATH=. python benchmarks/sparse_prior.py [--grid 50 100 200 500 1000] [--popular 1000 3000]
      [--no-models] [--prior ease|ease+intent] [--splits val test] [--out results.json] [-- key=value ...]

On the configured catalog (the default: ml-latest-small) with the run's EASE lambda (tuned on validation and cached
in --workdir/ease.json, as `h2po run` does), every method ranks the same requests of each split:
- "EASE dense": exact EASE, the dense (N, N) B (the reference of every paired difference);
- "EASE top-m": the same B truncated to each item's m largest entries (core.numerics.top_neighbours), for m in
  --grid: what the model's prior, MOST's targets and the rewards now use;
- "EASE P=p": the large-N approximation of evaluation/neighbours.py forced onto this catalog: exact EASE on the p
  most popular items and scaled item-kNN for the others, m = model.prior_neighbours (what EASE does above
  model.prior_items warm items);
- "prior m=...": the untrained model with model.zero_head=true and model.prior=ease (or --prior), whose logits are
  exactly its prior (b_i = 0, W_o = 0), through the real greedy sampler; "prior dense" keeps every entry (m = N:
  the values of the former dense fp16 prior buffer), the second reference.
Each group (families A and B) gets NDCG@10 with its 95% bootstrap interval over users and the paired difference to
each reference (evaluation/report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import subprocess
import time

from harness import add_common_arguments, machine, set_threads, workspace, write_result

from evaluation.baselines import EASE, NeighbourScores
from evaluation.report import evaluate_methods, format_table
from learner.workspace import Workspace, build_model, ease_lambda, examples, model_recommender
from model.transformer import Retriever

DENSE, PRIOR_DENSE = "EASE dense", "prior dense"


def prior_model(ws: Workspace, ease: EASE, m: int, prior: str) -> Retriever:
    """The untrained zero-head model whose logits are its (top-m) EASE prior (+ the intent counts)."""
    model_cfg = dataclasses.replace(ws.cfg.model, prior=prior, zero_head=True, prior_neighbours=m)
    return build_model(dataclasses.replace(ws, cfg=dataclasses.replace(ws.cfg, model=model_cfg)), ease)


def methods_of(ws: Workspace, ease: EASE, args: argparse.Namespace) -> dict:
    """{name: examples -> (R, k) lists} of every compared method."""
    cat, k, n = ws.data.catalog, ws.cfg.requests.k, ws.data.catalog.n_items
    methods = {DENSE: functools.partial(ease.recommend, k=k)}
    for m in args.grid:
        methods[f"EASE top-{m}"] = functools.partial(NeighbourScores(cat, ease.neighbours(m)).recommend, k=k)
    for p in args.popular:
        approx = EASE(cat, ws.data.train_matrix, ease.lam, popular=p, neighbours=ws.cfg.model.prior_neighbours)
        methods[f"EASE P={p} m={ws.cfg.model.prior_neighbours}"] = functools.partial(approx.recommend, k=k)
    if args.models:
        for m in [*(args.model_grid or args.grid), n]:
            name = PRIOR_DENSE if m == n else f"prior m={m}"
            methods[name] = model_recommender(ws, prior_model(ws, ease, m, args.prior))
    return methods


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs="+", default=[50, 100, 200, 500, 1000], help="neighbours m")
    parser.add_argument("--popular", type=int, nargs="*", default=[1000, 3000],
                        help="P of the forced large-N approximation (none: skip)")
    parser.add_argument("--no-models", dest="models", action="store_false", help="EASE lists only")
    parser.add_argument("--model-grid", type=int, nargs="*", help="the models' m (default: --grid)")
    parser.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    parser.add_argument("--prior", default="ease", choices=["ease", "ease+intent"], help="the models' model.prior")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip())
    ws = workspace(args)
    threads = set_threads(args.threads)
    lam = ease_lambda(ws)
    start = time.time()
    ease = EASE(ws.data.catalog, ws.data.train_matrix, lam)
    methods = methods_of(ws, ease, args)
    print(f"EASE lambda {lam:g}; N={ws.data.catalog.n_items}; {len(methods)} methods built in "
          f"{time.time() - start:.0f}s ({threads} threads)")
    results = {}
    for split in args.splits:
        requests = examples(ws, split)
        results[split] = evaluate_methods(methods, requests, ws.data, ws.cfg.eval, (DENSE, PRIOR_DENSE),
                                          features=ws.features)
        results[split] = {g: r for g, r in results[split].items() if "/" not in g}  # families A and B
        print(f"\n##### {split} ({len(requests)} requests)\n{format_table(results[split])}")
    result = {"benchmark": "sparse_prior", "machine": machine(), "commit": commit, "uncommitted_changes": dirty,
              "ease_lambda": lam,
              "n_items": ws.data.catalog.n_items, "grid": args.grid, "popular": args.popular,
              "prior_neighbours": ws.cfg.model.prior_neighbours, "models_prior": args.prior, "results": results}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
