"""Placing a run's actors on the nodes of a Ray cluster (`system.placement`, core/placement.py).

    groups = place_groups(system)                    # waits until every bundle has a node, else UserError
    RolloutActor.options(**groups.rollout_options(i, system))...
    groups.remove()                                  # at the end of the run

Learner ranks and rollout actors each get a Ray placement group, one bundle per actor (its CPUs, GPUs and the role's
custom resources), with the role's strategy (pack, spread, strict_pack, strict_spread); rank r runs in bundle r,
rollout actor i in bundle i. A rollout actor (restarted by Ray, `max_restarts`) whose node dies comes back in its
bundle, which Ray places again on a node that still fits it. The replay buffer holds every accepted sample between
checkpoints, so it runs on the driver's node (node affinity: a placement group cannot name "the node this process
runs on"); when that node dies the driver dies with it and `--resume` continues from the train state.

`node_name(node_id)` says where an actor is in words (address, short node id, the node's custom resources), for the
error of a learner rank that died with its node and for the run's start line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from core.config import SystemConfig
from core.errors import UserError

PLACEMENT_TIMEOUT = 300.0  # seconds for a placement group's bundles to find nodes (an autoscaler may add some)
STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}


def bundle(cpus: float, gpus: float, resources: dict) -> dict:
    """One actor's bundle: its CPUs, GPUs and custom resources (zero amounts left out: Ray refuses them)."""
    return {name: float(amount) for name, amount in {"CPU": cpus, "GPU": gpus, **resources}.items() if amount > 0}


@dataclass
class Groups:
    """The run's placement groups (None for a role whose bundles would be empty: those actors go anywhere) and, per
    role, the (node id, node name) of each bundle when they were placed."""

    learners: object | None
    rollouts: object | None
    placed: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def learner_options(self, rank: int, system: SystemConfig) -> dict:
        return _options(self.learners, rank, system.learner_cpus, system.learner_gpus)

    def rollout_options(self, index: int, system: SystemConfig) -> dict:
        return _options(self.rollouts, index, system.rollout_cpus, system.rollout_gpus)

    def nodes(self, role: str) -> list[str]:
        """Node id of each bundle of the role's group ("learners", "rollouts"), as placed now ([] without one)."""
        group = getattr(self, role)
        if group is None:
            return []
        table = ray.util.placement_group_table(group)
        return [table["bundles_to_node_id"].get(i, "") for i in range(len(table["bundles"]))]

    def remove(self) -> None:
        for group in (self.learners, self.rollouts):
            if group is not None:
                remove_placement_group(group)


def _options(group: object | None, index: int, cpus: float, gpus: float) -> dict:
    options = {"num_cpus": cpus, "num_gpus": gpus}
    if group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
    return options


def place_groups(system: SystemConfig) -> Groups:
    """Create both placement groups and wait until they are placed; UserError naming the role, its bundles and the
    cluster's resources when they do not fit within PLACEMENT_TIMEOUT."""
    placement = system.placement
    wanted = {"learner ranks": ([bundle(system.learner_cpus, system.learner_gpus, placement.learner_resources)]
                                * system.learners, placement.learners),
              "rollout actors": ([bundle(system.rollout_cpus, system.rollout_gpus, placement.rollout_resources)]
                                 * system.rollout_actors, placement.rollouts)}
    groups = {}
    for role, (bundles, strategy) in wanted.items():
        groups[role] = placement_group(bundles, strategy=strategy.upper()) if bundles[0] else None
    try:
        for role, group in groups.items():
            if group is not None and not group.wait(timeout_seconds=PLACEMENT_TIMEOUT):
                bundles, strategy = wanted[role]
                raise UserError(f"the {role}' placement group ({len(bundles)} x {bundles[0]}, {strategy}) found no "
                                f"nodes in {PLACEMENT_TIMEOUT:.0f}s; the cluster has {cluster_resources()} "
                                "(system.placement, system.*_cpus / *_gpus)")
    except BaseException:
        Groups(*groups.values()).remove()
        raise
    placed = Groups(*groups.values())
    names = {node: node_name(node) for role in ("learners", "rollouts") for node in placed.nodes(role)}
    placed.placed = {role: [(node, names[node]) for node in placed.nodes(role)] for role in ("learners", "rollouts")}
    print("placed: learner ranks on " + "; ".join(names[n] for n in placed.nodes("learners")) + " | rollout actors on "
          + "; ".join(names[n] for n in placed.nodes("rollouts")), flush=True)
    return placed


def cluster_resources() -> str:
    """The alive nodes' resources in words (for a placement error)."""
    return "; ".join(f"{node_name(n['NodeID'])}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(n["Resources"].items())
                                                              if not k.startswith("node:") and "_group_" not in k)
                     for n in ray.nodes() if n["Alive"])


def driver_node_options() -> dict:
    """Options that keep an actor on the driver's node (the replay buffer)."""
    here = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}


def node_name(node_id: str) -> str:
    """`ADDRESS node ID8 [custom resources]` of a node (the labels while it is alive: a dead node has none)."""
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            custom = sorted(k for k in node["Resources"] if k not in STANDARD and not k.startswith("node:")
                            and "_group_" not in k)
            labels = f" [{', '.join(custom)}]" if custom else ""
            return f"{node['NodeManagerAddress']} node {node_id[:8]}{labels}"
    return f"node {node_id[:8]}"


def node_alive(node_id: str) -> bool:
    return any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes())
