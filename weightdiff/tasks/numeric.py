"""Numbers in task descriptions: the angle and mirror flag a ``rotdigits`` description names.

:func:`numeric_features` gives the features of any family: its ``description_features``
(``rotdigits``: the angle and mirror flag read here; the other built-in families: none), and
:func:`numeric_reader` the family's whole reading (features, their names, what was parsed), as
``sample`` records it.

A frozen sentence embedding carries meaning but not numeric geometry (measured: adapters
generated from "rotated by N degrees" descriptions did not generalise to unseen N), so the
numbers a description states reach the generator directly, as ``[cos A, sin A, has_angle,
mirror_sign]`` beside the embedding (see :mod:`weightdiff.models.conditioning`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightdiff.errors import ConditionError, TaskFamilyError
from weightdiff.tasks.base import get_family

NUMERIC_FIELDS = ("cos A", "sin A", "has_angle", "mirror_sign")  # the angle/mirror features, in order
NUMERIC_DIM = len(NUMERIC_FIELDS)


@dataclass(frozen=True)
class NumericCondition:
    """What :func:`parse_description` read from a text: an angle in degrees (CCW positive) and a mirror flag."""

    angle: float | None
    mirrored: bool

    def record(self) -> dict[str, Any]:
        """``{"angle": degrees or None, "mirrored": bool}``: what was read, as ``sample.json`` records it."""
        return {"angle": self.angle, "mirrored": self.mirrored}

    def features(self) -> torch.Tensor:
        """(4,) float32 ``[cos A, sin A, has_angle, mirror_sign]``; A = 0 when no angle was found."""
        a = math.radians(self.angle or 0.0)
        return torch.tensor([math.cos(a), math.sin(a), float(self.angle is not None),
                             1.0 if self.mirrored else -1.0], dtype=torch.float32)


_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")  # 20, 30, ..., 90
_WORD_VALUES = {**{w: i for i, w in enumerate(_UNITS)}, **{w: 20 + 10 * i for i, w in enumerate(_TENS)}}


def _alternatives(words: tuple[str, ...]) -> str:
    return "|".join(sorted(words, key=len, reverse=True))  # longest first: "seventeen" before "seven"


_BELOW_100 = rf"(?:(?:{_alternatives(_TENS)})(?:[\s-]+(?:{_alternatives(_UNITS[1:10])}))?|(?:{_alternatives(_UNITS)}))"
_WORD_NUMBER = (rf"(?:(?:(?:{_alternatives(_UNITS[1:10])}|a)[\s-]+hundred(?:[\s-]+(?:and[\s-]+)?{_BELOW_100})?"
                rf"|{_BELOW_100})\b)")
_DIGITS = r"[-+\u2212]?[0-9]+(?:\.[0-9]+)?"  # ASCII digits only: "\d" would also take e.g. Arabic-Indic digits
_NUM = rf"(?:{_DIGITS}|{_WORD_NUMBER})"


def words_to_number(text: str) -> int | None:
    """An English number from zero to 999 written in words, e.g. ``"sixty-five"`` -> 65; None otherwise.

    Accepts ``one hundred and twenty``, ``a hundred``, ``ninety nine`` (spaces or hyphens, any case).

    >>> words_to_number("Two hundred and forty-five"), words_to_number("sixty five"), words_to_number("lots")
    (245, 65, None)
    """
    words = [w for w in re.split(r"[\s-]+", text.strip().lower()) if w and w != "and"]
    if not words:
        return None
    value = 0
    if len(words) >= 2 and words[1] == "hundred":
        hundreds = 1 if words[0] == "a" else _WORD_VALUES.get(words[0], 0)
        if not 1 <= hundreds <= 9:
            return None
        value, words = 100 * hundreds, words[2:]
    if not words:
        return value
    first = _WORD_VALUES.get(words[0])
    if first is None or (value and first == 0):
        return None
    if len(words) == 1:
        return value + first
    second = _WORD_VALUES.get(words[1])
    if len(words) == 2 and first >= 20 and second is not None and 1 <= second <= 9:
        return value + first + second
    return None


def _number(text: str) -> float:
    """The value of a match of ``_NUM``: digits (an optional sign, U+2212 minus too) or number words."""
    if any(c.isdigit() for c in text):
        return float(text.replace("\u2212", "-"))
    value = words_to_number(text)
    if value is None:  # unreachable for a match of _WORD_NUMBER
        raise ConditionError(f"cannot read the number {text!r}")
    return float(value)

_ANGLE_WITH_UNIT = re.compile(
    rf"(?<![\w.])(?P<num>{_NUM})\s*-?\s*(?P<unit>°|º|˚|degrees?\b|degs?\b|radians?\b|rads?\b)", re.I)
_ANGLE_FIELD = re.compile(rf"\bangle\s*[=:]\s*(?P<num>{_NUM})", re.I)
_ANGLE_AFTER_VERB = re.compile(
    rf"\b(?:rotat\w*|turn\w*|tilt\w*|spun|spin\w*)\s+(?:by\s+|through\s+)?(?:an?\s+angle\s+of\s+)?"
    rf"(?P<num>{_DIGITS})(?![\d.])(?!\s*(?:%|percent|times|pixels?|px|steps?)\b)", re.I)
# A number in words with no unit counts only after "by"/"through" ("rotated by sixty-five"), not "turned one more".
_WORDS_AFTER_VERB = re.compile(
    rf"\b(?:rotat\w*|turn\w*|tilt\w*|spun|spin\w*)\s+(?:by|through)\s+(?:an?\s+angle\s+of\s+)?"
    rf"(?P<num>{_WORD_NUMBER})(?!\s*(?:%|percent|times|pixels?|px|steps?)\b)", re.I)
_TURNS = [(re.compile(r"\bthree[\s-]quarters?(?:\s+of\s+a)?[\s-]turns?\b", re.I), 270.0),
          (re.compile(r"\bquarter[\s-]turns?\b", re.I), 90.0),
          (re.compile(r"\bhalf[\s-]turns?\b", re.I), 180.0),
          (re.compile(r"\bupside[\s-]down\b", re.I), 180.0)]
_CCW = re.compile(r"\b(?:counter|anti)[\s-]?clockwise\b|\bccw\b|\bto\s+the\s+left\b|\bleftwards?\b", re.I)
_CW = re.compile(r"\bclockwise\b|\bcw\b|\bto\s+the\s+right\b|\brightwards?\b", re.I)
_MIRROR = re.compile(r"\b(?:mirror\w*|flip\w*|reflect\w*|left\s*(?:-|/|\bto\b)\s*right)\b", re.I)
_FLIP_FIELD = re.compile(r"\b(?:flip|mirror)\s*[=:]\s*(?P<val>[01])\b", re.I)
_NEGATIONS = {"not", "no", "without", "never", "non", "nor", "w/o"}


_CLAUSE_BREAK = re.compile(r"[,;:.!?()]|\b(?:and|but|then|while)\b", re.I)


def _negated(text: str, start: int, window: int = 3) -> bool:
    """Whether one of the ``window`` words before ``start``, in the same clause, negates what follows."""
    before = _CLAUSE_BREAK.split(text[:start])[-1]
    words = re.findall(r"[\w/']+", before.lower())[-window:]
    return any(w in _NEGATIONS or w.endswith("n't") for w in words)


def parse_description(text: str) -> NumericCondition:
    """Read the angle and mirror flag from a task description (the numeric condition path).

    Understood phrasings (case-insensitive):

    - angles with a unit: ``40 degrees``, ``40 degree``, ``40-degree``, ``40°``, ``40 deg``,
      ``-15 degrees``, ``0.5 rad``/``radians`` (converted to degrees); a task-string field
      ``angle=40``; a bare number right after a rotation verb (``rotated by 40``,
      ``turned 73``, ``tilted through 12``). Numbers are ASCII digits or English words from
      zero to 999 (``sixty-five degrees``, ``rotated by forty five``: words without a unit only
      after ``by``/``through``; :func:`words_to_number`). ``quarter turn`` (90), ``half turn`` and
      ``upside down`` (180), ``three-quarter turn`` (270). The first angle found is used.
    - direction: angles are counter-clockwise positive (the task convention); ``clockwise`` or
      ``cw``/``to the right`` negates, ``counter-clockwise``/``counterclockwise``/``anticlockwise``/
      ``anti-clockwise``/``ccw``/``to the left`` keeps the sign (and wins if both appear).
    - mirroring: ``mirror``/``mirrored``/``mirroring``, ``flip``/``flipped``, ``reflect``/
      ``reflected``/``reflection``, ``left-right``/``left to right``; a task-string field
      ``flip=0|1``. A negation among the three preceding words (``not``, ``no``, ``without``,
      ``never``, ``non-``, ``…n't``) in the same clause cancels it, as do ``unmirrored``/``unflipped`` (not
      matched); ``flipped upside down`` is read as a half turn, not a mirror.

    Anything else (e.g. "upright digits") gives no angle and no mirror.
    """
    if not isinstance(text, str):
        raise ConditionError(f"task description must be a string, got {type(text).__name__}: {text!r}")
    angle: float | None = None
    for pattern in (_ANGLE_WITH_UNIT, _ANGLE_FIELD, _ANGLE_AFTER_VERB, _WORDS_AFTER_VERB):
        m = pattern.search(text)
        if m:
            angle = _number(m.group("num"))
            if m.groupdict().get("unit") and m.group("unit").lower().startswith("rad"):
                angle = math.degrees(angle)
            break
    if angle is None:
        for pattern, value in _TURNS:
            if pattern.search(text):
                angle = value
                break
    if angle is not None and not _CCW.search(text) and _CW.search(text):
        angle = -angle

    field = _FLIP_FIELD.search(text)
    if field:
        mirrored = field.group("val") == "1"
    else:
        mirrored = any(not _negated(text, m.start()) and not re.match(r"\s+upside[\s-]down", text[m.end():], re.I)
                       for m in _MIRROR.finditer(text))
    return NumericCondition(angle=angle, mirrored=mirrored)


def parse_numeric_features(text: str) -> torch.Tensor:
    """Text -> (4,) float32 ``[cos A, sin A, has_angle, mirror_sign]`` (see :func:`parse_description`).

    ``mirror_sign`` is +1 for mirrored, -1 otherwise, so ``[:2]`` and ``[3]`` agree with the
    task code ``[cos A, sin A, 2·flip - 1]``.

    >>> parse_numeric_features("rotated by 90 degrees clockwise and mirrored").round().tolist()
    [0.0, -1.0, 1.0, 1.0]
    """
    return parse_description(text).features()


def _angle_mirror_numbers(text: str) -> dict[str, Any]:
    return parse_description(text).record()


@dataclass(frozen=True)
class NumericReader:
    """How the numbers of a description reach a text-conditioned generator.

    Attributes:
        fields: the names of the F features, in order (e.g. :data:`NUMERIC_FIELDS`).
        features: text -> ``(F,)`` float32.
        numbers: text -> what was read, by name (``sample.json``'s ``condition.parsed``).
    """

    fields: tuple[str, ...]
    features: Callable[[str], torch.Tensor]
    numbers: Callable[[str], dict[str, Any]]

    @property
    def dim(self) -> int:
        """F, the number of features."""
        return len(self.fields)


#: The angle/mirror reading of this module, which every family's descriptions got before families
#: supplied their own (and which generators trained with it keep getting).
ANGLE_MIRROR = NumericReader(NUMERIC_FIELDS, parse_numeric_features, _angle_mirror_numbers)


def numeric_reader(family: str | None = None, numeric_dim: int | None = None) -> NumericReader:
    """The reading of a family's descriptions for a generator that reads ``numeric_dim`` features.

    Args:
        family: the task family, whose ``description_features``, ``NUMERIC_FIELDS`` and
            ``description_numbers`` are used; None: :data:`ANGLE_MIRROR`.
        numeric_dim: the width a trained generator reads. When it differs from the family's
            ``NUMERIC_DIM`` and is 4, :data:`ANGLE_MIRROR` is used (a generator trained with
            those features keeps sampling from the inputs it was trained on).

    Raises:
        ConditionError: ``numeric_dim`` is neither the family's width nor 4.
        TaskFamilyError: the family names a number of ``NUMERIC_FIELDS`` other than ``NUMERIC_DIM``.
    """
    if family is None:
        return ANGLE_MIRROR
    cls = get_family(family)
    if numeric_dim is not None and numeric_dim != cls.NUMERIC_DIM:
        if numeric_dim != NUMERIC_DIM:
            raise ConditionError(f"the generator reads {numeric_dim} numeric description features, but family "
                                 f"'{family}' supplies {cls.NUMERIC_DIM} (and the angle/mirror features are "
                                 f"{NUMERIC_DIM})")
        return ANGLE_MIRROR
    fields = cls.NUMERIC_FIELDS or tuple(f"feature {i}" for i in range(cls.NUMERIC_DIM))  # unnamed: by position
    if len(fields) != cls.NUMERIC_DIM:
        raise TaskFamilyError(f"task family '{family}' ({cls.__module__}.{cls.__qualname__}) names "
                              f"{len(fields)} NUMERIC_FIELDS {list(fields)} for NUMERIC_DIM = {cls.NUMERIC_DIM} "
                              "features")
    return NumericReader(tuple(fields), cls.description_features, cls.description_numbers)


def numeric_features(descriptions: Sequence[str], family: str | None = None,
                     numeric_dim: int | None = None) -> torch.Tensor:
    """Descriptions -> (R, F): the numbers they state, as the task family reads them.

    :func:`numeric_reader` chooses the reading (the same arguments; the same errors).
    """
    reader = numeric_reader(family, numeric_dim)
    rows = [reader.features(d).float().reshape(reader.dim) for d in descriptions]
    return torch.stack(rows) if rows else torch.zeros(0, reader.dim)
