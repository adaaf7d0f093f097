"""The ``rotdigits`` adaptation family: digits mirrored (optionally) and rotated by an angle.

``rotdigits:angle=A,flip=F`` takes the ``digits`` images, mirrors them left-right when F = 1,
then rotates them by A degrees counter-clockwise (negative A: clockwise) about the image centre
with bilinear sampling and zero fill. Splits are those of ``digits``. The target is a LoRA
adapter on the frozen ``digits`` base network trained on upright digits.

Descriptions state the angle as a number followed by "degrees" or "°" with a direction word:
positive angles "counter-clockwise" / "anticlockwise" / "counterclockwise", negative angles
"clockwise" with the absolute value, 0 with no direction. Mirror words ("mirrored", "flipped
left to right", "reflected", "reflection", "mirror image") appear if and only if flip = 1. The
angle is the only number in a description, so a numeric parser cannot pick up another one.

Adapter setup, chosen by measurement (one CPU core; ``scripts/family_report.py``; test accuracy
of the adapted network / of the base alone / cost of training one adapter):

- DigitsCNN base, LoRA r=4 on conv1, conv2, fc (1,484 params), 200 full-batch Adam steps:
  94.2 % / 24 % / 6.0 s wall (one task, 40° mirrored); with 150 steps of batch 128: 84 % / 0.8 s.
- **DigitsMLP base (64-64-10), LoRA r=8 on fc1, fc2 (1,616 params), 100 full-batch Adam steps at
  lr 3e-2: 95.5 % / 31 % / 0.17 s CPU** (mean of 10 tasks over angles and flips).

The MLP base (96.2 % on upright digits) is the ``rotdigits`` base: the CNN's adapters are as
accurate only with ~35× the compute, too slow for a zoo of hundreds of adapters. Few-shot LoRA
from the base with k labelled examples per class (same optimiser): k = 1: 52 %, k = 5: 80 %,
k = 10: 85 %, k = 50: 93 %, all 1,000: 95.5 %. The full ``digits`` family keeps the
:class:`~weightdiff.nets.DigitsCNN`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from weightdiff.nets import DigitsMLP
from weightdiff.tasks.base import Factor, Task, TaskData, register_family
from weightdiff.tasks.digits import digits_arrays

ANGLE_RANGE = (-180.0, 180.0)

# The adapter setup of this family (see weightdiff.train_loops for the measurements behind it).
DEFAULT_LORA_CONFIG: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": ["fc1", "fc2"]}
DEFAULT_ADAPTER_TRAINING: dict[str, Any] = {"steps": 100, "lr": 3e-2}  # full-batch Adam


def rotate_images(x: torch.Tensor, angle: float, flip: int = 0) -> torch.Tensor:
    """Mirror (if ``flip``) then rotate images counter-clockwise by ``angle`` degrees.

    Args:
        x: images ``(N, C, H, W)``.
        angle: degrees, counter-clockwise as displayed (rows downwards, columns rightwards).
        flip: 1 mirrors left-right before rotating.

    Returns:
        ``(N, C, H, W)``: bilinear samples, zero outside the source image. For square images a
        rotation by a multiple of 90° equals ``torch.rot90(x, k, (-2, -1))`` up to rounding.
    """
    if flip:
        x = x.flip(-1)
    if angle == 0:
        return x.clone()
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    # affine_grid maps *output* coordinates (x right, y down, in [-1, 1]) to input coordinates,
    # so it needs the inverse of the displayed counter-clockwise rotation; with y pointing down
    # that inverse is [[cos, -sin], [sin, cos]].
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@functools.lru_cache(maxsize=128)  # ~0.5 MB per task
def _rotated_data(angle: float, flip: int) -> TaskData:
    base = digits_arrays()
    parts = {}
    for split in ("train", "val", "test"):
        x, y = base.split(split)
        parts[f"x_{split}"] = rotate_images(x, angle, flip).contiguous()
        parts[f"y_{split}"] = y
    return TaskData(**parts)


def _direction(angle: float, variant: int) -> str:
    if angle > 0:
        return ("counter-clockwise", "anticlockwise", "counterclockwise")[variant % 3]
    if angle < 0:
        return "clockwise"
    return ""


@register_family
@dataclass(frozen=True)
class RotDigitsTask(Task):
    """Digits mirrored if ``flip`` and rotated by ``angle`` degrees; target: a LoRA adapter."""

    family_name: ClassVar[str] = "rotdigits"
    factor_specs: ClassVar[tuple[Factor, ...]] = (
        Factor("angle", "float", default=None, low=ANGLE_RANGE[0], high=ANGLE_RANGE[1]),
        Factor("flip", "int", default=0, choices=(0, 1)),
    )
    kind: ClassVar[str] = "lora"
    base_family: ClassVar[str] = "digits"
    NUM_CLASSES: ClassVar[int] = 10
    INPUT_SHAPE: ClassVar[tuple[int, ...]] = (1, 8, 8)

    @property
    def angle(self) -> float:
        return float(self.factors["angle"])

    @property
    def flip(self) -> int:
        return int(self.factors["flip"])

    def code(self) -> torch.Tensor:
        """``[cos A, sin A, 2 F - 1]`` float32 ``(3,)``: continuous in the angle across ±180°."""
        a = math.radians(self.angle)
        return torch.tensor([math.cos(a), math.sin(a), 2.0 * self.flip - 1.0], dtype=torch.float32)

    def descriptions(self) -> list[str]:
        """Seven phrasings; each states the angle (number + degrees/°), direction and mirroring."""
        mag = f"{abs(self.angle):g}"
        flipped = self.flip == 1

        def rot(variant: int, unit: str = " degrees") -> str:
            d = _direction(self.angle, variant)
            return f"{mag}{unit} {d}".rstrip() if d else f"0{unit}"

        return [
            f"Classify low-resolution handwritten digits that have been {'mirrored left to right and then ' if flipped else ''}"
            f"rotated by {rot(0)}.",
            f"Digit images {'flipped left to right, then ' if flipped else ''}turned {rot(1, '°')}; "
            "predict which digit each one shows.",
            f"Recognise handwritten digits rotated {rot(2)}"
            f"{', after a left-right reflection' if flipped else ''}.",
            f"Each small digit scan is {'shown as a mirror image and ' if flipped else ''}rotated through {rot(0)}; "
            "label it with its digit.",
            f"Ten-class digit recognition where every input is {'reflected horizontally and ' if flipped else ''}"
            f"rotated {rot(1)}.",
            f"Handwritten digits{' in mirror image' if flipped else ''}, with a rotation of {rot(2, '°')}: "
            "which digit is it?",
            f"A digit classifier for tiny grayscale images under a rotation of {rot(0)}"
            f"{' applied after mirroring them left to right' if flipped else ''}.",
        ]

    def data(self) -> TaskData:
        return _rotated_data(self.angle, self.flip)

    def build_network(self) -> nn.Module:
        return DigitsMLP(num_classes=self.num_classes)

    def default_lora_config(self) -> dict[str, Any]:
        """The family's adapter setup (``LoraConfig`` keyword arguments)."""
        return dict(DEFAULT_LORA_CONFIG, target_modules=list(DEFAULT_LORA_CONFIG["target_modules"]))
