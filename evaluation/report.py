"""Benchmark tables: every method on the same examples, per family and per seed size, with bootstrap CIs.

`evaluate_methods` runs each method's `recommend(examples) -> (R, k)` once, computes the per-request metrics
of `evaluation/metrics.py` and summarises them per group: "A", "B" (families, seed sizes pooled) and "A/s=3",
"A/s=5", ... (one seed size). Each metric gets its mean and a 95% bootstrap interval (`"ndcg@10"`,
`"ndcg@10_ci"`); coverage is a scalar of the group's lists. Non-reference methods also get the paired
bootstrap difference of NDCG@min(ks) to each reference (`"ndcg@10_vs_EASE"`, `"ndcg@10_vs_EASE_ci"`). The
bootstrap resamples users, not requests: a group holds several requests of each user (one per seed size and
test draw), which are not independent. All methods share the resample indices (same seed), so their intervals are
comparable.

Example:
    baselines = build_baselines(data, features, cfg.eval, ease_lambda)
    methods = {name: functools.partial(b.recommend, k=20) for name, b in baselines.items()}
    print(format_table(evaluate_methods(methods, test_examples, data, cfg.eval, features=features)))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from catalog.dataset import Dataset
from catalog.features import item_features
from core.carriers import Example
from core.config import EvalConfig
from core.table import cell
from evaluation.metrics import bootstrap_ci, coverage, list_metrics, paired_bootstrap

Recommender = Callable[[Sequence[Example]], np.ndarray]


def example_groups(examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """{"A": rows, "A/s=3": rows, ..., "B": rows, ...}: example indices per family and per (family, seed size)."""
    keys = sorted({(e.family, e.seed_size) for e in examples})
    groups: dict[str, np.ndarray] = {}
    for family in sorted({f for f, _ in keys}):
        groups[family] = np.array([i for i, e in enumerate(examples) if e.family == family])
        for _, size in (key for key in keys if key[0] == family):
            groups[f"{family}/s={size}"] = np.array([i for i, e in enumerate(examples)
                                                     if e.family == family and e.seed_size == size])
    return groups


def summarise(values: dict[str, np.ndarray], lists: np.ndarray, n_items: int, n_boot: int, seed: int,
              users: np.ndarray) -> dict[str, object]:
    """{metric: mean, metric_ci: [lo, hi], coverage, n} for one method on one group of requests (`users` (R,):
    the bootstrap resamples users)."""
    out: dict[str, object] = {"n": len(lists)}
    for name, per_request in values.items():
        mean, lo, hi = bootstrap_ci(per_request, n_boot, seed, users)
        out[name], out[f"{name}_ci"] = mean, [lo, hi]
    out["coverage"] = coverage(lists, n_items)
    return out


def evaluate_methods(methods: dict[str, Recommender], examples: Sequence[Example], data: Dataset,
                     cfg: EvalConfig, references: Sequence[str] = ("EASE",),
                     features: np.ndarray | None = None,
                     composites: dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, dict[str, object]]]:
    """{group: {method: {metric: value}}} for every method on `examples` (see the module docstring).

    `features` (N, F) are the item features of ILD; computed with `item_features(data)` when not given.
    `composites` {name: {family: method}} adds rows whose lists are, for each request, those of the method named
    for its family (e.g. "best rival", chosen per family on validation); they may serve as references.
    """
    if not examples:
        raise ValueError("evaluate_methods needs at least one example")
    features = item_features(data) if features is None else features
    lists: dict[str, np.ndarray] = {}  # name -> (R, k); a recommender given under two names runs once
    for name, recommend in methods.items():
        twin = next((other for other in lists if methods[other] is recommend), None)
        lists[name] = lists[twin] if twin else np.asarray(recommend(examples))
    for name, chosen in (composites or {}).items():
        lists[name] = np.stack([lists[chosen[e.family]][r] for r, e in enumerate(examples)])  # (R, k)
    values = {name: list_metrics(lists[name], examples, data, features, cfg.ks) for name in lists}
    primary = f"ndcg@{min(cfg.ks)}"
    seed = cfg.request_seed
    users = np.array([e.user for e in examples])
    results: dict[str, dict[str, dict[str, object]]] = {}
    for group, rows in example_groups(examples).items():
        results[group] = {}
        for name in lists:
            group_values = {metric: v[rows] for metric, v in values[name].items()}
            summary = summarise(group_values, lists[name][rows], data.catalog.n_items, cfg.bootstrap, seed,
                                users[rows])
            for reference in [r for r in references if r in lists and r != name]:
                d, lo, hi = paired_bootstrap(group_values[primary], values[reference][primary][rows],
                                             cfg.bootstrap, seed, users[rows])
                summary[f"{primary}_vs_{reference}"], summary[f"{primary}_vs_{reference}_ci"] = d, [lo, hi]
            results[group][name] = summary
    return results


RECALL_NOTE = "Rmin@K = Recall@K (min-normalised): hits in the top K / min(K, |targets|), not / |targets|."
COLUMNS = [  # (header, key, width)
    ("Rmin@10", "recall_min@10", 7), ("Rmin@20", "recall_min@20", 7), ("HR@10", "hit@10", 6), ("NDCG@20", "ndcg@20", 8),
    ("sat", "constraint_sat", 6), ("dup", "duplicates", 6), ("leak", "seed_leak", 6), ("ILD", "ild", 6),
    ("nov", "novelty", 6), ("cov", "coverage", 6),
]


def _cell(summary: dict[str, object], key: str, width: int, with_ci: bool = False) -> str:
    return cell(summary, key, with_ci).rjust(width)


def format_table(results: dict[str, dict[str, dict[str, object]]]) -> str:
    """A fixed-width text table per group: methods as rows, NDCG@10 with CI first, then the other metrics, then
    one paired-difference column per reference method; `RECALL_NOTE` at the end."""
    blocks = []
    for group, by_method in results.items():
        vs_keys = list(dict.fromkeys(k for s in by_method.values() for k in s if "_vs_" in k and not k.endswith("_ci")))
        name_width = max(12, *(len(m) for m in by_method))
        n = next(iter(by_method.values()))["n"]
        header = f"{'method':<{name_width}} {'NDCG@10 [95% CI]':>22}" + "".join(f" {h:>{w}}" for h, _, w in COLUMNS)
        widths = {key: max(27, len(key) + 12) for key in vs_keys}  # "best rival" is longer than "EASE"
        for key in vs_keys:
            metric, reference = key.split("_vs_")
            header += f" {f'd{metric.upper()} vs {reference} [95% CI]':>{widths[key]}}"
        lines = [f"== {group} (n={n}) ==", header]
        for method, summary in by_method.items():
            row = f"{method:<{name_width}} {_cell(summary, 'ndcg@10', 22, with_ci=True)}"
            row += "".join(f" {_cell(summary, key, w)}" for _, key, w in COLUMNS)
            row += "".join(f" {_cell(summary, key, widths[key], with_ci=True)}" for key in vs_keys)
            lines.append(row)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + f"\n\n{RECALL_NOTE}"
