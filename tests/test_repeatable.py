"""The same config gives the same MOST checkpoint (issue 13, point 5), on two torch threads as `make run` uses them.

On several CPU threads some of torch's kernels accumulate in an order that changes from call to call: the backward
of an index with repeated items (`items[slots]`, the same item in several requests' target lists) is one, and its
float-level differences grow over the steps into a different checkpoint. `prepare` turns on torch's deterministic
kernels for CPU runs, so two pretrainings of one config give bit-identical weights. The default model size is used
on purpose: the tiny one's index is too small for torch to split it across threads.
Run: `python -m pytest tests/test_repeatable.py -q` (about 15 s).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from app import pipeline
from core.config import load_config

DEFAULT = str(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")
SHORT = ["threads=2", "most.max_steps=12", "most.eval_every=6", "most.val_requests=16", "most.val_draws=1",
         "model.prior_folds=2", "model.prior_lambda=300"]


def pretrained(run: Path) -> dict[str, torch.Tensor]:
    ws = pipeline.prepare(load_config(DEFAULT, [f"out_dir={run}", *SHORT]))
    path, _ = pipeline.run_pretrain(ws, pipeline.fit_ease(ws, ws.cfg.model.prior_lambda))
    return load_file(path)


def test_two_pretrainings_of_one_config_give_identical_weights(tmp_path):
    first, second = pretrained(tmp_path / "a"), pretrained(tmp_path / "b")
    assert first.keys() == second.keys()
    differ = [name for name in first if not torch.equal(first[name], second[name])]
    assert not differ, f"{len(differ)} of {len(first)} tensors differ, e.g. {differ[:3]}"
    assert any(first[name].abs().sum() > 0 for name in first if ".ada." in name)  # it did train (adaLN starts at 0)
