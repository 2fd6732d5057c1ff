"""The `h2po` command line. Every subcommand that trains or evaluates takes `--config FILE` and `key=value`
overrides for any config field (`h2po config` lists them). User errors print one line and exit 2."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

from app.cli_parser import build_parser
from catalog.output import check_output, check_output_dir
from catalog.requests import request_from_refs
from core.carriers import Exclude, Prefer, Recency, Request, Require
from core.config import describe, load_config
from core.errors import UserError, quoted

# what `run`, `pretrain` and `train` write into OUT_DIR: each must be absent or a regular file before work starts
RUN_FILES = ("ease.json", "folds.safetensors", "most.safetensors", "pretrain.json", "preferences.parquet",
             "h2po.safetensors", "h2po_best.safetensors", "h2po_last.safetensors", "metrics.jsonl", "report.html",
             "results.json")


def _field_value(text: str, flag: str) -> tuple[str, str]:
    if "=" not in text:
        raise UserError(f"{flag} {quoted(text)}: expected FIELD=VALUE")
    field, value = text.split("=", 1)
    return field.strip(), value.strip()


def _constraints(args) -> tuple:
    out: list = [Exclude(*_field_value(t, "--exclude")) for t in args.exclude]
    out += [Require(*_field_value(t, "--require")) for t in args.require]
    for text in args.prefer:
        field, value = _field_value(text, "--prefer")
        weight = 1.0
        if ":" in value:
            value, raw = value.rsplit(":", 1)
            try:
                weight = float(raw)
            except ValueError:
                raise UserError(f"--prefer {quoted(text)}: weight {quoted(raw)} is not a number") from None
        out.append(Prefer(field, value, weight))
    if args.min_year is not None or args.half_life is not None:
        out.append(Recency(min_year=args.min_year, half_life=args.half_life))
    return tuple(out)


def cmd_run(args, pretrain_only: bool = False) -> None:
    from app import pipeline
    from learner.checkpoint import load_checkpoint

    start = time.time()
    cfg = load_config(args.config, args.overrides)
    check_output_dir(cfg.out_dir, RUN_FILES, "out_dir")
    _ensure_data(cfg)
    ws = pipeline.prepare(cfg)
    lam = pipeline.ease_lambda(ws)
    path = None if pretrain_only else pipeline.reusable_most(ws)
    if path is not None:
        print(f"MOST: reusing {path} (finished pretraining with these settings; delete it to pretrain again)")
    else:
        path, result = pipeline.run_pretrain(ws, pipeline.fit_ease(ws, lam))
        print(f"MOST: {result.steps} steps in {result.seconds:.0f}s ({result.samples_per_second:.0f} samples/s, "
              f"ended by {result.stopped_by}); best validation NDCG@10 {result.best_score:.4f} at step "
              f"{result.best_step}; checkpoint {path}")
    if not pretrain_only:
        models = {"MOST": load_checkpoint(path, ws.data.catalog)[0]}
        if cfg.h2po.steps > 0:
            models["H2PO"] = _run_h2po(ws, path)
        pipeline.run_evaluation(ws, models, lam, ws.out_dir / "results.json")
        print(f"results: {ws.out_dir / 'results.json'}")
        if "H2PO" in models and cfg.dashboard.report:
            from dashboard.report import write_report

            print(f"report: {write_report(ws.out_dir)}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"done in {time.time() - start:.0f}s, peak memory of this process {peak:.0f} MiB")
    if not pretrain_only and cfg.h2po.steps > 0:
        serve_after_training(cfg, ws.out_dir / "h2po.safetensors")


def _run_h2po(ws, most_path: Path):
    """Logged preferences, then H2PO on a local Ray instance from the MOST checkpoint.  -> the trained policy"""
    from actors.calls import LearnerFailed
    from actors.driver import train
    from app import pipeline
    from learner.checkpoint import load_checkpoint

    prefs = ws.out_dir / "preferences.parquet"
    pipeline.make_preferences(ws, prefs)
    pipeline.training_folds(ws)  # cached before the actors start, so none fits them
    try:
        result = train(ws.cfg, most_path, prefs, ws.cfg.h2po.steps)
    except LearnerFailed as err:
        raise UserError(f"{err} (for this run: h2po train --checkpoint {most_path} --preferences {prefs} --steps "
                        f"{ws.cfg.h2po.steps} --resume out_dir={ws.out_dir}, then h2po eval)") from err
    return load_checkpoint(result.checkpoint, ws.data.catalog)[0]


def _ensure_data(cfg) -> None:
    """Download MovieLens when no catalog is configured and it is found nowhere (the error says how otherwise)."""
    from catalog import movielens
    from catalog.schema import CatalogError

    if cfg.data.catalog or cfg.data.movielens or cfg.data.source or cfg.data.format != "movielens":
        return
    try:
        movielens.locate()
    except CatalogError:
        print(f"MovieLens {movielens.DATASET} not found locally; downloading it (h2po data download)")
        movielens.download()


def cmd_eval(args) -> None:
    from app import pipeline
    from learner.checkpoint import config_from_checkpoint, load_checkpoint

    check_output(args.out, "--out")  # before the minutes of scoring, not after
    cfg = config_from_checkpoint(Path(args.checkpoint), args.config, args.overrides, rewards=False)
    ws = pipeline.prepare(cfg)
    model, _, meta = load_checkpoint(Path(args.checkpoint), ws.data.catalog)
    name = "H2PO" if "from" in meta else "MOST"  # an h2po.safetensors names the checkpoint it started from
    pipeline.run_evaluation(ws, {name: model}, pipeline.ease_lambda(ws), Path(args.out))
    print(f"results: {args.out}")


def _load_for_retrieval(checkpoint: str):
    from catalog.batch import constraint_vocab
    from catalog.dataset import load_catalog
    from core.config import config_from_dict
    from learner.checkpoint import load_checkpoint, read_header

    path = Path(checkpoint)
    cfg = config_from_dict(json.loads(read_header(path)["config"]))
    catalog = load_catalog(cfg.data, path.parent)
    model, cfg, meta = load_checkpoint(path, catalog)
    if meta.get("complete") is False:  # written during a pretraining that never finished (learner.checkpoint)
        print(f"h2po: warning: {path} comes from an unfinished MOST pretraining (best so far, at step "
              f"{meta.get('step')}); lists from it may be weak. Finish it with `h2po pretrain` (or `h2po run`).",
              file=sys.stderr)
    return catalog, model, cfg, constraint_vocab(catalog)


def cmd_retrieve(args) -> int:
    from rollout.retrieve import recommend

    if bool(args.seeds) == bool(args.requests):
        raise UserError("give either --seeds or --requests")
    if args.requests:
        return _retrieve_batch(args)
    constraints = _constraints(args)
    catalog, model, cfg, vocab = _load_for_retrieval(args.checkpoint)
    request = request_from_refs(catalog, args.seeds, args.negatives, constraints,
                                cfg.requests.k if args.k is None else args.k, cfg.model.max_k)
    items = recommend(model, catalog, vocab, [request], cfg.sampler)[0]
    rows = [{"rank": r + 1, "item_id": int(catalog.item_ids[i]), "title": catalog.titles[i]}
            for r, i in enumerate(items)]
    if args.json:
        print(json.dumps({"items": rows}))
    else:
        for row in rows:
            print(f"{row['rank']:3d}. {row['title']}  [{row['item_id']}]")
    return 0


def _retrieve_batch(args) -> int:
    from catalog.requests import parse_request_line, request_lines
    from catalog.schema import CatalogError, atomic_write
    from rollout.retrieve import recommend

    if not args.out:
        raise UserError("--requests needs --out FILE for the results")
    source = Path(args.requests)
    if not source.is_file():
        raise UserError(f"requests file not found: {quoted(str(source), 200)}")
    check_output(args.out, "--out")
    catalog, model, cfg, vocab = _load_for_retrieval(args.checkpoint)
    results: list[dict] = []
    good: list[tuple[int, Request]] = []
    for line_no, line, problem in request_lines(source):
        if problem is None and not line.strip():
            problem = "empty line"
        try:
            if problem:
                raise CatalogError(problem)
            good.append((len(results), parse_request_line(catalog, line, cfg.requests.k, cfg.model.max_k)))
            results.append({})
        except CatalogError as err:
            results.append({"line": line_no, "error": f"{err}"})
    lists = recommend(model, catalog, vocab, [r for _, r in good], cfg.sampler)
    for (slot, _), items in zip(good, lists):
        results[slot] = {"line": slot + 1, "items": [{"item_id": int(catalog.item_ids[i]), "title": catalog.titles[i]}
                                                     for i in items]}
    atomic_write(Path(args.out), lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in results)))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"{source}:{r['line']}: {r['error']}", file=sys.stderr)
    print(f"{len(results) - len(failed)} of {len(results)} requests answered; results in {args.out}")
    return 1 if failed else 0


def cmd_preferences(args) -> int:
    """Generate logged preference pairs on the training users, write them, and re-read them with the validator."""
    from app import pipeline

    check_output(args.out, "--out")
    cfg = load_config(args.config, args.overrides)
    _ensure_data(cfg)
    return 1 if pipeline.make_preferences(pipeline.prepare(cfg), Path(args.out)).bad else 0


def cmd_train(args) -> None:
    from actors.calls import LearnerFailed
    from actors.driver import train
    from learner.checkpoint import config_from_checkpoint
    from learner.workspace import out_of_fold

    # placement: system.learners=2 system.zero_stage=2 ...
    cfg = config_from_checkpoint(Path(args.checkpoint), args.config, args.overrides)
    check_output_dir(cfg.out_dir, RUN_FILES, "out_dir")
    if out_of_fold(cfg.model):  # the out-of-fold priors, fit (or found) once here rather than in every actor
        from app import pipeline
        ws = pipeline.prepare(cfg)
        pipeline.training_folds(ws)
    try:
        steps = cfg.h2po.steps if args.steps is None else args.steps
        train(cfg, args.checkpoint, args.preferences, steps, args.mode, resume=args.resume)
    except LearnerFailed as err:
        raise UserError(str(err)) from err
    serve_after_training(cfg, Path(cfg.out_dir) / "h2po.safetensors")


def cmd_data(args) -> int:
    from catalog import movielens
    from catalog.dataset import FORMATS

    if args.data_command == "preferences":
        return cmd_preferences(args)
    if args.data_command == "download":
        path = movielens.download(Path(args.dest) if args.dest else None)
        print(f"MovieLens {movielens.DATASET} verified in {path}")
    elif args.data_command == "synth":
        from catalog.synth import SynthSpec, write_synth

        spec = SynthSpec(args.items, args.users, args.clusters, args.per_user, args.seed)
        spec.check()  # before the output check: a bad argument is named first
        check_output_dir(args.out, ("items.parquet", "interactions.parquet", "LICENSE.txt"), "--out")
        out = write_synth(spec, Path(args.out), progress=True)
        print(f"synthetic catalog written to {out} (items.parquet, interactions.parquet, LICENSE.txt); use it with "
              f"data.catalog={out}")
    else:
        locate, import_files, _ = FORMATS[args.format]
        check_output_dir(args.out, ("items.parquet", "interactions.parquet", "LICENSE.txt"), "--out")
        out = import_files(locate(args.source), Path(args.out))
        print(f"catalog written to {out} (items.parquet, interactions.parquet, LICENSE.txt)")
    return 0


def cmd_dashboard(args) -> None:
    from dashboard.feed import METRICS_FILE

    if not (Path(args.run) / METRICS_FILE).is_file():
        raise UserError(f"{args.run} has no {METRICS_FILE}: give the OUT_DIR of a training run (h2po train / run)")
    if args.report:
        from dashboard.report import write_report

        print(f"report: {write_report(args.run)}")
        return
    from dashboard.server import serve

    try:
        serve(args.run, args.host, args.port, args.token)
    except OSError as err:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {err.strerror or err}") from err


def cmd_serve(args) -> None:
    """`h2po serve`: the serve section comes from --config and serve.* overrides (the checkpoint's own is ignored)."""
    from serving.launch import serve_forever

    cfg = load_config(args.config, args.overrides).serve
    if args.detach and not (args.address or os.environ.get("RAY_ADDRESS")):
        raise UserError("--detach needs a running cluster (--address or $RAY_ADDRESS): a local instance stops with "
                        "the command")
    try:
        serve_forever(Path(args.checkpoint), cfg, args.token, args.address, args.detach)
    except OSError as err:
        raise UserError(f"cannot serve on {cfg.host}:{cfg.port}: {err.strerror or err}") from err


def serve_after_training(cfg, checkpoint: Path) -> None:
    """serve.after_training: serve the policy a run just wrote, until Ctrl-C (the opt-in of `h2po train` / `run`)."""
    if cfg.serve.after_training and checkpoint.is_file():
        from serving.launch import serve_forever

        print(f"serve.after_training: serving {checkpoint}", flush=True)
        serve_forever(checkpoint, cfg.serve)


def cmd_config() -> None:
    for key, default, text in describe():
        print(f"{key:28s} {json.dumps(default):>24s}  {text}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            cmd_run(args)
        elif args.command == "pretrain":
            cmd_run(args, pretrain_only=True)
        elif args.command == "eval":
            cmd_eval(args)
        elif args.command == "train":
            cmd_train(args)
        elif args.command == "retrieve":
            return cmd_retrieve(args)
        elif args.command == "data":
            return cmd_data(args)
        elif args.command == "dashboard":
            cmd_dashboard(args)
        elif args.command == "serve":
            cmd_serve(args)
        else:
            cmd_config()
    except UserError as err:
        print(f"h2po: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("h2po: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
