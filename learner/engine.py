"""The learner's optimiser engine: DeepSpeed behind `step`, `state_dict`, `load` and checkpoints (DESIGN section 7).

One `Engine` per data-parallel rank. The caller computes a loss that is already averaged over its shard of the
batch (micro batch size 1, no gradient accumulation), and `step(loss)` runs DeepSpeed's backward (which averages
the gradients over the ranks) and the optimiser step with gradient clipping. Device and collective backend follow
`torch.cuda.is_available()`: gloo on CPU, nccl on GPU.

Deliberate simplifications:
- ZeRO stages 0-2 only. Stage 3 partitions parameters and gathers them in module forward hooks, but the Retriever
  reads its own parameters in methods other than `forward` (`encode`, `hidden`, `logits`), which those hooks do
  not see; stage 3 is rejected with a clear error instead of silently training on empty shards.
- Weights and optimiser state are fp32 everywhere; bf16 on GPU is autocast around the forward passes
  (`model.transformer.precision`, applied by the learner actor), not DeepSpeed's bf16 mode, which would cast the
  module and every float input. `state_dict()` is therefore the module's own parameters (complete on every rank
  for stages 0-2), as fp32 CPU tensors.
- Constant learning rate (`h2po.lr`), AdamW from torch (`torch_adam`: no JIT-built fused kernel).
- No JIT-built op at all: on CPU, DeepSpeed's process-group start would compile its shared-memory all-reduce op
  (used only by `inference_all_reduce`, never by training) under a file lock in ~/.cache/torch_extensions. A rank
  killed while compiling (a node lost at start-up) leaves that lock behind, and every later start on the machine
  then waits on it forever; `init_distributed` marks the op unavailable, so training's collectives are plain
  torch.distributed either way.
- DeepSpeed's checkpoint files are loaded as tensors only: its checkpoint engine's `load` (every file of a
  checkpoint goes through it) is replaced by `torch.load(weights_only=True)` that allows, besides tensors and
  plain containers, the three plain DeepSpeed types its ZeRO optimiser state holds (`TENSOR_ONLY_GLOBALS`). A
  file holding anything else (a crafted pickle) is refused with a UserError, never executed.

Example (inside a process where `init_distributed` has run, e.g. an `actors.learner.LearnerActor`):
    init_distributed(rank=0, world_size=1, port=29500)
    engine = Engine(model, EngineConfig(zero_stage=2, lr=1e-4, grad_clip=1.0))
    engine.step(loss)
    weights = engine.state_dict()
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError


@dataclass
class EngineConfig:
    """Plain arguments of the engine, no defaults of its own: the driver fills them from `system.zero_stage`,
    `h2po.lr` and `h2po.grad_clip`, where the defaults live."""

    zero_stage: int  # ZeRO stage 0, 1 or 2 (3 is rejected: module docstring)
    lr: float  # AdamW learning rate
    grad_clip: float  # global gradient-norm clip (0 = none)
    weight_decay: float = 0.0  # AdamW weight decay (H2PO uses none; there is no knob for it)


def backend() -> str:
    """The collective backend of this process: nccl on GPU, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(rank: int, world_size: int, port: int, address: str = "127.0.0.1") -> None:
    """Join the process group of `world_size` ranks (every rank must call this concurrently).

    Sets the environment DeepSpeed reads (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK = 0: one rank per
    process, each seeing its own device) and calls `deepspeed.init_distributed`, with DeepSpeed's shared-memory
    op marked unavailable (module docstring: its JIT build can wait forever on a dead rank's lock)."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed keeps this dict for edits like this

    os.environ.update({"MASTER_ADDR": address, "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)


def deepspeed_config(cfg: EngineConfig, world_size: int) -> dict:
    """The DeepSpeed JSON config for `cfg`: one micro batch per rank (the loss is already a shard average)."""
    if cfg.zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2, got {cfg.zero_stage} (stage 3 needs every parameter "
                         "read inside a submodule's forward; the Retriever reads its own in encode/logits)")
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                  "torch_adam": True}},
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def tensor_only_globals() -> list:
    """The non-tensor types DeepSpeed's ZeRO 0-2 checkpoints hold (plain records: a loss-scale holder, the ZeRO
    stage enum, a fragment's (start, numel) address). Allowed in `torch.load(weights_only=True)`, they are
    rebuilt from their fields, with no code from the file."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_tensors_only(path: str, map_location=None):
    """`torch.load` of one DeepSpeed checkpoint file with weights_only=True (module docstring); UserError when
    the file holds anything beyond tensors, plain containers and `tensor_only_globals()`."""
    with torch.serialization.safe_globals(tensor_only_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            lines = [line for line in str(err).splitlines() if "WeightsUnpickler error" in line]
            first = (lines[0].split("WeightsUnpickler error:")[-1].split(" was not an allowed")[0].strip()
                     if lines else str(err)[:200])
            raise UserError(f"{path}: not loaded: DeepSpeed checkpoint files are read as tensors only, and this one "
                            f"holds other objects ({first})") from None


class Engine:
    """A DeepSpeed engine around `model`: `step(loss)`, full fp32 `state_dict()`, `load`, and checkpoints."""

    def __init__(self, model: nn.Module, cfg: EngineConfig) -> None:
        import deepspeed
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("Engine needs init_distributed() first (every rank, concurrently)")
        config = deepspeed_config(cfg, dist.get_world_size())
        trainable = [p for p in model.parameters() if p.requires_grad]
        # DeepSpeed's initial broadcast views every parameter as bytes, which fails for 0-dim parameters (the
        # Retriever's prior_scale). Broadcast those here and tag them so that DeepSpeed skips them: its broadcast
        # leaves out parameters marked `ds_optim_param` (a flag otherwise only used by its OptimizedLinear).
        if torch.cuda.is_available():
            model.cuda()  # nccl broadcasts device tensors (DeepSpeed would move the model there anyway)
        scalars = [p for p in trainable if p.dim() == 0]
        for p in scalars:
            dist.broadcast(p.data, src=0)
            p.ds_optim_param = True
        try:
            self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
        finally:
            for p in scalars:
                del p.ds_optim_param
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        if not isinstance(self.engine.checkpoint_engine, TorchCheckpointEngine):
            raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(self.engine.checkpoint_engine)}: "
                               "its loads could not be restricted to tensors")
        self.engine.checkpoint_engine.load = load_tensors_only  # module docstring: no pickled code is executed
        self.steps = 0

    @property
    def module(self) -> nn.Module:
        """The trained model (on the engine's device); call its methods directly to build the loss."""
        return self.engine.module

    @property
    def rank(self) -> int:
        return self.engine.global_rank

    def step(self, loss: torch.Tensor) -> float:
        """Backward (gradients averaged over ranks), clip, optimiser step.  -> the global gradient norm."""
        self.engine.backward(loss)
        self.engine.step()
        self.steps += 1
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def state_dict(self, buffers: bool = True) -> dict[str, torch.Tensor]:
        """The full model weights as fp32 CPU tensors (every rank holds full parameters for ZeRO stages 0-2).

        `buffers=False` leaves out the module's buffers (item features, the prior matrix: constants that never
        train), which keeps weight publication small."""
        params = {name for name, _ in self.module.named_parameters()}
        return {name: (value.detach().float() if value.is_floating_point() else value.detach()).cpu().clone()
                for name, value in self.module.state_dict().items() if buffers or name in params}

    def save_checkpoint(self, directory: str | Path, client_state: dict | None = None) -> None:
        """DeepSpeed checkpoint (module, optimiser partitions, step) under `directory/step<N>`; every rank calls it."""
        self.engine.save_checkpoint(str(directory), tag=f"step{self.steps}",
                                    client_state={"engine_steps": self.steps, **(client_state or {})})

    def load_checkpoint(self, directory: str | Path, tag: str | None = None) -> dict:
        """Restore the latest (or `tag`) checkpoint under `directory` on every rank.  -> its client state."""
        path, client_state = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
        self.steps = int(client_state.get("engine_steps", 0))
        return client_state
