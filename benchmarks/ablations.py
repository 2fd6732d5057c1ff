"""The model's own ablations on the same test requests: checkpoints x sampler steps S (issue 13, DESIGN 3.4 and 4).

Run:  python benchmarks/ablations.py CHECKPOINT[=NAME] ... [--steps 10,1,1p] [--orders slots,score]
          [--reference ROW] [--bootstrap N] [--out FILE] [--set KEY=VALUE ...]

Each CHECKPOINT (a most.safetensors or h2po.safetensors in a run directory; NAME defaults to `<dir>/<stem>`) is
scored on the test split with the config of its header plus the `--set` overrides, once per entry of `--steps`: a
number of sampler steps S (`rollout.sampler.sample_lists`, as served) or `1p`, `one_pass` (all k slots from one forward
pass: the sampler's S = 1 draws every slot in its first pass too, but a slot that collides with a more confident one
is drawn again in a further pass, so S = 1 may take several passes), and once per entry of `--orders`: the rank
order of the list (`sampler.order`: `slots` as the sampler filled them, `score` re-sorted by the first slot's logits,
`rollout.sampler.served_order`). The checkpoints must share the test requests
(the same data split and request seed; checked). For every family, family A seed size and row
(checkpoint, S) it prints NDCG@10 with its 95% interval over users, the paired difference to the reference row (the
first row unless `--reference` names another) and to the same checkpoint at the first S and order, and the decoding
statistics read from the sampler's trajectories (`rollout.sampler.Samples.step_of`):

- passes: forward passes per list (S when no collision costs a step; more when one does; 1 for 1-pass);
- redrawn (S = 1 rows): the share of slots whose one-step draw collided with a more confident slot drawing the same
  item. The sampler resolves such collisions itself (the loser stays masked and is drawn again in a further pass),
  so at S = 1 every slot committed after the first pass is one that collided: the one-shot duplicate rate of
  DESIGN section 9, per slot; `lists` is the share of lists with at least one such slot.

Scoring is that of `app.pipeline.run_evaluation` (`evaluation.report.evaluate_methods`: bootstrap over users,
`eval.test_draws` requests per user and group, `eval.bootstrap` resamples unless `--bootstrap` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from harness import format_rows, machine, output_file, write_result

from app import pipeline
from catalog.batch import encode_requests
from core.carriers import Example, RequestBatch
from core.config import config_to_dict
from evaluation.report import evaluate_methods, example_groups
from learner.checkpoint import config_from_checkpoint, load_checkpoint
from model.head import top_log_probs
from model.transformer import MASK, Retriever
from rollout.sampler import sample_lists, served_order


@torch.no_grad()
def one_pass(model: Retriever, batch: RequestBatch, k: int, order: str = "slots") -> torch.Tensor:
    """(B, K) greedy lists from a single forward pass at the all-masked state: the slots, in order of the confidence
    of their first choice (its log-prob), each take their most likely allowed item not yet taken. What S = 1 gives
    when a collision is resolved by the loser's next choice in the same pass instead of a further pass. A slot's
    choice is among its k most likely items (at most k - 1 are taken before it), so only each slot's top k are
    computed (`model.head.top_log_probs`, in item chunks). `order`: as served (`served_order`)."""
    b = len(batch)
    ctx = model.encode(batch)
    slots = torch.full((b, k), MASK, dtype=torch.long, device=batch.valid.device)
    rows, cols = (slots == MASK).nonzero(as_tuple=True)  # every slot, row-major
    hidden = model.hidden(ctx, slots)[rows, cols]  # (B*K, D)
    logp, candidates = top_log_probs(model, ctx, hidden, rows, batch.valid, k)  # (B*K, k), most likely first
    slot_order = logp[:, 0].view(b, k).argsort(1, descending=True)  # (B, K): slots by their first choice's log-prob
    candidates = candidates.view(b, k, k)
    taken = torch.zeros_like(batch.valid)  # (B, N)
    items = torch.empty((b, k), dtype=torch.long, device=slots.device)
    every = torch.arange(b, device=slots.device)
    for rank in range(k):
        slot = slot_order[:, rank]  # (B,)
        options = candidates[every, slot]  # (B, k)
        first_free = (~taken.gather(1, options)).float().argmax(1, keepdim=True)  # (B, 1)
        pick = options.gather(1, first_free).squeeze(1)  # (B,)
        items[every, slot] = pick
        taken[every, pick] = True
    return served_order(model, ctx, items, order)


def decode(ws: pipeline.Workspace, model: Retriever, examples: list[Example],
           steps: int | None, order: str = "slots") -> tuple[np.ndarray, np.ndarray]:
    """(lists (R, K), step_of (R, K)): the lists `learner.workspace.model_recommender` gives at `steps` sampler steps
    when `order` is the config's sampler.order (the config's temperature and batch size), with the pass in which each
    slot was committed; steps None: the greedy `one_pass` lists (all slots in pass 0); order "score": each list
    re-sorted (`served_order`). Every benchmark request asks for k = requests.k, so the batches are plain slices."""
    k, cfg = ws.cfg.requests.k, ws.cfg.sampler
    if any(e.request.k != k for e in examples):
        raise ValueError(f"every request must ask for k = requests.k = {k}")
    model.eval()
    generator = torch.Generator(model.device).manual_seed(ws.cfg.seed)  # only drawn from when temperature > 0
    lists, step_of = [], []
    for start in range(0, len(examples), cfg.batch_size):
        batch = encode_requests(ws.data.catalog, [e.request for e in examples[start:start + cfg.batch_size]],
                                ws.vocab).to(model.device)
        if steps is None:
            items, passes = one_pass(model, batch, k, order), torch.zeros((len(batch), k), dtype=torch.long)
        else:
            samples = sample_lists(model, batch, k, steps, cfg.temperature, generator, order)
            items, passes = samples.served, samples.step_of
        lists.append(items.cpu().numpy())
        step_of.append(passes.cpu().numpy())
    return np.concatenate(lists), np.concatenate(step_of)


@dataclasses.dataclass
class Row:
    """One checkpoint decoded at one number of sampler steps."""

    steps: int | None  # sampler steps S; None: `one_pass`
    first: str  # the row of the same checkpoint at the first S (its "d vs first S")
    lists: np.ndarray  # (R, K) item indices
    step_of: np.ndarray  # (R, K) pass in which each slot was committed
    seconds: float


def decoding_stats(step_of: np.ndarray, steps: int | None) -> dict[str, float | None]:
    """{passes: mean forward passes per list, redrawn: share of slots drawn again after a collision, lists: share of
    lists with such a slot} of step_of (R, K). `redrawn` and `lists` are defined at steps = 1 only (at S > 1 a slot
    also waits for a later pass by the schedule) and are None otherwise."""
    one_shot = steps == 1
    return {"passes": float((step_of.max(1) + 1).mean()),
            "redrawn": float((step_of > 0).mean()) if one_shot else None,
            "lists": float((step_of > 0).any(1).mean()) if one_shot else None}


def label(steps: int | None, order: str = "slots") -> str:
    """The row suffix of a number of sampler steps and an order: "S=10", "1-pass" for `one_pass`, + " by score"."""
    return ("1-pass" if steps is None else f"S={steps}") + (" by score" if order == "score" else "")


def load(spec: str, overrides: list[str]) -> tuple[str, pipeline.Workspace, Retriever]:
    """CHECKPOINT[=NAME] -> (name, workspace of its config + overrides in its run directory, model)."""
    text, _, name = spec.partition("=")
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    ws = pipeline.prepare(config_from_checkpoint(path, None, [*overrides, f"out_dir={path.parent}"], rewards=False))
    return name or f"{path.parent.name}/{path.stem}", ws, load_checkpoint(path, ws.data.catalog)[0]


def score(rows: dict[str, Row], reference: str, ws: pipeline.Workspace, test: list[Example]) -> dict[str, dict]:
    """{group: {row: summary}}: `evaluate_methods` on the lists of every row, with the paired NDCG@10 difference to
    `reference` and to the row's first-S row, on the same resamples (one call per checkpoint, the same seed)."""
    results: dict[str, dict[str, dict]] = {}
    for first in dict.fromkeys(row.first for row in rows.values()):
        members = [name for name, row in rows.items() if row.first == first]
        methods = {name: (lambda _examples, lists=rows[name].lists: lists)
                   for name in dict.fromkeys([reference, *members])}
        scored = evaluate_methods(methods, test, ws.data, ws.cfg.eval, (reference, first), features=ws.features)
        for group, by_row in scored.items():
            results.setdefault(group, {}).update({name: by_row[name] for name in members})
    return results


def _diff(summary: dict, other: str) -> str:
    key = f"ndcg@10_vs_{other}"
    if key not in summary:
        return "-"
    lo, hi = summary[f"{key}_ci"]
    return f"{summary[key]:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def table(results: dict, rows: dict[str, Row], reference: str, test: list[Example]) -> str:
    """The printed table: per group and row, NDCG@10 [CI], the two paired differences, validity and decoding."""
    groups = example_groups(test)
    blocks = []
    for group, by_row in results.items():
        cells = []
        for name, s in by_row.items():
            st = decoding_stats(rows[name].step_of[groups[group]], rows[name].steps)
            lo, hi = s["ndcg@10_ci"]
            cells.append([name, s["n"], f"{s['ndcg@10']:.4f} [{lo:.4f}, {hi:.4f}]", _diff(s, reference),
                          _diff(s, rows[name].first), f"{s['constraint_sat']:.3f}", f"{s['duplicates']:.3f}",
                          f"{st['passes']:.2f}",
                          "-" if st["redrawn"] is None else f"{st['redrawn']:.3f} / {st['lists']:.3f}"])
        blocks.append(f"== {group} ==\n" + format_rows(
            ["row", "n", "NDCG@10 [95% CI]", "d vs reference", "d vs first S", "sat", "dup", "passes",
             "redrawn slots / lists"], cells))
    return "\n\n".join(blocks) + f"\nreference: {reference}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT[=NAME]")
    parser.add_argument("--steps", default="10,1,1p",
                        help="sampler steps S to score, comma-separated; 1p = one_pass (%(default)s)")
    parser.add_argument("--orders", default="slots",
                        help="rank orders to score, comma-separated: slots, score (sampler.order; %(default)s)")
    parser.add_argument("--reference", help="row of the paired differences (default: the first row)")
    parser.add_argument("--bootstrap", type=int, help="bootstrap resamples over users (default: eval.bootstrap)")
    parser.add_argument("--out", type=output_file, help="write the results as JSON here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of every checkpoint's scoring (repeatable), e.g. eval.test_draws=1")
    args = parser.parse_args()
    try:
        steps = [None if s == "1p" else int(s) for s in args.steps.split(",")]
    except ValueError:
        parser.error(f"--steps {args.steps}: comma-separated integers or 1p")
    orders = args.orders.split(",")
    if not orders or set(orders) - {"slots", "score"}:
        parser.error(f"--orders {args.orders}: comma-separated slots, score")
    sets = [*args.set, *([f"eval.bootstrap={args.bootstrap}"] if args.bootstrap else [])]
    rows: dict[str, Row] = {}
    test, ws0 = None, None
    for spec in args.checkpoints:
        try:
            name, ws, model = load(spec, sets)
        except FileNotFoundError as err:
            parser.error(str(err))
        examples = pipeline.examples(ws, "test")
        if test is not None and examples != test:
            parser.error(f"{spec}: other test requests than {args.checkpoints[0]} (another data split or seed)")
        test, ws0 = examples, ws0 or ws
        for s in steps:
            for order in orders:
                start = time.perf_counter()
                lists, step_of = decode(ws, model, test, s, order)
                row = f"{name} {label(s, order)}"
                rows[row] = Row(s, f"{name} {label(steps[0], orders[0])}", lists, step_of, time.perf_counter() - start)
                print(f"{row}: {len(test)} lists in {rows[row].seconds:.0f}s", flush=True)
    reference = args.reference or next(iter(rows))
    if reference not in rows:
        parser.error(f"--reference {reference!r} is none of the rows: {', '.join(rows)}")
    results = score(rows, reference, ws0, test)
    print(table(results, rows, reference, test))
    groups = example_groups(test)
    decoding = {name: {group: decoding_stats(row.step_of[idx], row.steps) for group, idx in groups.items()}
                for name, row in rows.items()}
    write_result(args.out, {"machine": machine(), "checkpoints": args.checkpoints, "steps": steps, "orders": orders,
                            "reference": reference, "overrides": sets, "decoding": decoding, "results": results,
                            "seconds": {name: row.seconds for name, row in rows.items()},
                            "config": config_to_dict(ws0.cfg)})


if __name__ == "__main__":
    main()
