"""The ``mnist1d`` family: the procedural MNIST-1D dataset (Greydanus 2020), generated offline.

``mnist1d.data.make_dataset`` with the default arguments (5,000 sequences of length 40, its own
seed 42) gives 4,000 train and 1,000 test examples; we split its train set 3,500 / 500 into
train / val with :data:`SPLIT_SEED` and keep its test set. Inputs are ``(N, 1, 40)`` float32.

The generator reseeds Python's and NumPy's global RNGs, so their states are saved and restored
around it. The arrays are cached as ``.npz`` (plain arrays, no pickles) under
``$WEIGHTDIFF_CACHE`` or ``~/.cache/weightdiff``, written atomically.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from weightdiff.io import atomic_path
from weightdiff.tasks.networks import MNIST1DCNN
from weightdiff.tasks.base import Task, TaskData, register_family

logger = logging.getLogger(__name__)

SPLIT_SEED = 0
NUM_VAL = 500
SEQ_LEN = 40
CACHE_FILE = "mnist1d-v1.npz"  # bump the version when the generation arguments change


def cache_dir() -> Path:
    """``$WEIGHTDIFF_CACHE`` if set, else ``~/.cache/weightdiff``."""
    env = os.environ.get("WEIGHTDIFF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "weightdiff"


def generate_mnist1d() -> dict[str, np.ndarray]:
    """Run the MNIST-1D generator without disturbing the global ``random``/NumPy RNG states.

    Returns:
        ``x (4000, 40)``, ``y (4000,)``, ``x_test (1000, 40)``, ``y_test (1000,)``.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {k: np.asarray(raw[k]) for k in ("x", "y", "x_test", "y_test")}


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        logger.warning("ignoring unreadable MNIST-1D cache %s (%s); regenerating", path, exc)
        return None
    if arrays["x"].shape[1:] != (SEQ_LEN,) or len(arrays["x"]) != len(arrays["y"]):
        logger.warning("ignoring MNIST-1D cache %s with unexpected shapes; regenerating", path)
        return None
    return arrays


def mnist1d_raw() -> dict[str, np.ndarray]:
    """The generated arrays, from the on-disk cache when present (else generated and cached)."""
    path = cache_dir() / CACHE_FILE
    if path.is_file() and (cached := _read_cache(path)) is not None:
        return cached
    arrays = generate_mnist1d()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: savez adds no suffix
            np.savez(fh, **arrays)
    except OSError as exc:  # a read-only home must not stop training
        logger.warning("could not cache MNIST-1D at %s: %s", path, exc)
    return arrays


@functools.lru_cache(maxsize=1)
def mnist1d_arrays() -> TaskData:
    """The MNIST-1D splits, built once per process (shared: do not modify in place)."""
    raw = mnist1d_raw()
    x = raw["x"].astype(np.float32)[:, None]        # (4000, 1, 40)
    y = raw["y"].astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    val_idx, train_idx = np.sort(perm[:NUM_VAL]), np.sort(perm[NUM_VAL:])
    return TaskData(
        x_train=torch.from_numpy(x[train_idx].copy()), y_train=torch.from_numpy(y[train_idx].copy()),
        x_val=torch.from_numpy(x[val_idx].copy()), y_val=torch.from_numpy(y[val_idx].copy()),
        x_test=torch.from_numpy(raw["x_test"].astype(np.float32)[:, None].copy()),
        y_test=torch.from_numpy(raw["y_test"].astype(np.int64).copy()),
    )


@register_family
@dataclass(frozen=True)
class MNIST1DTask(Task):
    """Classify MNIST-1D sequences (10 classes); target: a full :class:`MNIST1DCNN`."""

    family_name: ClassVar[str] = "mnist1d"
    NUM_CLASSES: ClassVar[int] = 10
    INPUT_SHAPE: ClassVar[tuple[int, ...]] = (1, SEQ_LEN)

    def descriptions(self) -> list[str]:
        return [
            "Classify MNIST-1D: one-dimensional signals of length 40 encoding the digits 0 to 9.",
            "Recognise which of ten digit templates produced a noisy, shifted, sheared 1-D sequence.",
            "Ten-class classification of procedurally generated 40-step MNIST-1D sequences.",
        ]

    def heldout_description(self) -> str:
        return "Identify the digit behind each short, noisy one-dimensional MNIST-1D signal."

    def data(self) -> TaskData:
        return mnist1d_arrays()

    def build_network(self) -> nn.Module:
        return MNIST1DCNN(num_classes=self.num_classes)
