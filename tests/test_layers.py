"""The import direction (issue 15): each package imports only the layers below it, so the graph can be drawn.

Layers, lowest first (a module may import its own package and any lower layer, never a higher one or a sibling of
its own layer):
  0 the leaf `core/`: config, errors, carriers, shared numerics (torch and numpy only)
  1 `catalog/`   2 `model/`, `evaluation/`   3 `rewards/`   4 `rollout/`   5 `learner/`   6 `dashboard/`
  7 `actors/`    8 `serving/`   9 the app `app/`: the CLI and the single-machine pipeline
`model/` is stricter still: it imports torch and the leaf only. Every import counts, the ones inside functions too.
Run: `python -m pytest tests/test_layers.py -q`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"core": 0, "catalog": 1, "model": 2, "evaluation": 2, "rewards": 3, "rollout": 4,
          "learner": 5, "dashboard": 6, "actors": 7, "serving": 8, "app": 9}


def layer(module: str) -> tuple[int, str] | None:
    """(rank, the layer's name) of a module of the project, None for anything else (stdlib, third party)."""
    name = module.split(".")[0]
    return (LAYERS[name], name) if name in LAYERS else None


def imported(source: str) -> set[str]:
    """Every absolute module a source imports (`from app import pipeline` counts as app.pipeline)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.update(f"{node.module}.{alias.name}" if "." not in node.module else node.module for alias in node.names)
    return out


def upward(module: str, source: str) -> set[tuple[str, str]]:
    """(module, target) for each import of `source` that goes to a higher layer or a sibling of the same rank."""
    own = layer(module)
    found = set()
    for target in imported(source):
        theirs = layer(target)
        if own is None or theirs is None or theirs[1] == own[1]:
            continue  # outside the project, or the same package
        if theirs[0] >= own[0]:
            found.add((module, target))
    return found


def project_modules() -> dict[str, str]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p.read_text()
            for name in {n.split(".")[0] for n in LAYERS} for p in (ROOT / name).glob("*.py")}


def test_imports_run_downward_only():
    found = set().union(*(upward(module, source) for module, source in project_modules().items()))
    assert found == set(), f"upward imports: {sorted(found)}"


def test_model_imports_torch_and_the_leaf_only():
    project = {target for module, source in project_modules().items() if module.startswith("model.")
               for target in imported(source) if layer(target) is not None}
    assert {target.split(".")[0] for target in project} <= {"core", "model"}, sorted(project)


def test_an_upward_import_is_caught():
    """model/ importing the sampler, a lazy import of the app inside a function, and two siblings of one layer."""
    assert upward("model.transformer", "from rollout.sampler import sample_lists") == \
        {("model.transformer", "rollout.sampler")}
    assert upward("catalog.dataset", "def f():\n    from app import pipeline\n") == \
        {("catalog.dataset", "app.pipeline")}
    assert upward("model.diffusion", "import evaluation.metrics") == {("model.diffusion", "evaluation.metrics")}
    assert upward("rollout.sampler", "from model.transformer import Retriever\nfrom core.config import X") == set()
