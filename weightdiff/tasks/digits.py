"""The ``digits`` family: scikit-learn's 8×8 handwritten digits (1,797 images, offline).

Images are scaled from [0, 16] to [0, 1] and shaped ``(N, 1, 8, 8)`` float32; labels are 0–9.
The splits are stratified and fixed by :data:`SPLIT_SEED`: 1,000 train / 297 val / 500 test.
The ``rotdigits`` adaptation family reuses these splits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from weightdiff.tasks.networks import DigitsCNN
from weightdiff.tasks.base import Task, TaskData, register_family

SPLIT_SEED = 0
NUM_TRAIN, NUM_VAL, NUM_TEST = 1000, 297, 500
PIXEL_MAX = 16.0  # load_digits stores 4-bit intensities 0..16


@functools.lru_cache(maxsize=1)
def digits_arrays() -> TaskData:
    """The upright digits splits, loaded once per process (shared: do not modify in place)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / PIXEL_MAX)[:, None]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    train_idx, rest_idx = train_test_split(idx, train_size=NUM_TRAIN, stratify=y, random_state=SPLIT_SEED)
    val_idx, test_idx = train_test_split(rest_idx, test_size=NUM_TEST, stratify=y[rest_idx],
                                         random_state=SPLIT_SEED)
    parts = {}
    for split, ids in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        ids = np.sort(ids)
        parts[f"x_{split}"] = torch.from_numpy(x[ids].copy())
        parts[f"y_{split}"] = torch.from_numpy(y[ids].copy())
    return TaskData(**parts)


@register_family
@dataclass(frozen=True)
class DigitsTask(Task):
    """Classify upright 8×8 handwritten digits (10 classes); target: a full :class:`DigitsCNN`."""

    family_name: ClassVar[str] = "digits"
    NUM_CLASSES: ClassVar[int] = 10
    INPUT_SHAPE: ClassVar[tuple[int, ...]] = (1, 8, 8)

    def descriptions(self) -> list[str]:
        return [
            "Classify 8x8 grayscale images of handwritten digits into the ten classes 0 to 9.",
            "Recognise upright handwritten digits from small 8 by 8 pixel scans.",
            "Ten-class digit recognition on low-resolution handwritten digit images.",
        ]

    def heldout_description(self) -> str:
        return "Identify which digit appears in each tiny handwritten scan."

    def data(self) -> TaskData:
        return digits_arrays()

    def build_network(self) -> nn.Module:
        return DigitsCNN(num_classes=self.num_classes)
