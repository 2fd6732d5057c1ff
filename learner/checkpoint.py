"""Checkpoints: one safetensors file holding the weights, the item index, the resolved config and metadata.

Loading never executes code from the file (safetensors). A checkpoint only fits the catalog it was trained on:
the item index fingerprint is checked on load. Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from catalog.batch import constraint_vocab
from catalog.schema import Catalog, CatalogError, atomic_write
from h2po.config import RunConfig, config_from_dict, config_to_dict
from h2po.errors import UserError
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
    return header


def load_checkpoint(path: Path, catalog: Catalog) -> tuple[Retriever, RunConfig, dict]:
    """Rebuild the model from a checkpoint made on `catalog` (eval mode, CPU)."""
    header = read_header(path)
    if header["catalog"] != catalog.fingerprint:
        raise CatalogError(f"{path} was trained on another catalog (fingerprint {header['catalog']}, "
                           f"this catalog {catalog.fingerprint}); use the catalog it was made on")
    cfg = config_from_dict(json.loads(header["config"]))
    tensors = load_file(str(path))
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    model = Retriever(cfg.model, state["features"], len(constraint_vocab(catalog)), state.get("prior_matrix"),
                      state.get("intent_values"), state.get("intent_parts"))
    model.load_state_dict(state)
    model.eval()
    return model, cfg, json.loads(header["meta"])
