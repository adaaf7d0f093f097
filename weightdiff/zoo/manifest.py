"""The on-disk layout of a zoo and its manifest rows (``entry.json``).

::

    <root>/<name>/
      zoo.json                  name, kind, family, format_version, recipe
      base/                     (lora zoos) model.safetensors + entry.json of the frozen base
      parents/p<k>/             (full zoos with parents) model.safetensors + entry.json
      entries/<entry id>/       one checkpoint: weights (+ adapter_config.json) + entry.json

A manifest row (one ``entry.json``) has the fields of :data:`REQUIRED_FIELDS`, plus
``heldout_kind`` (``near`` / ``far`` / ``combo`` / ``novel`` for held-out rows, ``null`` otherwise) and
optional extras (``parent``; ``family`` and ``kind``, as in ``zoo.json``, and for LoRA entries
``base_sha256``, the hash of the base network the adapter was trained on, so that the entry says on
its own what it is and which network it needs). ``sha256`` is the hash of the weight file named by
``file``, so a corrupted or swapped file is detected without loading it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weightdiff.errors import ManifestError, WeightFileError
from weightdiff.io import read_json, safetensors_extent, sha256_file
from weightdiff.tasks.metrics import METRICS

FORMAT_VERSION = 1
ZOO_FILE = "zoo.json"
ENTRY_FILE = "entry.json"
ENTRIES_DIR = "entries"
BASE_DIR = "base"
PARENTS_DIR = "parents"

REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str, "task": str, "split": str, "code": list, "descriptions": list, "seed": int, "run_id": str,
    "checkpoint": int, "metrics": dict, "num_params": int, "file": str, "sha256": str,
}
METRIC_FIELDS = ("train_acc", "val_acc", "test_acc")
SPLITS = ("train", "heldout")
HELDOUT_KINDS = ("near", "far", "combo", "novel")  # as weightdiff.zoo.recipe.HeldoutKind
_NOT_HASHED = "not the file whose sha256 the manifest records (not hashed)"
_MAX_ITEM_BYTES = 8  # the widest safetensors dtype (F64, I64, U64)
ZOO_FIELDS: dict[str, type] = {"name": str, "kind": str, "family": str, "format_version": int, "recipe": dict}


def _type_names(tp: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (tp if isinstance(tp, tuple) else (tp,)))


def validate_row(row: Any, source: str | Path) -> dict[str, Any]:
    """Check one manifest row; return it unchanged.

    Raises:
        ManifestError: naming ``source`` and the first missing or ill-typed field.
    """
    if not isinstance(row, dict):
        raise ManifestError(f"{source}: manifest row must be a JSON object, got {type(row).__name__}")
    for name, tp in REQUIRED_FIELDS.items():
        if name not in row:
            raise ManifestError(f"{source}: manifest row is missing field '{name}' ({_type_names(tp)})")
        value = row[name]
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ManifestError(f"{source}: field '{name}' expected {_type_names(tp)}, "
                                f"got {type(value).__name__} {value!r}")
    for name in METRIC_FIELDS:  # the accuracies; a task scored by another metric has {split}_<metric> instead
        value = row["metrics"].get(name)
        split = name.removesuffix("_acc")
        if name not in row["metrics"] and any(f"{split}_{m}" in row["metrics"] for m in METRICS):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(f"{source}: field 'metrics.{name}' expected a number, got {value!r}")
    if row["split"] not in SPLITS:
        raise ManifestError(f"{source}: field 'split' expected one of {SPLITS}, got {row['split']!r}")
    kind = row.get("heldout_kind")
    if row["split"] == "heldout" and kind not in HELDOUT_KINDS:
        raise ManifestError(f"{source}: field 'heldout_kind' expected one of {HELDOUT_KINDS} for a held-out row, "
                            f"got {kind!r}")
    if "/" in row["file"] or row["file"].startswith("."):
        raise ManifestError(f"{source}: field 'file' must name a file inside the entry folder, got {row['file']!r}")
    return row


def read_row(entry_dir: Path, *, check_id: bool = True) -> dict[str, Any]:
    """Read and validate ``entry_dir/entry.json``; with ``check_id`` its id must be the folder's name.

    Raises:
        ManifestError: the file is missing, not JSON, or the row is invalid.
    """
    path = entry_dir / ENTRY_FILE
    try:
        row = read_json(path, "manifest row")
    except WeightFileError as exc:
        raise ManifestError(str(exc)) from None
    validate_row(row, path)
    if check_id and row["id"] != entry_dir.name:
        raise ManifestError(f"{path}: field 'id' = {row['id']!r} differs from its folder name {entry_dir.name!r}")
    return row


def zoo_dir_of(folder: Path) -> Path:
    """The zoo folder holding an entry, base or parent folder (by the layout above)."""
    return folder.parent if folder.name == BASE_DIR else folder.parent.parent


def weights_problem(weights: Path, zoo_dir: Path, num_params: Any = None) -> str | None:
    """Why a weight file cannot be the one its row names, found without reading its data; ``None``
    if nothing is wrong so far (its sha256 is checked next).

    Args:
        weights: the weight file of an entry, base or parent folder of the zoo ``zoo_dir``.
        zoo_dir: the zoo folder; a weight file that is (or lies under) a link leading out of it is
            a problem, whatever it points to.
        num_params: the row's parameter count, if it has one.

    The file's size must be the one its safetensors header declares, and its tensors must fit in
    ``num_params`` values of the widest dtype, so a huge file (a link to a disk image or to another
    model, say) is refused in microseconds instead of hashed for minutes.
    """
    resolved = weights.resolve()
    if not resolved.is_relative_to(zoo_dir.resolve()):
        return f"weight file {weights} links to {resolved}, outside the zoo {zoo_dir}"
    if not resolved.is_file():
        return f"weight file {weights} is missing"
    try:
        declared, data = safetensors_extent(weights)
    except WeightFileError as exc:
        return f"{exc}; {_NOT_HASHED}"
    size = weights.stat().st_size
    if size != declared:
        return f"{weights}: {size} bytes, its safetensors header declares {declared}; {_NOT_HASHED}"
    if isinstance(num_params, int) and data > _MAX_ITEM_BYTES * num_params:
        return (f"{weights}: its safetensors header declares {data} bytes of tensors, more than "
                f"num_params = {num_params} values can fill; {_NOT_HASHED}")
    return None


def entry_problem(entry_dir: Path, *, expect: dict[str, Any] | None = None,
                  zoo_dir: Path | None = None) -> str | None:
    """Why an entry folder is not a complete, intact checkpoint; ``None`` if it is.

    Checks the row, the weight file (:func:`weights_problem`) and its sha256, and (``expect``) that
    fields of the row equal the planned values, so a resumed build never keeps an entry of another
    plan.

    Args:
        entry_dir: ``<zoo>/entries/<id>``.
        expect: planned values of row fields.
        zoo_dir: the zoo folder (default: the one ``entry_dir`` lies in).
    """
    try:
        row = read_row(entry_dir)
    except ManifestError as exc:
        return str(exc)
    weights = entry_dir / row["file"]
    why = weights_problem(weights, zoo_dir_of(entry_dir) if zoo_dir is None else zoo_dir, row["num_params"])
    if why is not None:
        return why
    for key, value in (expect or {}).items():
        if row.get(key) != value:
            return f"{entry_dir / ENTRY_FILE}: field '{key}' = {row.get(key)!r}, expected {value!r}"
    actual = sha256_file(weights)
    if actual != row["sha256"]:
        return f"{weights}: sha256 {actual[:12]}… differs from the manifest's {row['sha256'][:12]}…"
    return None


def network_problem(folder: Path, *, zoo_dir: Path | None = None) -> str | None:
    """Why a base/parent network folder (weights + ``entry.json``) is not intact; ``None`` if it is.

    Args:
        folder: ``<zoo>/base`` or ``<zoo>/parents/p<k>``.
        zoo_dir: the zoo folder (default: the one ``folder`` lies in).
    """
    try:
        row = read_json(folder / ENTRY_FILE, "network row")
        weights = folder / row["file"]
        why = weights_problem(weights, zoo_dir_of(folder) if zoo_dir is None else zoo_dir, row.get("num_params"))
        if why is not None:
            return why
        if sha256_file(weights) != row["sha256"]:
            return f"{weights}: sha256 differs from the one in {folder / ENTRY_FILE}"
    except WeightFileError as exc:
        return str(exc)
    except (OSError, KeyError, TypeError) as exc:
        return f"{folder}: {type(exc).__name__}: {exc}"
    return None


def read_zoo_json(zoo_dir: Path) -> dict[str, Any]:
    """Read and validate ``zoo_dir/zoo.json``.

    Raises:
        ManifestError: the folder is not a zoo (no ``zoo.json``), the file is corrupt, a field is
            missing or ill-typed, or the format version is not :data:`FORMAT_VERSION`.
    """
    path = zoo_dir / ZOO_FILE
    if not path.is_file():
        raise ManifestError(f"{zoo_dir} is not a zoo: {ZOO_FILE} not found (build one with `weightdiff zoo build`)")
    try:
        meta = read_json(path, "zoo file")
    except WeightFileError as exc:
        raise ManifestError(str(exc)) from None
    if not isinstance(meta, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for name, tp in ZOO_FIELDS.items():
        if name not in meta:
            raise ManifestError(f"{path}: missing field '{name}' ({tp.__name__})")
        if not isinstance(meta[name], tp) or isinstance(meta[name], bool):
            raise ManifestError(f"{path}: field '{name}' expected {tp.__name__}, got {type(meta[name]).__name__}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ManifestError(f"{path}: field 'format_version' = {meta['format_version']}, "
                            f"expected {FORMAT_VERSION}")
    return meta
