"""Task metrics: how the outputs of S networks on one split become S scores.

A :class:`Metric` scores every example, ``(outputs (S, N, ...), targets (N, ...)) -> (S, N)``,
and a network's score is the mean over the N examples, so evaluating the inputs in chunks gives
exactly the score of one pass. Each task names its metric (:attr:`weightdiff.tasks.Task.metric`):

==========  =========================================  ======================  ===================
name        per-example score                           better                  reports show
==========  =========================================  ======================  ===================
accuracy    1 if ``argmax(outputs) == y`` else 0         higher (the default)    ``acc %``
neg_loss    ``-cross_entropy(outputs, y)`` (nats)        higher                  ``neg_loss (nats)``
mse         mean squared error over the output dims      lower                   ``mse``
==========  =========================================  ======================  ===================

    >>> get_metric("accuracy").score(torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]), torch.tensor([0, 0]))
    tensor([0.5000])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from weightdiff.errors import TaskStringError


@dataclass(frozen=True)
class Metric:
    """A named per-example score and its direction.

    Attributes:
        name: the name tasks and reports use, e.g. ``"accuracy"``.
        per_example: ``(outputs (S, N, ...), targets (N, ...)) -> (S, N)`` float.
        higher_is_better: False for errors such as ``mse`` (the best network has the lowest score).
        classification: the targets are class indices ``(N,)`` int64 (else float, the outputs' shape).
        label: how tables head a column of scores, name and unit (``"acc %"``); default: the name.
        axis: how plots label an axis of scores (``"accuracy (%)"``); default: the label.
        scale: reports show ``scale × score`` (100: a fraction shown in percent).
    """

    name: str
    per_example: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    higher_is_better: bool = True
    classification: bool = True
    label: str = ""
    axis: str = ""
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)
        if not self.axis:
            object.__setattr__(self, "axis", self.label)

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean per-example score ``(S,)`` of ``outputs (S, N, ...)`` against ``targets (N, ...)``."""
        return self.per_example(outputs, targets.to(outputs.device)).float().mean(-1)

    def best(self, scores: torch.Tensor) -> float:
        """The best of ``scores (S,)``: the maximum, or the minimum when lower is better."""
        return float(scores.max() if self.higher_is_better else scores.min())

    def argbest(self, scores: torch.Tensor) -> int:
        """Index of the best of ``scores (S,)``, the first one on ties."""
        return int(torch.argmax(scores) if self.higher_is_better else torch.argmin(scores))


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(-1) == targets[None]).float()  # (S, N)


def _neg_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    s, n = outputs.shape[:2]
    loss = F.cross_entropy(outputs.reshape(s * n, -1).float(), targets.repeat(s), reduction="none")
    return -loss.reshape(s, n)


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    diff = outputs.float() - targets[None].float().reshape(1, *outputs.shape[1:])
    return diff.square().flatten(2).mean(-1)  # (S, N)


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", _accuracy, label="acc %", axis="accuracy (%)", scale=100.0),
    "neg_loss": Metric("neg_loss", _neg_loss, label="neg_loss (nats)", axis="negative cross-entropy (nats)"),
    "mse": Metric("mse", _mse, higher_is_better=False, classification=False, axis="mean squared error"),
}


def get_metric(name: str) -> Metric:
    """The metric called ``name``.

    Raises:
        TaskStringError: no such metric (the message lists the known ones).
    """
    if name not in METRICS:
        raise TaskStringError(f"unknown metric {name!r}; expected one of {sorted(METRICS)}")
    return METRICS[name]
