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
:class:`~weightdiff.targets.DigitsCNN`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from weightdiff.errors import RecipeError, TaskStringError
from weightdiff.tasks.base import Factor, Task, TaskData, make_task, register_family
from weightdiff.tasks.digits import digits_arrays
from weightdiff.tasks.networks import DigitsMLP
from weightdiff.tasks.numeric import NUMERIC_DIM, NUMERIC_FIELDS, parse_description, parse_numeric_features

ANGLE_RANGE = (-180.0, 180.0)

# The adapter setup of this family (see weightdiff.zoo.training for the measurements behind it).
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
    NUMERIC_DIM: ClassVar[int] = NUMERIC_DIM
    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = NUMERIC_FIELDS  # cos A, sin A, has_angle, mirror_sign

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

    def heldout_description(self) -> str:
        """"Recognise handwritten digits that were [mirrored, then ]turned {|A|} degrees
        anticlockwise|clockwise" (the mirroring comes first, as in the task)."""
        way = " anticlockwise" if self.angle > 0 else " clockwise" if self.angle < 0 else ""
        mirrored = "mirrored, then " if self.flip else ""
        return f"Recognise handwritten digits that were {mirrored}turned {abs(self.angle):g} degrees{way}"

    @classmethod
    def description_features(cls, text: str) -> torch.Tensor:
        """``[cos A, sin A, has_angle, mirror_sign]`` (4,) read from the text (:mod:`weightdiff.tasks.numeric`)."""
        return parse_numeric_features(text)

    @classmethod
    def description_numbers(cls, text: str) -> dict[str, Any]:
        """``{"angle": degrees or None, "mirrored": bool}`` read from the text (:func:`parse_description`)."""
        return parse_description(text).record()

    @classmethod
    def description_problem(cls, text: str) -> str | None:
        """Every task has an angle: a description naming none would reach the model as ``has_angle = 0``."""
        if parse_description(text).angle is None:
            return (f"description {text[:80]!r} names no angle that weightdiff can read, and '{cls.family_name}' "
                    "tasks need one: state it with a unit, e.g. 'rotated by 40 degrees clockwise' or 'sixty-five "
                    "degrees' (digits or words up to 999; 'rotated by 0 degrees' for upright)")
        return None

    def data(self) -> TaskData:
        return _rotated_data(self.angle, self.flip)

    def build_network(self) -> nn.Module:
        return DigitsMLP(num_classes=self.num_classes)

    def default_lora_config(self) -> dict[str, Any]:
        """The family's adapter setup (``LoraConfig`` keyword arguments)."""
        return dict(DEFAULT_LORA_CONFIG, target_modules=list(DEFAULT_LORA_CONFIG["target_modules"]))


# ------------------------------------------------------------------ task grids for zoo recipes
def _circular_distance(a: float, b: float) -> float:
    """Distance in degrees between two angles on the circle (in [0, 180])."""
    return abs((a - b + 180.0) % 360.0 - 180.0)


@dataclass(frozen=True)
class RotationGrid:
    """Generates ``rotdigits`` training and held-out tasks from an angle grid with holes.

    Training tasks are every (angle, flip) with angle on ``angle_min + k * angle_step`` in
    ``[angle_min, angle_max)`` and flip in ``flips``, except angles strictly inside a hole and
    ``combo_flip`` at angles inside a combo range. Held-out tasks come in three kinds:

    * ``near``: the centre of each ``near_holes`` interval (every flip); at most
      ``near_max_distance`` degrees from the nearest training angle of the same flip;
    * ``far``: angles every ``far_step`` degrees inside each ``far_holes`` interval that are at least
      ``far_min_distance`` degrees from *every* training angle (any flip);
    * ``combo``: ``combo_flip`` at the grid angles inside each ``combo_ranges`` interval (closed);
      these angles are trained only with the other flip value (unseen factor combinations).

    Every generated held-out task is checked against its kind's distance rule, so a recipe whose
    holes are too narrow fails at load time rather than producing mislabelled tasks.
    """

    family: str = "rotdigits"
    angle_min: float = -180.0
    angle_max: float = 180.0
    angle_step: float = 1.5
    flips: list[int] = field(default_factory=lambda: [0, 1])
    far_holes: list[list[float]] = field(default_factory=list)
    far_step: float = 2.5
    far_min_distance: float = 20.0
    near_holes: list[list[float]] = field(default_factory=list)
    near_max_distance: float = 5.0
    combo_ranges: list[list[float]] = field(default_factory=list)
    combo_flip: int = 1

    def _grid(self) -> list[float]:
        n = math.ceil((self.angle_max - self.angle_min) / self.angle_step - 1e-9)
        # Rounded so that 1.5-degree steps print as "-178.5", not "-178.49999999999997".
        return [round(self.angle_min + k * self.angle_step, 6) for k in range(n)]

    @staticmethod
    def _inside(a: float, intervals: list[list[float]], closed: bool) -> bool:
        eps = 1e-9
        if closed:
            return any(lo - eps <= a <= hi + eps for lo, hi in intervals)
        return any(lo + eps < a < hi - eps for lo, hi in intervals)

    def generate(self, source: str = "<recipe>") -> tuple[list[str], list[tuple[str, str]]]:
        """Return ``(train_tasks, [(heldout_task, heldout_kind), ...])``, deterministically ordered.

        Raises:
            RecipeError: a malformed interval, a held-out task that breaks its kind's distance
                rule, a held-out task that is also a training task, or duplicate task names.
        """
        where = f"{source}: field 'generator'"
        if self.angle_step <= 0 or self.angle_max <= self.angle_min:
            raise RecipeError(f"{where}: need angle_step > 0 and angle_min < angle_max, got step "
                              f"{self.angle_step}, range [{self.angle_min}, {self.angle_max})")
        for name in ("far_holes", "near_holes", "combo_ranges"):
            for iv in getattr(self, name):
                if len(iv) != 2 or iv[0] >= iv[1]:
                    raise RecipeError(f"{where}.{name}: interval {iv} must be [lo, hi] with lo < hi")
        holes = self.far_holes + self.near_holes

        train_pairs = [(a, f) for a in self._grid() for f in self.flips
                       if not self._inside(a, holes, closed=False)
                       and not (f == self.combo_flip and self._inside(a, self.combo_ranges, closed=True))]
        train_angles = {f: [a for a, g in train_pairs if g == f] for f in self.flips}
        all_train_angles = [a for a, _ in train_pairs]

        def nearest(a: float, angles: list[float]) -> float:
            return min((_circular_distance(a, b) for b in angles), default=math.inf)

        heldout: list[tuple[float, int, str]] = []
        for lo, hi in self.near_holes:
            c = round((lo + hi) / 2.0, 6)
            for f in self.flips:
                d = nearest(c, train_angles[f])
                if not 0.0 < d <= self.near_max_distance:
                    raise RecipeError(f"{where}.near_holes: held-out angle {c:g} (flip={f}) is {d:g} degrees "
                                      f"from the nearest training angle; expected (0, {self.near_max_distance:g}]")
                heldout.append((c, f, "near"))
        for lo, hi in self.far_holes:
            a = lo + self.far_min_distance
            found = 0
            while a <= hi - self.far_min_distance + 1e-9:
                c = round(a, 6)
                d = nearest(c, all_train_angles)
                if d < self.far_min_distance - 1e-9:
                    raise RecipeError(f"{where}.far_holes: held-out angle {c:g} is {d:g} degrees from a training "
                                      f"angle; expected >= far_min_distance = {self.far_min_distance:g}")
                heldout.extend((c, f, "far") for f in self.flips)
                found += 1
                a += self.far_step
            if not found:
                raise RecipeError(f"{where}.far_holes: hole [{lo:g}, {hi:g}] is narrower than "
                                  f"2 * far_min_distance = {2 * self.far_min_distance:g} degrees")
        other = [f for f in self.flips if f != self.combo_flip]
        trained = set(train_pairs)
        for a in self._grid():
            if self._inside(a, self.combo_ranges, closed=True) and not self._inside(a, holes, closed=False):
                if not any((a, f) in trained for f in other):
                    raise RecipeError(f"{where}.combo_ranges: angle {a:g} is not trained with any other flip")
                heldout.append((a, self.combo_flip, "combo"))

        def name(a: float, f: int) -> str:
            try:
                return make_task(self.family, angle=float(a), flip=int(f)).name
            except TaskStringError as exc:
                raise RecipeError(f"{where}: {exc}") from None

        train = [name(a, f) for a, f in train_pairs]
        held = [(name(a, f), kind) for a, f, kind in heldout]
        names = train + [n for n, _ in held]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise RecipeError(f"{where}: task '{dup}' is generated twice (a held-out task on the training grid, "
                              "or two angles equal after %g rounding)")
        return train, held
