"""Benchmark suites: which zoo kind and task family each ``weightdiff benchmark --suite`` runs on.

A suite is a small YAML file::

    name: adapt-lora            # reported in results.json
    kind: lora                  # "full" (whole networks) or "lora" (adapters on a frozen base)
    family: rotdigits           # task family of the zoo and the generator (any registered family)
    description: ...            # optional, one line
    baseline_condition: code    # optional: what retrieval and the hypernetworks read of a task,
                                # its task code (default) or its descriptions' embedding ("text")

``--suite NAME`` picks a shipped suite (:func:`list_suites`: ``digits-cnn``, ``mnist1d-cnn``,
``adapt-lora``); ``--suite path/to/suite.yaml`` reads a file of one's own (``configs/suites/`` is the
place for them in a project). The shipped suites are package data (``suite_configs/*.yaml``
beside this module), not files under the repository's ``configs/``: an installed wheel has no
repository around it, and a suite name means the same suite whatever the working directory.

    >>> load_suite("adapt-lora").family
    'rotdigits'
"""

from __future__ import annotations

import os
import typing
from dataclasses import MISSING, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from weightdiff.errors import BenchmarkError, TaskFamilyError, TaskStringError
from weightdiff.tasks.base import get_family

SUITES_DIR = "suite_configs"  # package data of weightdiff.tasks: one <name>.yaml per shipped suite
SUITE_SUFFIXES = (".yaml", ".yml")
SuiteKind = Literal["full", "lora"]


@dataclass(frozen=True)
class Suite:
    """One benchmark suite.

    Args:
        name: suite name, written to ``results.json``.
        kind: zoo kind, ``"full"`` or ``"lora"``; must be the kind of ``family``.
        family: task family of the zoo's tasks.
        description: one line saying what the suite measures.
        baseline_condition: what retrieval, kNN averaging and the hypernetworks read of a task:
            ``"code"``, its task code; ``"text"``, the sentence embedding of its descriptions, as a
            text-conditioned generator does (for families whose task code names what a
            held-out task's text can describe but no code of the training tasks can reach).
    """

    name: str
    kind: SuiteKind
    family: str
    description: str = ""
    baseline_condition: Literal["code", "text"] = "code"


def _shipped() -> resources.abc.Traversable:
    return resources.files(__package__).joinpath(SUITES_DIR)


def list_suites() -> list[str]:
    """Names of the shipped suites, sorted."""
    return sorted(p.name.rsplit(".", 1)[0] for p in _shipped().iterdir()
                  if p.is_file() and p.name.endswith(SUITE_SUFFIXES))


def _is_path(suite: str | os.PathLike) -> bool:
    text = os.fspath(suite)
    return not isinstance(suite, str) or text.endswith(SUITE_SUFFIXES) or "/" in text or os.sep in text


def load_suite(suite: str | os.PathLike) -> Suite:
    """A shipped suite by name (``"adapt-lora"``) or a suite YAML file by path.

    Raises:
        BenchmarkError: an unknown name (listing the shipped suites), a missing or non-YAML file,
            or a field that is unknown, missing, ill-typed or disagrees with the family's kind
            (naming the file and the field).
    """
    if _is_path(suite):
        path = Path(suite)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise BenchmarkError(f"suite file not found: {path}") from None
        except OSError as exc:
            raise BenchmarkError(f"cannot read suite file {path}: {exc.strerror or exc}") from None
        source = str(path)
    else:
        name = str(suite)
        shipped = _shipped().joinpath(f"{name}.yaml")
        if not shipped.is_file():
            raise BenchmarkError(f"unknown suite {name!r}; expected one of {list_suites()} or the path of a suite "
                                 ".yaml file")
        text, source = shipped.read_text(), f"suite '{name}' ({SUITES_DIR}/{name}.yaml)"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BenchmarkError(f"suite {source} is not valid YAML: {' '.join(str(exc).split())}") from None
    return suite_from_dict(data, source)


def suite_from_dict(data: Any, source: str = "<suite>") -> Suite:
    """Build and check a :class:`Suite` from a mapping (a parsed suite file named by ``source``)."""
    if not isinstance(data, dict):
        raise BenchmarkError(f"{source}: expected a mapping of suite fields, got {type(data).__name__}")
    hints = typing.get_type_hints(Suite)
    names = [f.name for f in fields(Suite)]
    for key in data:
        if key not in hints:
            raise BenchmarkError(f"{source}: unknown field {key!r}; expected one of {names}")
    for f in fields(Suite):
        if f.name not in data:
            if f.default is MISSING:
                raise BenchmarkError(f"{source}: missing required field '{f.name}'")
            continue
        value = data[f.name]
        allowed = typing.get_args(hints[f.name])
        if allowed and value not in allowed:
            raise BenchmarkError(f"{source}: field '{f.name}' expected one of {list(allowed)}, got {value!r}")
        if not allowed and not isinstance(value, str):
            raise BenchmarkError(f"{source}: field '{f.name}' expected str, got {type(value).__name__} {value!r}")
    suite = Suite(**data)
    if not suite.name.strip():
        raise BenchmarkError(f"{source}: field 'name' must not be empty")
    try:
        family_kind = get_family(suite.family).kind
    except (TaskStringError, TaskFamilyError) as exc:
        raise BenchmarkError(f"{source}: field 'family': {exc}") from None
    if family_kind != suite.kind:
        raise BenchmarkError(f"{source}: field 'kind' = {suite.kind!r}, but family '{suite.family}' is of kind "
                             f"{family_kind!r}")
    return suite
