"""The import direction (issue 15): each package imports only the layers below it, so the graph can be drawn.

Layers, lowest first (a module may import its own package and any lower layer, never a higher one or a sibling of
its own layer):
  0 the leaf: `core/`, and the config and error modules of `h2po/` (config, config_check, config_yaml, errors)
  1 `catalog/`   2 `model/`, `evaluation/`   3 `rewards/`   4 `rollout/`   5 `learner/`   6 `dashboard/`
  7 `actors/`    8 `serving/`   9 the app: `h2po.cli`, `h2po.cli_parser`, `h2po.pipeline`
Every import counts, the ones inside functions too. KNOWN_UPWARD lists the upward edges that remain today (the
actors' workspace and validation probe still call the pipeline); the test fails on any other upward edge, and on a
known one that is gone (so the list shrinks with the code). Run: `python -m pytest tests/test_layers.py -q`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEAF = ("core", "h2po.config", "h2po.config_check", "h2po.config_yaml", "h2po.errors")
LAYERS = {**dict.fromkeys(LEAF, 0), "catalog": 1, "model": 2, "evaluation": 2, "rewards": 3, "rollout": 4,
          "learner": 5, "dashboard": 6, "actors": 7, "serving": 8, "h2po": 9}
KNOWN_UPWARD = {("actors.evaluate", "h2po.pipeline"), ("actors.workspace", "h2po.pipeline")}


def layer(module: str) -> tuple[int, str] | None:
    """(rank, the layer's name) of a module of the project, None for anything else (stdlib, third party)."""
    for name in sorted(LAYERS, key=len, reverse=True):  # the longest match: h2po.config before h2po
        if module == name or module.startswith(name + "."):
            return LAYERS[name], name
    return None


def imported(source: str) -> set[str]:
    """Every absolute module a source imports (`from h2po import pipeline` counts as h2po.pipeline)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.update(f"{node.module}.{alias.name}" if node.module in ("h2po", "core") else node.module
                       for alias in node.names)
    return out


def upward(module: str, source: str) -> set[tuple[str, str]]:
    """(module, target) for each import of `source` that goes to a higher layer or a sibling of the same rank."""
    own = layer(module)
    found = set()
    for target in imported(source):
        theirs = layer(target)
        if own is None or theirs is None or theirs[1] == own[1] or theirs[0] == own[0] == 0:
            continue  # outside the project, the same package, or within the leaf
        if theirs[0] >= own[0]:
            found.add((module, target))
    return found


def project_modules() -> dict[str, str]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p.read_text()
            for name in {n.split(".")[0] for n in LAYERS} for p in (ROOT / name).glob("*.py")}


def test_imports_run_downward_only():
    found = set().union(*(upward(module, source) for module, source in project_modules().items()))
    assert found - KNOWN_UPWARD == set(), f"upward imports: {sorted(found - KNOWN_UPWARD)}"
    assert KNOWN_UPWARD - found == set(), f"gone, remove from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - found)}"


def test_an_upward_import_is_caught():
    """model/ importing the sampler, a lazy import of the app inside a function, and two siblings of one layer."""
    assert upward("model.transformer", "from rollout.sampler import sample_lists") == \
        {("model.transformer", "rollout.sampler")}
    assert upward("catalog.dataset", "def f():\n    from h2po import pipeline\n") == \
        {("catalog.dataset", "h2po.pipeline")}
    assert upward("model.diffusion", "import evaluation.metrics") == {("model.diffusion", "evaluation.metrics")}
    assert upward("rollout.sampler", "from model.transformer import Retriever\nfrom h2po.config import X") == set()
