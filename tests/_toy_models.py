"""Tiny base networks and a tiny text family for the tests of bases from configuration.

``ToyMLP`` is a base architecture no task family builds (named by ``class_path``); ``ToyTextTask``
is a LoRA family whose inputs are token ids, for a Hugging Face encoder as the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from weightdiff.tasks import Factor, Task, TaskData, register_family

TOY_VOCAB = 1000  # token ids drawn below every Hugging Face vocabulary the tests use
TOY_SEQ_LEN = 6


class ToyMLP(nn.Module):
    """``(N, 1, 8, 8)`` digits → ``(N, classes)`` logits through one hidden tanh layer."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.inp = nn.Linear(64, width)
        self.act = nn.Tanh()
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.inp(self.flat(x))))  # (N, classes)


@dataclass(frozen=True)
class ToyTextTask(Task):
    """Is token k of a 6-token sequence odd? Inputs are token ids ``(N, 6)``."""

    family_name: ClassVar[str] = "toytext"
    factor_specs: ClassVar[tuple[Factor, ...]] = (Factor("k", "int", default=None, choices=(0, 1, 2)),)
    kind: ClassVar[str] = "lora"
    NUM_CLASSES: ClassVar[int] = 2
    INPUT_SHAPE: ClassVar[tuple[int, ...]] = (TOY_SEQ_LEN,)

    def code(self) -> torch.Tensor:
        return torch.tensor([float(self.factors["k"])])

    def descriptions(self) -> list[str]:
        return [f"Tell whether token {self.factors['k']} is odd."]

    def data(self) -> TaskData:
        x = torch.randint(1, TOY_VOCAB, (12, TOY_SEQ_LEN), generator=torch.Generator().manual_seed(0))
        y = x[:, self.factors["k"]] % 2
        return TaskData(x[:4], y[:4], x[4:8], y[4:8], x[8:], y[8:])

    def build_network(self) -> nn.Module:
        raise NotImplementedError("toytext has no network of its own: its zoos name their base")


def register() -> None:
    """Register the ``toytext`` family (idempotent)."""
    register_family(ToyTextTask)


def unregister() -> None:
    """Forget the ``toytext`` family again, so that later tests see only the real families."""
    from weightdiff.tasks import base

    base._FAMILIES.pop(ToyTextTask.family_name, None)
