"""Learned rivals in torch, trained on the training users only: a two-tower retriever and Mult-VAE.

- `TwoTower`: the embedding retrieval the paper argues against. Query = mean of the seeds' query-tower embeddings,
  item = its item-tower embedding, both L2-normalised; trained with in-batch sampled softmax (temperature tau) from
  a random seed subset of a training user's positives to one of the user's other positives; items are ranked by
  the inner product. Items without a training positive never get a learned embedding and rank last.
- `MultVAE` (Liang et al. 2018, arXiv:1802.05814): x -> L2 normalise -> dropout -> tanh MLP -> (mu, logvar) ->
  z -> tanh MLP -> logits; loss = -sum x * log_softmax(logits) + beta * KL, beta = min(beta_max, step / total
  steps). A request is scored by encoding its seed multi-hot (mu, no dropout). Written here rather than taken from
  cornac: cornac's VAECF / RecVAE `score(user_idx)` only encode rows of the training matrix they were fitted on,
  so folding in an unseen request's seed set would mean reaching into their internal networks and item maps.

Both train for `epochs` passes over the training users (budgets in epochs, not minutes); `stop` < epochs ends
training early at the same state a full run passes through, so validation can choose the epoch (`fit_neural`),
and a budget whose last epoch validates best is doubled (`fit_within_budget`).
Seeded: the same arguments give the same weights.

Example:
    vae = MultVAE(data.catalog, data.train_matrix, beta=0.2, epochs=100, stop=60, seed=0)
    scores = vae.scores(examples)  # (R, N)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from catalog.schema import Catalog
from core.carriers import Example
from evaluation.baselines import Baseline, seed_matrix

EpochHook = Callable[[int, "NeuralRival"], None]  # (epochs done, model) after every epoch


class NeuralRival(Baseline):
    """Shared training loop: seeded, `epochs` planned, stops after `stop`, calls `hook` after every epoch."""

    batch_size = 64
    lr = 1e-3
    passes = 1  # an epoch visits every training user this many times

    def __init__(self, catalog: Catalog, train_matrix: np.ndarray, epochs: int, stop: int | None, seed: int) -> None:
        super().__init__(catalog)
        self.x = torch.from_numpy(np.ascontiguousarray(train_matrix, dtype=np.float32))  # (U, N)
        self.epochs, self.seed = int(epochs), seed
        self.stop = self.epochs if stop is None else int(min(stop, epochs))

    def fit(self, hook: EpochHook | None = None) -> NeuralRival:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.build()
            rng = np.random.default_rng(self.seed)
            opt = self.optimizer()
            steps_per_epoch = -(-len(self.x) * self.passes // self.batch_size)
            total = self.epochs * steps_per_epoch
            for epoch in range(self.stop):
                self.net.train()
                order = rng.permutation(np.tile(np.arange(len(self.x)), self.passes))
                for b in range(steps_per_epoch):
                    rows = order[b * self.batch_size:(b + 1) * self.batch_size]
                    loss = self.loss(rows, rng, (epoch * steps_per_epoch + b) / total)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                self.net.eval()
                if hook is not None:
                    hook(epoch + 1, self)
        return self

    def build(self) -> None:
        raise NotImplementedError

    def optimizer(self) -> torch.optim.Optimizer:
        # fused: one kernel over all tensors (the same Adam; on a 9,932 x 5,186 Mult-VAE it took half the step)
        return torch.optim.Adam(self.net.parameters(), lr=self.lr, fused=True)

    def loss(self, rows: np.ndarray, rng: np.random.Generator, progress: float) -> torch.Tensor:
        raise NotImplementedError


class TwoTower(NeuralRival):
    """Dual encoder: mean-pooled query-tower seed embeddings against item-tower embeddings (module docstring)."""

    batch_size = 128
    lr = 1e-2
    passes = 8

    def __init__(self, catalog: Catalog, train_matrix: np.ndarray, dim: int, temperature: float, epochs: int,
                 stop: int | None, seed: int, seed_sizes: Sequence[int] = (3, 5, 10)) -> None:
        super().__init__(catalog, train_matrix, epochs, stop, seed)
        self.dim, self.temperature, self.seed_sizes = int(dim), float(temperature), tuple(seed_sizes)
        self.positives = [np.flatnonzero(row) for row in train_matrix]
        self.cold = train_matrix.sum(0) == 0  # (N,)
        # log q_j, the chance that item j is a training target (a uniform user, then a uniform positive of theirs):
        # subtracted from the in-batch logits (Yi et al. 2019, logQ correction), else popular items are over-penalised
        share = (train_matrix / np.maximum(train_matrix.sum(1, keepdims=True), 1)).sum(0) / len(train_matrix)
        self.log_q = torch.from_numpy(np.log(np.maximum(share, 1e-12)).astype(np.float32))  # (N,)

    def build(self) -> None:
        n = self.catalog.n_items
        self.net = nn.ModuleDict({"query": nn.EmbeddingBag(n, self.dim, mode="mean", sparse=True),
                                  "item": nn.Embedding(n, self.dim, sparse=True)})
        for table in self.net.values():
            nn.init.normal_(table.weight, std=0.1)

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SparseAdam(list(self.net.parameters()), lr=self.lr)  # updates only the rows in a batch

    def query(self, seeds: Sequence[Sequence[int]]) -> torch.Tensor:
        """(R, D) unit query vectors: the mean of the seeds' query-tower rows."""
        flat = torch.tensor([i for s in seeds for i in s], dtype=torch.long)
        offsets = torch.tensor(np.cumsum([0, *[len(s) for s in seeds[:-1]]]), dtype=torch.long)
        return F.normalize(self.net["query"](flat, offsets), dim=1)

    def item_vectors(self) -> torch.Tensor:
        """(N, D) unit item-tower vectors."""
        return F.normalize(self.net["item"].weight, dim=1)

    def loss(self, rows: np.ndarray, rng: np.random.Generator, progress: float) -> torch.Tensor:
        seeds, targets = [], []
        for row in rows:
            pos = self.positives[row]
            if len(pos) < 2:
                continue
            s = min(int(rng.choice(self.seed_sizes)), len(pos) - 1)
            pick = rng.permutation(pos)
            seeds.append(pick[:s].tolist())
            targets.append(int(pick[s]))
        target = torch.tensor(targets)
        logits = self.query(seeds) @ F.normalize(self.net["item"](target), dim=1).T / self.temperature  # (B, B)
        logits = logits - self.log_q[target][None, :]
        same = (target[:, None] == target[None, :]) & ~torch.eye(len(target), dtype=torch.bool)
        logits = logits.masked_fill(same, float("-inf"))  # a repeated target is not a negative of itself
        return F.cross_entropy(logits, torch.arange(len(target)))

    @torch.no_grad()
    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        scores = (self.query([e.request.seeds for e in examples]) @ self.item_vectors().T).numpy()  # (R, N)
        scores[:, self.cold] = -1.0  # the lowest cosine: no learned embedding
        return scores


class MultVAE(NeuralRival):
    """Mult-VAE with a [W -> hidden -> latent] encoder and its mirror decoder over the W items that have a training
    positive (the others cannot be learned and rank last)."""

    def __init__(self, catalog: Catalog, train_matrix: np.ndarray, beta: float, epochs: int, stop: int | None,
                 seed: int, hidden: int = 600, latent: int = 200, dropout: float = 0.5) -> None:
        self.warm = np.flatnonzero(train_matrix.sum(0) > 0)  # (W,)
        super().__init__(catalog, train_matrix[:, self.warm], epochs, stop, seed)
        self.beta, self.hidden, self.latent, self.dropout = float(beta), hidden, latent, dropout

    def build(self) -> None:
        w = len(self.warm)
        self.net = nn.ModuleDict({"encoder": nn.Sequential(nn.Linear(w, self.hidden), nn.Tanh(),
                                                           nn.Linear(self.hidden, 2 * self.latent)),
                                  "decoder": nn.Sequential(nn.Linear(self.latent, self.hidden), nn.Tanh(),
                                                           nn.Linear(self.hidden, w))})

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each (B, latent), of multi-hot rows x (B, W)."""
        h = F.dropout(F.normalize(x, dim=1), self.dropout, self.net.training)
        mu, logvar = self.net["encoder"](h).chunk(2, dim=1)
        return mu, logvar

    def loss(self, rows: np.ndarray, rng: np.random.Generator, progress: float) -> torch.Tensor:
        x = self.x[rows]  # (B, W)
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        nll = -(F.log_softmax(self.net["decoder"](z), dim=1) * x).sum(1).mean()
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
        return nll + min(self.beta, progress) * kl

    @torch.no_grad()
    def scores(self, examples: Sequence[Example]) -> np.ndarray:
        x = torch.from_numpy(seed_matrix(examples, self.catalog.n_items)[:, self.warm])  # (R, W)
        logits = self.net["decoder"](self.encode(x)[0]).numpy()  # (R, W)
        out = np.repeat(logits.min(1, keepdims=True) - 1.0, self.catalog.n_items, axis=1)  # (R, N) cold: last
        out[:, self.warm] = logits
        return out


def fit_neural(make: Callable[[int | None], NeuralRival], every: int,
               validate: Callable[[NeuralRival], float]) -> tuple[NeuralRival, int]:
    """(model at its best validation epoch, that epoch): `make(stop)` builds an unfitted rival; it is trained to
    its planned epochs, validated every `every` epochs and at the end, and the best epoch's weights are kept
    (the same weights as `make(best epoch).fit()`: training is seeded)."""
    best: dict = {"score": -np.inf}

    def hook(epoch: int, model: NeuralRival) -> None:
        if epoch % every == 0 or epoch == model.epochs:
            score = validate(model)
            if score > best["score"]:
                best.update(score=score, epoch=epoch, state={k: v.clone() for k, v in model.net.state_dict().items()})

    model = make(None).fit(hook)
    model.net.load_state_dict(best["state"])
    model.stop = best["epoch"]
    return model, best["epoch"]


def fit_within_budget(make: Callable[[int, int | None], NeuralRival], epochs: int, every: int,
                      validate: Callable[[NeuralRival], float], extensions: int) -> tuple[NeuralRival, int, int]:
    """`fit_neural` with a budget of `epochs` (`make(epochs, stop)`); while the epoch kept is the budget's last, the
    budget was too short to show where validation peaks, and it doubles (at most `extensions` times).
    -> (model at its best epoch, the budget it was planned with, that epoch)"""
    for extension in range(extensions + 1):
        model, stop = fit_neural(lambda s: make(epochs, s), every, validate)
        if stop < epochs or extension == extensions:
            break
        epochs *= 2
    return model, epochs, stop
