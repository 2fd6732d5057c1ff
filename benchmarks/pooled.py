"""H2PO - MOST averaged over several H2PO runs on the same test requests: the mean effect over training runs.

Run:  python benchmarks/pooled.py RUN[:POLICY] RUN[:POLICY] ... [--out FILE] [--set KEY=VALUE ...]

Each RUN is a run directory holding most.safetensors (its MOST start) and an H2PO policy: `h2po.safetensors`, or
POLICY relative to RUN (`ablation/on/h2po.safetensors` for an ablation variant). Every run's MOST and policy are
scored on the test split with the config of its MOST checkpoint and the `--set` overrides (greedy lists, NDCG@10
per request, as `app.pipeline.run_evaluation` does; `--set eval.test_draws=5` scores five requests per user and
group); the runs must share the test requests (the same data split and request seed), which is checked. The
per-request differences H2PO - MOST are averaged over the runs, and the mean gets the evaluation's paired bootstrap
interval over users (a user's requests are resampled together). The interval covers the test users' sampling; the
spread between runs is printed next to it (its standard error over the runs is what the training randomness adds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from harness import format_rows, machine, output_file, write_result

from app import pipeline
from evaluation.metrics import paired_bootstrap
from evaluation.report import example_groups
from learner.checkpoint import config_from_checkpoint, load_checkpoint


def run_differences(run: Path, policy: Path, overrides: list[str] = ()) -> tuple[np.ndarray, list]:
    """(per-request NDCG@10 of the policy - of MOST, the test examples) of one run directory."""
    ws = pipeline.prepare(config_from_checkpoint(run / "most.safetensors", None, [*overrides, f"out_dir={run}"],
                                                 rewards=False))
    test = pipeline.examples(ws, "test")

    def ndcg(checkpoint: Path) -> np.ndarray:
        return pipeline.request_ndcg(ws, test, load_checkpoint(checkpoint, ws.data.catalog)[0])
    return ndcg(policy) - ndcg(run / "most.safetensors"), test


def pool(diffs: dict[str, np.ndarray], test: list, n_boot: int, seed: int) -> dict[str, dict]:
    """{group: {per run's mean, pooled mean + 95% CI over users, between-run sd}} of the (runs, R) differences."""
    users = np.array([e.user for e in test])
    mean = np.mean(list(diffs.values()), axis=0)
    out = {}
    for group, rows in example_groups(test).items():
        per_run = {name: float(d[rows].mean()) for name, d in diffs.items()}
        d, lo, hi = paired_bootstrap(mean[rows], np.zeros(len(rows)), n_boot, seed, users[rows])
        out[group] = {"runs": per_run, "mean": d, "ci": [lo, hi], "n": len(rows),
                      "sd_between_runs": float(np.std(list(per_run.values()), ddof=1)) if len(diffs) > 1 else 0.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN[:POLICY]", help="run directory, optionally :policy path")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (users)")
    parser.add_argument("--out", type=output_file, help="write the results as JSON here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of every run's scoring (repeatable), e.g. eval.test_draws=5")
    args = parser.parse_args()
    diffs, test = {}, None
    for spec in args.runs:
        run, _, policy = spec.partition(":")
        run = Path(run)
        policy = run / (policy or "h2po.safetensors")
        if not (run / "most.safetensors").is_file() or not policy.is_file():
            parser.error(f"{spec}: needs {run / 'most.safetensors'} and {policy}")
        diffs[spec], examples = run_differences(run, policy, args.set)
        if test is not None and examples != test:
            parser.error(f"{spec}: other test requests than {args.runs[0]} (another data split or request seed)")
        test = examples
    result = pool(diffs, test, args.bootstrap, seed=1)
    rows = [[group, r["n"], *(f"{v:+.4f}" for v in r["runs"].values()), f"{r['mean']:+.4f}",
             f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]", f"{r['sd_between_runs']:.4f}"] for group, r in result.items()]
    print(format_rows(["group", "n", *(f"run {i + 1}" for i in range(len(diffs))), "mean", "95% CI (users)",
                       "sd over runs"], rows))
    print("runs: " + ", ".join(f"{i + 1} = {spec}" for i, spec in enumerate(diffs)))
    write_result(args.out, {"machine": machine(), "runs": list(diffs), "results": result})


if __name__ == "__main__":
    main()
