"""What the benchmark scripts share: the machine description, the workspace and model, the device arguments and a
clock synchronised with the device, tables and JSON output.

`sampler.py`, `learner_step.py` and `training.py` load the run configuration exactly like `h2po run`
(`core.config.load_config`: defaults, an optional YAML file, `key=value` overrides), prepare the real catalog with
`learner.workspace.prepare` into a scratch run directory, and build the model with `learner.workspace.build_model`,
so they measure the code and model sizes that the pipeline uses. `system.py` and `ablation.py` run real H2PO
(`actors.driver.train`) from an `h2po run` directory with the config of its MOST checkpoint (`add_run_arguments`,
`h2po_run_config`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from app import pipeline
from catalog.output import atomic_write, check_output
from core.config import RunConfig, load_config
from core.errors import UserError
from evaluation.baselines import EASE
from learner.checkpoint import config_from_checkpoint
from learner.workspace import fit_ease as fit_run_ease
from learner.workspace import prepare

DEFAULT_WORKDIR = "runs/bench"
# EASE's lambda changes the prior's values, not its cost; the benchmarks use a fixed one instead of tuning it.
DEFAULT_EASE_LAMBDA = 3000.0


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --workdir, --threads, --out and trailing `key=value` config overrides."""
    parser.add_argument("--config", default=None, help="YAML run config (default: the built-in defaults)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help="scratch run directory where the catalog is imported (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all cores")
    parser.add_argument("--out", default=None, type=output_file, help="write the results as JSON to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. model.d_model=32")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device cpu|cuda and --bf16 (system.bf16's autocast of the forward passes, on a GPU only)."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast of the forward passes (needs --device cuda)")


def check_device_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error for --bf16 off the GPU (it would measure float32 under a bf16 label) or a missing GPU."""
    if args.bf16 and args.device != "cuda":
        parser.error("--bf16 needs --device cuda (system.bf16 autocasts on a GPU only)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")


def add_run_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """--run DIR (an `h2po run` directory), --steps, --out and trailing `key=value` overrides of the H2PO runs."""
    parser.add_argument("--run", required=True, help="run directory of `h2po run` (most.safetensors, preferences)")
    parser.add_argument("--steps", type=int, default=steps, help="learner steps of every measured run")
    parser.add_argument("--out", type=output_file, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides of every run")


def h2po_run_config(parser: argparse.ArgumentParser, run: Path, out_dir: Path, overrides: list[str]) -> RunConfig:
    """The config of `run`'s MOST checkpoint + overrides, for a measured H2PO run into out_dir: dashboard, report,
    validation probes (so the last step's policy is kept), train-state checkpoints and the time budget off. A run
    directory without its checkpoint or preferences is a usage error."""
    if not (run / "most.safetensors").is_file() or not (run / "preferences.parquet").is_file():
        parser.error(f"{run} needs most.safetensors and preferences.parquet (run `h2po run` first)")
    fixed = [f"out_dir={out_dir}", "dashboard.enabled=false", "dashboard.report=false", "h2po.eval_every=0",
             "h2po.keep=last", "h2po.max_minutes=0", "h2po.checkpoint_every=0"]
    return config_from_checkpoint(run / "most.safetensors", None, [*fixed, *overrides])  # a header is data


def set_threads(threads: int) -> int:
    """torch.set_num_threads(threads or all cores); returns the number in use."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def now() -> float:
    """perf_counter after finishing queued device work (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def machine() -> dict:
    """The machine the numbers were measured on."""
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def workspace(args: argparse.Namespace, base: dict | None = None) -> pipeline.Workspace:
    """Config (checkpoint's config as the base, if given) + overrides -> prepared workspace in --workdir."""
    cfg: RunConfig = load_config(args.config, [*args.overrides, f"out_dir={args.workdir}"], base=base)
    return prepare(cfg)


def fit_ease(ws: pipeline.Workspace, lam: float = DEFAULT_EASE_LAMBDA) -> EASE:
    """EASE on the training users (the model's prior when `model.prior=ease`, and MOST's relevance scorer), fitted as
    the run fits it (`learner.workspace.fit_ease`: model.prior_items, model.prior_neighbours)."""
    return fit_run_ease(ws, lam)


def format_rows(header: list[str], rows: list[list]) -> str:
    """A plain-text table: floats with 4 significant digits, columns padded."""
    cells = [header] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def output_file(text: str) -> str:
    """argparse type of --out: the target is checked when the arguments are read, before any measuring
    (absent or a regular file, in a writable place; `catalog.output.check_output`)."""
    try:
        return str(check_output(text, "--out"))
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def write_result(path: str | None, result: dict) -> None:
    """Write `result` as indented JSON (atomically, parent directories created) when a path is given."""
    if path:
        atomic_write(Path(path), lambda p: p.write_text(json.dumps(result, indent=2)))
        print(f"results written to {path}")
