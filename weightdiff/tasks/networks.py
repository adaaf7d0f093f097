"""The target networks of the built-in task families.

Small plain stacks (conv → ReLU → ... → flatten → linear) with named modules, so state-dict
keys are stable (``conv1.weight``, ``fc.bias``) and there is no BatchNorm (no running
statistics; hidden-unit permutations act on weights alone).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


class DigitsCNN(nn.Sequential):
    """CNN for 8×8 digit images: two 3×3 convs (the second strided) and a linear head.

    Input ``(N, 1, 8, 8)`` → logits ``(N, num_classes)``. The default widths keep a full training
    run at ~1 s on one CPU core.
    """

    def __init__(self, channels: tuple[int, int] = (8, 16), num_classes: int = 10) -> None:
        c1, c2 = channels
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(1, c1, 3, padding=1),              # (N, c1, 8, 8)
            act1=nn.ReLU(),
            conv2=nn.Conv2d(c1, c2, 3, stride=2, padding=1),   # (N, c2, 4, 4)
            act2=nn.ReLU(),
            flatten=nn.Flatten(),                              # (N, 16 c2)
            fc=nn.Linear(16 * c2, num_classes),                # (N, C)
        ))


class DigitsMLP(nn.Sequential):
    """MLP for 8×8 digit images: the frozen base of the ``rotdigits`` LoRA family.

    Input ``(N, 1, 8, 8)`` → flatten ``(N, 64)`` → ``fc1`` → ReLU → ``fc2`` → logits ``(N, C)``.
    Chosen over :class:`DigitsCNN` as the adapter base because a LoRA adapter on it trains in
    ~0.17 s of CPU (100 full-batch Adam steps) against ~6 s on the CNN, at the same ~95 %
    accuracy on rotated digits (measurements in :mod:`weightdiff.tasks.rotdigits`).
    """

    def __init__(self, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__(OrderedDict(
            flatten=nn.Flatten(),                  # (N, 64)
            fc1=nn.Linear(64, hidden),             # (N, hidden)
            act1=nn.ReLU(),
            fc2=nn.Linear(hidden, num_classes),    # (N, C)
        ))


class MNIST1DCNN(nn.Sequential):
    """1-D CNN for MNIST-1D: a stride-1 conv, three strided convs and a linear head.

    Input ``(N, 1, 40)`` → logits ``(N, num_classes)``; the sequence length halves at each
    strided conv (40 → 20 → 10 → 5). With 32 channels it reaches 94.6 % test accuracy (3 seeds,
    40 epochs, ~5 s on one core), matching the dataset paper's CNN baseline (94 %, Greydanus 2020).
    """

    def __init__(self, channels: int = 32, num_classes: int = 10) -> None:
        c = channels
        super().__init__(OrderedDict(
            conv1=nn.Conv1d(1, c, 5, padding=2),               # (N, c, 40)
            act1=nn.ReLU(),
            conv2=nn.Conv1d(c, c, 3, stride=2, padding=1),     # (N, c, 20)
            act2=nn.ReLU(),
            conv3=nn.Conv1d(c, c, 3, stride=2, padding=1),     # (N, c, 10)
            act3=nn.ReLU(),
            conv4=nn.Conv1d(c, c, 3, stride=2, padding=1),     # (N, c, 5)
            act4=nn.ReLU(),
            flatten=nn.Flatten(),                              # (N, 5 c)
            fc=nn.Linear(5 * c, num_classes),                  # (N, C)
        ))
