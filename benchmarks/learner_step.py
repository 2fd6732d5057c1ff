"""H2PO step costs per device and precision: one rollout batch, and one learner update on it (DESIGN section 8).

Run:  python benchmarks/learner_step.py [--checkpoint C] [--steps 10] [--warmup 2] [--device cpu|cuda] [--bf16]
      [--threads 0] [--out results.json] [key=value ...]

What a rollout actor and a learner rank each do per H2PO step, in one process, without Ray or DeepSpeed:
- rollouts: `rollout.generate.generate_rollouts` of h2po.batch_requests fresh training requests x h2po.group_size
  lists (k = requests.k, S = sampler.steps, T = h2po.rollout_temperature, the configured rewards), as
  `actors.rollout.RolloutActor.generate` calls it (without the out-of-fold priors of model.prior_folds);
- learner update: `learner.update.h2po_update` on one such batch: pi_prox and pi_ref once, then h2po.inner_epochs
  passes of the loss with the MOST anchor (most.batch_size fresh requests) when h2po.lambda_sft > 0 and no logged
  pairs (the main job's h2po.pairs_per_step: 0), each followed by torch AdamW with the engine's gradient clip
  (`adamw_step`, as benchmarks/probe.py: the update DeepSpeed's one rank makes, without its bookkeeping).
Each figure is the median of `--steps` timed repetitions after `--warmup` untimed ones, the clock read after the
device finishes its queued work. `--device cuda` puts the model there; `--bf16` autocasts the forward passes as
`system.bf16` does (`model.transformer.precision`: weights, optimiser state and the item head stay fp32). The model is
`--checkpoint`'s, or the configured default with random weights and the EASE prior (`benchmarks/sampler.py`'s
`load_model`); its weights move between repetitions, which changes the work only through the sampler's passes.
Not measured: Ray, weight publication, the MOST anchor's data preparation apart from the rest of the update.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from harness import (
    DEFAULT_EASE_LAMBDA,
    add_common_arguments,
    add_device_arguments,
    check_device_arguments,
    format_rows,
    machine,
    now,
    set_threads,
    write_result,
)
from sampler import load_model

from actors.policy import frozen_copy
from catalog.dataset import training_examples
from learner.pretrain import most_step
from learner.update import adamw_step, h2po_update
from rewards.base import RewardContext
from rewards.registry import build_rewards
from rollout.generate import generate_rollouts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a MOST checkpoint (default: random-init default model)")
    parser.add_argument("--steps", type=int, default=10, help="timed repetitions of each figure (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--ease-lambda", type=float, default=DEFAULT_EASE_LAMBDA,
                        help="without a checkpoint: EASE prior lambda (0 = no prior); ignored with a checkpoint")
    add_device_arguments(parser)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    check_device_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ws, model = load_model(args)
    threads = set_threads(args.threads)
    cfg, h2po = ws.cfg, ws.cfg.h2po
    relevance = model.prior  # the anchor's and the rewards' relevance on the CPU, as actors.policy takes it
    if relevance is None:
        raise SystemExit("the model has no EASE prior (--ease-lambda 0?): the rewards and the anchor need one")
    model.to(args.device)
    reference = frozen_copy(model)
    ctx, rewards = RewardContext.from_dataset(ws.data, ws.features, relevance), build_rewards(h2po.rewards)
    rng, generator = np.random.default_rng(cfg.seed), torch.Generator(args.device).manual_seed(cfg.seed)
    cpu_generator = torch.Generator().manual_seed(cfg.seed)  # the anchor's noise, drawn on the CPU as the learner's
    step_fn = adamw_step(model, h2po.lr, h2po.grad_clip)

    def rollouts():
        examples = training_examples(ws.data, cfg.requests, h2po.batch_requests, rng)
        return generate_rollouts(model, ws.data.catalog, ws.vocab, examples, h2po.group_size, cfg.sampler.steps,
                                 h2po.rollout_temperature, rewards, ctx, 0, generator, args.bf16, cfg.sampler.order)

    def anchor() -> torch.Tensor:  # the MOST loss on a fresh batch of training requests, as the learner's
        return most_step(model, ws.data, ws.vocab, ws.unit_features, relevance, cfg.requests, cfg.most, rng,
                         cpu_generator)

    seconds = {"rollouts": [], "learner update": []}
    for repetition in range(args.warmup + args.steps):
        start = now()
        batch = rollouts()
        middle = now()
        stats = h2po_update(model, reference, batch, None, step_fn, h2po, 0.0, cfg.most.eps, cpu_generator,
                            anchor if h2po.lambda_sft > 0 else None, args.bf16)
        end = now()
        if not np.isfinite(stats["loss/total"]):
            raise FloatingPointError(f"repetition {repetition}: loss/total is {stats['loss/total']}")
        if repetition >= args.warmup:
            seconds["rollouts"].append(middle - start)
            seconds["learner update"].append(end - middle)
    return report(args, ws, model, threads, seconds)


def report(args: argparse.Namespace, ws, model, threads: int, seconds: dict[str, list[float]]) -> dict:
    """Print the table of the timed parts and write the result JSON (`--out`).  -> the result"""
    cfg, h2po = ws.cfg, ws.cfg.h2po
    lists = h2po.batch_requests * h2po.group_size
    rows = [[name, 1000 * float(np.median(v)), 1000 * float(np.min(v)), 1000 * float(np.max(v))]
            for name, v in seconds.items()]
    info = machine()
    mc = model.cfg
    print(f"machine: {info['cpu_count']} CPUs, torch {info['torch']}, {threads} threads, {info['gpu'] or 'no GPU'}")
    print(f"model: d_model={mc.d_model}, n_layers={mc.n_layers}, N={ws.data.catalog.n_items}, checkpoint="
          f"{args.checkpoint}; {h2po.batch_requests} requests x G={h2po.group_size} = {lists} lists, k="
          f"{cfg.requests.k}, S={cfg.sampler.steps}, {h2po.inner_epochs} inner epochs, anchor "
          f"{cfg.most.batch_size if h2po.lambda_sft > 0 else 0}; {args.device}"
          f"{', bf16 autocast' if args.bf16 else ', float32'}; {args.steps} timed after {args.warmup} warm-up")
    print(format_rows(["part", "median ms", "min ms", "max ms"], rows))
    rollout_lists = lists / float(np.median(seconds["rollouts"]))
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    print(f"rollouts: {rollout_lists:.1f} lists/s; learner update: {np.median(seconds['learner update']):.3f} s"
          + (f"; peak GPU memory allocated {peak:.2f} GiB" if peak is not None else ""))
    result = {"benchmark": "learner_step", "machine": info,
              "settings": {"checkpoint": args.checkpoint, "device": args.device, "bf16": args.bf16,
                           "steps": args.steps, "warmup": args.warmup, "batch_requests": h2po.batch_requests,
                           "group_size": h2po.group_size, "k": cfg.requests.k, "sampler_steps": cfg.sampler.steps,
                           "inner_epochs": h2po.inner_epochs, "lambda_sft": h2po.lambda_sft,
                           "anchor_requests": cfg.most.batch_size, "d_model": mc.d_model, "n_layers": mc.n_layers,
                           "n_items": ws.data.catalog.n_items},
              "rollout_lists_per_s": rollout_lists, "seconds": seconds, "peak_gpu_gib": peak}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
