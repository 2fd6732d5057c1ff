"""What a replica answers with, without Ray: a checkpoint's policy or a rival, loaded once, turning checked
requests into ranked lists; and the request edge of the HTTP body.

    lister = load_policy(Path("runs/g_intent10/h2po.safetensors"), steps=4)
    requests, errors = parse_body(body, lister.catalog, lister.default_k, lister.max_k)   # the one request edge
    lists = lister.lists([r for r in requests if r is not None])    # [(k,) item indices], request order
    answer(lister, items)                                          # {"items": [{"rank", "item_id", "title"}]}

Every request goes through `catalog.requests.request_from_json` (hence `request_from_refs`), the edge the CLI uses,
so a served request meets the same limits and checks as `h2po retrieve`. The rivals are those of the evaluation:
EASE (lambda from ease.json beside the checkpoint, as the run tuned it), EASE + intent and the two-tower embedding
retriever, fitted on the checkpoint's training users with the parameters of rivals.json beside the checkpoint
(tuned on validation by `h2po run`), else with RIVAL_DEFAULTS (the values tuning found on MovieLens).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from catalog.requests import request_from_json
from catalog.schema import Catalog, CatalogError
from core.carriers import Example, Request
from core.errors import UserError, quoted

RIVALS = {"EASE": "ease", "EASE + intent": "ease-intent", "two-tower": "two-tower"}  # name -> route
MODEL = "h2po"
# rival parameters when no rivals.json lies beside the checkpoint: what `h2po run` tuned on MovieLens (README)
RIVAL_DEFAULTS = {"two-tower": {"dim": 64, "temperature": 0.2, "epochs": 30, "stop": 30}, "EASE + intent":
                  {"weight": 30.0}}
MAX_BATCH_REQUESTS = 64  # requests in one JSON array body


@dataclass
class Lister:
    """A loaded method: `lists(requests)` -> one (k,) array of item indices per request."""

    name: str  # "h2po" or a rival's name
    catalog: Catalog
    lists: Callable[[list[Request]], list[np.ndarray]]
    default_k: int
    max_k: int
    source: str  # the checkpoint it was loaded from
    facts: dict = field(default_factory=dict)  # shown by /health: steps, parameters, stamp


def checkpoint_stamp(path: Path) -> str:
    """Identifies one version of a checkpoint file (a file replaced in place gets a new one)."""
    st = Path(path).stat()
    return f"{st.st_mtime_ns}-{st.st_size}"


def catalog_of(path: Path) -> tuple[str, dict]:
    """(catalog fingerprint, resolved config dict) of a checkpoint, from its header only."""
    from learner.checkpoint import read_header

    header = read_header(Path(path))
    return header["catalog"], json.loads(header["config"])


def load_catalog_for(path: Path):
    """(catalog, config) a checkpoint was made on: its config's data section, read relative to its directory."""
    from catalog.dataset import load_catalog
    from core.config import config_from_dict

    cfg = config_from_dict(catalog_of(path)[1])
    return load_catalog(cfg.data, Path(path).parent), cfg


def load_policy(path: Path, steps: int = 0, catalog: Catalog | None = None, device: str = "cpu",
                bf16: bool = False) -> Lister:
    """The checkpoint's policy, sampling with `steps` (0 = its sampler.steps) greedy-or-as-configured steps, on
    `device` (under bf16 autocast there when `bf16` and the device is a GPU). A checkpoint of another catalog than
    `catalog` (when given) raises CatalogError."""
    import torch

    from catalog.batch import constraint_vocab
    from learner.checkpoint import load_checkpoint
    from model.transformer import precision
    from rollout.retrieve import recommend

    path = Path(path)
    stamp = checkpoint_stamp(path)
    if catalog is None:
        catalog = load_catalog_for(path)[0]
    model, cfg, meta = load_checkpoint(path, catalog)
    model.to(device).freeze_items()
    sampler = replace(cfg.sampler, steps=steps or cfg.sampler.steps)
    vocab = constraint_vocab(catalog)

    def lists(requests: list[Request]) -> list[np.ndarray]:
        with torch.inference_mode(), precision(model, bf16):
            return recommend(model, catalog, vocab, requests, sampler)

    half = bf16 and model.device.type == "cuda"
    facts = {"steps": sampler.steps, "temperature": sampler.temperature, "stamp": stamp, "device": str(model.device),
             "precision": "bf16" if half else "fp32",
             "complete": meta.get("complete", True), "parameters": sum(p.numel() for p in model.parameters())}
    return Lister(MODEL, catalog, lists, cfg.requests.k, cfg.model.max_k, str(path), facts)


def rival_parameters(name: str, directory: Path) -> tuple[dict, str]:
    """(parameters, where they came from) of a rival: rivals.json beside the checkpoint, else RIVAL_DEFAULTS."""
    cached = directory / "rivals.json"
    if cached.is_file():
        tuned = json.loads(cached.read_text()).get("rivals", {})
        if name in tuned:
            return tuned[name]["params"], str(cached)
    return RIVAL_DEFAULTS[name], "defaults (no rivals.json beside the checkpoint)"


def ease_lambda_for(directory: Path, configured: float) -> float:
    """serve.ease_lambda when set, else the lambda `h2po run` tuned (ease.json beside the checkpoint)."""
    if configured > 0:
        return configured
    cached = directory / "ease.json"
    if not cached.is_file():
        raise UserError(f"no ease.json beside the checkpoint in {directory}: set serve.ease_lambda=L (the EASE lambda "
                        "of the rivals) or serve.rivals=[]")
    return float(json.loads(cached.read_text())["lambda"])


def load_rival(name: str, checkpoint: Path, ease_lambda: float = 0.0) -> Lister:
    """A rival of the evaluation, fitted on the training users of the checkpoint's catalog and split."""
    from catalog.dataset import Dataset
    from catalog.intent import IntentIndex
    from evaluation.baselines import EASE
    from evaluation.neural_rivals import TwoTower
    from evaluation.rivals import IntentBoost

    if name not in RIVALS:
        raise UserError(f"serve.rivals: unknown rival {quoted(name)} (known: {', '.join(RIVALS)})")
    checkpoint = Path(checkpoint)
    catalog, cfg = load_catalog_for(checkpoint)
    data = Dataset.build(catalog, cfg.data)
    facts: dict = {"stamp": checkpoint_stamp(checkpoint)}
    if name.startswith("EASE"):
        lam = ease_lambda_for(checkpoint.parent, ease_lambda)
        method = EASE(catalog, data.train_sparse, lam)
        facts["lambda"] = lam
        if name == "EASE + intent":
            params, facts["from"] = rival_parameters(name, checkpoint.parent)
            method = IntentBoost(method, params["weight"], IntentIndex(catalog))
            facts["weight"] = params["weight"]
    else:
        params, facts["from"] = rival_parameters(name, checkpoint.parent)
        method = TwoTower(catalog, data.train_matrix, int(params["dim"]), params["temperature"], int(params["epochs"]),
                          int(params.get("stop", params["epochs"])), cfg.seed).fit()
        facts.update({k: params[k] for k in ("dim", "temperature", "epochs")})

    def lists(requests: list[Request]) -> list[np.ndarray]:
        by_k: dict[int, list[int]] = defaultdict(list)
        for n, request in enumerate(requests):
            by_k[request.k].append(n)
        out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(requests)
        for k, members in by_k.items():
            examples = [Example(requests[n], (), -1, "A", len(requests[n].seeds)) for n in members]
            for n, items in zip(members, method.recommend(examples, k)):
                out[n] = items
        return out

    return Lister(name, catalog, lists, cfg.requests.k, cfg.model.max_k, str(checkpoint), facts)


class BadRequest(ValueError):
    """A request the server refuses: `status` (400 malformed, 422 well-formed but unsatisfiable) and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_body(body: bytes, catalog: Catalog, default_k: int, max_k: int) -> tuple[bool, list, list[str | None]]:
    """The HTTP body -> (batch?, [Request or None], [error or None]).

    One JSON object is one request (a problem raises BadRequest); a JSON array is a batch in the batch-retrieve
    format (at most MAX_BATCH_REQUESTS; each entry answered or refused on its own, like the lines of a requests file).
    """
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest(400, "the body is not UTF-8 text") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, a 5000-digit number, deep nesting
        raise BadRequest(400, f"malformed JSON: {quoted(str(err), 120)}") from None
    if isinstance(data, list):
        if not 1 <= len(data) <= MAX_BATCH_REQUESTS:
            raise BadRequest(400, f"a batch holds 1..{MAX_BATCH_REQUESTS} requests, got {len(data)}")
        requests, errors = [], []
        for entry in data:
            try:
                requests.append(request_from_json(catalog, entry, default_k, max_k))
                errors.append(None)
            except CatalogError as err:
                requests.append(None)
                errors.append(str(err))
        return True, requests, errors
    try:
        return False, [request_from_json(catalog, data, default_k, max_k)], [None]
    except CatalogError as err:
        status = 400 if not isinstance(data, dict) else 422
        raise BadRequest(status, str(err)) from None


def answer(catalog: Catalog, items: np.ndarray) -> list[dict]:
    """A list as JSON rows: rank, external id and title."""
    return [{"rank": r + 1, "item_id": int(catalog.item_ids[i]), "title": catalog.titles[i]}
            for r, i in enumerate(items)]


def complete_titles(catalog: Catalog, prefix: str, limit: int = 12) -> list[dict]:
    """Titles for the page's completion: those starting with `prefix` (case-insensitive), then those containing it,
    most popular first."""
    key = prefix.strip().lower()[:100]
    if not key:
        return []
    order = _popular_first(catalog)
    starts = [n for n in order if catalog.titles[n].lower().startswith(key)]
    hits = starts[:limit]
    if len(hits) < limit:
        seen = set(hits)
        hits += [n for n in order if key in catalog.titles[n].lower() and n not in seen][:limit - len(hits)]
    return [{"item_id": int(catalog.item_ids[n]), "title": catalog.titles[n]} for n in hits]


def _popular_first(catalog: Catalog) -> np.ndarray:
    cached = getattr(catalog, "_serve_order", None)
    if cached is None:
        cached = np.argsort(-catalog.popularity, kind="stable")
        object.__setattr__(catalog, "_serve_order", cached)
    return cached


def constraint_choices(catalog: Catalog, limit: int = 200) -> dict:
    """What the page offers as constraints: attribute fields with at most `limit` values, and the year range."""
    fields = {name: catalog.values(name) for name in sorted(catalog.attributes)}
    years = catalog.years[catalog.years > 0]
    return {"fields": {name: values for name, values in fields.items() if len(values) <= limit},
            "years": [int(years.min()), int(years.max())] if len(years) else [1, 9999]}
