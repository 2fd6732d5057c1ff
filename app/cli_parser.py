"""The `h2po` command line's arguments: one builder per subcommand (the commands themselves: app/cli.py)."""

from __future__ import annotations

import argparse

RUN_HELP = """Run the main job on the embedded default: import the data, tune EASE, pretrain with MOST (or reuse
OUT_DIR/most.safetensors made with the same settings), generate logged preferences, fine-tune with H2PO on a
local Ray instance, or the cluster RAY_ADDRESS names (h2po.steps learner steps, within h2po.max_minutes; the
dashboard URL is printed), evaluate baselines, MOST and H2PO on the test split, and print the comparison table.
h2po.steps=0 skips H2PO."""

def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (may name a `base:` file it overrides)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override any config field, e.g. most.lr=3e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="h2po", description="Seed-set-conditioned generative retrieval: "
                                     "MOST pretraining, distributed H2PO fine-tuning, retrieval under constraints, "
                                     "evaluation, a live dashboard.")
    sub = parser.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("run", help="the main job (MOST + H2PO + eval)", description=RUN_HELP))
    _config_args(sub.add_parser("pretrain", help="MOST pretraining; writes OUT_DIR/most.safetensors"))
    ev = sub.add_parser("eval", help="compare a checkpoint with the baselines on the test split")
    ev.add_argument("--checkpoint", required=True, help="checkpoint file (most.safetensors)")
    ev.add_argument("--out", required=True, help="where to write the results JSON")
    _config_args(ev)
    _retrieve_parser(sub)
    _train_parser(sub)
    _data_parser(sub)
    _dashboard_parser(sub)
    _serve_parser(sub)
    sub.add_parser("config", help="list every config key with its default and meaning")
    return parser


def _retrieve_parser(sub) -> None:
    rt = sub.add_parser("retrieve", help="generate a list for a seed set (or a JSONL file of requests)")
    rt.add_argument("--checkpoint", required=True, help="checkpoint file (most.safetensors)")
    rt.add_argument("--seeds", nargs="+", help="seed items by id or exact title")
    rt.add_argument("--negatives", nargs="+", default=[], help="items not wanted 'more of' (ids or titles)")
    rt.add_argument("--exclude", action="append", default=[], metavar="FIELD=VALUE", help="hard: no item has it")
    rt.add_argument("--require", action="append", default=[], metavar="FIELD=VALUE", help="hard: every item has it")
    rt.add_argument("--prefer", action="append", default=[], metavar="FIELD=VALUE[:WEIGHT]", help="soft preference")
    rt.add_argument("--min-year", type=int, help="hard: only items from this year on")
    rt.add_argument("--half-life", type=float, help="soft recency preference, in years")
    rt.add_argument("--k", type=int, default=None, help="list length (default: the config's requests.k)")
    rt.add_argument("--json", action="store_true", help="print the list as JSON")
    rt.add_argument("--requests", help="JSONL file: one request per line (seeds, negatives, constraints, k)")
    rt.add_argument("--out", help="with --requests: JSONL output, one result per input line")


def _train_parser(sub) -> None:
    tr = sub.add_parser("train", help="H2PO fine-tuning on Ray + DeepSpeed; writes OUT_DIR/h2po.safetensors")
    tr.add_argument("--checkpoint", required=True, help="MOST checkpoint to start from (also the reference)")
    tr.add_argument("--preferences", help="logged preference pairs (Parquet, `h2po data preferences`); none = "
                    "no off-policy term")
    tr.add_argument("--steps", type=int, default=None, help="learner steps (weight versions); default h2po.steps")
    tr.add_argument("--mode", choices=["sync", "async"], default=None, help="async overlaps rollouts with training "
                    "(h2po.max_staleness steps ahead), sync alternates; default: the driver's (async)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT_DIR/train_state (written every "
                    "h2po.checkpoint_every steps); --steps is the total")
    _config_args(tr)


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="get or convert datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    dl = dsub.add_parser("download", help="fetch MovieLens ml-latest-small and verify its checksums")
    dl.add_argument("--dest", help="directory to install into (default: the user cache directory)")
    im = dsub.add_parser("import", help="convert MovieLens CSVs or MovieTweetings .dat files into the project's "
                         "Parquet schema")
    im.add_argument("--format", choices=["movielens", "movietweetings"], default="movielens", help="source format")
    im.add_argument("--source", default="", help="ml-latest-small or MovieTweetings directory (default: located "
                    "automatically, e.g. ../shared/data/<dataset>)")
    im.add_argument("--out", required=True, help="output directory for items/interactions Parquet")
    sy = dsub.add_parser("synth", help="generate a synthetic catalog with planted structure (clusters, correlated "
                         "genres and years, power-law popularity) in the Parquet schema; deterministic from --seed")
    sy.add_argument("--items", type=int, required=True, help="number of items N")
    sy.add_argument("--users", type=int, required=True, help="number of users U")
    sy.add_argument("--clusters", type=int, default=0, help="latent clusters C (default: about sqrt(N) / 3)")
    sy.add_argument("--per-user", type=int, default=40, help="mean interactions per user, before repeats are dropped")
    sy.add_argument("--seed", type=int, default=0, help="random seed (the same arguments give identical files)")
    sy.add_argument("--out", required=True, help="output directory for items/interactions Parquet")
    pf = dsub.add_parser("preferences", help="logged preference pairs from the configured behaviour policy")
    pf.add_argument("--out", required=True, help="output Parquet file (schema: catalog/preferences.py)")
    _config_args(pf)


def _dashboard_parser(sub) -> None:
    db = sub.add_parser("dashboard", help="serve the live page of a run directory (finished or running)")
    db.add_argument("--run", required=True, help="run directory holding metrics.jsonl (a training run's OUT_DIR)")
    db.add_argument("--host", default="127.0.0.1", help="address to bind; another than loopback only when asked")
    db.add_argument("--port", type=int, default=0, help="port to bind (0 = a free port; the URL is printed)")
    db.add_argument("--token", default=None, help="token every request must carry (default: $H2PO_DASHBOARD_TOKEN; "
                    "beyond loopback a generated one, printed in the URL)")
    db.add_argument("--report", action="store_true", help="write OUT_DIR/report.html (self-contained) and exit")


def _serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="serve a checkpoint (and EASE, the two-tower rival) over HTTP on Ray Serve")
    sv.add_argument("--checkpoint", required=True, help="checkpoint file; replaced by a newer one of the same catalog "
                    "(training writes it atomically), it is hot-swapped in")
    sv.add_argument("--address", default=None, help="Ray cluster to deploy on (default: $RAY_ADDRESS, else a local "
                    "instance on loopback)")
    sv.add_argument("--token", default=None, help="bearer token every request must carry (default: "
                    "$H2PO_SERVE_TOKEN; beyond loopback a generated one, printed)")
    sv.add_argument("--detach", action="store_true", help="on a cluster: leave the applications running and exit")
    _config_args(sv)
