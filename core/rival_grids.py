"""The rivals' starting tuning grids (`eval.rival_grids`, evaluation/rivals.py) and their validation.

A config names a grid for any rival and parameter it changes; what it leaves out keeps the default below.
"""

from __future__ import annotations

from core.config_yaml import ConfigError

RIVAL_GRIDS = {  # evaluation/rivals.py; ml-latest-small's tuned values sit inside these (docs/results.md)
    "ALS": {"factors": [32, 64, 128], "regularization": [3.0, 10.0, 30.0], "alpha": [1.0, 3.0, 10.0]},
    "two-tower": {"temperature": [0.05, 0.1, 0.2], "dim": [64], "epochs": [60]},
    "two-tower + MMR": {"lam": [0.5, 0.7, 0.9]},
    "Mult-VAE": {"beta": [0.003, 0.00625, 0.0125, 0.025], "epochs": [100]},
    "intent": {"weight": [1.0, 3.0, 10.0, 30.0]},
}


def merge_rival_grids(given: dict) -> dict:
    """The default grids with the given rivals' parameters replaced; ConfigError names an unknown rival or
    parameter, or a grid that is not a non-empty list of numbers > 0."""
    unknown = sorted(set(given) - set(RIVAL_GRIDS))
    if unknown:
        raise ConfigError(f"eval.rival_grids: unknown rival {unknown[0]!r} (known: {', '.join(RIVAL_GRIDS)})")
    merged = {}
    for name, default in RIVAL_GRIDS.items():
        grid = given.get(name, {})
        if not isinstance(grid, dict) or set(grid) - set(default):
            raise ConfigError(f"eval.rival_grids.{name}: expected a mapping of {sorted(default)}, got {grid!r}")
        for param, values in grid.items():
            if not (isinstance(values, list) and values and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)):
                raise ConfigError(f"eval.rival_grids.{name}.{param} must be a non-empty list of numbers > 0, "
                                  f"got {values!r}")
        merged[name] = {**default, **grid}
    return merged
