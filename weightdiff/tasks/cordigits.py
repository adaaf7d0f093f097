"""The ``cordigits`` family: digits under one corruption, or two composed; target: a LoRA adapter.

A task applies corruption ``c1`` at severity ``s1`` and then, optionally, ``c2`` at ``s2`` to every
image of the ``digits`` splits (:mod:`weightdiff.tasks.corruptions`: rotation, shear, zoom,
translation, blur, Gaussian noise, salt and pepper, inversion, contrast loss, wave distortion,
occlusion, pixelation, mirroring)::

    >>> get_task("cordigits:c1=rotate,s1=0.5").name
    'cordigits:c1=rotate,s1=0.5,c2=none,s2=0'
    >>> get_task("cordigits:c1=blur,s1=0.4,c2=invert,s2=1").descriptions()[0]
    'Classify handwritten digits that have been moderately blurred and then inverted.'

The target is a LoRA adapter on the attention projections of a :class:`DigitsViT` trained once
on clean digits. Descriptions name the corruptions in words and their severities in words or
as a percentage; no parser reads them (``NUMERIC_DIM = 0``), so the kind of corruption reaches a
generator only through the sentence embedding. A description that names no corruption of the
registry cannot say which task it means (:meth:`CorDigitsTask.description_problem`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from weightdiff.errors import TaskStringError
from weightdiff.tasks.base import Factor, Task, TaskData, register_family
from weightdiff.tasks.corruptions import CORRUPTIONS, apply_corruptions, corruption_seed
from weightdiff.tasks.digits import digits_arrays
from weightdiff.tasks.networks import DigitsViT

NO_CORRUPTION = "none"  # the value of c2 for a single corruption

# The adapter setup of this family. Measured on one core (mean test accuracy over 8 held-out tasks,
# 300 Adam steps of batch 128): r=4 on q, v at lr 1e-2: 92.5 % (3e-2: 92.2 %), 1.6 s an adapter; r=8:
# 88.6 %, r=2: 89.3 % (lr 3e-2). Adding fc1, fc2 (r=4) gains 2 points (94.1 % against 92.1 % on another
# 8 tasks) for 2.5x the parameters (5,120 against 2,048) and 1.8 s: left out, so that the adapter is on
# the attention projections alone.
DEFAULT_LORA_CONFIG: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]}

# Severity words, by the upper end of the severity band they name (the last band ends at 1).
_ADVERBS = ((0.35, "slightly"), (0.6, "moderately"), (0.85, "heavily"), (1.0, "extremely"))
_ADJECTIVES = ((0.35, "mild"), (0.6, "moderate"), (0.85, "heavy"), (1.0, "extreme"))


def _band(severity: float, words: tuple[tuple[float, str], ...]) -> str:
    return next(word for upper, word in words if severity < upper or upper == 1.0)


def severity_adverb(severity: float) -> str:
    """``"slightly"`` (< 0.35), ``"moderately"`` (< 0.6), ``"heavily"`` (< 0.85) or ``"extremely"``."""
    return _band(severity, _ADVERBS)


def severity_adjective(severity: float) -> str:
    """``"mild"``, ``"moderate"``, ``"heavy"`` or ``"extreme"``, on the bands of :func:`severity_adverb`."""
    return _band(severity, _ADJECTIVES)


def severity_percent(severity: float) -> str:
    """``"at 60% strength"`` for severity 0.6."""
    return f"at {100.0 * severity:g}% strength"


@functools.lru_cache(maxsize=128)  # ~0.5 MB per task
def _corrupted_data(name: str, steps: tuple[tuple[str, float], ...]) -> TaskData:
    base = digits_arrays()
    parts = {}
    for split in ("train", "val", "test"):
        x, y = base.split(split)
        gen = torch.Generator().manual_seed(corruption_seed(name, split))
        parts[f"x_{split}"] = apply_corruptions(x, steps, gen).contiguous()
        parts[f"y_{split}"] = y
    return TaskData(**parts)


@register_family
@dataclass(frozen=True)
class CorDigitsTask(Task):
    """Digits corrupted by ``c1`` at severity ``s1``, then by ``c2`` at ``s2`` (``c2=none``: not).

    Severities are in (0, 1]; an ungraded corruption (``invert``, ``mirror``) takes severity 1.
    The two corruptions differ, and ``s2`` is 0 exactly when ``c2`` is ``none``.
    """

    family_name: ClassVar[str] = "cordigits"
    factor_specs: ClassVar[tuple[Factor, ...]] = (
        Factor("c1", "name", default=None),
        Factor("s1", "float", default=None, low=0.0, high=1.0, high_inclusive=True),
        Factor("c2", "name", default=NO_CORRUPTION),
        Factor("s2", "float", default=0.0, low=0.0, high=1.0, high_inclusive=True),
    )
    kind: ClassVar[str] = "lora"
    base_family: ClassVar[str] = "digits"
    NUM_CLASSES: ClassVar[int] = 10
    INPUT_SHAPE: ClassVar[tuple[int, ...]] = (1, 8, 8)

    def __post_init__(self) -> None:
        def fail(why: str) -> TaskStringError:
            return TaskStringError(f"task string {self.name!r}: {why}")

        c1, s1, c2, s2 = (self.factors[k] for k in ("c1", "s1", "c2", "s2"))
        for key, value in (("c1", c1), ("c2", c2)):
            if key == "c2" and value == NO_CORRUPTION:
                continue
            if value not in CORRUPTIONS:
                extra = f" or '{NO_CORRUPTION}'" if key == "c2" else ""
                raise fail(f"factor '{key}' = {value!r} is not a corruption; expected one of "
                           f"{', '.join(CORRUPTIONS)}{extra}")
        if c2 == NO_CORRUPTION and s2 != 0:
            raise fail(f"factor 's2' = {s2:g} needs a second corruption; expected s2=0 with c2={NO_CORRUPTION}")
        if c2 != NO_CORRUPTION and c2 == c1:
            raise fail(f"factors 'c1' and 'c2' both name '{c1}'; expected two different corruptions "
                       "(raise the severity instead)")
        for c, s, key in ((c1, s1, "s1"), (c2, s2, "s2")):
            if c == NO_CORRUPTION:
                continue
            if s == 0:
                raise fail(f"factor '{key}' = 0 leaves '{c}' out; expected a severity in (0, 1]")
            if not CORRUPTIONS[c].graded and s != 1:
                raise fail(f"factor '{key}' = {s:g}, but '{c}' has no degrees; expected {key}=1")

    @property
    def steps(self) -> tuple[tuple[str, float], ...]:
        """The corruptions in the order applied: ``((c1, s1),)`` or ``((c1, s1), (c2, s2))``."""
        out = [(str(self.factors["c1"]), float(self.factors["s1"]))]
        if self.factors["c2"] != NO_CORRUPTION:
            out.append((str(self.factors["c2"]), float(self.factors["s2"])))
        return tuple(out)

    def code(self) -> torch.Tensor:
        """``(K,)`` float32 over the K corruptions of the registry (in its order): the severity of each
        corruption the task applies, 0 elsewhere."""
        code = torch.zeros(len(CORRUPTIONS), dtype=torch.float32)
        names = list(CORRUPTIONS)
        for name, severity in self.steps:
            code[names.index(name)] += severity
        return code

    # ---------------------------------------------------------------- descriptions
    def _phrase(self, form: str, variant: int, severity_style: str) -> str:
        """The corruptions in words, in the order applied: ``form="participle"``, e.g. "heavily rotated and
        then inverted" (severity as an adverb or a percentage); ``form="noun"``, e.g. "heavy rotation
        followed by inversion" (severity as an adjective or a percentage)."""
        participle = form == "participle"
        severity_word = severity_adverb if participle else severity_adjective
        parts = []
        for name, severity in self.steps:
            c = CORRUPTIONS[name]
            words = c.participles if participle else c.nouns
            word = words[variant % len(words)]
            if c.graded and severity_style == "percent":
                word = f"{word} {severity_percent(severity)}"
            elif c.graded and severity_style in ("adverb", "adjective"):
                word = f"{severity_word(severity)} {word}"
            parts.append(word)
        return (" and then " if participle else " followed by ").join(parts)

    def descriptions(self) -> list[str]:
        """Nine phrasings naming each corruption in words (synonyms vary) and its severity as an adverb,
        an adjective or a percentage; compositions are named in the order applied."""
        return [
            f"Classify handwritten digits that have been {self._phrase('participle', 0, 'adverb')}.",
            f"Digit images {self._phrase('participle', 1, 'adverb')}; predict which digit each one shows.",
            f"Recognise small digit scans under {self._phrase('noun', 2, 'adjective')}.",
            f"Ten-class digit recognition where every image is {self._phrase('participle', 0, 'percent')}.",
            f"Handwritten digits corrupted by {self._phrase('noun', 1, 'percent')}: which digit is it?",
            f"A digit classifier for tiny grayscale images that are {self._phrase('participle', 2, 'adverb')}.",
            f"Identify the digit in each 8x8 image after {self._phrase('noun', 0, 'adjective')}.",
            f"Each small digit scan has been {self._phrase('participle', 1, 'percent')}; label it with its digit.",
            f"Digits subjected to {self._phrase('noun', 2, 'percent')}; tell which of the ten digits each shows.",
        ]

    def heldout_description(self) -> str:
        """"Name the digit drawn in every picture once it went through rotation (heavy severity), then
        inversion": parenthesised severities, phrased unlike every training description."""
        parts = []
        for name, severity in self.steps:
            c = CORRUPTIONS[name]
            parts.append(f"{c.nouns[0]} ({severity_adjective(severity)} severity)" if c.graded else c.nouns[0])
        return f"Name the digit drawn in every picture once it went through {', then '.join(parts)}"

    @classmethod
    def description_problem(cls, text: str) -> str | None:
        """A description must name a corruption of the registry: the type reaches a generator only
        through the words (``NUMERIC_DIM = 0``), and a text naming none conditions on nothing the
        family's descriptions share."""
        if not any(c.mentioned_in(text) for c in CORRUPTIONS.values()):
            examples = ", ".join(c.participles[0] for c in CORRUPTIONS.values())
            return (f"description {text[:80]!r} names no corruption that '{cls.family_name}' tasks are described "
                    f"by; name at least one in words, e.g. 'digits heavily rotated' (one of: {examples})")
        return None

    def data(self) -> TaskData:
        return _corrupted_data(self.name, self.steps)

    def build_network(self) -> nn.Module:
        return DigitsViT(num_classes=self.num_classes)

    def default_lora_config(self) -> dict[str, Any]:
        """The family's adapter setup (``LoraConfig`` keyword arguments)."""
        return dict(DEFAULT_LORA_CONFIG, target_modules=list(DEFAULT_LORA_CONFIG["target_modules"]))
