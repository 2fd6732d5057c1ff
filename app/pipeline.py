"""The single-machine job, as plain calls: prepare data -> EASE prior -> MOST pretraining -> logged preferences ->
H2PO (`actors.driver.train`, on a local Ray instance) -> evaluation.

Every stage writes into the run directory (`cfg.out_dir`): `catalog/` (Parquet + the dataset's LICENSE.txt),
`ease.json` (tuned lambda), `folds.safetensors` (the out-of-fold EASE priors of model.prior_folds, which MOST and
H2PO train on), `most.safetensors` (best-validating checkpoint; `complete: false` in its meta until the pretraining
ends), `pretrain.json` (curve; its presence marks a finished pretraining, which a later run with the same
data/model/MOST settings reuses), `preferences.parquet` (logged pairs), `h2po.safetensors` + `metrics.jsonl` +
`report.html` (H2PO), `results.json` (the comparison table). Files are written atomically.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

from catalog.behaviour import generate_preferences
from catalog.dataset import license_note
from catalog.preferences import ValidationReport, read_preferences, write_preferences
from core.carriers import Example
from core.config import config_from_dict, config_to_dict
from core.errors import UserError
from evaluation.baselines import EASE, CentroidKNN, build_baselines
from evaluation.report import evaluate_methods, format_table
from evaluation.rivals import Rivals, best_per_family, load_or_tune
from evaluation.tuning import ValidationSet
from learner.checkpoint import finish_checkpoint, read_header, save_checkpoint
from learner.pretrain import PretrainResult, pretrain
from learner.workspace import (  # noqa: F401 (re-exported: the CLI and the benchmarks call pipeline.X)
    Workspace,
    build_model,
    ease_lambda,
    examples,
    fit_ease,
    model_recommender,
    prepare,
    prior_neighbours,
    training_folds,
    request_ndcg,
    validation_score,
    write_json,
)
from model.transformer import Retriever


def validation_requests(ws: Workspace) -> list[Example]:
    """MOST's validation requests: `most.val_requests` of those of `most.val_draws`, a subset drawn with
    eval.request_seed (as the requests themselves), so runs that differ only in their training seed validate on the
    same requests."""
    val = examples(ws, "val", ws.cfg.most.val_draws)
    rng = np.random.default_rng(ws.cfg.eval.request_seed)
    return [val[i] for i in sorted(rng.permutation(len(val))[: ws.cfg.most.val_requests])]


def run_pretrain(ws: Workspace, ease: EASE) -> tuple[Path, PretrainResult]:
    """MOST pretraining; the best-validating checkpoint is written to out_dir/most.safetensors."""
    cfg = ws.cfg
    model = build_model(ws, ease)
    val = validation_requests(ws)
    path = ws.out_dir / "most.safetensors"
    (ws.out_dir / "pretrain.json").unlink(missing_ok=True)  # present again only once this pretraining finishes
    save = functools.partial(_save_best, ws, path)
    relevance = model.prior if model.prior is not None else prior_neighbours(ws, ease)  # MOST's target relevance
    result = pretrain(model, ws.data, ws.vocab, ws.unit_features, relevance, cfg.requests, cfg.most, cfg.seed,
                      functools.partial(validation_score, ws, val), save, validate_start=cfg.model.zero_head,
                      folds=training_folds(ws, ease.lam))
    finish_checkpoint(path, {"steps": result.steps, "stopped_by": result.stopped_by})
    write_json(ws.out_dir / "pretrain.json", {"steps": result.steps, "best_step": result.best_step,
                                              "best_val_ndcg@10": result.best_score, "seconds": result.seconds,
                                              "samples_per_second": result.samples_per_second,
                                              "stopped_by": result.stopped_by, "val_requests": len(val),
                                              "history": result.history})
    return path, result


# the config sections a MOST checkpoint depends on (sampler: validation lists; eval: the tuned EASE prior's lambdas
# and the validation requests)
MOST_KEYS = ("seed", "data", "requests", "model", "most", "sampler", "eval")


def most_settings(config: dict) -> dict:
    """The part of a config dict (`config_to_dict`) that a MOST checkpoint made with it depends on: MOST_KEYS,
    less eval.test_draws and eval.rival* (they only score the test split) and most.max_minutes (a safety net: a
    pretraining it ended is not reused, `reusable_most`)."""
    out = {key: config.get(key) for key in MOST_KEYS}
    out["eval"] = {k: v for k, v in (out["eval"] or {}).items() if k != "test_draws" and not k.startswith("rival")}
    out["most"] = {k: v for k, v in (out["most"] or {}).items() if k != "max_minutes"}
    return out


def reusable_most(ws: Workspace) -> Path | None:
    """OUT_DIR/most.safetensors when a finished pretraining (pretrain.json) that its steps ended, not the clock,
    made it with this run's settings."""
    path, record = ws.out_dir / "most.safetensors", ws.out_dir / "pretrain.json"
    if not (path.is_file() and record.is_file()) or json.loads(record.read_text()).get("stopped_by") == "max_minutes":
        return None
    header = read_header(path)
    made = config_to_dict(config_from_dict(json.loads(header["config"])))  # keys added since take their defaults
    same = most_settings(made) == most_settings(config_to_dict(ws.cfg))
    return path if same and header["catalog"] == ws.data.catalog.fingerprint else None


def make_preferences(ws: Workspace, out: Path) -> ValidationReport:
    """Logged preference pairs from the configured behaviour policy on the training users (DESIGN section 5),
    written to `out` and re-read with the validating reader.  -> the reader's report"""
    pc, data = ws.cfg.preferences, ws.data
    if pc.noise <= 0 or pc.pairs_per_user < 1:
        raise UserError("preferences.noise must be > 0 and preferences.pairs_per_user >= 1")
    scorer = fit_ease(ws, ease_lambda(ws)) if pc.behaviour == "ease" \
        else CentroidKNN(data.catalog, ws.features)
    source = f"{pc.behaviour} gumbel-top-k noise={pc.noise:g} seed={pc.seed}"
    table, stats = generate_preferences(data, scorer, pc.pairs_per_user, pc.noise, ws.cfg.requests.k, pc.seed,
                                        source, requests=ws.cfg.requests, progress=True)
    write_preferences(table, Path(out))
    print(f"{stats.summary()}; written to {out}")
    reader = read_preferences(out, data.catalog)
    for _ in reader:
        pass
    print(reader.report.summary())
    return reader.report


def _save_best(ws: Workspace, path: Path, model: Retriever, record: dict) -> None:
    save_checkpoint(path, model, ws.cfg, ws.data.catalog, {**record, "complete": False})  # until finish_checkpoint


def rival_baselines(ws: Workspace, ease: EASE) -> dict:
    """The rivals of evaluation/rivals.py, fitted with their validation-tuned parameters. OUT_DIR/rivals.json
    caches the tuning, keyed by the data, the requests and the rival settings (a change retunes)."""
    ec, cat = ws.cfg.eval, ws.data.catalog
    rivals = Rivals(ws.data, ec.rival_grids, ec.rival_extensions, ec.rival_eval_every, ease, ws.cfg.seed,
                    threads=torch.get_num_threads())
    key = {"catalog": cat.fingerprint, "positive_threshold": ws.cfg.data.positive_threshold,
           "split_seed": ws.cfg.data.split_seed, "requests": config_to_dict(ws.cfg.requests),
           "request_seed": ec.request_seed, "seed": ws.cfg.seed, "ease_lambda": ease.lam, "grids": ec.rival_grids,
           "extensions": ec.rival_extensions, "eval_every": ec.rival_eval_every}
    start = time.time()
    built = rivals.build(load_or_tune(rivals, ValidationSet(cat, examples(ws, "val")), ws.out_dir / "rivals.json",
                                      key))
    print(f"rivals tuned (or read from {ws.out_dir / 'rivals.json'}) and fitted in {time.time() - start:.0f}s")
    return built


def same_weights(a: Retriever, b: Retriever) -> bool:
    """Whether two models have the same config and the same tensors under the same names, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    return a.cfg == b.cfg and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def run_evaluation(ws: Workspace, models: dict[str, Retriever], ease_lam: float, out: Path | None = None) -> dict:
    """Baselines, rivals and models on the test split: results dict (also written to `out`) and the printed table.
    Every method gets its paired NDCG@10 difference to EASE, to MOST when it is among the models, and to the best
    rival of each family (chosen on validation NDCG@10 among the baselines and rivals) when the rivals are on."""
    test = examples(ws, "test")
    baselines = build_baselines(ws.data, ws.features, ws.cfg.eval, ease_lam, ws.cfg.model.prior_items,
                                ws.cfg.model.prior_neighbours)
    best: dict[str, str] = {}
    if ws.cfg.eval.rivals:
        baselines.update(rival_baselines(ws, baselines["EASE"]))
        best, _ = best_per_family(baselines, ValidationSet(ws.data.catalog, examples(ws, "val")), ws.cfg.requests.k)
        print("best rival per family (validation NDCG@10): " + ", ".join(f"{f}: {m}" for f, m in best.items()))
    methods = {name: functools.partial(b.recommend, k=ws.cfg.requests.k) for name, b in baselines.items()}
    for name, model in models.items():  # a model with another's weights (H2PO that kept its start) shares its lists
        twin = next((other for other in methods if other in models and same_weights(models[other], model)), None)
        if twin:
            print(f"{name} has the weights of {twin}: its lists are {twin}'s, scored once")
        methods[name] = methods[twin] if twin else model_recommender(ws, model)
    start = time.time()
    results = evaluate_methods(methods, test, ws.data, ws.cfg.eval, ("EASE", "MOST", "best rival"),
                               features=ws.features, composites={"best rival": best} if best else None)
    cat = ws.data.catalog
    report = {"results": results, "config": config_to_dict(ws.cfg),
              "dataset": {"name": cat.name, "n_items": cat.n_items, "fingerprint": cat.fingerprint,
                          "users": {"train": len(ws.data.train_users), "val": len(ws.data.val_users),
                                    "test": len(ws.data.test_users)},
                          "test_requests": len(test), "ease_lambda": ease_lam, "best_rival": best,
                          "format": ws.cfg.data.format if not ws.cfg.data.catalog else "parquet",
                          "license": license_note(ws.cfg.data)},
              "seconds": time.time() - start}
    if out is not None:
        write_json(out, report)
    print(format_table(results))
    return report
