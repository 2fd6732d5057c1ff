"""Single-process H2PO probe: what one setting does to greedy NDCG@10, paired against its MOST start.

Run:  python benchmarks/probe.py --run runs/default [--steps 40] [--eval-every 20] [--terms on,off]
      [--freeze item_residual,item_bias] [--rollout-users train|val] [--seed 0] [--out FILE] [key=value ...]

No Ray and no DeepSpeed: one process draws rollouts with the current weights (synchronous, staleness 0) and runs
the learner's own update loop, `learner.update.h2po_update`, with torch AdamW and the engine's gradient clip as its
`step_fn` (`learner.update.adamw_step`). It is the cheap way to compare settings before a distributed run: every
`--eval-every` steps it prints the paired bootstrap difference to MOST on the validation split, and at the end
on the test split. Decide on validation; the test line is for the record.
- `--terms`: which data the loss sees, on-policy rollouts and/or logged pairs (the MOST anchor follows
  h2po.lambda_sft);
- `--freeze`: parameter name prefixes left out of the update (e.g. the per-item residuals and biases);
- rollouts (and anchor batches) of training users come from one fold of model.prior_folds each, with EASE fit
  without that fold as their prior, as in the distributed learner;
- `--rollout-users val`: rollouts from validation users instead of training users. This trains on the users that
  the validation lines score, so those lines become in-sample: the measure of how far H2PO moves the greedy lists
  of the very users it is rewarded on (a ceiling), while the test lines stay out of sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from harness import add_run_arguments, h2po_run_config, machine, set_threads, write_result

from actors.policy import frozen_copy
from app import pipeline
from catalog.dataset import training_examples
from catalog.preferences import read_preferences
from evaluation.metrics import paired_bootstrap
from learner.checkpoint import load_checkpoint
from learner.h2po import lambda_off_at
from learner.pretrain import draw_fold, most_step
from learner.update import adamw_step, h2po_update
from rewards.base import RewardContext
from rewards.registry import build_rewards
from rollout.buffer import encode_pairs
from rollout.generate import generate_rollouts


def scorer(ws: pipeline.Workspace, split: str, start: torch.nn.Module):
    """-> score(model, label): prints and returns {family: [diff, low, high]} against `start` on `split`."""
    examples = pipeline.examples(ws, split)
    family, users = np.array([e.family for e in examples]), np.array([e.user for e in examples])
    base = pipeline.request_ndcg(ws, examples, start)

    def score(model, label: str) -> dict:
        after, out = pipeline.request_ndcg(ws, examples, model), {}
        for f in sorted(set(family)):
            rows = family == f
            diff = paired_bootstrap(after[rows], base[rows], 1000, 0, users[rows])
            out[f] = [float(v) for v in diff]
            print(f"{label} {split} {f}: MOST {base[rows].mean():.4f} H2PO {after[rows].mean():.4f} "
                  f"diff {diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}]", flush=True)
        return out
    return score


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """-> (the parser, for usage errors later; the arguments, `terms` as a set)"""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(parser, steps=40)
    parser.add_argument("--eval-every", type=int, default=20, help="validation lines every this many steps")
    parser.add_argument("--terms", default="on,off", help="comma-separated subset of on,off")
    parser.add_argument("--freeze", default="", help="comma-separated parameter name prefixes not to train")
    parser.add_argument("--rollout-users", choices=("train", "val"), default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all cores")
    args = parser.parse_args()
    args.terms = set(args.terms.split(","))
    if not args.terms or args.terms - {"on", "off"}:
        parser.error("--terms: a comma-separated subset of on,off")
    return parser, args


def main() -> None:
    parser, args = parse_args()
    set_threads(args.threads)
    run = Path(args.run)
    cfg = h2po_run_config(parser, run, run, args.overrides)
    ws, h2po = pipeline.prepare(cfg), cfg.h2po
    model = load_checkpoint(run / "most.safetensors", ws.data.catalog)[0]
    reference = frozen_copy(model)
    frozen = [n for n, p in model.named_parameters() if any(n.startswith(f) for f in args.freeze.split(",") if f)]
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    scores = {split: scorer(ws, split, reference) for split in ("val", "test")}
    users = ws.data if args.rollout_users == "train" else dataclasses.replace(ws.data, train_users=ws.data.val_users)
    relevance, rewards = model.prior, build_rewards(h2po.rewards)
    reward_ctx = RewardContext.from_dataset(ws.data, ws.features, relevance)
    pairs = [p for b in read_preferences(run / "preferences.parquet", ws.data.catalog) for p in b.pairs] \
        if "off" in args.terms else []
    step_fn = adamw_step(model, h2po.lr, h2po.grad_clip)
    rng, generator = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)

    folds = pipeline.training_folds(ws) if args.rollout_users == "train" else None

    def anchor():  # the MOST loss on a fresh batch of training requests
        return most_step(model, ws.data, ws.vocab, ws.unit_features, relevance, cfg.requests, cfg.most, rng, generator,
                         draw_fold(folds, rng))
    history, start = [], time.time()
    for step in range(args.steps):
        fold = draw_fold(folds, rng)
        rollouts = generate_rollouts(model, ws.data.catalog, ws.vocab, training_examples(
            users, cfg.requests, h2po.batch_requests, rng, None if fold is None else fold.users), h2po.group_size,
            cfg.sampler.steps, h2po.rollout_temperature, rewards, reward_ctx, step, generator, order=cfg.sampler.order,
            ease=None if fold is None else fold.prior) if "on" in args.terms else None
        batch = encode_pairs(ws.data.catalog, [pairs[(step * h2po.batch_requests + i) % len(pairs)]
                                               for i in range(h2po.batch_requests)], ws.vocab) if pairs else None
        stats = h2po_update(model, reference, rollouts, batch, step_fn, h2po,
                            lambda_off_at(step, args.steps, h2po.lambda_off_start, h2po.lambda_off_end), cfg.most.eps,
                            generator, anchor)
        history.append({"step": step + 1, "seconds": time.time() - start, **stats})
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            history[-1]["val"] = scores["val"](model, f"step {step + 1}")
    final = {split: score(model, f"step {args.steps}") for split, score in scores.items()}
    print(f"{args.steps} steps in {time.time() - start:.0f} s; frozen: {', '.join(frozen) or 'nothing'}")
    write_result(args.out, {"machine": machine(), "args": {**vars(args), "terms": sorted(args.terms)}, "final": final,
                            "history": history})


if __name__ == "__main__":
    main()
