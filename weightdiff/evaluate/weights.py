"""Load sets of weights (samples, zoo entries) and evaluate them, batched, in their target network.

A *weight set* is S checkpoints with the same tensor names and shapes, stacked along a leading
sample dimension: ``params[name]`` is ``(S, *shape)``. Sources are sample directories written by
``weightdiff sample``, zoo entry directories, or bare ``.safetensors`` files; whole networks are
``model.safetensors``, LoRA adapters PEFT directories (``adapter_model.safetensors`` +
``adapter_config.json``). Weights are read with :func:`weightdiff.io.load_weights` (safetensors
only, never unpickled) and must be float32 (:func:`weightdiff.io.check_weight_dtypes`).

A sample's ``sample.json`` and a zoo entry's ``entry.json`` record the task family, the kind and
(LoRA) the base network's sha256 of the checkpoint (:class:`Provenance`); checkpoints written
before those fields existed fall back to what their files imply. :func:`target_for` refuses a
task of another family and a base network other than the recorded one, naming the files.

Evaluation runs S networks at once with ``Target.forward_batched`` (vmap), in chunks of samples
and of inputs so that memory stays bounded for any S and N.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from weightdiff.base_networks import recorded_base_spec
from weightdiff.errors import TargetMismatchError, WeightFileError
from weightdiff.io import check_weight_dtypes, load_weights, read_json, sha256_file
from weightdiff.models.generator import BASE_DIR as GENERATOR_BASE_DIR
from weightdiff.models.generator import MODEL_INDEX_FILE
from weightdiff.sampling import SAMPLE_FILE as SAMPLE_INFO_FILE
from weightdiff.targets import (
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, BASE_PATH_FIELD, FULL_WEIGHTS_FILE, Target, resolve_base_path,
)
from weightdiff.tasks import Task, get_task
from weightdiff.zoo.manifest import BASE_DIR as ZOO_BASE_DIR
from weightdiff.zoo.manifest import ENTRIES_DIR, ENTRY_FILE, ZOO_FILE

log = logging.getLogger(__name__)

WeightKind = Literal["full", "lora"]
_WEIGHT_FILES: dict[str, WeightKind] = {FULL_WEIGHTS_FILE: "full", ADAPTER_WEIGHTS_FILE: "lora"}
# Adapter-config fields that change the function of the same tensors; sets must agree on them.
_LORA_FUNCTION_FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora", "modules_to_save")
_GLOB_CHARS = set("*?[")
_KIND_WORDS: dict[str, str] = {"full": "full-network", "lora": "LoRA"}


@dataclass(frozen=True)
class Provenance:
    """What a checkpoint records about itself (``sample.json``, ``entry.json``) or implies.

    Attributes:
        kind: ``"full"`` or ``"lora"``, from the weight file's name.
        family: the task family it is for (``"rotdigits"``); ``None`` when nothing says.
        base_sha256: (LoRA) sha256 of the base network it was made for; ``None`` when not recorded.
        record: the file the fields were read from; ``None`` for a bare checkpoint.
        what: ``"samples"``, ``"zoo entries"`` or ``"checkpoints"``, as messages name them.
    """

    kind: WeightKind
    family: str | None = None
    base_sha256: str | None = None
    record: Path | None = None
    what: str = "checkpoints"


@dataclass
class WeightSet:
    """S weight sets stacked along a leading sample dimension.

    Attributes:
        kind: ``"full"`` (whole networks) or ``"lora"`` (PEFT adapter tensors).
        params: tensor name → ``(S, *shape)`` float32, in the files' key order.
        ids: S names (the directory or file stem of each source).
        adapter_config: the common ``adapter_config.json`` contents (LoRA), else ``None``.
        sources: S source paths (directories or files).
        provenance: S :class:`Provenance` records, one per source (empty: nothing known).
    """

    kind: WeightKind
    params: dict[str, torch.Tensor]
    ids: list[str]
    adapter_config: dict[str, Any] | None = None
    sources: list[Path] = field(default_factory=list)
    provenance: list[Provenance] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def _weight_file(path: Path) -> tuple[Path, WeightKind] | None:
    """The weight file of a checkpoint directory (or ``path`` itself) and its kind, if any."""
    if path.is_file() and path.suffix == ".safetensors":
        return path, _WEIGHT_FILES.get(path.name, "full")
    if path.is_dir():
        for name, kind in _WEIGHT_FILES.items():
            if (path / name).is_file():
                return path / name, kind
    return None


def _exported_generator(directory: Path) -> Path | None:
    """The exported generator folder that ``directory`` is, or whose base network folder it is."""
    if (directory / MODEL_INDEX_FILE).is_file():
        return directory
    if directory.name == GENERATOR_BASE_DIR and (directory.parent / MODEL_INDEX_FILE).is_file():
        return directory.parent
    return None


def _check_checkpoint_folder(path: Path) -> None:
    """Refuse an exported generator (or its ``base/``) and a sample or zoo entry without weights.

    Raises:
        WeightFileError: naming ``path`` and what it is instead.
    """
    directory = path if path.is_dir() else path.parent
    generator = _exported_generator(directory)
    if generator is not None:
        what = ("an exported generator" if path == generator else
                f"the base network of the exported generator {generator}" if directory != generator else
                f"a file of the exported generator {generator}")
        raise WeightFileError(f"{path} is {what}, not weights; sample from it with "
                              f"`weightdiff sample --model {generator} --out <dir> ...` and evaluate the samples")
    if path.is_dir() and _weight_file(path) is None:
        for record in (SAMPLE_INFO_FILE, ENTRY_FILE):
            if (path / record).is_file():
                raise WeightFileError(f"{path} holds {record} but no weight file ({FULL_WEIGHTS_FILE} or "
                                      f"{ADAPTER_WEIGHTS_FILE}): an incomplete sample or zoo entry")


def find_weight_paths(spec: str | os.PathLike) -> list[Path]:
    """Expand a ``--weights`` argument into checkpoint paths (sorted).

    A *checkpoint* is a folder holding ``model.safetensors`` (a whole network) or
    ``adapter_model.safetensors`` + ``adapter_config.json`` (a PEFT adapter): a sample folder
    (with ``sample.json``), a zoo entry (with ``entry.json``) or a bare checkpoint folder; or a
    ``.safetensors`` file. ``spec`` may be a checkpoint, a folder of checkpoint folders (e.g.
    ``weightdiff sample --out`` or a zoo's ``entries/``), a zoo folder (``zoo.json``: its
    ``entries/``), or a glob pattern (``"samples/sample_00*"``) matching checkpoints. Hidden
    folders (interrupted writes) are never checkpoints.

    Raises:
        WeightFileError: nothing matches, naming the argument; or ``spec`` is an exported generator
            (``model_index.json``) or its ``base/`` folder, or a sample / zoo entry folder without
            its weight file.
    """
    text = str(spec)
    if _GLOB_CHARS & set(text):
        found = [Path(p) for p in sorted(glob.glob(text)) if _weight_file(Path(p)) is not None]
        if not found:
            raise WeightFileError(f"--weights pattern {text!r} matches no checkpoint "
                                  f"({FULL_WEIGHTS_FILE} / {ADAPTER_WEIGHTS_FILE} directory or .safetensors file)")
        for path in found:
            _check_checkpoint_folder(path)
        return found
    path = Path(text)
    if not path.exists():
        raise WeightFileError(f"weights path not found: {path}")
    _check_checkpoint_folder(path)
    if _weight_file(path) is not None:
        return [path]
    zoo = (path / ZOO_FILE).is_file() or (path / ENTRIES_DIR).is_dir()
    parent = path / ENTRIES_DIR if zoo else path
    found = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and _weight_file(p) is not None) if parent.is_dir() else []
    if not found:
        raise WeightFileError(f"{path} holds no checkpoint: expected {FULL_WEIGHTS_FILE} or {ADAPTER_WEIGHTS_FILE} "
                              "in it or in its sub-directories")
    return found


def _family_of(task: Any) -> str | None:
    """The family of a task string (the part before ``:``), or ``None`` for anything else."""
    return (task.partition(":")[0].strip() or None) if isinstance(task, str) else None


def _optional_json(path: Path) -> dict[str, Any]:
    """``path``'s JSON object, or ``{}`` when it is absent or unreadable (a fallback, never required)."""
    try:
        data = read_json(path) if path.is_file() else {}
    except WeightFileError:
        return {}
    return data if isinstance(data, dict) else {}


def _record(path: Path, what: str) -> dict[str, Any]:
    """A checkpoint's ``sample.json`` / ``entry.json``: a JSON object, or :class:`WeightFileError` naming it."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise WeightFileError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data


def checkpoint_provenance(path: Path, kind: WeightKind) -> Provenance:
    """The family, kind and (LoRA) base sha256 of one checkpoint.

    Read from the folder's ``sample.json`` (``family``, ``base_sha256``) or ``entry.json``
    (``family``, ``base_sha256``). Older files without those fields fall back to what they imply:
    a sample's ``condition.task`` or its generator's ``model_index.json`` (``zoo.family``,
    ``base.sha256``); an entry's ``task`` or its zoo's ``zoo.json``.

    Args:
        path: a checkpoint folder or ``.safetensors`` file.
        kind: the kind of its weight file.

    Raises:
        WeightFileError: ``sample.json`` or ``entry.json`` is not valid JSON (naming it).
    """
    directory = path if path.is_dir() else path.parent
    sample_file, entry_file = directory / SAMPLE_INFO_FILE, directory / ENTRY_FILE
    if sample_file.is_file():
        info = _record(sample_file, "sample info")
        index = {}
        if not (info.get("family") and (kind == "full" or info.get("base_sha256"))) and info.get("model_dir"):
            index = _optional_json(Path(info["model_dir"]) / MODEL_INDEX_FILE)
        zoo, base = index.get("zoo"), index.get("base")
        family = (info.get("family") or _family_of((info.get("condition") or {}).get("task"))
                  or (zoo.get("family") if isinstance(zoo, dict) else None))
        base_sha = info.get("base_sha256") or (base.get("sha256") if isinstance(base, dict) else None)
        return Provenance(kind, family, base_sha if kind == "lora" else None, sample_file, "samples")
    if entry_file.is_file():
        row = _record(entry_file, "manifest row")
        zoo_file = directory.parent.parent / ZOO_FILE
        family = (row.get("family") or _family_of(row.get("task"))
                  or (_optional_json(zoo_file).get("family") if directory.parent.name == ENTRIES_DIR else None))
        return Provenance(kind, family, row.get("base_sha256") if kind == "lora" else None, entry_file, "zoo entries")
    return Provenance(kind)


def _adapter_config(directory: Path, weight_file: Path) -> dict[str, Any]:
    cfg_path = directory / ADAPTER_CONFIG_FILE
    if not cfg_path.is_file():
        raise WeightFileError(f"adapter weights {weight_file} have no {ADAPTER_CONFIG_FILE} beside them")
    return read_json(cfg_path, "adapter config")


def load_weight_sets(paths: Sequence[str | os.PathLike]) -> WeightSet:
    """Load S checkpoints into one :class:`WeightSet` (strict: same kind, keys and shapes).

    Args:
        paths: checkpoint directories or ``.safetensors`` files (see :func:`find_weight_paths`).

    Returns:
        A :class:`WeightSet` with ``params[name]`` of shape ``(S, *shape)`` float32.

    Raises:
        WeightFileError: a path holds no weight file, a tensor is not float32, an adapter has no
            config, or a ``sample.json`` / ``entry.json`` is not a JSON object.
        TargetMismatchError: a set differs from the first in kind, keys, shapes or adapter
            config; the message names the file, the key, the expected and the actual value.
    """
    if not paths:
        raise WeightFileError("no weight paths given")
    first: tuple[Path, dict[str, torch.Tensor]] | None = None
    kind: WeightKind | None = None
    config: dict[str, Any] | None = None
    stacks: dict[str, list[torch.Tensor]] = {}
    ids, sources, provenance = [], [], []
    for raw in paths:
        path = Path(raw)
        found = _weight_file(path)
        if found is None:
            raise WeightFileError(f"{path} holds no weight file ({FULL_WEIGHTS_FILE} or {ADAPTER_WEIGHTS_FILE})")
        file, this_kind = found
        tensors = load_weights(file)
        check_weight_dtypes(tensors, str(file))
        this_config = _adapter_config(file.parent, file) if this_kind == "lora" else None
        if first is None:
            first, kind, config = (file, tensors), this_kind, this_config
            stacks = {k: [] for k in tensors}
        else:
            ref_file, ref = first
            if this_kind != kind:
                raise TargetMismatchError(f"{file}: a {this_kind} checkpoint, but {ref_file} is {kind}; "
                                          "a weight set holds one kind")
            missing = [k for k in ref if k not in tensors]
            extra = [k for k in tensors if k not in ref]
            if missing:
                raise TargetMismatchError(f"{file}: missing key '{missing[0]}' (present in {ref_file})")
            if extra:
                raise TargetMismatchError(f"{file}: unexpected key '{extra[0]}' (absent from {ref_file})")
            for k, v in tensors.items():
                if v.shape != ref[k].shape:
                    raise TargetMismatchError(f"{file}: tensor '{k}' has shape {tuple(v.shape)}, expected "
                                              f"{tuple(ref[k].shape)} as in {ref_file}")
            if config is not None and this_config is not None:
                for key in _LORA_FUNCTION_FIELDS:
                    a, b = config.get(key), this_config.get(key)
                    if (sorted(a) if isinstance(a, list) else a) != (sorted(b) if isinstance(b, list) else b):
                        raise TargetMismatchError(f"{file.parent / ADAPTER_CONFIG_FILE}: '{key}' is {b!r}, expected "
                                                  f"{a!r} as in {ref_file.parent / ADAPTER_CONFIG_FILE}")
        for k in stacks:
            stacks[k].append(tensors[k].float())
        ids.append(path.stem if path.is_file() else path.name)
        sources.append(path)
        provenance.append(checkpoint_provenance(path, this_kind))
    assert kind is not None
    params = {k: torch.stack(v) for k, v in stacks.items()}
    log.info("loaded %d %s checkpoints (%d tensors)", len(ids), kind, len(params))
    return WeightSet(kind=kind, params=params, ids=ids, adapter_config=config, sources=sources,
                     provenance=provenance)


def find_base(source: Path) -> Path | None:
    """The base network of a LoRA checkpoint (its ``model.safetensors``), or None when none is found.

    Looked for, in order: the folder its ``adapter_config.json`` names in ``base_model_name_or_path``
    (relative to the checkpoint folder, as weightdiff writes it, or absolute, as older files hold
    it: :func:`~weightdiff.targets.resolve_base_path`); ``sample.json`` → ``model_dir/base``; the
    ``base/`` of the zoo it is an entry of. A moved folder tree is found by the first.
    """
    directory = source if source.is_dir() else source.parent
    config = _optional_json(directory / ADAPTER_CONFIG_FILE)
    named = resolve_base_path(config.get(BASE_PATH_FIELD), directory)
    if named is not None and (named / FULL_WEIGHTS_FILE).is_file():
        return named / FULL_WEIGHTS_FILE
    info_path = directory / SAMPLE_INFO_FILE
    if info_path.is_file():
        model_dir = _record(info_path, "sample info").get("model_dir")
        if model_dir and (Path(model_dir) / GENERATOR_BASE_DIR / FULL_WEIGHTS_FILE).is_file():
            return Path(model_dir) / GENERATOR_BASE_DIR / FULL_WEIGHTS_FILE
    for parent in (directory.parent, directory.parent.parent):  # entries/<id>/ → zoo root
        if (parent / ZOO_BASE_DIR / FULL_WEIGHTS_FILE).is_file():
            return parent / ZOO_BASE_DIR / FULL_WEIGHTS_FILE
    return None


def _fits(record: Provenance, task: Task) -> bool:
    """Whether a checkpoint is for ``task``: its family and kind, or a full network of the task's base family."""
    if record.kind == "full" and task.base_family is not None and record.family in (None, task.base_family):
        return True  # the base architecture without an adapter
    return record.kind == task.kind and record.family in (None, task.family)


def check_task(weights: WeightSet, task: Task) -> None:
    """Refuse checkpoints made for another task family or kind than ``task``'s.

    A checkpoint fits a task of its recorded family and kind; a full network of an adapter
    family's base family also fits that family's tasks (a LoRA zoo's ``base/``, whose row names
    the task ``digits``, on ``rotdigits`` tasks: the base network without an adapter). Without a
    recorded or implied family only the kind is compared.

    Raises:
        TargetMismatchError: naming the checkpoint, the record that says what it is, and the task.
    """
    for source, record in zip(weights.sources, weights.provenance):
        if _fits(record, task):
            continue
        kind = _KIND_WORDS[record.kind]
        if record.family is None:
            raise TargetMismatchError(f"{source}: these are {kind} weights, but '{task.name}' is a "
                                      f"{_KIND_WORDS[task.kind]} task (family '{task.family}'); evaluate them "
                                      "with a task of the family they were made for")
        raise TargetMismatchError(f"{source}: these are {record.family} {kind} {record.what} (per {record.record}); "
                                  f"evaluate them with a {record.family} task, not '{task.name}'")


def _check_base(weights: WeightSet, file: Path) -> None:
    """Refuse a base network other than the one the adapters record (``base_sha256``).

    Raises:
        TargetMismatchError: two checkpoints record different bases, or ``file`` is not the recorded one.
    """
    recorded = [(r.base_sha256, r.record) for r in weights.provenance if r.base_sha256]
    if not recorded:
        return
    want, where = recorded[0]
    for sha, other in recorded[1:]:
        if sha != want:
            raise TargetMismatchError(f"{other} records base network sha256 {sha[:12]}…, but {where} records "
                                      f"{want[:12]}…: a weight set runs on one base network; evaluate them apart")
    actual = sha256_file(file)
    if actual != want:
        raise TargetMismatchError(f"base network {file} has sha256 {actual[:12]}…, but {where} records "
                                  f"base_sha256 {want[:12]}… (the base the adapters were made for); "
                                  "pass that base with --base")


def target_for(weights: WeightSet, task: Task, base: str | os.PathLike | None = None) -> Target:
    """The :class:`Target` that evaluates ``weights`` on ``task``.

    Full sets use the task's network architecture; LoRA sets need the frozen base network, from
    ``base`` (a ``model.safetensors`` file or a directory holding one) or found beside the first
    source (:func:`find_base`), and the sets' own adapter config.

    Raises:
        WeightFileError: no base network can be found for a LoRA set, or its file is unreadable.
        TargetMismatchError: the checkpoints are for another task family or kind (:func:`check_task`),
            the base network is not the one they record, the base weights do not fit the task's
            network, or the tensors do not fit the target network (file, key and shape named).
    """
    check_task(weights, task)
    if weights.kind == "full":
        target = Target.build("full", task.build_network())
    else:
        base_path = Path(base) if base is not None else find_base(weights.sources[0])
        if base_path is None:
            raise WeightFileError(f"LoRA weights {weights.sources[0]}: no base network found (no "
                                  f"{ADAPTER_CONFIG_FILE} base_model_name_or_path or {SAMPLE_INFO_FILE} model_dir "
                                  "naming a folder with model.safetensors, no zoo base/ above it); pass --base PATH")
        assert weights.adapter_config is not None
        file = base_path / FULL_WEIGHTS_FILE if base_path.is_dir() else base_path
        base_state = load_weights(file)
        _check_base(weights, file)
        spec = recorded_base_spec(file.parent)  # a zoo's base/ records its architecture; else the family's
        target = Target.build("lora", spec if spec is not None else task.build_network(), base_state=base_state,
                              lora_config=weights.adapter_config, source=file)
    source = str(weights.sources[0]) if weights.sources else "weights"
    if len(weights.sources) > 1:  # every set has the first one's keys and shapes (load_weight_sets)
        source += f" (and {len(weights.sources) - 1} more checkpoints with the same tensors)"
    target.check(weights.params, source, batched=True)
    return target


@torch.no_grad()
def evaluate_params(target: Target, task: Task, params: Mapping[str, torch.Tensor], split: str = "test",
                    chunk: int = 64, input_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and predicted labels of S weight sets on one split of a task.

    Args:
        target: the target network (:func:`target_for`).
        params: tensors ``(S, *shape)`` named as in ``target.param_shapes()``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        chunk: samples evaluated at once (memory bound: ``chunk × input_chunk`` activations).
        input_chunk: inputs evaluated at once.

    Returns:
        ``accuracy (S,)`` float32 and ``predictions (S, N)`` int64.
    """
    if chunk < 1 or input_chunk < 1:
        raise ValueError(f"chunk and input_chunk must be at least 1, got {chunk} and {input_chunk}")
    s = target.check(params, batched=True)
    x, y = task.data().split(split)
    preds = torch.empty(s, x.shape[0], dtype=torch.long)
    for i in range(0, s, chunk):
        part = {k: v[i:i + chunk] for k, v in params.items()}
        for j in range(0, x.shape[0], input_chunk):
            preds[i:i + chunk, j:j + input_chunk] = target.forward_batched(part, x[j:j + input_chunk]).argmax(-1)
    acc = (preds == y[None]).float().mean(1)
    return acc, preds


@torch.no_grad()
def score_params(target: Target, task: Task, params: Mapping[str, torch.Tensor], split: str = "test",
                 chunk: int = 64, input_chunk: int = 4096) -> torch.Tensor:
    """The task's metric (:attr:`Task.metric`) of S weight sets on one split.

    Each network's score is the mean of the metric's per-example scores, accumulated over input
    chunks, so it does not depend on ``chunk`` or ``input_chunk``.

    Args:
        target: the target network (:func:`target_for`).
        params: tensors ``(S, *shape)`` named as in ``target.param_shapes()``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        chunk: samples evaluated at once.
        input_chunk: inputs evaluated at once.

    Returns:
        ``(S,)`` float32 scores (for ``accuracy``: those of :func:`evaluate_params`).
    """
    if chunk < 1 or input_chunk < 1:
        raise ValueError(f"chunk and input_chunk must be at least 1, got {chunk} and {input_chunk}")
    s = target.check(params, batched=True)
    metric = task.metric
    x, y = task.data().split(split)
    total = torch.zeros(s, dtype=torch.float64)
    for i in range(0, s, chunk):
        part = {k: v[i:i + chunk] for k, v in params.items()}
        for j in range(0, x.shape[0], input_chunk):
            out = target.forward_batched(part, x[j:j + input_chunk])  # (s, n, ...)
            total[i:i + chunk] += metric.per_example(out, y[j:j + input_chunk].to(out.device)).double().sum(1).cpu()
    return (total / x.shape[0]).float()


def summarize(acc: torch.Tensor, higher_is_better: bool = True) -> dict[str, float]:
    """``{num, best, mean, median, std}`` of scores ``(S,)`` (best: the lowest when lower is better)."""
    a = acc.double()
    best = a.max() if higher_is_better else a.min()
    return {"num": int(a.numel()), "best": float(best), "mean": float(a.mean()),
            "median": float(a.quantile(0.5)), "std": float(a.std()) if a.numel() > 1 else 0.0}


def evaluate_weights(task: str, weights: Sequence[str | os.PathLike], base: str | os.PathLike | None = None,
                     split: str = "test", chunk: int = 64) -> dict[str, Any]:
    """The task's metric (top-1 accuracy unless the task names another) of checkpoints on one split.

    Args:
        task: task string, e.g. ``"rotdigits:angle=70,flip=0"``.
        weights: ``--weights`` specs (see :func:`find_weight_paths`), expanded in order.
        base: the base network of LoRA adapters (default: :func:`find_base`).
        split: ``"train"``, ``"val"`` or ``"test"``.
        chunk: networks evaluated at once.

    Returns:
        ``{task, split, kind, metric, higher_is_better, num, best, mean, median, std, weights}``
        where ``weights`` lists ``{id, path, <metric>}`` per checkpoint (``metric`` names the
        key, e.g. ``accuracy``; ``best`` is the lowest score when lower is better).
    """
    t = get_task(task)
    paths = [p for spec in weights for p in find_weight_paths(spec)]
    loaded = load_weight_sets(paths)
    metric = t.metric
    scores = score_params(target_for(loaded, t, base), t, loaded.params, split=split, chunk=chunk)
    return {"task": t.name, "split": split, "kind": loaded.kind, "metric": metric.name,
            "higher_is_better": metric.higher_is_better, **summarize(scores, metric.higher_is_better),
            "weights": [{"id": i, "path": str(p), metric.name: float(a)}
                        for i, p, a in zip(loaded.ids, loaded.sources, scores.tolist())]}
