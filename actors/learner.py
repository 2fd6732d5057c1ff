"""`LearnerActor`: one data-parallel H2PO learner rank (DESIGN section 7), a Ray shell around `learner.engine`.

Each rank holds the policy (from the MOST checkpoint), a frozen reference copy (the same checkpoint, DESIGN
section 5) and a DeepSpeed `Engine`. The driver starts all ranks, asks rank 0 for an address, calls every rank's
`init_distributed` concurrently, then passes each rank its shard of every learner batch as an object reference
from the replay buffer (Ray resolves it in this process; the data never passes through the driver). Per batch a
rank runs `learner.update.h2po_update` with the engine's `step` (which averages gradients over the ranks) and
advances the weight version by one. Ranks draw their MOST anchor batches and VRPO noise from their own seeds; with
model.prior_folds an anchor batch comes from one fold, as in MOST.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import ray
import torch
from safetensors.torch import load_file, save_file

from actors.policy import ActorProcess, frozen_copy, load_policy
from catalog.schema import atomic_write
from core.carriers import LearnerBatch
from core.config import RunConfig
from core.errors import UserError
from learner.checkpoint import save_checkpoint
from learner.engine import Engine, EngineConfig, init_distributed
from learner.pretrain import draw_fold, most_step
from learner.update import h2po_update


def save_rng(path: Path, rng: np.random.Generator, generator: torch.Generator) -> None:
    """A rank's RNG streams as safetensors, no pickle: torch's generator state (a uint8 tensor) as the tensor,
    numpy's bit-generator state (a dict of ints and strings) as JSON in the header."""
    atomic_write(Path(path), lambda p: save_file({"torch": generator.get_state()}, str(p),
                                                 metadata={"numpy": json.dumps(rng.bit_generator.state)}))


def load_rng(path: Path, rng: np.random.Generator, generator: torch.Generator) -> None:
    """Restore the streams `save_rng` wrote (nothing in the file is executed); UserError if it is malformed."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {})["numpy"])
        rng.bit_generator.state = state
        generator.set_state(load_file(str(path))["torch"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: not an RNG state written by h2po ({type(err).__name__}: {err})"[:500]) from None


@ray.remote
class LearnerActor(ActorProcess):
    """One learner rank: policy + frozen reference + DeepSpeed engine; versioned weights."""

    def __init__(self, cfg: RunConfig, checkpoint: str, engine_cfg: EngineConfig) -> None:
        self.cfg, self.engine_cfg = cfg, engine_cfg
        self.policy = load_policy(cfg, checkpoint)
        self.ref = frozen_copy(self.policy.model)
        self.engine: Engine | None = None
        self.rank, self.version = -1, 0

    def address(self) -> tuple[str, int]:
        """(node IP, a free port on this node): where rank 0 hosts the process-group rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def init_distributed(self, rank: int, world_size: int, port: int, address: str = "127.0.0.1") -> int:
        """Join the process group and build the engine (all ranks must be called before any is awaited)."""
        init_distributed(rank, world_size, port, address)
        self.rank = rank
        self.engine = Engine(self.policy.model, self.engine_cfg)  # moves the policy to this rank's GPU, if any
        self.ref.to(self.engine.module.device)
        self.rng = np.random.default_rng([self.cfg.h2po_seed, 1 + rank])
        self.generator = torch.Generator().manual_seed(self.cfg.h2po_seed * 1009 + 1 + rank)
        return rank

    def train_step(self, shard: LearnerBatch, lambda_off: float) -> dict:
        """H2PO on this rank's shard (`learner.update.h2po_update`), then version + 1.  -> mean stats over the
        inner epochs, the rank's train time and the new version."""
        start = time.time()
        model, ws, cfg = self.engine.module, self.policy.ws, self.cfg

        def anchor():  # the MOST loss on a fresh batch of training requests
            return most_step(model, ws.data, ws.vocab, ws.unit_features, self.policy.relevance, cfg.requests, cfg.most,
                             self.rng, self.generator, draw_fold(self.policy.folds, self.rng))
        out = h2po_update(model, self.ref, shard.rollouts, shard.pairs, self.engine.step, cfg.h2po, lambda_off,
                          cfg.most.eps, self.generator, anchor, cfg.system.bf16)
        self.version += 1
        out.update({"time/train": time.time() - start, "version": self.version})
        return out

    @ray.method(num_returns=2)
    def weights(self) -> tuple[dict[str, torch.Tensor], int]:
        """(trained parameters as fp32 CPU tensors, weight version); buffers are constants and left out."""
        return self.engine.state_dict(buffers=False), self.version

    def save_policy(self, path: str, meta: dict) -> str:
        """Write the current policy as an h2po checkpoint (`learner.checkpoint` format) at `path`."""
        ws = self.policy.ws
        save_checkpoint(path, self.engine.module, self.cfg, ws.data.catalog, {**meta, "version": self.version})
        return path

    def save_checkpoint(self, directory: str) -> None:
        """DeepSpeed checkpoint of model + optimiser + version, plus this rank's RNG states (every rank calls it)."""
        self.engine.save_checkpoint(directory, {"version": self.version})
        save_rng(Path(directory) / f"rng_rank{self.rank}.safetensors", self.rng, self.generator)

    def load_checkpoint(self, directory: str) -> int:
        """Restore the latest DeepSpeed checkpoint and RNG states (every rank).  -> the restored weight version."""
        self.version = int(self.engine.load_checkpoint(directory)["version"])
        rng_file = Path(directory) / f"rng_rank{self.rank}.safetensors"
        if rng_file.exists():  # checkpoints of `save_checkpoint`; bare DeepSpeed ones keep the current streams
            load_rng(rng_file, self.rng, self.generator)  # (an old pickled rng_rank<r>.pt is never opened)
        return self.version
