"""Shared fixtures: a 50-item catalog built in memory and tiny randomised Retrievers on it (CPU, seconds).

`tiny_catalog`: N=50 items, a "genre" field over 4 genres (item i has genre i % 4, and genre (i + 1) % 4 too
when i % 3 == 0), years 1950 + (7 i mod 70) spanning 1950-2019, five users with six interactions each.
`tiny_model` / `tiny_prior_model`: Retriever(d_model=32, n_layers=2, n_heads=2), eval mode, every parameter
perturbed with seeded noise so the adaLN-Zero gates are non-zero and outputs depend on the request; the prior
variant carries a random (N, N) float16 prior matrix.
`time_limit(seconds)`: a block that runs longer raises TimeoutError (SIGALRM), so a hang fails instead of stalling.
`tiny_checkpoint`: the tiny catalog written as Parquet and an untrained `tiny_model` saved as a checkpoint beside it
(DIR/catalog, DIR/most.safetensors), so the CLI's retrieve/eval paths run in a second without pretraining.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from catalog.batch import constraint_vocab
from catalog.schema import Catalog, Interactions
from core.config import DataConfig, ModelConfig, RunConfig
from core.numerics import top_neighbours
from model.transformer import Retriever

N_ITEMS = 50
N_FEATURES = 8
GENRES = ("Action", "Comedy", "Drama", "Horror")


def make_tiny_catalog() -> Catalog:
    """The deterministic 50-item catalog described in the module docstring."""
    genres = [(GENRES[i % 4],) + ((GENRES[(i + 1) % 4],) if i % 3 == 0 else ()) for i in range(N_ITEMS)]
    years = np.array([1950 + (7 * i) % 70 for i in range(N_ITEMS)], np.int32)
    users = np.repeat(np.arange(5, dtype=np.int64), 6)
    items = np.array([(7 * u + 3 * j) % N_ITEMS for u in range(5) for j in range(6)], np.int64)
    inter = Interactions(users, items, np.full(len(items), 4.0, np.float32), np.arange(len(items), dtype=np.int64))
    return Catalog(item_ids=np.arange(100, 100 + N_ITEMS, dtype=np.int64),
                   titles=[f"Item {i} ({years[i]})" for i in range(N_ITEMS)], attributes={"genre": genres},
                   years=years, popularity=np.bincount(items, minlength=N_ITEMS).astype(np.int64),
                   interactions=inter, name="tiny50")


def randomise(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Add seeded Gaussian noise (std `scale`) to every parameter, so zero-initialised gates become active."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model.eval()


TINY_PRIOR_NEIGHBOURS = 10
TINY_MODEL_CONFIG = ModelConfig(d_model=32, n_layers=2, n_heads=2, dropout=0.0, id_dropout=0.0, prior="none")


def make_tiny_model(catalog: Catalog, prior: bool = False, seed: int = 0) -> Retriever:
    """A randomised 2-layer D=32 Retriever in eval mode (with a random float16 prior, each item's top 10 neighbours
    of a random (N, N) matrix, when `prior`)."""
    generator = torch.Generator().manual_seed(1000 + seed)
    features = torch.randn(catalog.n_items, N_FEATURES, generator=generator)
    dense = torch.rand(catalog.n_items, catalog.n_items, generator=generator).half() if prior else None
    prior_matrix = top_neighbours(dense, TINY_PRIOR_NEIGHBOURS) if prior else None  # sparse, as the real prior
    cfg = TINY_MODEL_CONFIG
    with torch.random.fork_rng(devices=[]):  # seed the constructor's own init without touching the global RNG
        torch.manual_seed(seed)
        model = Retriever(cfg, features, n_values=len(constraint_vocab(catalog)), prior=prior_matrix)
    return randomise(model, seed)


# `make unit` (pytest -m unit): the tests of these modules that run on synthetic data only (the in-memory catalog
# below, hand-made tensors, fake workers), not marked slow; well under a minute together. `make test` runs everything.
UNIT_MODULES = {"test_update.py", "test_scheduler.py", "test_h2po.py", "test_model.py", "test_most.py",
                "test_evaluation.py", "test_rewards.py", "test_intent_prior.py", "test_device.py", "test_config.py",
                "test_config_ranges.py", "test_config_fuzz.py", "test_header_fuzz.py", "test_request_fuzz.py",
                "test_actors.py", "test_faults.py", "test_serve_lists.py", "test_layers.py",
                "test_chunked_head.py", "test_sparse_prior.py",
                "test_rollout.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "unit: synthetic data only, seconds (`make unit`: the edit-test loop)")


def pytest_terminal_summary(terminalreporter):
    """Last line of the run: the Ray settings this machine's environment holds (tests' clusters inherit them; tokens
    not shown), since a run that behaves differently elsewhere starts there."""
    names = sorted(k for k in os.environ if k.startswith("RAY_"))
    shown = [f"{k}={'***' if 'TOKEN' in k else os.environ[k]}" for k in names]
    terminalreporter.write_line(f"Ray environment: {' '.join(shown) or 'none'}")


def pytest_ignore_collect(collection_path, config):
    """With `-m unit`, the other test modules are not even imported (fast start; no heavy imports)."""
    if config.getoption("markexpr") == "unit" and collection_path.name.startswith("test_") \
            and collection_path.suffix == ".py":
        return collection_path.name not in UNIT_MODULES
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in UNIT_MODULES and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for tiny models: thread start-up and contention on a busy 2-core box cost 10-30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def restore_threads():
    """The CLI sets torch's thread count (threads=1); give the rest of the session its setting back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_catalog() -> Catalog:
    return make_tiny_catalog()


@pytest.fixture
def tiny_model(tiny_catalog) -> Retriever:
    return make_tiny_model(tiny_catalog)


@pytest.fixture
def tiny_prior_model(tiny_catalog) -> Retriever:
    return make_tiny_model(tiny_catalog, prior=True)


@pytest.fixture(scope="session")
def tiny_vocab(tiny_catalog) -> dict[tuple[str, str], int]:
    return constraint_vocab(tiny_catalog)


def write_tiny_checkpoint(directory: Path) -> Path:
    """The tiny catalog as Parquet in DIR/catalog and an untrained tiny model in DIR/most.safetensors (its path)."""
    from catalog.schema import write_catalog
    from learner.checkpoint import save_checkpoint

    catalog = make_tiny_catalog()
    rows = [[(name, list(values[i])) for name, values in catalog.attributes.items()] for i in range(N_ITEMS)]
    items = pa.table({"item_id": pa.array(catalog.item_ids, pa.int64()), "title": catalog.titles,
                      "attributes": pa.array(rows, pa.map_(pa.string(), pa.list_(pa.string()))),
                      "year": pa.array(catalog.years, pa.int32()),
                      "popularity": pa.array(catalog.popularity, pa.int64())})
    inter = catalog.interactions
    interactions = pa.table({"user_id": pa.array(inter.users, pa.int64()),
                             "item_id": pa.array(catalog.item_ids[inter.items], pa.int64()),
                             "weight": pa.array(inter.weights, pa.float32()),
                             "timestamp": pa.array(inter.timestamps, pa.int64())})
    write_catalog(directory / "catalog", items, interactions, "synthetic test data")
    cfg = RunConfig(out_dir=str(directory), threads=1, data=DataConfig(catalog=str(directory / "catalog")),
                    model=TINY_MODEL_CONFIG)
    path = directory / "most.safetensors"
    save_checkpoint(path, make_tiny_model(catalog), cfg, catalog, {"step": 0})
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))


@contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread when the block runs longer than `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
