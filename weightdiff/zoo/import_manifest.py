"""Import manifests: the rows of ``weightdiff zoo import``, read and checked one by one.

The manifest lists one checkpoint per row, as JSON Lines (``.jsonl``) or CSV (``.csv``)::

    {"path": "adapters/a40", "task": "rotdigits:angle=40", "split": "train",
     "descriptions": ["digits turned 40 degrees"], "metrics": {"test_acc": 0.91}}

Fields: ``path`` (a PEFT adapter folder holding ``adapter_model.safetensors`` and
``adapter_config.json``, or a ``.safetensors`` state dict / a folder holding ``model.safetensors``;
relative to the manifest's folder), ``task`` (a task string of a registered family; every row of
one family), ``split`` (``train`` / ``heldout``), ``descriptions`` (one string or a list); optional
``heldout_kind`` (held-out rows: ``near`` / ``far`` / ``combo`` / ``novel``, default :data:`DEFAULT_HELDOUT_KIND`),
``code`` (numbers, as many as the family's task codes; default the task's code), ``metrics``
(numbers by name; the accuracies of :data:`~weightdiff.zoo.manifest.METRIC_FIELDS` not given are
measured on the task's data), ``seed`` and ``checkpoint`` (integers naming the entry, as in a built
zoo: ``<task>-s<seed>-c<checkpoint>``; default the row's rank among the task's rows, and 0). CSV
files have these as columns: ``descriptions`` separated by ``|``, ``code`` as a JSON list or
numbers separated by spaces, metrics as ``metrics.<name>`` columns, empty cells meaning absent.

:func:`read_manifest` gives the raw rows with their line numbers and :func:`parse_row` checks one
row's fields and finds its files, raising :class:`~weightdiff.errors.ManifestError` naming the
manifest, the line and the field. The checks across rows and of the files' contents are in
:mod:`weightdiff.zoo.importer`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightdiff.errors import ManifestError, WeightDiffError
from weightdiff.targets import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, FULL_WEIGHTS_FILE
from weightdiff.tasks import get_family, get_task
from weightdiff.zoo.manifest import HELDOUT_KINDS, SPLITS
from weightdiff.zoo.recipe import RunSpec

REQUIRED = ("path", "task", "split", "descriptions")
OPTIONAL = ("heldout_kind", "code", "metrics", "seed", "checkpoint")
DEFAULT_HELDOUT_KIND = "far"  # a held-out task of an imported set is, unless said otherwise, an unseen one
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")
CSV_SEPARATOR = "|"  # between the descriptions of one CSV cell


@dataclass
class ImportRow:
    """One validated manifest row: where its checkpoint is and what the zoo records of it."""

    line: int
    weights: Path                 # the safetensors file
    config: Path | None           # adapter_config.json (LoRA)
    task: str                     # canonical task string
    split: str
    heldout_kind: str | None
    descriptions: list[str]
    code: list[float]
    metrics: dict[str, float]     # as given; missing accuracies are measured when written
    seed: int
    checkpoint: int
    source_sha256: str = ""
    config_sha256: str | None = None

    def run(self) -> RunSpec:
        return RunSpec(self.line, self.task, self.split, self.heldout_kind, self.seed, None, (self.checkpoint,))

    @property
    def entry_id(self) -> str:
        return self.run().entry_id(self.checkpoint)

    def expect(self) -> dict[str, Any]:
        """Row fields of its entry: identity, what conditions it (descriptions, code) and the hashes
        of the files it was imported from; an entry whose row differs in any is imported again."""
        out: dict[str, Any] = {"task": self.task, "split": self.split, "seed": self.seed,
                               "checkpoint": self.checkpoint, "descriptions": list(self.descriptions),
                               "code": list(self.code), "source_sha256": self.source_sha256}
        if self.config_sha256 is not None:
            out["source_config_sha256"] = self.config_sha256
        return out

class Manifest:
    """Errors naming the manifest, a line and a field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, line: int, field: str, why: str) -> ManifestError:
        return ManifestError(f"{self.path}: line {line}: field '{field}' {why}")


# --------------------------------------------------------------------------------------- reading
def read_manifest(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """``[(line number, raw row)]`` of a JSONL or CSV manifest, blank lines skipped.

    Raises:
        ManifestError: the file is missing or empty, has another suffix, a line is not a JSON
            object, or a CSV cell cannot be parsed (naming the file, line and column).
    """
    path = Path(path)
    if path.suffix not in (".jsonl", ".csv"):
        raise ManifestError(f"manifest {path}: expected a .jsonl or .csv file, got suffix {path.suffix!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest {path} cannot be read: {exc}") from None
    rows = _read_csv(path, text) if path.suffix == ".csv" else _read_jsonl(path, text)
    if not rows:
        raise ManifestError(f"manifest {path} lists no checkpoints")
    return rows


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: line {n} is not valid JSON: {exc}") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows


def _read_csv(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    rows = []
    for cells in reader:
        n = reader.line_num
        row: dict[str, Any] = {}
        for column, value in cells.items():
            if column is None:
                raise ManifestError(f"{path}: line {n} has more cells than the header has columns")
            if value is None or not value.strip():
                continue
            value = value.strip()
            if column.startswith("metrics."):
                row.setdefault("metrics", {})[column.removeprefix("metrics.")] = _csv_number(path, n, column, value)
            elif column == "descriptions":
                row[column] = [d.strip() for d in value.split(CSV_SEPARATOR)]
            elif column == "code":
                row[column] = (_csv_json(path, n, column, value) if value.startswith("[")
                               else [_csv_number(path, n, column, v) for v in value.replace(",", " ").split()])
            elif column in ("seed", "checkpoint"):
                row[column] = _csv_number(path, n, column, value, integer=True)
            elif column == "metrics":
                row[column] = _csv_json(path, n, column, value)
            else:
                row[column] = value
        if row:
            rows.append((n, row))
    return rows


def _csv_number(path: Path, line: int, column: str, value: str, integer: bool = False) -> float | int:
    try:
        return int(value) if integer else float(value)
    except ValueError:
        want = "an integer" if integer else "a number"
        raise ManifestError(f"{path}: line {line}: field '{column}' expected {want}, got {value!r}") from None


def _csv_json(path: Path, line: int, column: str, value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: line {line}: field '{column}' is not valid JSON: {exc}") from None


# ------------------------------------------------------------------------------------ row fields
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_row(m: Manifest, line: int, raw: dict[str, Any], family: str | None) -> ImportRow:
    """Check the fields of one row (not yet its files)."""
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise m.error(line, unknown[0], f"is unknown; expected fields {list(REQUIRED + OPTIONAL)}")
    for name in REQUIRED:
        if name not in raw or raw[name] is None:
            raise m.error(line, name, "is missing")
    for name in ("path", "task", "split"):
        if not isinstance(raw[name], str) or not raw[name].strip():
            raise m.error(line, name, f"expected a non-empty string, got {raw[name]!r}")
    try:
        task = get_task(raw["task"])
    except WeightDiffError as exc:
        raise m.error(line, "task", f"is not a task of a registered family: {exc}") from None
    if family is not None and task.family != family:
        raise m.error(line, "task", f"= {raw['task']!r} is of family '{task.family}'; the manifest's first row "
                                    f"is of family '{family}' (one family per zoo)")
    split = raw["split"]
    if split not in SPLITS:
        raise m.error(line, "split", f"expected one of {SPLITS}, got {split!r}")
    kind = raw.get("heldout_kind")
    if split == "train" and kind is not None:
        raise m.error(line, "heldout_kind", f"= {kind!r} is only for split 'heldout'")
    if split == "heldout":
        kind = DEFAULT_HELDOUT_KIND if kind is None else kind
        if kind not in HELDOUT_KINDS:
            raise m.error(line, "heldout_kind", f"expected one of {HELDOUT_KINDS}, got {kind!r}")
    descriptions = raw["descriptions"]
    descriptions = [descriptions] if isinstance(descriptions, str) else descriptions
    if (not isinstance(descriptions, list) or not descriptions
            or not all(isinstance(d, str) and d.strip() for d in descriptions)):
        raise m.error(line, "descriptions", f"expected a non-empty string or list of them, got {raw['descriptions']!r}")
    want = [float(v) for v in task.code().tolist()]
    code = raw.get("code", want)
    if not isinstance(code, list) or not all(_is_number(v) for v in code) or len(code) != len(want):
        raise m.error(line, "code", f"expected a list of {len(want)} finite numbers (the length of the family's "
                                    f"task codes), got {code!r}")
    metrics = raw.get("metrics", {})
    if not isinstance(metrics, dict):
        raise m.error(line, "metrics", f"expected an object of numbers by name, got {metrics!r}")
    for name, value in metrics.items():
        if not _is_number(value):
            raise m.error(line, f"metrics.{name}", f"expected a finite number, got {value!r}")
    numbers = {}
    for name in ("seed", "checkpoint"):
        value = raw.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise m.error(line, name, f"expected an integer >= 0, got {value!r}")
        numbers[name] = value
    weights, config = _source_files(m, line, raw["path"], get_family(task.family).kind)
    return ImportRow(line, weights, config, task.name, split, kind, [d.strip() for d in descriptions],
                     [float(v) for v in code], {k: float(v) for k, v in metrics.items()},
                     numbers["seed"] if numbers["seed"] is not None else -1, numbers["checkpoint"] or 0)


def _source_files(m: Manifest, line: int, text: str, kind: str) -> tuple[Path, Path | None]:
    """The weight file (and adapter config) of a row's ``path``, relative to the manifest's folder."""
    path = Path(text).expanduser()
    path = path if path.is_absolute() else m.path.parent / path
    if not path.exists():
        raise m.error(line, "path", f"= {text!r}: {path} not found")
    if path.is_dir():
        pickles = [name for name in PICKLE_FILES if (path / name).is_file()]
        name = ADAPTER_WEIGHTS_FILE if kind == "lora" else FULL_WEIGHTS_FILE
        if not (path / name).is_file():
            found = f"; it holds the pickle {pickles[0]} (only safetensors is accepted)" if pickles else ""
            raise m.error(line, "path", f"= {text!r}: folder {path} has no {name}{found}")
        if kind == "lora":
            if not (path / ADAPTER_CONFIG_FILE).is_file():
                raise m.error(line, "path", f"= {text!r}: adapter folder {path} has no {ADAPTER_CONFIG_FILE}")
            return path / name, path / ADAPTER_CONFIG_FILE
        return path / name, None
    if kind == "lora":
        raise m.error(line, "path", f"= {text!r}: a LoRA checkpoint must be a PEFT adapter folder "
                                    f"({ADAPTER_WEIGHTS_FILE} + {ADAPTER_CONFIG_FILE}), got the file {path}")
    if path.suffix in PICKLE_SUFFIXES:
        raise m.error(line, "path", f"= {text!r}: {path} is a pickle file; only .safetensors state dicts are "
                                    "accepted (pickles can execute code and are never loaded)")
    if path.suffix != ".safetensors":
        raise m.error(line, "path", f"= {text!r}: expected a .safetensors file or a folder, got {path}")
    return path, None
