"""Load sets of weights (samples, zoo entries) and evaluate them, batched, in their target network.

A *weight set* is S checkpoints with the same tensor names and shapes, stacked along a leading
sample dimension: ``params[name]`` is ``(S, *shape)``. Sources are sample directories written by
``weightdiff sample``, zoo entry directories, or bare ``.safetensors`` files; whole networks are
``model.safetensors``, LoRA adapters PEFT directories (``adapter_model.safetensors`` +
``adapter_config.json``). Weights are read with :func:`weightdiff.io.load_weights` (safetensors
only, never unpickled).

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

from weightdiff.errors import TargetMismatchError, WeightFileError
from weightdiff.io import load_weights, read_json
from weightdiff.targets import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, FULL_WEIGHTS_FILE, Target
from weightdiff.tasks import Task, get_task

log = logging.getLogger(__name__)

WeightKind = Literal["full", "lora"]
_WEIGHT_FILES: dict[str, WeightKind] = {FULL_WEIGHTS_FILE: "full", ADAPTER_WEIGHTS_FILE: "lora"}
# Adapter-config fields that change the function of the same tensors; sets must agree on them.
_LORA_FUNCTION_FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora", "modules_to_save")
_GLOB_CHARS = set("*?[")
SAMPLE_INFO_FILE = "sample.json"


@dataclass
class WeightSet:
    """S weight sets stacked along a leading sample dimension.

    Attributes:
        kind: ``"full"`` (whole networks) or ``"lora"`` (PEFT adapter tensors).
        params: tensor name → ``(S, *shape)`` float32, in the files' key order.
        ids: S names (the directory or file stem of each source).
        adapter_config: the common ``adapter_config.json`` contents (LoRA), else ``None``.
        sources: S source paths (directories or files).
    """

    kind: WeightKind
    params: dict[str, torch.Tensor]
    ids: list[str]
    adapter_config: dict[str, Any] | None = None
    sources: list[Path] = field(default_factory=list)

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


def find_weight_paths(spec: str | os.PathLike) -> list[Path]:
    """Expand a ``--weights`` argument into checkpoint paths (sorted).

    ``spec`` may be a checkpoint directory or ``.safetensors`` file, a directory of checkpoint
    directories (e.g. ``weightdiff sample --out`` or a zoo's ``entries/``), a zoo directory, or a
    glob pattern (``"samples/sample_00*"``).

    Raises:
        WeightFileError: nothing matches, naming the argument.
    """
    text = str(spec)
    if _GLOB_CHARS & set(text):
        found = [Path(p) for p in sorted(glob.glob(text)) if _weight_file(Path(p)) is not None]
        if not found:
            raise WeightFileError(f"--weights pattern {text!r} matches no checkpoint "
                                  f"({FULL_WEIGHTS_FILE} / {ADAPTER_WEIGHTS_FILE} directory or .safetensors file)")
        return found
    path = Path(text)
    if not path.exists():
        raise WeightFileError(f"weights path not found: {path}")
    if _weight_file(path) is not None:
        return [path]
    parent = path / "entries" if (path / "entries").is_dir() else path
    found = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and _weight_file(p) is not None)
    if not found:
        raise WeightFileError(f"{path} holds no checkpoint: expected {FULL_WEIGHTS_FILE} or {ADAPTER_WEIGHTS_FILE} "
                              "in it or in its sub-directories")
    return found


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
        WeightFileError: a path holds no weight file, or an adapter has no config.
        TargetMismatchError: a set differs from the first in kind, keys, shapes or adapter
            config; the message names the file, the key, the expected and the actual value.
    """
    if not paths:
        raise WeightFileError("no weight paths given")
    first: tuple[Path, dict[str, torch.Tensor]] | None = None
    kind: WeightKind | None = None
    config: dict[str, Any] | None = None
    stacks: dict[str, list[torch.Tensor]] = {}
    ids, sources = [], []
    for raw in paths:
        path = Path(raw)
        found = _weight_file(path)
        if found is None:
            raise WeightFileError(f"{path} holds no weight file ({FULL_WEIGHTS_FILE} or {ADAPTER_WEIGHTS_FILE})")
        file, this_kind = found
        tensors = load_weights(file)
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
    assert kind is not None
    params = {k: torch.stack(v) for k, v in stacks.items()}
    log.info("loaded %d %s checkpoints (%d tensors)", len(ids), kind, len(params))
    return WeightSet(kind=kind, params=params, ids=ids, adapter_config=config, sources=sources)


def find_base(source: Path) -> Path | None:
    """The base network beside a LoRA checkpoint: from ``sample.json`` → ``model_dir/base``, or a zoo's ``base/``."""
    directory = source if source.is_dir() else source.parent
    info_path = directory / SAMPLE_INFO_FILE
    if info_path.is_file():
        info = read_json(info_path, "sample info")
        model_dir = info.get("model_dir")
        if model_dir and (Path(model_dir) / "base" / FULL_WEIGHTS_FILE).is_file():
            return Path(model_dir) / "base" / FULL_WEIGHTS_FILE
    for parent in (directory.parent, directory.parent.parent):  # entries/<id>/ → zoo root
        if (parent / "base" / FULL_WEIGHTS_FILE).is_file():
            return parent / "base" / FULL_WEIGHTS_FILE
    return None


def target_for(weights: WeightSet, task: Task, base: str | os.PathLike | None = None) -> Target:
    """The :class:`Target` that evaluates ``weights`` on ``task``.

    Full sets use the task's network architecture; LoRA sets need the frozen base network, from
    ``base`` (a ``model.safetensors`` file or a directory holding one) or found beside the first
    source (:func:`find_base`), and the sets' own adapter config.

    Raises:
        WeightFileError: no base network can be found for a LoRA set, or its file is unreadable.
        TargetMismatchError: the base weights do not fit the task's network, or the tensors do not
            fit the target network (file, key and shape named).
    """
    if weights.kind == "full":
        target = Target.build("full", task.build_network())
    else:
        base_path = Path(base) if base is not None else find_base(weights.sources[0])
        if base_path is None:
            raise WeightFileError(f"LoRA weights {weights.sources[0]}: no base network found (no {SAMPLE_INFO_FILE} "
                                  "with a model_dir holding base/model.safetensors, no zoo base/ above it); "
                                  "pass --base PATH")
        assert weights.adapter_config is not None
        file = base_path / FULL_WEIGHTS_FILE if base_path.is_dir() else base_path
        target = Target.build("lora", task.build_network(), base_state=load_weights(file),
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
    s = target.check(params, batched=True)
    x, y = task.data().split(split)
    preds = torch.empty(s, x.shape[0], dtype=torch.long)
    for i in range(0, s, chunk):
        part = {k: v[i:i + chunk] for k, v in params.items()}
        for j in range(0, x.shape[0], input_chunk):
            preds[i:i + chunk, j:j + input_chunk] = target.forward_batched(part, x[j:j + input_chunk]).argmax(-1)
    acc = (preds == y[None]).float().mean(1)
    return acc, preds


def summarize(acc: torch.Tensor) -> dict[str, float]:
    """``{num, best, mean, median, std}`` of accuracies ``(S,)``."""
    a = acc.double()
    return {"num": int(a.numel()), "best": float(a.max()), "mean": float(a.mean()),
            "median": float(a.quantile(0.5)), "std": float(a.std()) if a.numel() > 1 else 0.0}


def evaluate_weights(task: str, weights: Sequence[str | os.PathLike], base: str | os.PathLike | None = None,
                     split: str = "test", chunk: int = 64) -> dict[str, Any]:
    """Accuracy of checkpoints (samples, zoo entries) on one split of a task.

    Args:
        task: task string, e.g. ``"rotdigits:angle=70,flip=0"``.
        weights: ``--weights`` specs (see :func:`find_weight_paths`), expanded in order.
        base: the base network of LoRA adapters (default: :func:`find_base`).
        split: ``"train"``, ``"val"`` or ``"test"``.
        chunk: networks evaluated at once.

    Returns:
        ``{task, split, kind, num, best, mean, median, std, weights}`` where ``weights`` lists
        ``{id, path, accuracy}`` per checkpoint.
    """
    t = get_task(task)
    paths = [p for spec in weights for p in find_weight_paths(spec)]
    loaded = load_weight_sets(paths)
    acc, _ = evaluate_params(target_for(loaded, t, base), t, loaded.params, split=split, chunk=chunk)
    return {"task": t.name, "split": split, "kind": loaded.kind, **summarize(acc),
            "weights": [{"id": i, "path": str(p), "accuracy": float(a)}
                        for i, p, a in zip(loaded.ids, loaded.sources, acc.tolist())]}
