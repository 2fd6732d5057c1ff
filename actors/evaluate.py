"""Validation quality during training, for the dashboard: NDCG@10 per request family of the published weights
every `h2po.eval_every` learner steps, and of the baselines once (drawn as reference lines next to the curve).

The driver holds one `ValidationProbe`: a workspace, a policy copy it loads published weights into, and the
validation requests (`h2po.workspace.examples(ws, "val")`). It runs in the driver between learner steps; the
test-split table of `h2po run` is computed separately (`app.pipeline.run_evaluation`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from actors.policy import load_policy, load_weights
from core.config import RunConfig
from evaluation.baselines import build_baselines
from evaluation.metrics import item_mask, ranking_metrics
from learner import workspace


class ValidationProbe:
    """NDCG@10 on the validation requests of any recommender, per request (`ndcg`) and per family (`records`)."""

    def __init__(self, cfg: RunConfig, checkpoint: str | Path) -> None:
        self.policy = load_policy(cfg, checkpoint)
        ws = self.policy.ws
        self.examples = workspace.examples(ws, "val")
        self.relevant = item_mask([e.targets for e in self.examples], ws.data.catalog.n_items)
        self.families = np.array([e.family for e in self.examples])
        self.users = np.array([e.user for e in self.examples])  # clusters of the bootstrap over users

    def ndcg(self, recommend) -> np.ndarray:
        """(R,) NDCG@10 of one recommender (examples -> (R, k) lists) on each validation request."""
        return ranking_metrics(recommend(self.examples), self.relevant, [10])["ndcg@10"]

    def records(self, method: str, ndcg: np.ndarray, step: int | None) -> list[dict]:
        """`eval` records (`dashboard.feed`), one per family, of one recommender's per-request NDCG@10."""
        return [{"step": step, "method": method, "split": "val", "family": str(family),
                 "metrics": {"ndcg@10": float(ndcg[self.families == family].mean())}}
                for family in sorted(set(self.families))]

    def baselines(self) -> list[dict]:
        ws = self.policy.ws
        found = build_baselines(ws.data, ws.features, ws.cfg.eval, workspace.ease_lambda(ws))
        k = ws.cfg.requests.k
        return [r for name, b in found.items()
                for r in self.records(name, self.ndcg(functools.partial(b.recommend, k=k)), None)]

    def policy_ndcg(self, state: dict[str, torch.Tensor]) -> np.ndarray:
        """(R,) NDCG@10 of published weights (an empty `state`: the policy as loaded, the MOST checkpoint)."""
        if state:
            load_weights(self.policy.model, state)
        return self.ndcg(workspace.model_recommender(self.policy.ws, self.policy.model))
