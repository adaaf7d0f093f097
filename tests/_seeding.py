"""Random but reproducible parameters for the toy networks the tests compare against PEFT."""

from __future__ import annotations

import torch
from torch import nn


def seed_parameters(module: nn.Module, *, seed: int = 0, scale: float, trainable_only: bool = False) -> nn.Module:
    """Overwrite ``module``'s parameters (or only those that require grad) with ``scale · N(0, 1)``
    draws from a generator seeded with ``seed``, in ``parameters()`` order; returns it in eval mode.

    Non-zero everywhere (unlike PEFT's zero-initialised ``lora_B``), so every term of a LoRA
    forward is exercised.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad or not trainable_only:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()
