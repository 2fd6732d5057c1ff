"""The "EASE + intent" rival against the model's checkpoints, per family, on the test split (issue 13 point 3).

Run:  python benchmarks/intent_rival.py RUN [CHECKPOINT ...] [--out FILE] [--set KEY=VALUE ...]

The rival: EASE's scores of the seed set (the run's tuned lambda), standardised per request over the items it
allows, plus w times the intent count (`catalog.intent.IntentIndex.scores`: how many of the values every seed
shares, attribute values and the decade, each item has), behind the shared hard-constraint post-filter. w is tuned
on the validation requests: once with the families pooled (one w, as a practitioner who does not know a request's
family would) and once per family (the stronger rival; the table's differences are to this one, which with w=0 in
the grid is never below EASE's validation score). Each CHECKPOINT (relative to RUN, default most.safetensors and
h2po.safetensors where present) is scored on the same test requests with greedy lists (`pipeline.request_ndcg`);
the table gives NDCG@10 per family with 95% intervals over users and the paired difference model - rival.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from harness import format_rows, machine, output_file, write_result

from app import pipeline
from catalog.intent import IntentIndex
from catalog.requests import valid_mask
from core.config import load_config
from core.numerics import masked_zscore
from evaluation.baselines import EASE, best_k
from evaluation.metrics import bootstrap_ci, item_mask, paired_bootstrap, ranking_metrics
from evaluation.report import example_groups
from learner.checkpoint import load_checkpoint, read_header

WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 50.0)
CHUNK = 512


def rival_ndcg(ease: EASE, intent: IntentIndex, examples: list, weights: tuple[float, ...], k: int) -> np.ndarray:
    """(len(weights), R) NDCG@10 of top-k lists of z-scored EASE + w * intent count (valid items only)."""
    cat = ease.catalog
    out = np.zeros((len(weights), len(examples)))
    for start in range(0, len(examples), CHUNK):
        part = examples[start:start + CHUNK]
        raw = ease.scores(part)  # (R, N)
        allowed = np.stack([valid_mask(cat, e.request) for e in part])
        z = masked_zscore(raw, allowed)
        boost = intent.scores([e.request.seeds for e in part])
        relevant = item_mask([e.targets for e in part], cat.n_items)
        for j, w in enumerate(weights):
            lists = best_k(np.where(allowed, z + w * boost, -np.inf), k)
            out[j, start:start + len(part)] = ranking_metrics(lists, relevant, [10])["ndcg@10"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run directory (its MOST checkpoint's config is the base)")
    parser.add_argument("checkpoints", nargs="*", help="checkpoints relative to RUN")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=output_file)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    run = Path(args.run)
    base = json.loads(read_header(run / "most.safetensors")["config"]) if (run / "most.safetensors").is_file() \
        else None
    ws = pipeline.prepare(load_config(None, [*args.set, f"out_dir={run}"], base=base))
    ease = EASE(ws.data.catalog, ws.data.train_matrix, pipeline.ease_lambda(ws))
    intent, k = IntentIndex(ws.data.catalog), ws.cfg.requests.k
    val, test = pipeline.examples(ws, "val"), pipeline.examples(ws, "test")
    val_ndcg = rival_ndcg(ease, intent, val, WEIGHTS, k)
    family = np.array([e.family for e in val])
    tuning = {f: {w: float(val_ndcg[j, family == f].mean()) for j, w in enumerate(WEIGHTS)} for f in "AB"}
    tuning["pooled"] = {w: float(val_ndcg[j].mean()) for j, w in enumerate(WEIGHTS)}
    for name, table in tuning.items():
        print(f"validation NDCG@10 by w ({name}): " + ", ".join(f"{w:g}: {v:.4f}" for w, v in table.items()))
    w = {name: max(table, key=table.get) for name, table in tuning.items()}
    pooled, per_a, per_b = rival_ndcg(ease, intent, test, (w["pooled"], w["A"], w["B"]), k)
    test_a = np.array([e.family == "A" for e in test])
    scores = {f"EASE+intent (per family: A w={w['A']:g}, B w={w['B']:g})": np.where(test_a, per_a, per_b),
              f"EASE+intent (pooled w={w['pooled']:g})": pooled}
    names = args.checkpoints or [p for p in ("most.safetensors", "h2po.safetensors") if (run / p).is_file()]
    for name in names:
        scores[name] = pipeline.request_ndcg(ws, test, load_checkpoint(run / name, ws.data.catalog)[0])
    users = np.array([e.user for e in test])
    rival = next(iter(scores.values()))
    rows, result = [], {}
    for group, idx in example_groups(test).items():
        for name, values in scores.items():
            mean, lo, hi = bootstrap_ci(values[idx], args.bootstrap, 1, users[idx])
            d, dlo, dhi = paired_bootstrap(values[idx], rival[idx], args.bootstrap, 1, users[idx])
            result.setdefault(group, {})[name] = {"ndcg@10": mean, "ci": [lo, hi], "vs_rival": d,
                                                  "vs_rival_ci": [dlo, dhi], "n": len(idx)}
            rows.append([group, name, len(idx), f"{mean:.4f} [{lo:.4f}, {hi:.4f}]",
                         f"{d:+.4f} [{dlo:+.4f}, {dhi:+.4f}]"])
    print(format_rows(["group", "method", "n", "NDCG@10 [95% CI]", "- rival [95% CI]"], rows))
    write_result(args.out, {"machine": machine(), "run": str(run), "w": w, "tuning": tuning, "results": result})


if __name__ == "__main__":
    main()
