"""Process set-up shared by the actors (wiring, no Ray): the workspace, the MOST policy and weight loading.

Every actor process builds its own `Workspace` from the run config (the catalog is read from the run directory,
which must be shared storage on a multi-node cluster) and loads the MOST checkpoint, which must have been made on
that catalog. The relevance of the MOST anchor and the rewards is the model's sparse EASE prior when it has one
(the same top-m neighbours pretraining used), else EASE's top-m neighbours with the configured or tuned lambda.
With `model.prior_folds`, H2PO trains as MOST did: each batch of training requests (rollouts, anchor) comes from one
fold's users and its prior is EASE fit without them (`learner.workspace.training_folds`, cached in the run
directory), as it would be for a user EASE never saw.
"""

from __future__ import annotations

import copy
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import RunConfig
from core.numerics import Neighbours
from learner.checkpoint import load_checkpoint
from learner.pretrain import Fold
from learner.workspace import Workspace, ease_lambda, fit_ease, prepare, prior_neighbours, training_folds
from model.transformer import Retriever


@dataclass
class Policy:
    """A process's workspace and the policy loaded from a checkpoint."""

    ws: Workspace
    model: Retriever
    relevance: Neighbours  # (N, m) item-to-item relevance: EASE's B, each item's top-m neighbours
    folds: list[Fold] | None  # model.prior_folds: training users in folds, each with EASE fit without them


def load_policy(cfg: RunConfig, checkpoint: str | Path) -> Policy:
    """Prepare the workspace of `cfg` and load the checkpoint's model onto its catalog."""
    ws = prepare(cfg)
    model, _, _ = load_checkpoint(Path(checkpoint), ws.data.catalog)
    relevance = model.prior
    if relevance is None:
        relevance = prior_neighbours(ws, fit_ease(ws, ease_lambda(ws)))
    return Policy(ws, model, relevance, training_folds(ws))


def frozen_copy(model: Retriever) -> Retriever:
    """A frozen copy (eval mode, no gradients) that shares the model's buffers (features, prior neighbours)."""
    shared = {id(buffer): buffer for buffer in model.buffers()}
    ref = copy.deepcopy(model, memo=shared)
    ref.requires_grad_(False)
    return ref.eval()


def load_weights(model: Retriever, state: dict[str, torch.Tensor]) -> None:
    """Load published weights: every parameter must be present; buffers (constants) may be left out."""
    params = {name for name, _ in model.named_parameters()}
    missing, unknown = params - set(state), set(state) - set(model.state_dict())
    if missing or unknown:
        raise KeyError(f"published weights do not fit the model: missing {sorted(missing)[:5]}, "
                       f"unknown {sorted(unknown)[:5]}")
    model.load_state_dict(state, strict=False)


class ActorProcess:
    """What every actor answers about its own process."""

    def peak_memory(self) -> float:
        """Peak resident memory of this actor's process, MiB."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
