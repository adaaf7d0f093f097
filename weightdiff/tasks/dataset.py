"""The ``dataset`` family: tasks of imported zoos, defined by data files named in a task file.

A task is ``dataset:name=NAME``; NAME is looked up among the dataset tasks registered from
*task files* (JSON, or YAML with a ``.yaml``/``.yml`` suffix), so task strings stay short and
canonical while the files they stand for live beside the zoo. A task file::

    tasks:
      - name: sst2-mini                    # letters, digits, '.', '_', '-'
        num_classes: 2
        data: sst2-mini.safetensors        # relative to the task file; or .npz
        sha256: 3f1c…                      # optional: the data file must have this hash
        metric: accuracy                   # accuracy (default), neg_loss or mse
        descriptions: ["Is this movie review positive or negative?"]
        heldout_description: "Sentiment of a short film review"   # optional
        code: [1.0, 0.0]                   # optional numeric task code
      - name: toy-regression
        dataset: {class_path: mypkg.data.make_toy, init_args: {n: 200}}
        metric: mse
        network: {class_path: mypkg.nets.SmallMLP, init_args: {width: 32}}   # for dataset-net tasks

``data`` holds the six tensors ``x_train, y_train, x_val, y_val, x_test, y_test`` (safetensors,
or ``.npz`` read with ``allow_pickle=False``, so no file can run code); ``dataset`` names a
callable returning a :class:`~weightdiff.tasks.TaskData` or a mapping of those six tensors (it
runs code, like any ``class_path`` in a config). Floating inputs become float32; labels of
classification metrics must be integers in ``[0, num_classes)`` (int64), targets of ``mse``
float32.

Task files are registered with :func:`register_task_file`, or listed in the environment
variable :data:`TASK_FILES_ENV` (paths separated by ``os.pathsep``), read the first time a
dataset task is asked for. A name registered twice must mean the same task.

Two families read the same task files. ``dataset:name=NAME`` (:class:`DatasetTask`) is a LoRA
family with no network of its own: its zoo's recorded base network is used, so its
:meth:`~DatasetTask.build_network` raises. ``dataset-net:name=NAME`` (:class:`DatasetNetworkTask`)
is a full family whose checkpoints are whole networks of the entry's ``network`` (any
``nn.Module`` by ``class_path`` + ``init_args``), built from its own seeded initialisation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from weightdiff.errors import TaskStringError, WeightDiffError
from weightdiff.tasks.base import Factor, Task, TaskData, import_module_class, import_object, register_family
from weightdiff.tasks.metrics import METRICS, Metric, get_metric

TASK_FILES_ENV = "WEIGHTDIFF_TASK_FILES"
SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
_DATA_SUFFIXES = (".safetensors", ".npz")
_FIELDS = ("name", "num_classes", "data", "sha256", "dataset", "metric", "descriptions", "heldout_description",
           "code", "input_shape", "network")


class DatasetTaskError(WeightDiffError):
    """A dataset task file or the data it names is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset task as its task file defines it.

    Attributes:
        name: the ``name`` factor of its task string.
        source: ``"<task file>: tasks[i]"``, as error messages name it.
        num_classes: output width C (classification: number of classes).
        metric: metric name (:data:`weightdiff.tasks.metrics.METRICS`).
        descriptions: natural-language descriptions (at least one).
        data: absolute path of the ``.safetensors``/``.npz`` data file, or None.
        sha256: the data file's expected sha256, or None.
        class_path: ``module.attr`` of a callable returning the data, or None.
        init_args: keyword arguments of that callable.
        heldout_description: a description unlike the others, or None.
        code: the numeric task code, or None (a constant).
        input_shape: shape of one input, or None (read from the data).
        network: ``(class_path, init_args as JSON)`` of the whole network a ``dataset-net`` task
            trains, or None.
    """

    name: str
    source: str
    num_classes: int
    metric: str
    descriptions: tuple[str, ...]
    data: str | None = None
    sha256: str | None = None
    class_path: str | None = None
    init_args: Mapping[str, Any] = field(default_factory=dict, hash=False)
    heldout_description: str | None = None
    code: tuple[float, ...] | None = None
    input_shape: tuple[int, ...] | None = None
    network: tuple[str, str] | None = None

    def identity(self) -> tuple[Any, ...]:
        """Everything that defines the task (not where it was read from)."""
        return (self.num_classes, self.metric, self.descriptions, self.data, self.sha256, self.class_path,
                json.dumps(dict(self.init_args), sort_keys=True, default=str), self.heldout_description, self.code,
                self.input_shape, self.network)


_SPECS: dict[str, DatasetSpec] = {}
_ENV_FILES_READ: set[str] = set()


def _read_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetTaskError(f"task file {path}: cannot be read: {exc}") from None
    try:
        return yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise DatasetTaskError(f"task file {path}: is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: "
                               f"{' '.join(str(exc).split())}") from None


def _spec(entry: Any, where: str, folder: Path) -> DatasetSpec:
    """Validate one entry of a task file (``where`` names it) into a :class:`DatasetSpec`."""
    def fail(key: str, why: str) -> DatasetTaskError:
        return DatasetTaskError(f"{where}.{key}: {why}")

    if not isinstance(entry, Mapping):
        raise DatasetTaskError(f"{where}: expected a mapping of task fields, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise fail(unknown[0], f"unknown field; expected one of {', '.join(_FIELDS)}")
    name = entry.get("name")
    try:
        DatasetTask.factor_specs[0].validate(name, f"dataset:name={name}")
    except TaskStringError:
        raise fail("name", f"= {name!r} is not a name: a letter or digit, then up to 63 letters, digits, '.', '_' "
                           "or '-'") from None
    metric = entry.get("metric", "accuracy")
    if metric not in METRICS:
        raise fail("metric", f"= {metric!r} is unknown; expected one of {sorted(METRICS)}")
    num_classes = entry.get("num_classes")
    if not (isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 1):
        raise fail("num_classes", f"= {num_classes!r}; expected a whole number of at least 1")
    descriptions = entry.get("descriptions")
    if (not isinstance(descriptions, list) or not descriptions
            or not all(isinstance(d, str) and d.strip() for d in descriptions)):
        raise fail("descriptions", f"= {descriptions!r}; expected a list of at least one non-empty string")
    held = entry.get("heldout_description")
    if held is not None and not (isinstance(held, str) and held.strip()):
        raise fail("heldout_description", f"= {held!r}; expected a non-empty string")
    code = entry.get("code")
    if code is not None and not (isinstance(code, list) and code and all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and np.isfinite(c) for c in code)):
        raise fail("code", f"= {code!r}; expected a non-empty list of finite numbers")
    shape = entry.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise fail("input_shape", f"= {shape!r}; expected a list of positive whole numbers")
    network = entry.get("network")
    if network is not None:
        if not isinstance(network, Mapping) or not isinstance(network.get("class_path"), str) \
                or "." not in network["class_path"] or set(network) - {"class_path", "init_args"} \
                or not isinstance(network.get("init_args") or {}, Mapping):
            raise fail("network", f"= {network!r}; expected {{class_path: 'module.Class', init_args: {{...}}}}")
        network = (network["class_path"], json.dumps(dict(network.get("init_args") or {}), sort_keys=True))
    data, dataset = entry.get("data"), entry.get("dataset")
    if (data is None) == (dataset is None):
        raise DatasetTaskError(f"{where}: give exactly one of 'data' (a .safetensors or .npz file) and 'dataset' "
                               "(class_path + init_args)")
    fields: dict[str, Any] = {}
    if data is not None:
        if not isinstance(data, str) or Path(data).suffix.lower() not in _DATA_SUFFIXES:
            raise fail("data", f"= {data!r}; expected a path ending in {' or '.join(_DATA_SUFFIXES)}")
        fields["data"] = str((folder / data).resolve())
        sha = entry.get("sha256")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise fail("sha256", f"= {sha!r}; expected 64 lowercase hex digits")
        fields["sha256"] = sha
    else:
        if entry.get("sha256") is not None:
            raise fail("sha256", "applies to a 'data' file only")
        if not isinstance(dataset, Mapping) or not isinstance(dataset.get("class_path"), str) \
                or "." not in dataset["class_path"] or set(dataset) - {"class_path", "init_args"}:
            raise fail("dataset", f"= {dataset!r}; expected {{class_path: 'module.callable', init_args: {{...}}}}")
        init_args = dataset.get("init_args") or {}
        if not isinstance(init_args, Mapping):
            raise fail("dataset.init_args", f"= {init_args!r}; expected a mapping of keyword arguments")
        fields.update(class_path=dataset["class_path"], init_args=dict(init_args))
    return DatasetSpec(name=name, source=where, num_classes=num_classes, metric=metric,
                       descriptions=tuple(descriptions), heldout_description=held,
                       code=tuple(float(c) for c in code) if code is not None else None,
                       input_shape=tuple(shape) if shape is not None else None, network=network, **fields)


def register_task_file(path: str | os.PathLike) -> list[str]:
    """Register the dataset tasks of a task file; returns their canonical task strings.

    Every entry is validated before any is registered, so a bad file registers nothing.

    Raises:
        DatasetTaskError: the file is unreadable or malformed, an entry has a missing, unknown or
            ill-typed field (named ``<file>: tasks[i].<field>``), or a name is given twice with
            different definitions.
    """
    path = Path(path)
    doc = _read_file(path)
    if not isinstance(doc, Mapping) or not isinstance(doc.get("tasks"), list):
        raise DatasetTaskError(f"task file {path}: expected a mapping with a list 'tasks'")
    specs = [_spec(entry, f"{path}: tasks[{i}]", path.resolve().parent) for i, entry in enumerate(doc["tasks"])]
    seen: dict[str, DatasetSpec] = {}
    for spec in specs:
        other = seen.get(spec.name) or _SPECS.get(spec.name)
        if other is not None and other.identity() != spec.identity():
            raise DatasetTaskError(f"{spec.source}.name: dataset task '{spec.name}' is already defined differently "
                                   f"by {other.source}")
        seen[spec.name] = spec
    for spec in specs:
        _SPECS.setdefault(spec.name, spec)
    return [f"{DatasetTask.family_name}:name={spec.name}" for spec in specs]


def _env_files() -> None:
    for entry in os.environ.get(TASK_FILES_ENV, "").split(os.pathsep):
        if entry and entry not in _ENV_FILES_READ:
            register_task_file(entry)
            _ENV_FILES_READ.add(entry)


def dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset task ``name`` (task files of :data:`TASK_FILES_ENV` read first).

    Raises:
        TaskStringError: no dataset task of that name is registered.
    """
    if name not in _SPECS:
        _env_files()
    if name not in _SPECS:
        known = ", ".join(sorted(_SPECS)) or "none"
        raise TaskStringError(f"task string 'dataset:name={name}': no dataset task named '{name}' is registered "
                              f"(registered: {known}); list it in a task file named by ${TASK_FILES_ENV} or "
                              "registered with weightdiff.tasks.dataset.register_task_file")
    return _SPECS[name]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_tensors(spec: DatasetSpec) -> tuple[dict[str, Any], str]:
    """The raw split tensors of a spec and the name of where they came from."""
    if spec.class_path is not None:
        where = f"{spec.source}.dataset ({spec.class_path})"
        try:
            out = import_object(spec.class_path)(**spec.init_args)
        except Exception as exc:
            raise DatasetTaskError(f"{where}: failed: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
        if isinstance(out, TaskData):
            out = {k: getattr(out, k) for k in SPLIT_KEYS}
        if not isinstance(out, Mapping):
            raise DatasetTaskError(f"{where}: returned a {type(out).__name__}; expected a TaskData or a mapping "
                                   f"with {', '.join(SPLIT_KEYS)}")
        return dict(out), where
    assert spec.data is not None
    path = Path(spec.data)
    where = f"{spec.source}.data ({path})"
    if not path.is_file():
        raise DatasetTaskError(f"{where}: no such file")
    if spec.sha256 is not None and _sha256(path) != spec.sha256:
        raise DatasetTaskError(f"{where}: sha256 is {_sha256(path)[:12]}…, but the task file records "
                               f"{spec.sha256[:12]}…")
    try:
        if path.suffix.lower() == ".safetensors":
            return dict(load_file(str(path))), where
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}, where
    except (SafetensorError, OSError, ValueError, EOFError) as exc:
        raise DatasetTaskError(f"{where}: cannot be read as {path.suffix}: {' '.join(str(exc).split())}") from None


def _as_tensor(value: Any, key: str, where: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DatasetTaskError(f"{where}: '{key}' has dtype {value.dtype}; expected numbers")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise DatasetTaskError(f"{where}: '{key}' is a {type(value).__name__}; expected a tensor or array")
    if value.is_complex():
        raise DatasetTaskError(f"{where}: '{key}' has dtype {value.dtype}; expected real numbers")
    return value


@functools.lru_cache(maxsize=32)
def load_dataset(spec: DatasetSpec) -> TaskData:
    """Read, check and convert the data of a dataset task (cached per process).

    Raises:
        DatasetTaskError: naming the file (or callable) and the key: a missing split tensor, an
            unexpected one, a non-numeric or non-finite tensor, mismatched lengths or input
            shapes, or labels that are not classes of the task.
    """
    raw, where = _read_tensors(spec)
    missing = [k for k in SPLIT_KEYS if k not in raw]
    if missing:
        raise DatasetTaskError(f"{where}: missing '{missing[0]}'; expected the tensors {', '.join(SPLIT_KEYS)}")
    extra = sorted(set(raw) - set(SPLIT_KEYS))
    if extra:
        raise DatasetTaskError(f"{where}: unexpected tensor '{extra[0]}'; expected only {', '.join(SPLIT_KEYS)}")
    metric = get_metric(spec.metric)
    parts: dict[str, torch.Tensor] = {}
    for split in ("train", "val", "test"):
        x = _as_tensor(raw[f"x_{split}"], f"x_{split}", where)
        y = _as_tensor(raw[f"y_{split}"], f"y_{split}", where)
        if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise DatasetTaskError(f"{where}: 'x_{split}' {tuple(x.shape)} and 'y_{split}' {tuple(y.shape)} must "
                                   "hold the same number (at least 1) of examples")
        if x.is_floating_point():
            x = x.float()
            if not torch.isfinite(x).all():
                raise DatasetTaskError(f"{where}: 'x_{split}' holds NaN or Inf values")
        if metric.classification:
            if y.is_floating_point() or y.dtype == torch.bool or y.ndim != 1:
                raise DatasetTaskError(f"{where}: 'y_{split}' is {y.dtype} {tuple(y.shape)}; metric "
                                       f"'{spec.metric}' needs integer class labels (N,)")
            y = y.long()
            if y.min() < 0 or y.max() >= spec.num_classes:
                raise DatasetTaskError(f"{where}: 'y_{split}' holds labels in [{int(y.min())}, {int(y.max())}]; "
                                       f"expected classes in [0, {spec.num_classes})")
        else:
            y = y.float()
            if not torch.isfinite(y).all():
                raise DatasetTaskError(f"{where}: 'y_{split}' holds NaN or Inf values")
        parts[f"x_{split}"], parts[f"y_{split}"] = x.contiguous(), y.contiguous()
    shapes = {k: tuple(v.shape[1:]) for k, v in parts.items() if k.startswith("x_")}
    expected = spec.input_shape or shapes["x_train"]
    for key, shape in shapes.items():
        if shape != tuple(expected):
            raise DatasetTaskError(f"{where}: '{key}' has inputs of shape {shape}; expected {tuple(expected)} "
                                   f"({'input_shape' if spec.input_shape else 'x_train'})")
    return TaskData(**parts)


@register_family
@dataclass(frozen=True)
class DatasetTask(Task):
    """A task defined by data files (see the module docstring); target: adapters on the zoo's base."""

    family_name: ClassVar[str] = "dataset"
    factor_specs: ClassVar[tuple[Factor, ...]] = (Factor("name", "name"),)
    kind: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        spec = dataset_spec(str(self.factors["name"]))
        object.__setattr__(self, "num_classes", spec.num_classes)
        shape = spec.input_shape if spec.input_shape is not None else tuple(load_dataset(spec).x_train.shape[1:])
        object.__setattr__(self, "input_shape", shape)

    @property
    def spec(self) -> DatasetSpec:
        return dataset_spec(str(self.factors["name"]))

    @property
    def metric(self) -> Metric:
        """The metric the task file names (default accuracy)."""
        return get_metric(self.spec.metric)

    def code(self) -> torch.Tensor:
        """The task file's ``code`` (float32), or a constant ``(1,)``."""
        code = self.spec.code
        return torch.tensor(code, dtype=torch.float32) if code is not None else super().code()

    def descriptions(self) -> list[str]:
        return list(self.spec.descriptions)

    def heldout_description(self) -> str:
        held = self.spec.heldout_description
        if held is None:
            raise NotImplementedError(f"{self.spec.source}: dataset task '{self.spec.name}' has no "
                                      "heldout_description")
        return held

    def data(self) -> TaskData:
        return load_dataset(self.spec)

    def build_network(self) -> nn.Module:
        raise DatasetTaskError(f"task '{self.name}' has no network of its own: a dataset task is evaluated on the "
                               "base network its zoo records (pass --base, or use the zoo's base/); whole networks of "
                               f"the entry's 'network' are task 'dataset-net:name={self.factors['name']}'")


@register_family
@dataclass(frozen=True)
class DatasetNetworkTask(DatasetTask):
    """A dataset task whose checkpoints are whole networks of its task file's ``network``."""

    family_name: ClassVar[str] = "dataset-net"
    kind: ClassVar[str] = "full"

    def build_network(self) -> nn.Module:
        """A fresh ``network`` of the task file, with its constructor's (seeded) initial weights.

        Raises:
            DatasetTaskError: the entry has no ``network``, or it cannot be built (naming the
                task file's entry).
        """
        spec = self.spec
        where = f"{spec.source}.network"
        if spec.network is None:
            raise DatasetTaskError(f"{spec.source}: task '{self.name}' is a whole-network task, but its entry has "
                                   "no 'network' {class_path, init_args}")
        class_path, init_args = spec.network[0], json.loads(spec.network[1])
        cls = import_module_class(class_path, where, DatasetTaskError)
        try:
            return cls(**init_args)
        except TypeError as exc:
            raise DatasetTaskError(f"{where}: init_args {init_args!r} do not fit {class_path}: {exc}") from None
