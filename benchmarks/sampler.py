"""Sampler throughput (DESIGN section 8): the batched sampler against a per-request reference and the FLOP floor.

Run:  python benchmarks/sampler.py [--checkpoint C] [--batch 256] [--k 20] [--steps 10] [--repeats 3] [--threads 0]
      [--requests 0] [--device cpu|cuda] [--bf16] [--no-reference] [--out results.json] [key=value ...]

Three numbers on the same real validation requests (`learner.workspace.examples(ws, "val")`), greedy (T=0) and T=1:
- batched: `rollout.retrieve.recommend` -> `rollout.sampler.sample_lists`, `--batch` requests per batch, the lists
  served in sampler.order (by default "score": re-sorted by their first-slot logits, one more forward pass);
- reference: `reference_lists` below, the straightforward version one writes first: a loop over requests and,
  per request, a loop over steps, each computing the logits of that one request (batch of 1, all K slots);
  it implements the same algorithm (DESIGN 3.4) and is the benchmark's one deliberate re-implementation;
- floor: `flops_per_list` over the FLOP rate of a large float32 matmul measured on the same machine, in the
  same thread count. "vs floor" = achieved lists/s / floor lists/s.
`--device cuda` puts the model, both methods and the floor's matmul on the GPU (Gumbel noise from a generator
there); `--bf16` runs them under the bf16 autocast of `system.bf16` (`model.transformer.precision`), and the floor
then counts the item head, which stays fp32, at the float32 matmul rate and the rest at the bf16 rate.
`--no-reference` leaves the reference out (one request at a time it is slow, and on a GPU it only measures launch
overhead). Times include request encoding (both methods turn `Request`s into lists); each is the best of
`--repeats` runs after a warm-up. Every list of both methods is checked: k distinct items, no seed or negative,
every item allowed by the request's hard constraints. Without `--checkpoint` the model is the configured default
(d_model=128, 3 layers) with random weights and, with `--ease-lambda` > 0, the EASE prior; with a checkpoint,
the trained model with the prior it carries. Deliberately not measured here: rollouts with trajectories and
rewards (the sampler is the cost that matters, DESIGN section 9).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import numpy as np
import torch
from harness import (
    DEFAULT_EASE_LAMBDA,
    add_common_arguments,
    add_device_arguments,
    check_device_arguments,
    fit_ease,
    format_rows,
    machine,
    now,
    set_threads,
    workspace,
    write_result,
)

from app import pipeline
from catalog.batch import encode_requests
from catalog.requests import valid_mask
from catalog.schema import Catalog
from core.carriers import Request
from core.config import SamplerConfig
from model.transformer import MASK, Retriever, precision
from rollout.retrieve import recommend


@torch.no_grad()
def reference_list(model: Retriever, catalog: Catalog, vocab: dict, request: Request, steps: int,
                   temperature: float, generator: torch.Generator | None = None) -> np.ndarray:
    """One list for one request, slot by slot in Python: low-confidence remasking (DESIGN 3.4), batch of 1.

    Each step: logits of all K slots; items not allowed (seeds, negatives, violators, committed) get -inf; every
    open slot draws argmax(logits / T + Gumbel) (argmax at T=0) with confidence log p at T=1; going through the
    open slots from most to least confident, a slot whose item a more confident slot drew loses it (collision),
    the others are committed until ceil(open / steps left) are; repeat until all K slots are filled.
    """
    k = request.k
    batch = encode_requests(catalog, [request], vocab).to(model.device)
    ctx = model.encode(batch)
    slots = torch.full((1, k), MASK, dtype=torch.long, device=model.device)
    allowed = batch.valid[0].clone()  # (N,)
    step = 0
    while (slots == MASK).any():
        logits = model.logits(ctx, model.hidden(ctx, slots))[0].masked_fill(~allowed, float("-inf"))  # (K, N)
        proposals = []
        for slot in range(k):
            if slots[0, slot] != MASK:
                continue
            row = logits[slot]
            if temperature > 0:
                u = torch.rand(row.shape, generator=generator, device=row.device).clamp_(1e-10, 1.0)
                pick = int((row / temperature - torch.log(-torch.log(u))).argmax())
            else:
                pick = int(row.argmax())
            proposals.append((float(row[pick] - torch.logsumexp(row, 0)), slot, pick))
        n_commit = math.ceil(len(proposals) / max(steps - step, 1))
        drawn, committed = set(), 0
        for _, slot, item in sorted(proposals, key=lambda p: (-p[0], p[1])):
            if item in drawn:
                continue  # a more confident open slot drew this item
            drawn.add(item)
            if committed < n_commit:
                slots[0, slot] = item
                allowed[item] = False
                committed += 1
        step += 1
    return slots[0].cpu().numpy()


def reference_lists(model: Retriever, catalog: Catalog, vocab: dict, requests: list[Request], steps: int,
                    temperature: float, generator: torch.Generator | None = None) -> list[np.ndarray]:
    """`reference_list` for each request in turn."""
    model.eval()
    return [reference_list(model, catalog, vocab, r, steps, temperature, generator) for r in requests]


def same_items_share(batched: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Share of requests whose batched list holds the reference's items. The batched lists are served in
    sampler.order, which may re-sort the slots the reference fills in place, so the order is not compared;
    tests/test_benchmarks.py compares the two slot by slot."""
    return float(np.mean([set(a.tolist()) == set(b.tolist()) for a, b in zip(batched, reference)]))


def check_lists(catalog: Catalog, requests: list[Request], lists: list[np.ndarray]) -> None:
    """Raise AssertionError unless every list has k distinct items, no seed/negative, all constraints met."""
    for n, (request, items) in enumerate(zip(requests, lists)):
        assert len(items) == request.k, f"request {n}: {len(items)} items, k={request.k}"
        assert len(set(items.tolist())) == request.k, f"request {n}: duplicate items"
        assert not set(items.tolist()) & set(request.seeds + request.negatives), f"request {n}: seed or negative"
        assert valid_mask(catalog, request)[items].all(), f"request {n}: an item violates a hard constraint"


def flops_per_list(d: int, n_layers: int, n_items: int, k: int, steps: int, context: float) -> float:
    """Matmul FLOPs of one list (2 per multiply-add), the floor's numerator.

    Per step, with L = context + K tokens (context = constraint + negative + seed tokens of the request):
      blocks:  n_layers * (24 L D^2 + 4 L^2 D + 12 D^2)   (qkv 6LD^2, out-proj 2LD^2, MLP 16LD^2; QK^T and AV
                                                            2L^2D each; adaLN 2D*6D on the pooled request vector)
      output:  4 D^2 + 2 K D^2                              (final adaLN, W_o)
      head:    2 K D N                                      (logits of K slots over N items: the dominant term)
    FLOPs/list = S * (blocks + output + head). Counted for all K slots at every step, as a batch-of-1 forward
    does; the batched sampler scores open slots only (on average (K + K/S) / 2 of them per step with the linear
    schedule), so it can in principle beat this "floor". Not counted: the request encoding and E = LN(W_f x) + u
    (once per list/batch), softmax, Gumbel noise and sorting (O(K N) elementwise per step).
    """
    length = context + k
    blocks = n_layers * (24 * length * d * d + 4 * length * length * d + 12 * d * d)
    return steps * (blocks + 4 * d * d + 2 * k * d * d + 2 * k * d * n_items)


def head_flops_per_list(d: int, n_items: int, k: int, steps: int) -> float:
    """The item head's share of `flops_per_list`, S * 2 K D N: it runs in fp32 also under bf16 autocast."""
    return steps * 2 * k * d * n_items


def matmul_rate(size: int, repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a (size x size) @ (size x size) matmul in `dtype` on `device`, best of `repeats` after a warm-up."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _seconds(fn: Callable[[], object]) -> float:
    start = now()
    fn()
    return now() - start


def time_method(run: Callable[[list[Request]], list[np.ndarray]], requests: list[Request], repeats: int,
                catalog: Catalog) -> tuple[float, list[np.ndarray]]:
    """Best wall time of `repeats` runs over all requests (after a warm-up on a few), and the last lists."""
    run(requests[:4])
    best, lists = math.inf, []
    for _ in range(repeats):
        start = now()
        lists = run(requests)
        best = min(best, now() - start)
    check_lists(catalog, requests, lists)
    return best, lists


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a MOST checkpoint (default: random-init default model)")
    parser.add_argument("--batch", type=int, default=256, help="requests per batch of the batched sampler")
    parser.add_argument("--k", type=int, default=20, help="list length k")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps S")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best is reported)")
    parser.add_argument("--requests", type=int, default=0, help="use the first R validation requests; 0 = all")
    parser.add_argument("--ease-lambda", type=float, default=DEFAULT_EASE_LAMBDA,
                        help="without a checkpoint: EASE prior lambda (0 = no prior); ignored with a checkpoint")
    parser.add_argument("--matmul-size", type=int, default=2048, help="size of the matmul measuring the FLOP rate")
    add_device_arguments(parser)
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the per-request reference")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    check_device_arguments(parser, args)
    return args


def load_model(args: argparse.Namespace) -> tuple[pipeline.Workspace, torch.nn.Module]:
    """The checkpoint's model on its config, or the default model (random weights, EASE prior unless lambda 0)."""
    if args.checkpoint:
        from learner.checkpoint import load_checkpoint, read_header

        ws = workspace(args, json.loads(read_header(args.checkpoint)["config"]))
        return ws, load_checkpoint(args.checkpoint, ws.data.catalog)[0]
    ws = workspace(args)
    return ws, pipeline.build_model(ws, fit_ease(ws, args.ease_lambda) if args.ease_lambda > 0 else None)


def measure(model, ws: pipeline.Workspace, requests: list[Request], args: argparse.Namespace,
            floor: float) -> tuple[list[list], list[dict], float | None]:
    """Time batched and reference sampling at T=0 and T=1.  -> (table rows, records, share of greedy lists with the
    reference's items; None without the reference)"""
    cat, vocab = ws.data.catalog, ws.vocab
    rows, records, greedy = [], [], {}
    for temperature in (0.0, 1.0):
        sampler_cfg = SamplerConfig(steps=args.steps, temperature=temperature, batch_size=args.batch)
        methods = {
            "batched": lambda reqs, c=sampler_cfg: recommend(model, cat, vocab, reqs, c,
                                                               torch.Generator(args.device).manual_seed(0)),
            "reference": lambda reqs, t=temperature: reference_lists(model, cat, vocab, reqs, args.steps, t,
                                                                     torch.Generator(args.device).manual_seed(0)),
        }
        if not args.reference:
            del methods["reference"]
        for name, run in methods.items():
            seconds, lists = time_method(run, requests, args.repeats, cat)
            if temperature == 0:
                greedy[name] = lists
            per_second = len(requests) / seconds
            rows.append([name, temperature, per_second, 1000 / per_second, per_second / floor])
            records.append({"method": name, "temperature": temperature, "lists_per_s": per_second,
                            "ms_per_list": 1000 / per_second, "vs_floor": per_second / floor, "seconds": seconds})
    rows.append(["floor", "-", floor, 1000 / floor, 1.0])
    if not args.reference:
        return rows, records, None
    return rows, records, same_items_share(greedy["batched"], greedy["reference"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    ws, model = load_model(args)
    threads = set_threads(args.threads)
    model.to(args.device).eval()
    cat = ws.data.catalog
    requests = [Request(e.request.seeds, e.request.negatives, e.request.constraints, args.k)
                for e in pipeline.examples(ws, "val")]
    requests = requests[: args.requests or len(requests)]
    mc = model.cfg
    context = float(np.mean([len(r.seeds) + len(r.negatives) + len(r.constraints) for r in requests]))
    flops = flops_per_list(mc.d_model, mc.n_layers, cat.n_items, args.k, args.steps, context)
    head = head_flops_per_list(mc.d_model, cat.n_items, args.k, args.steps)
    rate = matmul_rate(args.matmul_size, device=args.device)
    body_rate = matmul_rate(args.matmul_size, device=args.device, dtype=torch.bfloat16) if args.bf16 else rate
    floor = 1 / (head / rate + (flops - head) / body_rate)  # lists/s
    with torch.no_grad(), precision(model, args.bf16):
        rows, records, same = measure(model, ws, requests, args, floor)

    info = machine()
    print(f"machine: {info['cpu_count']} CPUs, torch {info['torch']}, {threads} threads, {info['gpu'] or 'no GPU'}; "
          f"{args.device} matmul {args.matmul_size}^3: {rate / 1e9:.1f} GFLOP/s float32"
          + (f", {body_rate / 1e9:.1f} bf16" if args.bf16 else ""))
    print(f"model: d_model={mc.d_model}, n_layers={mc.n_layers}, N={cat.n_items}, prior="
          f"{model.prior is not None}; k={args.k}, S={args.steps}, batch={args.batch}, "
          f"{len(requests)} validation requests; {flops / 1e6:.1f} MFLOP/list; {args.device}"
          f"{', bf16 autocast' if args.bf16 else ', float32'}")
    print(format_rows(["method", "T", "lists/s", "ms/list", "vs floor"], rows))
    if same is not None:
        print(f"greedy batched lists with the reference's items: {same:.1%}")
    print("all lists valid")
    result = {"benchmark": "sampler", "machine": info,
              "settings": {"checkpoint": args.checkpoint, "batch": args.batch, "k": args.k, "steps": args.steps,
                           "device": args.device, "bf16": args.bf16,
                           "repeats": args.repeats, "requests": len(requests), "d_model": mc.d_model,
                           "n_layers": mc.n_layers, "n_items": cat.n_items,
                           "prior": model.prior is not None, "mean_context_tokens": context},
              "flops_per_list": flops, "head_flops_per_list": head, "matmul_size": args.matmul_size,
              "matmul_flops_per_s": rate, "bf16_matmul_flops_per_s": body_rate if args.bf16 else None,
              "floor_lists_per_s": floor, "results": records, "greedy_same_items_share": same}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
