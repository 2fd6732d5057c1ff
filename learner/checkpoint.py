"""Checkpoints: one safetensors file holding the weights, the item index, the resolved config and metadata.

Loading never executes code from the file (safetensors). A checkpoint only fits the catalog it was trained on:
the item index fingerprint is checked on load. The EASE prior is stored sparse (`prior_indices`, `prior_values`,
(N, m) each); an older checkpoint's dense (N, N) `prior_matrix` is converted on load (`convert_dense_prior`).
Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from catalog.batch import constraint_vocab
from catalog.schema import Catalog, CatalogError, atomic_write
from core.config import RunConfig, config_from_dict, config_to_dict, load_config
from core.config_yaml import refuse_old_spellings
from core.errors import UserError, quoted
from core.numerics import Neighbours, top_neighbours
from model.transformer import Retriever


def save_checkpoint(path: Path, model: Retriever, cfg: RunConfig, catalog: Catalog, meta: dict) -> None:
    """Write weights + item ids + config + meta to `path` atomically."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors["catalog.item_ids"] = torch.from_numpy(catalog.item_ids.copy())
    header = {"config": json.dumps(config_to_dict(cfg)), "catalog": catalog.fingerprint,
              "meta": json.dumps(meta), "format": "h2po-1"}
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=header))


def read_header(path: Path) -> dict:
    """The checkpoint's metadata (config, catalog fingerprint, meta) without loading tensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable checkpoint ({err})") from None
    if header.get("format") != "h2po-1":
        raise UserError(f"{path}: not an h2po checkpoint")
    check_header(header, path)
    return header


MAX_HEADER_CHARS = 1 << 20  # a resolved config and its meta take a few kB


def check_header(header: dict, path: Path) -> None:
    """Refuse a header whose config or meta is not a JSON object or whose fingerprint is malformed (one line)."""
    for key in ("config", "meta"):
        text = header.get(key)
        if not isinstance(text, str) or len(text) > MAX_HEADER_CHARS:
            raise UserError(f"{path}: the checkpoint header's {key!r} is missing or over {MAX_HEADER_CHARS} chars")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict):
            raise UserError(f"{path}: the checkpoint header's {key!r} is not a JSON object: {quoted(text)}")
    if not re.fullmatch(r"[0-9a-f]{16}", str(header.get("catalog", ""))):
        raise UserError(f"{path}: the checkpoint header's catalog fingerprint is malformed: "
                        f"{quoted(header.get('catalog'))}")


def load_checkpoint(path: Path, catalog: Catalog) -> tuple[Retriever, RunConfig, dict]:
    """Rebuild the model from a checkpoint made on `catalog` (eval mode, CPU)."""
    header = read_header(path)
    if header["catalog"] != catalog.fingerprint:
        raise CatalogError(f"{path} was trained on another catalog (fingerprint {header['catalog']}, "
                           f"this catalog {catalog.fingerprint}); use the catalog it was made on")
    cfg = config_from_dict(json.loads(header["config"]))
    tensors = load_file(str(path))
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        convert_dense_prior(state, cfg.model.prior_neighbours, path)
        prior = Neighbours(state["prior_indices"], state["prior_values"]) if "prior_indices" in state else None
        model = Retriever(cfg.model, state["features"], len(constraint_vocab(catalog)), prior,
                          state.get("intent_values"), state.get("intent_parts"))
        model.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:  # missing or misshapen tensors
        raise UserError(f"{path}: its tensors do not make a model of its config ({quoted(str(err))})") from None
    model.eval()
    return model, cfg, json.loads(header["meta"])


def convert_dense_prior(state: dict[str, torch.Tensor], m: int, path: Path) -> None:
    """A checkpoint from before issue 16 holds the prior as a dense (N, N) `prior_matrix`: replace it in `state` by
    its rows' top-m entries (model.prior_neighbours of its config), the sparse prior this version keeps, and say so
    on stderr (the model's prior logits change by the truncation: docs/results.md, issue 16)."""
    if "prior_matrix" not in state:
        return
    dense = state.pop("prior_matrix")
    if dense.ndim != 2 or dense.shape[0] != dense.shape[1]:
        raise ValueError(f"prior_matrix of shape {tuple(dense.shape)}, expected (N, N)")
    rows = top_neighbours(dense, m)
    state["prior_indices"], state["prior_values"] = rows.indices, rows.values
    print(f"note: {path} holds a dense (N, N) prior from before issue 16; converted on load to each item's top {m} "
          "neighbours (model.prior_neighbours); save it again (any training run does) to store the sparse form",
          file=sys.stderr)


def config_from_checkpoint(path: Path, config_file: str | Path | None = None, overrides: Sequence[str] = (),
                           rewards: bool = True) -> RunConfig:
    """The config of a command that starts from the checkpoint at `path` (`h2po train`, `h2po eval`): its header's
    config, then the user's `config_file`, then `overrides`.

    A header is data, never a source of importable names or output paths (issue 14):
    - `out_dir` is the user's (file or override), else the checkpoint's own directory; the header's is never used;
    - `h2po.rewards` of the header is kept only when every reward it names is a built-in. Otherwise the user must
      give h2po.rewards (a UserError says so) when the command builds rewards (`rewards`), and the defaults take
      its place when it does not."""
    from core.config_yaml import merge, parse_override, read_yaml
    from rewards.registry import BUILTINS

    try:
        base = json.loads(read_header(path)["config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: the checkpoint's config is unreadable ({type(err).__name__})") from None
    if not isinstance(base, dict) or not isinstance(base.get("h2po", {}), dict):
        raise UserError(f"{path}: the checkpoint's config is not a mapping of sections")
    user = refuse_old_spellings(read_yaml(Path(config_file)) if config_file else {})
    for text in overrides:
        user = merge(user, refuse_old_spellings(parse_override(text)))
    base["out_dir"] = str(Path(path).parent)
    specs = base.get("h2po", {}).get("rewards", [])
    builtin = {*BUILTINS, *BUILTINS.values()}
    foreign = [spec.get("name") if isinstance(spec, dict) else spec for spec in
               (specs if isinstance(specs, list) else [specs])
               if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"] in builtin)]
    if foreign:
        del base["h2po"]["rewards"]
        if rewards and not (isinstance(user.get("h2po"), dict) and "rewards" in user["h2po"]):
            raise UserError(f"{path}: its config names reward {str(foreign[0])[:100]!r}, which is not a built-in "
                            f"({', '.join(BUILTINS)}); a checkpoint never decides what is imported: give h2po.rewards "
                            "in your --config file or as an override to use it")
    return load_config(None, [], base=merge(base, user))


def finish_checkpoint(path: Path, meta: dict) -> None:
    """Mark a checkpoint written during training as finished: its meta gets `complete: true` and `meta` (what ended
    the run), rewritten atomically. Until then a pretraining's checkpoint says `complete: false`, and `h2po retrieve`
    warns when it loads one (a killed run leaves it so)."""
    header = read_header(path)
    tensors = load_file(str(path))
    header["meta"] = json.dumps({**json.loads(header["meta"]), **meta, "complete": True})
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=header))
