"""A process's workspace: everything derived from the run config and the data once per process (the catalog read or
imported into the run directory, the user split, item features, the constraint vocabulary), and what every stage
computes from it: benchmark examples, the EASE lambda (configured, cached in `ease.json` or tuned on validation),
the model, and the greedy lists and NDCG@10 of a model on examples.

The app (`app.pipeline`) and the actors (`actors.policy`) both build one; nothing here starts Ray.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from catalog.batch import constraint_vocab
from catalog.dataset import Dataset, benchmark_examples, load_catalog
from catalog.features import item_features
from catalog.intent import IntentIndex
from catalog.schema import atomic_write
from core.carriers import Example
from core.config import ModelConfig, RunConfig
from core.errors import UserError
from core.numerics import Neighbours, unit_rows
from evaluation.baselines import EASE, tune_ease
from evaluation.metrics import item_mask, ranking_metrics
from learner.pretrain import Fold
from model.transformer import Retriever
from rollout.retrieve import recommend


@dataclass
class Workspace:
    """Everything derived from the data once per process."""

    cfg: RunConfig
    data: Dataset
    features: np.ndarray  # (N, F) item features x_i
    unit_features: np.ndarray  # (N, F) rows L2-normalised (cosines)
    vocab: dict
    out_dir: Path

def write_json(path: Path, value: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(value, indent=2)))

def prepare(cfg: RunConfig) -> Workspace:
    """Seed, set threads, import/load the catalog into the run directory, split users, compute features.
    On CPU, torch's deterministic kernels: on several threads the backward of an index with repeated items sums in
    a different order from call to call, which makes two pretrainings of one config differ (tests/test_repeatable.py;
    the kernels cost nothing measurable here). Their default of filling every new tensor with NaN stays off: it
    changes no result and doubled the time of a distributed learner step (DeepSpeed allocates its buffers each step).
    A GPU's would need cuBLAS settings and slower scatters, so GPU runs are not bit-repeatable."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.use_deterministic_algorithms(not torch.cuda.is_available())
    torch.utils.deterministic.fill_uninitialized_memory = False
    out_dir = Path(cfg.out_dir)
    data = Dataset.build(load_catalog(cfg.data, out_dir), cfg.data)
    features = item_features(data)
    return Workspace(cfg, data, features, unit_rows(features), constraint_vocab(data.catalog), out_dir)

def examples(ws: Workspace, split: str, draws: int | None = None) -> list[Example]:
    """The fixed requests of a split's users: `draws` per user, family and seed size (default: eval.test_draws for
    the test split, 1 for validation)."""
    users = {"val": ws.data.val_users, "test": ws.data.test_users}[split]
    if draws is None:
        draws = ws.cfg.eval.test_draws if split == "test" else 1
    return benchmark_examples(ws.data, users, ws.cfg.requests, ws.cfg.eval.request_seed, draws)

def ease_lambda(ws: Workspace) -> float:
    """The EASE lambda: configured, cached in the run directory, or tuned on validation family A."""
    if ws.cfg.model.prior_lambda > 0:
        return ws.cfg.model.prior_lambda
    path = ws.out_dir / "ease.json"
    key = {"catalog": ws.data.catalog.fingerprint, "split_seed": ws.cfg.data.split_seed,
           "lambdas": ws.cfg.eval.ease_lambdas}
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["lambda"]
    lam, table = tune_ease(ws.data, examples(ws, "val"), ws.cfg.eval.ease_lambdas)
    print(f"EASE lambda tuned on validation: {lam:g} (NDCG@10 by lambda: "
          + ", ".join(f"{k:g}: {v:.4f}" for k, v in table.items()) + ")")
    write_json(path, {"key": key, "lambda": lam, "validation_ndcg@10": {str(k): v for k, v in table.items()}})
    return lam

def fit_ease(ws: Workspace, lam: float) -> EASE:
    """EASE on the training users, exact up to model.prior_items warm items and approximated beyond (keeping
    model.prior_neighbours per item; evaluation/neighbours.py)."""
    m = ws.cfg.model
    return EASE(ws.data.catalog, ws.data.train_sparse, lam, m.prior_items, m.prior_neighbours)

def prior_neighbours(ws: Workspace, ease: EASE) -> Neighbours:
    """EASE's B as each item's top-m neighbours (m = model.prior_neighbours), float16 values: the model's prior and
    the relevance of MOST's targets and of the rewards."""
    rows = ease.neighbours(ws.cfg.model.prior_neighbours)
    return Neighbours(rows.indices, rows.values.half())

def out_of_fold(m: ModelConfig) -> bool:
    """Training requests see an out-of-fold EASE prior: model.prior_folds > 1 with an EASE prior."""
    return m.prior_folds > 1 and m.prior != "none"

def training_folds(ws: Workspace, lam: float | None = None) -> list[Fold] | None:
    """model.prior_folds > 1 (and an EASE prior): the training users in F folds (a permutation seeded by
    data.split_seed), each with EASE fit on the other folds' users at `lam` (default: `ease_lambda`, looked up only
    when there are folds); None otherwise. MOST's requests and H2PO's
    (rollouts and anchor) read them, so they are cached in the run directory (`folds.safetensors`, keyed by what
    they are computed from) and every process of a run fits them at most once."""
    m = ws.cfg.model
    if not out_of_fold(m):
        return None
    users = ws.data.train_users
    if len(users) < m.prior_folds:
        raise UserError(f"model.prior_folds={m.prior_folds} is more than the {len(users)} training users")
    lam = ease_lambda(ws) if lam is None else lam
    fold = np.empty(len(users), np.int64)
    fold[np.random.default_rng(ws.cfg.data.split_seed).permutation(len(users))] = np.arange(len(users)) % m.prior_folds
    path = ws.out_dir / "folds.safetensors"
    key = json.dumps({"catalog": ws.data.catalog.fingerprint, "split_seed": ws.cfg.data.split_seed,
                      "positive_threshold": ws.cfg.data.positive_threshold, "lambda": lam, "folds": m.prior_folds,
                      "prior_items": m.prior_items, "neighbours": m.prior_neighbours})
    cached = None
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            cached = (f.metadata() or {}).get("key")
    if cached == key:
        rows = load_file(str(path))
        return [Fold(users[fold == f], Neighbours(rows[f"indices{f}"], rows[f"values{f}"]))
                for f in range(m.prior_folds)]
    out = []
    for f in tqdm(range(m.prior_folds), desc="out-of-fold EASE priors", unit="fold", dynamic_ncols=True):
        rest = EASE(ws.data.catalog, ws.data.train_sparse[np.flatnonzero(fold != f)], lam, m.prior_items,
                    m.prior_neighbours)
        out.append(Fold(users[fold == f], prior_neighbours(ws, rest)))
    tensors = {f"{name}{f}": getattr(one.prior, name).contiguous() for f, one in enumerate(out)
               for name in ("indices", "values")}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"key": key}))
    return out

def build_model(ws: Workspace, ease: EASE | None) -> Retriever:
    prior = prior_neighbours(ws, ease) if ease is not None and ws.cfg.model.prior != "none" else None
    intent = IntentIndex(ws.data.catalog) if ws.cfg.model.prior == "ease+intent" else None
    return Retriever(ws.cfg.model, torch.from_numpy(ws.features), len(ws.vocab), prior,
                     *((torch.from_numpy(intent.values), torch.from_numpy(intent.parts)) if intent else ()))

def model_recommender(ws: Workspace, model: Retriever):
    """examples -> (R, k) lists, for the evaluation table."""
    def run(batch: list[Example]) -> np.ndarray:
        return np.stack(recommend(model, ws.data.catalog, ws.vocab, [e.request for e in batch], ws.cfg.sampler))
    return run

def request_ndcg(ws: Workspace, examples: list[Example], model: Retriever) -> np.ndarray:
    """(R,) NDCG@10 of the model's greedy list for each example."""
    relevant = item_mask([e.targets for e in examples], ws.data.catalog.n_items)
    return ranking_metrics(model_recommender(ws, model)(examples), relevant, [10])["ndcg@10"]

def validation_score(ws: Workspace, val: list[Example], model: Retriever) -> float:
    """Mean NDCG@10 of greedy lists on the validation requests."""
    return float(request_ndcg(ws, val, model).mean())
