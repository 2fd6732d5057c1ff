"""Single-process MOST pretraining loop with a progress bar, periodic validation and early stopping.

Overfitting, not compute, is the bottleneck on small catalogs (DESIGN section 9): every step draws fresh seed
subsets (augmentation), blocks use dropout, item ids use id dropout, AdamW decays weights, and the checkpoint
kept is the one with the best validation score; training stops after `patience` validations without progress.
With `ema` > 0 the weights validated and kept are an exponential moving average of the trained ones (torch's
AveragedModel), which moves less from one validation to the next than the last step's weights do.

The budget is in steps (`max_steps`, early stopping by `patience`), so a config gives the same checkpoint on a fast
or a loaded machine. `max_minutes` is a wall-clock safety net: when it ends training first, a WARNING says so on
stderr and the result records it (`stopped_by`), and the steps since the last validation are validated once more.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from catalog.batch import encode_requests
from catalog.dataset import Dataset, facet_mask, training_examples
from catalog.requests import soft_bonus
from core.config import MostConfig, RequestConfig
from core.numerics import Neighbours, seed_row_sum
from learner.most import build_targets, most_loss
from model.diffusion import elbo_nll, stratified_times
from model.transformer import Retriever


@dataclass
class PretrainResult:
    steps: int
    best_step: int
    best_score: float
    seconds: float
    samples_per_second: float
    history: list[dict]
    stopped_by: str = "max_steps"  # what ended training: "max_steps", "patience" or "max_minutes" (the clock)


@dataclass(frozen=True)
class Fold:
    """Training users of one fold and EASE fit without them (model.prior_folds): their requests' prior."""

    users: np.ndarray
    prior: Neighbours


def draw_fold(folds: list[Fold] | None, rng: np.random.Generator) -> Fold | None:
    """A fold drawn uniformly, whose users one batch of H2PO's training requests comes from (None without folds)."""
    return None if folds is None else folds[int(rng.integers(len(folds)))]


def relevance_scores(prior: Neighbours, seeds: torch.Tensor, seed_mask: torch.Tensor) -> np.ndarray:
    """Raw relevance of every item to a seed set: the sum of the seeds' sparse prior rows.  -> (B, N)"""
    device = prior.indices.device
    return seed_row_sum(prior, seeds.to(device), seed_mask.to(device)).cpu().numpy()


def most_step(model: Retriever, data: Dataset, vocab: dict, features: np.ndarray, relevance_matrix: Neighbours,
              req: RequestConfig, cfg: MostConfig, rng: np.random.Generator,
              generator: torch.Generator, fold: Fold | None = None) -> torch.Tensor:
    """The MOST loss of one fresh batch of training requests (graph attached). With a `fold`, the requests come from
    its users, and its out-of-fold EASE is both the targets' relevance and the model's prior."""
    examples = training_examples(data, req, cfg.batch_size, rng, None if fold is None else fold.users)
    batch = encode_requests(data.catalog, [e.request for e in examples], vocab, None if fold is None else fold.prior)
    relevance = (batch.ease.numpy() if fold is not None
                 else relevance_scores(relevance_matrix, batch.seeds, batch.seed_mask))
    bonus = np.stack([soft_bonus(data.catalog, e.request) for e in examples])
    preferred = np.zeros(relevance.shape, dtype=bool)
    for b, e in enumerate(examples):
        if e.facet is not None:
            preferred[b] = facet_mask(data, e.facet)
    x0, weights = build_targets(examples, relevance, bonus, batch.valid.numpy(), features, req.k, cfg.order,
                                cfg.redundancy, cfg.fill_weight, rng, preferred)
    t = stratified_times(len(examples), cfg.eps, generator)
    u = torch.rand(x0.shape, generator=generator)
    x0, weights, t, u = (x.to(model.device) for x in (x0, weights, t, u))
    return most_loss(elbo_nll(model, model.encode(batch.to(model.device)), x0, t, u), weights)


def pretrain(model: Retriever, data: Dataset, vocab: dict, features: np.ndarray, relevance_matrix: Neighbours,
             req: RequestConfig, cfg: MostConfig, seed: int, validate: Callable[[Retriever], float],
             save_best: Callable[[Retriever, dict], None], validate_start: bool = False,
             folds: list[Fold] | None = None) -> PretrainResult:
    """Train with AdamW until max_steps, max_minutes or patience; keep the best-validating weights via save_best.
    `validate_start`: the untrained model (step 0) is a candidate too; for a model that starts at its prior
    (model.zero_head), so that training keeps the prior unless it beats it on validation. `folds`
    (model.prior_folds): step s trains on fold s mod F's users with that fold's out-of-fold prior. With cfg.ema > 0
    the validated and saved weights are the moving average of the trained ones."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    start, bar = time.time(), tqdm(total=cfg.max_steps, desc="MOST pretraining", unit="step", dynamic_ncols=True)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema)) if cfg.ema > 0 else None
    keeper = BestKeeper(model if average is None else average.module, validate, save_best, bar, start)
    if validate_start:
        keeper.check(0, None)
    step, losses, stopped_by = 0, [], "max_steps"
    while step < cfg.max_steps and keeper.stale < cfg.patience:
        model.train()
        fold = folds[step % len(folds)] if folds else None
        loss = most_step(model, data, vocab, features, relevance_matrix, req, cfg, rng, generator, fold)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if average is not None:
            average.update_parameters(model)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        out_of_time = time.time() - start >= 60 * cfg.max_minutes  # the safety net (module docstring)
        if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
            keeper.check(step, float(np.mean(losses)))
            losses = []
        if out_of_time and step < cfg.max_steps and keeper.stale < cfg.patience:
            stopped_by = "max_minutes"
            break
    bar.close()
    if stopped_by == "max_minutes":
        warn_time_cap(step, cfg)
    elif keeper.stale >= cfg.patience:
        stopped_by = "patience"
    seconds = time.time() - start
    return PretrainResult(step, keeper.best_step, keeper.best, seconds, step * cfg.batch_size / max(seconds, 1e-9),
                          keeper.history, stopped_by)


class BestKeeper:
    """Validates the model and keeps its best weights (save_best); counts validations without progress."""

    def __init__(self, model: Retriever, validate: Callable[[Retriever], float],
                 save_best: Callable[[Retriever, dict], None], bar: tqdm, start: float) -> None:
        self.model, self.validate, self.save_best, self.bar, self.start = model, validate, save_best, bar, start
        self.best, self.best_step, self.stale, self.history = -float("inf"), 0, 0, []

    def check(self, step: int, loss: float | None) -> None:
        """Validate at `step` (mean training loss since the last check; None at step 0)."""
        self.model.eval()
        score = self.validate(self.model)
        record = {"step": step, "loss": loss, "val_ndcg@10": score, "seconds": time.time() - self.start}
        self.history.append(record)
        if score > self.best:
            self.best, self.best_step, self.stale = score, step, 0
            self.save_best(self.model, record)
        else:
            self.stale += 1
        self.bar.set_postfix(loss="-" if loss is None else f"{loss:.3f}", val=f"{score:.4f}",
                             best=f"{self.best:.4f}@{self.best_step}")


def warn_time_cap(step: int, cfg: MostConfig) -> None:
    """The loud line of a pretraining that the wall clock, not its step budget, ended."""
    print(f"WARNING: most.max_minutes ({cfg.max_minutes:g}) ended MOST pretraining after {step} of {cfg.max_steps} "
          "steps, before max_steps or early stopping: the budget is in steps, and this checkpoint depends on the "
          "machine's speed. Raise most.max_minutes (a safety net) to let the steps decide.", file=sys.stderr,
          flush=True)
