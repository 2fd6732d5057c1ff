"""MOST learner throughput (DESIGN section 8): training samples/s of the default model on the real data.

Run:  python benchmarks/training.py [--steps 30] [--batch 64] [--warmup 3] [--threads 0] [--out results.json]
      [key=value ...]

One timed step is exactly one iteration of `learner.pretrain.pretrain`'s loop: `learner.pretrain.most_step`
(fresh training requests, MOST targets, noise, encode, ELBO loss), then zero_grad, backward, gradient
clipping and an AdamW step, in train mode (dropout, id dropout on). The step is split into three parts:
- data + targets: everything `most_step` does before `model.encode` (requests from training users, padding
  into tensors, relevance and soft-bonus scores, metric-ordered targets, t and mask draws);
- forward: `model.encode` through the loss (the clock on entry to `model.encode` splits the two, so
  `most_step` is timed as it is, not re-implemented);
- backward + optimizer: zero_grad, backward, clip_grad_norm_, AdamW step.
On CPU every torch op is synchronous, so wall-clock boundaries between the parts are exact; on CUDA the
script synchronises at each boundary. The model is the configured default (d_model=128, 3 layers) with random
initial weights and the EASE prior (fixed lambda: it changes the prior's values, not its cost).
Deliberately not measured: validation and checkpointing, which `pretrain` runs every `most.eval_every` steps.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch
from harness import (
    DEFAULT_EASE_LAMBDA,
    add_common_arguments,
    fit_ease,
    format_rows,
    machine,
    now,
    set_threads,
    workspace,
    write_result,
)

from app import pipeline
from core.numerics import Neighbours
from learner.pretrain import most_step
from model.transformer import Retriever

PARTS = ("data + targets", "forward", "backward + optimizer")


class EncodeClock:
    """Records the time `model.encode` is entered: inside `most_step` that is where data preparation ends."""

    def __init__(self, model: Retriever) -> None:
        self.entered = float("nan")
        original = model.encode

        def encode(batch):
            self.entered = now()
            return original(batch)

        model.encode = encode  # instance attribute: shadows the method for this model only


def timed_steps(model: Retriever, ws: pipeline.Workspace, relevance_matrix: Neighbours, batch: int,
                steps: int, seed: int) -> np.ndarray:
    """Run `steps` MOST training steps; (steps, 3) seconds per part, in the order of PARTS."""
    cfg = dataclasses.replace(ws.cfg.most, batch_size=batch)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    clock = EncodeClock(model)
    model.train()
    out = np.zeros((steps, len(PARTS)))
    for step in range(steps):
        start = now()
        loss = most_step(model, ws.data, ws.vocab, ws.unit_features, relevance_matrix, ws.cfg.requests, cfg, rng,
                         generator)
        forward_done = now()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        out[step] = [clock.entered - start, forward_done - clock.entered, now() - forward_done]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()}")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--batch", type=int, default=64, help="training requests per step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--ease-lambda", type=float, default=DEFAULT_EASE_LAMBDA, help="EASE lambda (prior, targets)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)

    ws = workspace(args)
    ease = fit_ease(ws, args.ease_lambda)
    model = pipeline.build_model(ws, ease)
    threads = set_threads(args.threads)
    relevance = model.prior if model.prior is not None else pipeline.prior_neighbours(ws, ease)  # as `h2po run`
    timed_steps(model, ws, relevance, args.batch, args.warmup, ws.cfg.seed + 1)
    seconds = timed_steps(model, ws, relevance, args.batch, args.steps, ws.cfg.seed)  # (steps, 3)

    per_step = seconds.sum(1)
    total = float(per_step.sum())
    rows = [[part, 1000 * float(seconds[:, c].mean()), 1000 * float(np.median(seconds[:, c])),
             float(seconds[:, c].sum() / total)] for c, part in enumerate(PARTS)]
    rows.append(["step", 1000 * float(per_step.mean()), 1000 * float(np.median(per_step)), 1.0])
    samples_per_s = args.batch * args.steps / total
    mc = ws.cfg.model
    info = machine()
    print(f"machine: {info['cpu_count']} CPUs, torch {info['torch']}, {threads} threads")
    print(f"model: d_model={mc.d_model}, n_layers={mc.n_layers}, N={ws.data.catalog.n_items}, "
          f"prior={model.prior is not None}, {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"batch {args.batch}, k={ws.cfg.requests.k}, {args.steps} timed steps after {args.warmup} warm-up")
    print(format_rows(["part", "mean ms", "median ms", "share"], rows))
    print(f"MOST training throughput: {samples_per_s:.1f} samples/s ({args.steps / total:.2f} steps/s)")
    result = {"benchmark": "training", "machine": info,
              "settings": {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "k": ws.cfg.requests.k,
                           "d_model": mc.d_model, "n_layers": mc.n_layers, "n_items": ws.data.catalog.n_items,
                           "prior": model.prior is not None, "ease_lambda": args.ease_lambda},
              "samples_per_s": samples_per_s, "seconds": total,
              "parts": {part: {"mean_ms": r[1], "median_ms": r[2], "share": r[3]} for part, r in zip(PARTS, rows)},
              "per_step_seconds": seconds.tolist()}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
