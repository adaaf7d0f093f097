"""Raw condition inputs: what a condition provider receives for a task or a free-text request.

Kinds (see :mod:`weightdiff.conditioning` for the modules that embed them):

- ``text``: (R, 384 + F) — the frozen MiniLM embedding of a description, concatenated with the
  numeric features parsed from the same text (angles, mirror flags);
- ``code``: (R, C) — the task's code vector;
- ``examples``: a pair ``(x (R, K, x_dim), y (R, K))`` of labelled examples from the task's
  training split;
- ``none``: (R, 1) zeros (unconditional generation still needs a batch size).

The training data module and the sampler both build conditions here, so a model sees the same
inputs at sampling time as during training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from weightdiff.conditioning import TextEncoder, parse_numeric_features
from weightdiff.errors import ConditionError

_ENCODER: TextEncoder | None = None


def text_encoder() -> TextEncoder:
    """The process-wide frozen text encoder (loaded on first use, embeddings cached on disk)."""
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = TextEncoder()
    return _ENCODER


def text_condition(descriptions: Sequence[str]) -> torch.Tensor:
    """Descriptions -> (R, 384 + F): sentence embedding and parsed numeric features side by side."""
    if len(descriptions) == 0:
        raise ConditionError("no description given: need at least one non-empty task description")
    emb = text_encoder().encode(list(descriptions)).float()
    num = torch.stack([parse_numeric_features(d) for d in descriptions]).float()
    return torch.cat([emb, num], dim=1)


def examples_condition(x: torch.Tensor, y: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw k labelled examples (without replacement) -> (x (k, x_dim), y (k,))."""
    if x.shape[0] < k:
        raise ConditionError(f"need {k} labelled examples, the task's training split has {x.shape[0]}")
    idx = torch.randperm(x.shape[0], generator=generator)[:k]
    return x[idx].flatten(1).float(), y[idx].long()


def none_condition(rows: int) -> torch.Tensor:
    return torch.zeros(rows, 1)
