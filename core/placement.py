"""Where the actors of a distributed H2PO run go on a Ray cluster: `system.placement` of the run config.

`actors.placement` applies it: one Ray placement group for the learner ranks and one for the rollout actors, a
bundle per actor holding its CPUs, GPUs and the role's custom resources, with the role's strategy. Custom resources
are node labels: a node started with `ray start --resources '{"learner_node": 4}'` takes bundles that ask for
`learner_node`, other nodes do not. The replay buffer is not in a group: it runs on the driver's node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from core.config_yaml import ConfigError
from core.errors import quoted

Strategy = Literal["pack", "spread", "strict_pack", "strict_spread"]

STRATEGY_HELP = ("pack = as few nodes as possible, spread = across nodes where they fit (a lost node takes fewer "
                 "with it), strict_pack = one node, strict_spread = one node each (fails when there are too few)")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class PlacementConfig:
    """Ray placement groups of the learner ranks and of the rollout actors (module docstring)."""

    learners: Strategy = field(default="pack", metadata=_help(
        f"Placement-group strategy of the learner ranks' bundles: {STRATEGY_HELP}. pack keeps the gradient "
        "all-reduce on few nodes."))
    rollouts: Strategy = field(default="spread", metadata=_help(
        f"Placement-group strategy of the rollout actors' bundles: {STRATEGY_HELP}. A rollout actor whose node dies "
        "is restarted where its bundle is placed again (not with strict_spread when no spare node is left)."))
    learner_resources: dict = field(default_factory=dict, metadata=_help(
        "Custom Ray resources in each learner rank's bundle, e.g. {learner_node: 1}: ranks go only to nodes started "
        "with `ray start --resources` naming them; {} = any node with the CPUs/GPUs."))
    rollout_resources: dict = field(default_factory=dict, metadata=_help(
        "Custom Ray resources in each rollout actor's bundle (as learner_resources), e.g. {rollout_node: 1}."))

    def __post_init__(self) -> None:
        for role in ("learner", "rollout"):
            for name, amount in getattr(self, f"{role}_resources").items():
                if name in ("CPU", "GPU", "memory") or not isinstance(amount, (int, float)) or isinstance(
                        amount, bool) or not (0 < amount <= 1e6 and math.isfinite(amount)):
                    raise ConfigError(f"system.placement.{role}_resources.{name} = {quoted(amount)}: a custom "
                                      "resource needs an amount in (0, 1e6]; CPUs and GPUs are system."
                                      f"{role}_cpus / {role}_gpus")
