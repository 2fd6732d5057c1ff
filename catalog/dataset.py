"""A catalog with its user split, positives, item features and request families (DESIGN section 2).

Users are split 60/20/20 train/validation/test with a fixed seed; everything learned (CF factors, EASE,
the model) sees training users only. Family A: s seeds drawn from a user's positives, the targets are the
rest. Family B: seeds share a genre and decade, and the request carries a hard constraint (exclude a genre
present among the user's facet positives, or a minimum year); the targets are the held-out facet positives
that satisfy it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from catalog import movielens, movietweetings
from catalog.requests import valid_mask
from catalog.schema import Catalog, CatalogError, read_catalog
from core.carriers import Example, Exclude, Recency, Request
from core.config import ConfigError, DataConfig, RequestConfig

FACET_FIELD = "genre"
NO_GENRE = "(no genres listed)"


FORMATS = {  # data.format -> (locate(explicit) -> directory, import(source, out), licence summary)
    "movielens": (movielens.locate, movielens.import_movielens,
                  "MovieLens ml-latest-small terms (GroupLens: research use, redistribution under the same terms)"),
    "movietweetings": (movietweetings.locate, movietweetings.import_movietweetings,
                       "MovieTweetings: MIT licence, Copyright (c) 2013 Simon Dooms"),
}


def locate_source(cfg: DataConfig) -> Path:
    """The directory of data.format's files: data.source, else (MovieLens) data.movielens, else found."""
    if cfg.movielens and cfg.format != "movielens":
        raise ConfigError(f"data.movielens is set but data.format is {cfg.format!r}: give the directory as data.source")
    if cfg.movielens and cfg.source and Path(cfg.movielens) != Path(cfg.source):
        raise ConfigError(f"data.movielens ({cfg.movielens[:80]}) and data.source ({cfg.source[:80]}) disagree: "
                          "give one")
    return FORMATS[cfg.format][0](cfg.source or cfg.movielens)


def license_note(cfg: DataConfig) -> str:
    """What results say about the data's licence (the full text is catalog/LICENSE.txt)."""
    if cfg.catalog:
        return f"the catalog's own terms: see {Path(cfg.catalog) / 'LICENSE.txt'}"
    return f"{FORMATS[cfg.format][2]}: see catalog/LICENSE.txt in the run directory"


def load_catalog(cfg: DataConfig, workdir: Path) -> Catalog:
    """The configured catalog: a Parquet directory, or data.format's files imported into `workdir/catalog`."""
    if cfg.catalog:
        return read_catalog(cfg.catalog)
    target = Path(workdir) / "catalog"
    source = locate_source(cfg)
    stamp = target / "SOURCE"
    origin = str(source.resolve()) if cfg.format == "movielens" else f"{cfg.format}:{source.resolve()}"
    if not (stamp.is_file() and stamp.read_text() == origin):
        FORMATS[cfg.format][1](source, target)
        stamp.write_text(origin)
    return read_catalog(target)


@dataclass
class Dataset:
    """Catalog + positives per user + the user split."""

    catalog: Catalog
    positives: dict[int, np.ndarray]  # user -> sorted item indices with weight >= threshold
    train_users: np.ndarray
    val_users: np.ndarray
    test_users: np.ndarray
    cfg: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def build(cls, catalog: Catalog, cfg: DataConfig) -> Dataset:
        inter = catalog.interactions
        keep = inter.weights >= cfg.positive_threshold
        users, items = inter.users[keep], inter.items[keep]
        order = np.lexsort((items, users))
        users, items = users[order], items[order]
        bounds = np.flatnonzero(np.diff(users)) + 1
        positives = {int(u[0]): np.unique(i) for u, i in zip(np.split(users, bounds), np.split(items, bounds))
                     if len(u)}
        all_users = np.unique(inter.users)
        if len(all_users) < 5:
            raise CatalogError(f"{catalog.name}: at least 5 users are needed for a 60/20/20 split")
        perm = np.random.default_rng(cfg.split_seed).permutation(all_users)
        a, b = int(0.6 * len(perm)), int(0.8 * len(perm))
        if not any(int(user) in positives for user in perm[:a]):  # nothing to learn from: say so now, not later
            raise CatalogError(_no_positives(catalog, cfg))
        return cls(catalog, positives, np.sort(perm[:a]), np.sort(perm[a:b]), np.sort(perm[b:]), cfg)

    def user_positives(self, user: int) -> np.ndarray:
        return self.positives.get(int(user), np.empty(0, dtype=np.int64))

    @cached_property
    def train_matrix(self) -> np.ndarray:
        """(U_train, N) float32 binary matrix of training users' positives (dense: U_train x N; at large N use
        `train_sparse`)."""
        return self.train_sparse.toarray()

    @cached_property
    def train_sparse(self) -> sp.csr_matrix:
        """(U_train, N) float32 CSR matrix of training users' positives: `train_matrix`'s entries in memory linear
        in the positives."""
        rows = [self.user_positives(user) for user in self.train_users]
        indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows], dtype=np.int64)])
        indices = np.concatenate(rows) if rows else np.empty(0, np.int64)
        return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr),
                             shape=(len(self.train_users), self.catalog.n_items))

    @cached_property
    def train_popularity(self) -> np.ndarray:
        """(N,) float32 positive counts among training users."""
        return np.bincount(self.train_sparse.indices, minlength=self.catalog.n_items).astype(np.float32)

    @cached_property
    def genres(self) -> tuple[np.ndarray, list[str]]:
        """(N, G) genre multi-hot (without the no-genre label) and its vocabulary."""
        matrix, vocab = self.catalog.attribute_matrix(FACET_FIELD) if FACET_FIELD in self.catalog.attributes \
            else (np.zeros((self.catalog.n_items, 0), bool), [])
        keep = [j for j, v in enumerate(vocab) if v != NO_GENRE]
        return matrix[:, keep], [vocab[j] for j in keep]


def facet_mask(data: Dataset, facet: tuple[str, int]) -> np.ndarray:
    """(N,) bool: items with the facet's genre whose year falls in its decade."""
    genres, vocab = data.genres
    years = data.catalog.years
    return genres[:, vocab.index(facet[0])] & (years // 10 * 10 == facet[1]) & (years > 0)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def family_a(data: Dataset, user: int, s: int, k: int, rng: np.random.Generator) -> Example | None:
    """Seed-set completion: s random positives as seeds, the rest as targets."""
    pos = data.user_positives(user)
    if len(pos) < s + 1:
        return None
    pick = rng.permutation(len(pos))
    seeds, targets = pos[pick[:s]], pos[pick[s:]]
    return Example(Request(tuple(int(i) for i in seeds), k=k), tuple(int(i) for i in targets), int(user), "A", s)


def family_b(data: Dataset, user: int, s: int, k: int, min_targets: int, rng: np.random.Generator) -> Example | None:
    """Fine-grained intent: seeds share (genre, decade); a hard constraint; facet targets satisfying it."""
    pos = data.user_positives(user)
    genres, vocab = data.genres
    years = data.catalog.years[pos]
    decades = np.where(years > 0, years // 10 * 10, -1)
    facets = [(g, d) for g in range(len(vocab)) for d in np.unique(decades[decades > 0])
              if (genres[pos, g] & (decades == d)).sum() >= s + min_targets]
    for f in rng.permutation(len(facets)):
        g, d = facets[f]
        members = pos[genres[pos, g] & (decades == d)]
        members = members[rng.permutation(len(members))]
        seeds, rest = members[:s], members[s:]
        options = []
        for other in np.flatnonzero(genres[rest].any(0)):
            kept = rest[~genres[rest, other]]
            if other != g and len(kept) >= min_targets:
                options.append((Exclude(FACET_FIELD, vocab[other]), kept))
        for year in np.unique(data.catalog.years[rest]):
            kept = rest[data.catalog.years[rest] >= year]
            if len(kept) >= min_targets and len(kept) < len(rest):
                options.append((Recency(min_year=int(year)), kept))
        if options:
            constraint, targets = options[rng.integers(len(options))]
            request = Request(tuple(int(i) for i in seeds), constraints=(constraint,), k=k)
            if valid_mask(data.catalog, request).sum() >= k:
                return Example(request, tuple(int(i) for i in targets), int(user), "B", s, (vocab[g], int(d)))
    return None


def benchmark_examples(data: Dataset, users: np.ndarray, cfg: RequestConfig, seed: int,
                       draws: int = 1) -> list[Example]:
    """Fixed evaluation requests per user: `draws` family A requests for every seed size and `draws` family B
    requests, each drawn with its own seed set (a draw that repeats an earlier seed set of the user is skipped).
    The first draw is the same whatever `draws` is."""
    out = []
    for user in users:
        seen = set()
        for d in range(draws):
            extra = (d,) if d else ()
            drawn = [family_a(data, user, s, cfg.k, _rng(seed, int(user), s, *extra)) for s in cfg.seed_sizes]
            drawn.append(family_b(data, user, cfg.family_b_seed_size, cfg.k, cfg.family_b_min_targets,
                                  _rng(seed, int(user), 1000, *extra)))
            for ex in filter(None, drawn):
                key = (ex.family, ex.seed_size, frozenset(ex.request.seeds))
                if key not in seen:
                    seen.add(key)
                    out.append(ex)
    return out


def training_example(data: Dataset, user: int, cfg: RequestConfig, rng: np.random.Generator) -> Example | None:
    """One training request of `user`: family B with probability `family_b_share`, else family A (None when the
    user's positives do not allow the drawn family)."""
    if rng.random() < cfg.family_b_share:
        return family_b(data, user, cfg.family_b_seed_size, cfg.k, cfg.family_b_min_targets, rng)
    return family_a(data, user, int(rng.choice(cfg.seed_sizes)), cfg.k, rng)


def training_examples(data: Dataset, cfg: RequestConfig, n: int, rng: np.random.Generator,
                      users: np.ndarray | None = None) -> list[Example]:
    """`n` fresh training requests from training users (`users`: some of them; new seed subsets every call:
    augmentation). A drawn user whose positives allow no request of the drawn family is skipped; when 1000 + 100 n
    draws do not give n requests (e.g. no training user has a positive at data.positive_threshold), a CatalogError
    says why, not an endless loop."""
    out: list[Example] = []
    users = data.train_users if users is None else users
    draws = 1000 + 100 * n
    for _ in range(draws):
        if len(out) >= n:
            break
        ex = training_example(data, int(users[rng.integers(len(users))]), cfg, rng)
        if ex is not None:
            out.append(ex)
    if len(out) < n:
        raise CatalogError(_shortfall(data, cfg, len(out), n, draws))
    return out


def _no_positives(catalog: Catalog, cfg: DataConfig) -> str:
    """The error when no training user has a positive (a threshold above every weight)."""
    weights = catalog.interactions.weights
    largest = f"{weights.max():g}" if len(weights) else "none"
    return (f"{catalog.name}: no training user has a positive at data.positive_threshold={cfg.positive_threshold:g} "
            f"(the largest interaction weight is {largest})")


def _shortfall(data: Dataset, cfg: RequestConfig, got: int, n: int, draws: int) -> str:
    """Why training users gave only `got` of `n` requests in `draws` draws (the error of training_examples)."""
    counts = np.array([len(data.user_positives(user)) for user in data.train_users])
    threshold = f"data.positive_threshold={data.cfg.positive_threshold:g}"
    if not counts.any():
        return _no_positives(data.catalog, data.cfg)
    family_a_need, family_b_need = min(cfg.seed_sizes), cfg.family_b_seed_size + cfg.family_b_min_targets - 1
    need = family_a_need if cfg.family_b_share <= 0 else family_b_need if cfg.family_b_share >= 1 \
        else min(family_a_need, family_b_need)
    if counts.max() <= need:
        return (f"{data.catalog.name}: no training user has more than {need} positives at {threshold} (the most is "
                f"{counts.max()}); a request needs a seed set (requests.seed_sizes, family_b_seed_size) and targets")
    return (f"{data.catalog.name}: only {got} of {n} training requests in {draws} draws: too few training users have "
            f"positives enough for requests.seed_sizes={cfg.seed_sizes} at {threshold}")


def stable_hash(text: str) -> int:
    """A hash that is the same in every process (Python's hash() is salted)."""
    return zlib.crc32(text.encode())
