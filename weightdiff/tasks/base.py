"""Task strings, factor specifications and the :class:`Task` base class.

A task is named by a string ``family[:key=value[,key=value...]]``. Parsing fills defaults,
orders the keys as the family declares them and formats floats with ``%g``, so every task has
exactly one canonical name::

    >>> get_task("rotdigits:flip=0,angle=40.0").name
    'rotdigits:angle=40,flip=0'

Float factors are rounded to their ``%g`` form (six significant digits), so ``task.factors``
and ``task.name`` always agree and ``get_task(task.name) == task``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from weightdiff.errors import TaskFamilyError, TaskStringError
from weightdiff.tasks.metrics import Metric, get_metric


@dataclass(frozen=True)
class TaskData:
    """The three disjoint splits of one task (shared, cached tensors: do not modify in place).

    Inputs are float32 ``(N, *input_shape)``, labels int64 ``(N,)``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def split(self, name: Literal["train", "val", "test"]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, y)`` of one split."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


# Factor values as written in task strings: ASCII digits only, an optional sign, decimal point and exponent.
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Name factors: a letter or digit, then letters, digits, '.', '_' or '-' (no ',', '=', ':' or spaces).
_NAME_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Factor:
    """One named factor of a task family: its type, default and allowed values.

    Args:
        name: key in the task string.
        kind: ``"float"`` (formatted with ``%g``), ``"int"`` or ``"name"`` (a name kept as written:
            a letter or digit, then up to 63 letters, digits, ``.``, ``_`` or ``-``).
        default: value used when the key is absent; ``None`` makes the key required.
        low, high: allowed range ``[low, high)`` (``high_inclusive`` closes it on the right).
        choices: allowed values for ``"int"`` factors (overrides the range).
    """

    name: str
    kind: Literal["float", "int", "name"]
    default: float | int | str | None = None
    low: float | None = None
    high: float | None = None
    high_inclusive: bool = False
    choices: tuple[int, ...] | None = None

    def expected(self) -> str:
        """Human-readable description of the allowed values (used in error messages)."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.kind == "name":
            return "a name: a letter or digit, then up to 63 letters, digits, '.', '_' or '-'"
        right = "]" if self.high_inclusive else ")"
        return f"a finite {self.kind} in [{self.low:g}, {self.high:g}{right}"

    def parse(self, raw: str, task_string: str) -> float | int | str:
        """Parse and validate one raw value, raising :class:`TaskStringError` naming the key."""
        def fail(why: str) -> TaskStringError:
            return TaskStringError(f"task string {task_string!r}: factor '{self.name}' {why}; "
                                   f"expected {self.expected()}")

        if self.kind == "name":
            if not _NAME_TEXT.fullmatch(raw):
                raise fail(f"has value {raw!r}, not a name")
            return raw
        if self.kind == "int":
            if not _INT_TEXT.fullmatch(raw):  # int() would also take "1_5" and non-ASCII digits
                raise fail(f"has non-integer value {raw!r} (ASCII digits 0-9 with an optional sign)")
            value: float | int = int(raw)
        else:
            try:
                value = float(raw)
            except ValueError:
                raise fail(f"has non-numeric value {raw!r}") from None
            if not math.isfinite(value):
                raise fail(f"has non-finite value {raw!r}")
            if not _FLOAT_TEXT.fullmatch(raw):  # float() would also take "1_5" and non-ASCII digits
                raise fail(f"has value {raw!r}, not a number in ASCII digits 0-9 (optional sign, decimal "
                           "point and exponent)")
            # Round to the canonical %g form so the name and the factors agree exactly; "+ 0.0"
            # turns -0 into 0 so that "-0" and "0" name the same task.
            value = float(f"{value:g}") + 0.0
        return self.validate(value, task_string, raw)

    def validate(self, value: float | int | str, task_string: str, raw: str | None = None) -> float | int | str:
        """Check the range/choices (names: the spelling) of an already typed value."""
        shown = raw if raw is not None else repr(value)
        if self.kind == "name":
            if not (isinstance(value, str) and _NAME_TEXT.fullmatch(value)):
                raise TaskStringError(f"task string {task_string!r}: factor '{self.name}' = {shown} is not "
                                      f"allowed; expected {self.expected()}")
            return value
        if self.choices is not None:
            if value not in self.choices:
                raise TaskStringError(f"task string {task_string!r}: factor '{self.name}' = {shown} is not "
                                      f"allowed; expected {self.expected()}")
            return value
        above = value > self.high if self.high_inclusive else value >= self.high
        if value < self.low or above:
            raise TaskStringError(f"task string {task_string!r}: factor '{self.name}' = {shown} is out of "
                                  f"range; expected {self.expected()}")
        return value

    def format(self, value: float | int | str) -> str:
        """Canonical text of a value (``%g`` for floats, names as written)."""
        if self.kind == "name":
            return str(value)
        return f"{value:g}" if self.kind == "float" else str(int(value))


@dataclass(frozen=True)
class Task:
    """One classification task, built from its canonical name by :func:`get_task`.

    Subclasses (one per family) implement the data, the code, the descriptions and the target
    network; the fields are the same for all families.

    To add a family, write one frozen dataclass subclass:

    * class attributes: ``family_name`` (the prefix of its task strings), ``factor_specs`` (one
      :class:`Factor` per key of the task string; empty for a single-task family), ``kind``
      (``"full"``: whole networks; ``"lora"``: adapters on a frozen base, whose family is
      ``base_family``), ``NUM_CLASSES`` and ``INPUT_SHAPE``;
    * methods: :meth:`descriptions`, :meth:`data` and :meth:`build_network` (required);
      :meth:`code`, :meth:`heldout_description` and :meth:`default_lora_config` (optional);
    * evaluation: :attr:`metric` (default top-1 accuracy; :mod:`weightdiff.tasks.metrics`);
    * numbers in descriptions (optional): ``NUMERIC_DIM`` and :meth:`description_features`, the
      ``(NUMERIC_DIM,)`` features a text-conditioned generator reads beside the sentence
      embedding (default: none), ``NUMERIC_FIELDS``, their names, :meth:`description_numbers`,
      what was read as ``sample.json`` records it, and :meth:`description_problem`, why a
      free-text description cannot condition the family's tasks;
    * registration: decorate it with :func:`register_family` in a module that is imported, or,
      from another installed package, name it (or a function registering it) as an entry point
      of group :data:`ENTRY_POINT_GROUP` whose name is the family name::

          # pyproject.toml of the other package
          [project.entry-points."weightdiff.tasks"]
          tinyfam = "tinyfam:TinyTask"

      Entry points are loaded lazily, the first time a family name is not found among the
      registered ones (or when the families are listed).

    Attributes:
        name: canonical task string, e.g. ``"rotdigits:angle=40,flip=1"``.
        family: family name, e.g. ``"rotdigits"``.
        factors: parsed factor values in declaration order, e.g. ``{"angle": 40.0, "flip": 1}``.
        num_classes: number of classes C.
        input_shape: shape of one input, e.g. ``(1, 8, 8)``.
    """

    family_name: ClassVar[str] = ""
    factor_specs: ClassVar[tuple[Factor, ...]] = ()
    kind: ClassVar[Literal["full", "lora"]] = "full"
    base_family: ClassVar[str | None] = None  # adapter families: the family of the frozen base
    NUM_CLASSES: ClassVar[int] = 0
    INPUT_SHAPE: ClassVar[tuple[int, ...]] = ()
    NUMERIC_DIM: ClassVar[int] = 0  # width of description_features
    NUMERIC_FIELDS: ClassVar[tuple[str, ...]] = ()  # names of the NUMERIC_DIM features, in order

    name: str
    family: str
    factors: Mapping[str, float | int | str] = field(hash=False)
    num_classes: int
    input_shape: tuple[int, ...]

    def code(self) -> torch.Tensor:
        """Numeric task code ``(C,)`` float32 (a constant for single-task families)."""
        return torch.ones(1, dtype=torch.float32)

    def descriptions(self) -> list[str]:
        """Natural-language descriptions of the task (several phrasings)."""
        raise NotImplementedError

    def heldout_description(self) -> str:
        """A description phrased unlike every training description, for zero-shot benchmarks."""
        raise NotImplementedError(f"task family '{self.family}' has no held-out description")

    def data(self) -> TaskData:
        """Disjoint train/val/test splits, cached per process."""
        raise NotImplementedError

    def build_network(self) -> nn.Module:
        """Untrained target network (for adapter families: the base architecture)."""
        raise NotImplementedError

    def default_lora_config(self) -> dict[str, Any] | None:
        """``LoraConfig`` keyword arguments of the family's adapters; ``None`` for full families."""
        return None

    @property
    def metric(self) -> Metric:
        """How a network's outputs on this task are scored (top-1 accuracy unless the family says otherwise)."""
        return get_metric("accuracy")

    @classmethod
    def description_features(cls, text: str) -> torch.Tensor:
        """Numbers a description states, as ``(NUMERIC_DIM,)`` float32 (the family's own parser; default: none)."""
        return torch.zeros(cls.NUMERIC_DIM, dtype=torch.float32)

    @classmethod
    def description_numbers(cls, text: str) -> dict[str, Any]:
        """What the family's parser read from a description, by name (JSON values; default: nothing).

        ``sample.json`` records it as ``condition.parsed``, beside the features that reached the
        model (``NUMERIC_FIELDS``), e.g. ``{"angle": -65.0, "mirrored": False}`` for ``rotdigits``.
        """
        return {}

    @classmethod
    def description_problem(cls, text: str) -> str | None:
        """Why ``text`` cannot condition a task of this family (e.g. a required number is missing); None if it can."""
        return None


ENTRY_POINT_GROUP = "weightdiff.tasks"

_FAMILIES: dict[str, type[Task]] = {}
_LOADED_ENTRY_POINTS: set[tuple[str, str, str]] = set()  # (package, name, value) registered already
_SCANNED_ALL = False  # every installed entry point has been loaded once


def import_object(path: str) -> Any:
    """The object a dotted path ``package.module.name`` names (a class, a function, ...).

    Raises:
        LookupError: the path is not dotted, its module cannot be imported or has no such name;
            the message says which.
    """
    module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise LookupError(f"{path!r} is not a dotted path 'package.module.Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LookupError(f"{path!r}: module {module_name!r} cannot be imported ({exc})") from None
    if not hasattr(module, name):
        raise LookupError(f"{path!r}: module {module_name!r} has no {name!r}")
    return getattr(module, name)


def import_module_class(class_path: str, source: str, error: type[Exception]) -> type[nn.Module]:
    """The ``nn.Module`` subclass ``class_path`` names.

    Raises:
        error: (the caller's error type) the path does not import, or names no module class;
            the message starts with ``source``.
    """
    try:
        cls = import_object(class_path)
    except LookupError as exc:
        raise error(f"{source}: class_path {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise error(f"{source}: class_path {class_path!r} names a {type(cls).__name__}, expected an nn.Module "
                    "subclass")
    return cls


def register_family(cls: type[Task]) -> type[Task]:
    """Class decorator adding a :class:`Task` subclass to the registry under ``family_name``."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_family expects a Task subclass, got {cls!r}")
    if not cls.family_name:
        raise ValueError(f"{cls.__name__} has no family_name")
    _FAMILIES[cls.family_name] = cls
    return cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _package(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unnamed package"


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> None:
    """Import one entry point and register the family it names.

    The entry point names a :class:`Task` subclass (registered here) or a function taking no
    arguments that registers one; either way a family named ``ep.name`` must be registered after.

    Raises:
        TaskFamilyError: the import or the registration fails, the object is neither, or the
            family registered under ``ep.name`` is missing or clashes with another class.
    """
    package = _package(ep)
    key = (package, ep.name, ep.value)
    if key in _LOADED_ENTRY_POINTS:
        return
    where = (f"task family plug-in '{ep.name} = {ep.value}' (entry point group '{ENTRY_POINT_GROUP}' "
             f"of package '{package}')")

    def fail(why: str) -> TaskFamilyError:
        return TaskFamilyError(f"{where} {' '.join(why.split())}")  # one line, whatever the cause prints

    previous = _FAMILIES.get(ep.name)
    try:
        obj = ep.load()
    except Exception as exc:
        raise fail(f"cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, type) and issubclass(obj, Task):
        if obj.family_name != ep.name:
            raise fail(f"names {_qualified(obj)} of family_name {obj.family_name!r}; expected the entry-point "
                       f"name {ep.name!r}")
        register_family(obj)
    elif callable(obj):
        try:
            obj()
        except Exception as exc:
            raise fail(f"failed while registering: {type(exc).__name__}: {exc}") from exc
    else:
        raise fail(f"names a {type(obj).__name__}; expected a Task subclass or a function registering one")
    registered = _FAMILIES.get(ep.name)
    if registered is None:
        raise fail(f"registered no family named '{ep.name}' (registered: {sorted(_FAMILIES)}); the entry-point "
                   "name must be the family name")
    if previous is not None and _qualified(previous) != _qualified(registered):
        _FAMILIES[ep.name] = previous  # the family registered first stays
        raise fail(f"registers {_qualified(registered)} as family '{ep.name}', which {_qualified(previous)} "
                   "already is")
    _LOADED_ENTRY_POINTS.add(key)


def _entry_points(name: str | None = None) -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in eps if name is None or ep.name == name]


def _lookup(name: str) -> type[Task] | None:
    """The registered family ``name``, loading the entry points of that name if it is not yet known."""
    if name not in _FAMILIES:
        for ep in _entry_points(name):
            _load_entry_point(ep)
    return _FAMILIES.get(name)


def _known_families() -> list[str]:
    """Registered families (for error messages): entry points are loaded, broken ones skipped."""
    if not _SCANNED_ALL:
        for ep in _entry_points():
            try:
                _load_entry_point(ep)
            except TaskFamilyError:
                pass  # reported when that family itself is asked for, or the families are listed
    return sorted(_FAMILIES)


def list_families() -> list[str]:
    """Names of the task families, sorted: those registered in code and every installed plug-in.

    Raises:
        TaskFamilyError: an installed plug-in cannot be loaded (naming its entry point and package).
    """
    global _SCANNED_ALL
    if not _SCANNED_ALL:
        for ep in _entry_points():
            _load_entry_point(ep)
        _SCANNED_ALL = True
    return sorted(_FAMILIES)


def get_family(name: str) -> type[Task]:
    """The :class:`Task` subclass of a family (its ``kind``, ``base_family``, ``factor_specs``).

    Raises:
        TaskStringError: no family of that name is registered or installed.
        TaskFamilyError: the plug-in of that name cannot be loaded.
    """
    cls = _lookup(name)
    if cls is None:
        raise TaskStringError(f"unknown task family '{name}'; expected one of {_known_families()}")
    return cls


def _split_task_string(task_string: str) -> tuple[str, dict[str, str]]:
    if not isinstance(task_string, str):
        raise TaskStringError(f"task string must be a str, got {type(task_string).__name__}: {task_string!r}")
    text = task_string.strip()
    if not text:
        raise TaskStringError(f"task string {task_string!r} is empty; expected 'family[:key=value,...]'")
    family, sep, rest = text.partition(":")
    family = family.strip()
    if not family:
        raise TaskStringError(f"task string {task_string!r} has no family before ':'; "
                              f"expected one of {_known_families()}")
    raw: dict[str, str] = {}
    if sep and not rest.strip():
        raise TaskStringError(f"task string {task_string!r} has ':' but no factors; "
                              "expected 'family' or 'family:key=value[,key=value...]'")
    if sep:
        for item in rest.split(","):
            key, eq, value = (s.strip() for s in item.partition("="))
            if not item.strip():
                raise TaskStringError(f"task string {task_string!r} has an empty factor (stray ','); "
                                      "expected 'key=value' items separated by ','")
            if not eq or not key or not value:
                raise TaskStringError(f"task string {task_string!r}: factor item {item.strip()!r} is malformed; "
                                      "expected 'key=value'")
            if key in raw:
                raise TaskStringError(f"task string {task_string!r}: factor '{key}' is given twice")
            raw[key] = value
    return family, raw


def canonical_name(family: str, factors: Mapping[str, float | int | str]) -> str:
    """Canonical string of a family and fully specified factors (declaration order, ``%g``)."""
    cls = get_family(family)
    if not cls.factor_specs:
        return family
    return family + ":" + ",".join(f"{f.name}={f.format(factors[f.name])}" for f in cls.factor_specs)


def get_task(task_string: str) -> Task:
    """Build a :class:`Task` from its name, e.g. ``get_task("rotdigits:angle=-30,flip=1")``.

    Raises:
        TaskStringError: the string is malformed, names an unknown family or factor, lacks a
            required factor, or gives a value of the wrong type or out of range. The message
            names the string, the key and what was expected.
        TaskFamilyError: the family is an installed plug-in that cannot be loaded.
    """
    family, raw = _split_task_string(task_string)
    cls = _lookup(family)
    if cls is None:
        raise TaskStringError(f"task string {task_string!r}: unknown family '{family}'; "
                              f"expected one of {_known_families()}")
    specs = {f.name: f for f in cls.factor_specs}
    for key in raw:
        if key not in specs:
            allowed = ", ".join(specs) if specs else "no factors"
            raise TaskStringError(f"task string {task_string!r}: unknown factor '{key}' for family "
                                  f"'{family}'; expected {allowed}")
    factors: dict[str, float | int | str] = {}
    for spec in cls.factor_specs:
        if spec.name in raw:
            factors[spec.name] = spec.parse(raw[spec.name], task_string)
        elif spec.default is not None:
            factors[spec.name] = spec.default
        else:
            raise TaskStringError(f"task string {task_string!r}: missing required factor '{spec.name}' "
                                  f"for family '{family}'; expected {spec.expected()}")
    return cls(name=canonical_name(family, factors), family=family, factors=factors,
               num_classes=cls.NUM_CLASSES, input_shape=cls.INPUT_SHAPE)


def make_task(family: str, **factors: Any) -> Task:
    """Build a task from typed factor values, e.g. ``make_task("rotdigits", angle=40.0, flip=1)``.

    Equivalent to :func:`get_task` on the formatted string (same validation and rounding).
    """
    get_family(family)
    if not factors:
        return get_task(family)
    text = family + ":" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in factors.items())
    return get_task(text)

