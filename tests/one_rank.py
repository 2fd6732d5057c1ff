"""A one-rank DeepSpeed learner for the tests' subprocess scripts (DeepSpeed needs a process group of its own, so
each script runs in a fresh process): tests/test_faults.py and tests/test_security.py."""

from __future__ import annotations

import torch

from learner.engine import Engine, EngineConfig, init_distributed
from tests.raycluster import free_ports


def stepped_engine() -> Engine:
    """A ZeRO-2 Engine of one rank (on a free loopback port) over a seeded Linear(3, 2), after one step."""
    init_distributed(0, 1, free_ports(1)[0])
    torch.manual_seed(0)
    engine = Engine(torch.nn.Linear(3, 2), EngineConfig(zero_stage=2, lr=0.1, grad_clip=1.0))
    engine.step(sum(p.sum() for p in engine.module.parameters()))
    return engine
