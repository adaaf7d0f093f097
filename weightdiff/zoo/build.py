"""Build a zoo from a recipe: plan the runs, take a shard, skip valid entries, train the rest.

The build is resumable and safe to kill: each entry is written to a temporary folder and
renamed into place (``weightdiff.io.atomic_path``), and a run is retrained only when one of its
entries is missing or fails its hash check; entries that are already valid are never rewritten.
Shards (``shard=(i, n)``) take the runs whose index is ``i`` modulo ``n``, so n array jobs fill
one zoo without overlap. ``workers=K`` trains K runs at a time in K single-threaded processes.

Training itself is delegated to a :class:`ZooTrainer` (:class:`LoopTrainer` unless another is
passed in), so the orchestration can be tested with a fake trainer.

A LoRA recipe that names its base (``base``: a ``class_path`` or a ``pretrained`` Hugging Face
folder, see :class:`~weightdiff.zoo.recipe.Recipe`) has it built and run on one input of its first
task before anything is written; the zoo's ``base/`` then records the spec exactly as an imported
zoo's does (``base_spec.json``, and ``config.json`` for a Hugging Face base), written in the same
atomic step as the base's weights.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from weightdiff.base_networks import (HF_WEIGHTS_FILE, BaseSpec, base_call, build_base, record_base_spec,
                                      recorded_base_spec)
from weightdiff.errors import OutputPathError, RecipeError, TargetMismatchError, WeightDiffError, ZooBuildError
from weightdiff.io import (atomic_path, check_finite, check_writable, load_weights, read_json, save_weights,
                           sha256_file, write_json)
from weightdiff.zoo.manifest import (BASE_DIR, ENTRIES_DIR, ENTRY_FILE, FORMAT_VERSION, METRIC_FIELDS, PARENTS_DIR,
                                     ZOO_FILE, entry_problem, network_problem, read_zoo_json)
from weightdiff.zoo.recipe import Recipe, RunSpec
from weightdiff.targets import Target, load_base_network
from weightdiff.tasks import get_family, get_task
from weightdiff.zoo.training import FULL_DEFAULTS, evaluate_module, train_base, train_full_run, train_lora_adapter

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"  # base and parent networks


@dataclass
class TrainedCheckpoint:
    """One checkpoint returned by a trainer: its label (epoch or step), tensors and metrics."""

    checkpoint: int
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, float]


class ZooTrainer(Protocol):
    """Trains the networks of one zoo kind. Must be picklable (it is sent to worker processes)."""

    def train_base(self, recipe: Recipe) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The frozen base network of a LoRA zoo: ``(state_dict, metrics)``."""

    def train_parent(self, recipe: Recipe, index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Parent ``index`` of a full zoo with ``parents > 0``: ``(state_dict, metrics)``."""

    def train_run(self, recipe: Recipe, run: RunSpec, *, base: nn.Module | None,
                  parent: Mapping[str, torch.Tensor] | None) -> list[TrainedCheckpoint]:
        """One run; returns at least the checkpoints ``run.checkpoints``."""


def _network_from(recipe: Recipe, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The zoo's network initialised from ``state`` (a run fine-tuning its parent)."""
    net = recipe.build_network()
    net.load_state_dict(state, strict=True)
    return net


class LogitsOf(nn.Module):
    """``net`` returning the ``logits`` of its output mapping: a Hugging Face model's ``ModelOutput``
    becomes logits ``(N, C)``, which the zoo's loops train with cross-entropy and score by accuracy.

    PEFT names the adapter tensors of ``LogitsOf(net)`` ``base_model.model.net.<name>``;
    :func:`unwrapped_adapter_keys` maps them to ``base_model.model.<name>``, the names of an
    adapter of ``net`` itself (the zoo's target network).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = base_call(self.net)(self.net, x)  # with the attention mask of padded token ids
        if not torch.is_tensor(out):
            raise TargetMismatchError(f"{type(self.net).__name__} returns a {type(out).__name__} without 'logits'; "
                                      "name an auto class with a head, e.g. AutoModelForSequenceClassification, "
                                      "or the output to score with 'output' in the base spec")
        return out  # (N, C)


_PEFT_PREFIX = "base_model.model."  # get_peft_model_state_dict keys of a PeftModel start so


def unwrapped_adapter_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors trained on ``LogitsOf(net)``, renamed as adapter tensors of ``net``."""
    inner = _PEFT_PREFIX + "net."
    stray = [k for k in state if not k.startswith(inner)]
    if stray:
        raise ZooBuildError(f"adapter key '{stray[0]}' of a wrapped base does not start with '{inner}'")
    return {_PEFT_PREFIX + k.removeprefix(inner): v for k, v in state.items()}


def base_view(spec: BaseSpec | None, module: nn.Module) -> nn.Module:
    """The base as the zoo's loops run it: a Hugging Face (``pretrained``) model gives its logits."""
    return LogitsOf(module) if spec is not None and spec.pretrained is not None else module


def base_data_task(recipe: Recipe) -> str:
    """The task whose data the base is trained and scored on: the base family's, or for a
    ``pretrained`` base of a family without one, the first training task."""
    spec = recipe.base_spec()
    if spec is not None and spec.pretrained is not None and not get_family(recipe.family).base_family:
        return recipe.task_lists()[0][0]
    return recipe.base_family()


def _trainable_base(spec: BaseSpec) -> nn.Module:
    """An untrained ``class_path`` base with gradients on (``build_base`` returns it frozen)."""
    return build_base(spec, "recipe field 'base'").train().requires_grad_(True)


class LoopTrainer:
    """The default trainer of both kinds, on ``weightdiff.zoo.training``."""

    def train_base(self, recipe: Recipe) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        spec = recipe.base_spec()
        if spec is None:
            module = train_base(recipe.family, seed=recipe.base_seed)  # the adapter family's base architecture
            return dict(module.state_dict()), evaluate_module(module, get_task(recipe.base_family()).data())
        if spec.pretrained is not None:  # the folder's weights are the base: nothing to train
            module = build_base(spec, f"recipe '{recipe.name}': field 'base'")
            state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
            return state, evaluate_module(base_view(spec, module), get_task(base_data_task(recipe)).data())
        # A class_path base is trained as the family's own base network is (train_base).
        data_family = recipe.base_family()
        if data_family not in FULL_DEFAULTS:
            raise ZooBuildError(f"recipe '{recipe.name}': field 'base': a class_path base is trained on family "
                                f"'{data_family}', which has no training settings in FULL_DEFAULTS "
                                f"({sorted(FULL_DEFAULTS)})")
        hp = {k: FULL_DEFAULTS[data_family][k] for k in ("epochs", "lr", "batch_size")}
        (_, state, metrics), = train_full_run(get_task(data_family), recipe.base_seed, checkpoint_epochs=[hp["epochs"]],
                                              late_lr_schedule="cosine",
                                              network=functools.partial(_trainable_base, spec), **hp)
        return state, metrics

    def train_parent(self, recipe: Recipe, index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        # One cosine decay to a converged parent; the children then explore around it.
        ((_, state, metrics),) = train_full_run(
            recipe.tasks[0], recipe.parent_seed + index, epochs=recipe.parent_epochs, lr=recipe.lr,
            batch_size=recipe.batch_size, checkpoint_epochs=[recipe.parent_epochs], late_lr_schedule="cosine",
            weight_decay=recipe.weight_decay)
        return state, metrics

    def train_run(self, recipe: Recipe, run: RunSpec, *, base: nn.Module | None,
                  parent: Mapping[str, torch.Tensor] | None) -> list[TrainedCheckpoint]:

        if recipe.kind == "full":
            network = functools.partial(_network_from, recipe, parent) if parent is not None else None
            out = train_full_run(get_task(run.task), run.seed, epochs=recipe.epochs, lr=recipe.lr,
                                 batch_size=recipe.batch_size, checkpoint_epochs=recipe.checkpoint_epochs,
                                 late_lr_schedule=recipe.late_lr_schedule, late_lr_peak=recipe.late_lr_peak,
                                 late_lr_min=recipe.late_lr_min, weight_decay=recipe.weight_decay, network=network)
            return [TrainedCheckpoint(epoch, state, metrics) for epoch, state, metrics in out]
        assert base is not None
        view = base_view(recipe.base_spec(), base)
        state, metrics = train_lora_adapter(
            run.task, view, rank=recipe.rank, alpha=recipe.alpha, target_modules=recipe.target_modules,
            steps=recipe.steps, lr=recipe.lr, seed=run.seed, examples_per_class=recipe.examples_per_class,
            batch_size=recipe.lora_batch_size)
        if view is not base:
            state = unwrapped_adapter_keys(state)
        return [TrainedCheckpoint(recipe.steps, state, metrics)]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``; raise :class:`ZooBuildError` otherwise."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ZooBuildError(f"--shard {text!r}: expected 'i/n' with integers 0 <= i < n, e.g. '0/4'") from None
    if not 0 <= i < n:
        raise ZooBuildError(f"--shard {text!r}: expected 0 <= i < n, got i={i}, n={n}")
    return i, n


def shard_runs(runs: list[RunSpec], shard: tuple[int, int]) -> list[RunSpec]:
    """The runs of shard ``(i, n)``: those whose index is ``i`` modulo ``n``."""
    i, n = shard
    return [r for r in runs if r.index % n == i]


def _clean_metrics(metrics: Mapping[str, Any], where: str) -> dict[str, float]:
    missing = [k for k in METRIC_FIELDS if k not in metrics]
    if missing:
        raise ZooBuildError(f"{where}: trainer metrics lack '{missing[0]}'; expected {list(METRIC_FIELDS)}")
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Exists(Exception):
    """Another shard published the folder first; keep theirs (raised to abort our temp folder)."""


def publish_network(folder: Path, row: dict[str, Any], state: Mapping[str, torch.Tensor],
                    spec: BaseSpec | None = None) -> None:
    """Write a base/parent network (weights + row) atomically, unless another process already did.

    Args:
        folder: ``<zoo>/base`` or ``<zoo>/parents/p<k>``.
        row: its ``entry.json`` fields; ``file``, ``sha256`` and ``num_params`` are added.
        state: the network's state dict, written to :data:`WEIGHTS_FILE`.
        spec: the base's architecture, recorded beside its weights in the same atomic step
            (:func:`~weightdiff.base_networks.record_base_spec`); ``None``: the family's network.
    """
    check_finite(state, str(folder))
    try:
        with atomic_path(folder, directory=True) as tmp:
            save_weights(tmp / WEIGHTS_FILE, state)
            row = dict(row, file=WEIGHTS_FILE, sha256=sha256_file(tmp / WEIGHTS_FILE),
                       num_params=sum(int(t.numel()) for t in state.values()))
            write_json(tmp / ENTRY_FILE, row)
            if spec is not None:
                record_base_spec(spec, tmp)
            # Shards on other machines may train the same network concurrently; the first one to
            # publish wins, so every entry of the zoo is trained against the same weights.
            if folder.exists() and network_problem(folder) is None:
                raise _Exists
    except _Exists:
        log.info("%s was written by another process; using it", folder)


class _Builder:
    """Trains runs and writes their entries; one per process (the parent, or each worker)."""

    def __init__(self, recipe: Recipe, zoo_dir: Path, trainer: ZooTrainer) -> None:
        self.recipe, self.zoo_dir, self.trainer = recipe, zoo_dir, trainer
        self._target: Any = None
        self._base: nn.Module | None = None
        self._parents: dict[int, dict[str, torch.Tensor]] = {}
        self._task_info: dict[str, tuple[list[float], list[str]]] = {}
        self.base_sha = None
        if recipe.kind == "lora":
            self.base_sha = read_json(zoo_dir / BASE_DIR / ENTRY_FILE, "base network row")["sha256"]

    @property
    def base_file(self) -> Path:
        return self.zoo_dir / BASE_DIR / WEIGHTS_FILE

    def base_network(self) -> nn.Module:
        """A network of the base architecture: the spec ``base/`` records (a ``pretrained`` one is
        read from ``base/`` itself), else the family's."""
        spec = recorded_base_spec(self.zoo_dir / BASE_DIR)
        return build_base(spec, str(self.zoo_dir / BASE_DIR)) if spec is not None else self.recipe.build_network()

    def base_module(self) -> nn.Module:
        if self._base is None:
            self._base = load_base_network(self.base_network(), load_weights(self.base_file), self.base_file)
        return self._base

    def target(self) -> Any:
        if self._target is None:
            if self.recipe.kind == "full":
                self._target = Target.build("full", self.recipe.build_network())
            else:
                config = self.recipe.lora_config()
                spec = self.recipe.base_spec()
                if spec is not None and spec.pretrained is not None:  # AutoPeftModel finds the base from here
                    config["base_model_name_or_path"] = str((self.zoo_dir / BASE_DIR).resolve())
                self._target = Target.build("lora", self.base_network(), base_state=load_weights(self.base_file),
                                            lora_config=config, source=self.base_file)
        return self._target

    def parent(self, index: int | None) -> dict[str, torch.Tensor] | None:
        if index is None:
            return None
        if index not in self._parents:
            self._parents[index] = load_weights(self.zoo_dir / PARENTS_DIR / f"p{index}" / WEIGHTS_FILE)
        return self._parents[index]

    def expect(self, run: RunSpec, checkpoint: int) -> dict[str, Any]:
        """Row fields a valid entry of this run must have (a changed base invalidates adapters)."""
        out: dict[str, Any] = {"task": run.task, "split": run.split, "seed": run.seed, "checkpoint": checkpoint}
        if self.base_sha is not None:
            out["base_sha256"] = self.base_sha
        return out

    def missing(self, run: RunSpec) -> list[int]:
        """Checkpoints of ``run`` whose entries are absent or invalid."""
        entries = self.zoo_dir / ENTRIES_DIR
        return [c for c in run.checkpoints
                if entry_problem(entries / run.entry_id(c), expect=self.expect(run, c)) is not None]

    def task_info(self, task: str) -> tuple[list[float], list[str]]:
        if task not in self._task_info:
            t = get_task(task)
            self._task_info[task] = ([float(v) for v in t.code().tolist()], list(t.descriptions()))
        return self._task_info[task]

    def run(self, run: RunSpec) -> list[tuple[str, float]]:
        """Train ``run`` if any entry is missing; write only the missing entries.

        Returns ``[(entry_id, test_acc)]`` of the entries written.
        """
        todo = self.missing(run)
        if not todo:
            return []
        base = self.base_module() if self.recipe.kind == "lora" else None
        results = self.trainer.train_run(self.recipe, run, base=base, parent=self.parent(run.parent))
        by_ckpt = {r.checkpoint: r for r in results}
        absent = [c for c in todo if c not in by_ckpt]
        if absent:
            raise ZooBuildError(f"run {run.run_id}: trainer returned checkpoints {sorted(by_ckpt)}, "
                                f"missing {absent}")
        return [self.write_entry(run, by_ckpt[c]) for c in todo]

    def write_entry(self, run: RunSpec, ckpt: TrainedCheckpoint) -> tuple[str, float]:
        metrics = _clean_metrics(ckpt.metrics, f"entry {run.entry_id(ckpt.checkpoint)}")
        code, descriptions = self.task_info(run.task)
        row = write_entry(self.zoo_dir, self.target(), run, TrainedCheckpoint(ckpt.checkpoint, ckpt.tensors, metrics),
                          family=self.recipe.family, kind=self.recipe.kind, code=code, descriptions=descriptions,
                          base_sha=self.base_sha)
        return row["id"], metrics["test_acc"]


def write_entry(zoo_dir: Path, target: Any, run: RunSpec, ckpt: TrainedCheckpoint, *, family: str, kind: str,
                code: list[float], descriptions: list[str], base_sha: str | None,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the entry ``<zoo_dir>/entries/<run.entry_id(checkpoint)>`` atomically; return its row.

    Args:
        zoo_dir: the zoo folder.
        target: the zoo's :class:`~weightdiff.targets.Target`; it checks the tensors' names and
            shapes and writes them in the zoo's format (PEFT folder for LoRA).
        run: the run the checkpoint belongs to (task, split, seed, parent).
        ckpt: the checkpoint; its metrics hold at least :data:`METRIC_FIELDS`.
        family, kind: as in ``zoo.json``.
        code, descriptions: the task's condition material stored in the row.
        base_sha: sha256 of the base network (LoRA zoos), or ``None``.
        extra: further row fields, written last.

    Raises:
        NonFiniteWeightsError: a tensor holds NaN/Inf.
        TargetMismatchError: a missing/unexpected tensor or a wrong shape.
        OutputPathError: the entry cannot be written (nothing is left half-written).
    """
    entry_id = run.entry_id(ckpt.checkpoint)
    check_finite(ckpt.tensors, f"entry {entry_id}")
    with atomic_path(zoo_dir / ENTRIES_DIR / entry_id, directory=True) as tmp:
        weights = target.save(ckpt.tensors, tmp)  # checks names/shapes; PEFT layout for LoRA
        row: dict[str, Any] = {
            "id": entry_id, "task": run.task, "split": run.split, "heldout_kind": run.heldout_kind,
            "family": family, "kind": kind, "code": code, "descriptions": descriptions,
            "seed": run.seed, "run_id": run.run_id,
            "checkpoint": ckpt.checkpoint, "metrics": dict(ckpt.metrics),
            "num_params": sum(int(t.numel()) for t in ckpt.tensors.values()),
            "file": weights.name, "sha256": sha256_file(weights),
        }
        if run.parent is not None:
            row["parent"] = f"p{run.parent}"
        if base_sha is not None:
            row["base_sha256"] = base_sha
        row.update(extra or {})
        write_json(tmp / ENTRY_FILE, row)
    return row


# ---------------------------------------------------------------------------------- worker processes
_WORKER: _Builder | None = None


def _init_worker(recipe: Recipe, zoo_dir: Path, trainer: ZooTrainer) -> None:
    global _WORKER
    # One single-threaded worker per core: K processes beat K intra-op threads on these small nets.
    torch.set_num_threads(1)
    _WORKER = _Builder(recipe, zoo_dir, trainer)


def _work(run: RunSpec) -> list[tuple[str, float]]:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.run(run)


# ------------------------------------------------------------------------------------------ build
@dataclass
class BuildReport:
    """What one ``run_build`` call did."""

    zoo_dir: Path
    planned_runs: int
    shard_runs: int
    skipped_runs: int
    trained_runs: int = 0
    entries_written: int = 0
    seconds: float = 0.0
    test_accs: list[float] = field(default_factory=list)


def _ensure_zoo_json(zoo_dir: Path, recipe: Recipe) -> None:
    """Write ``zoo.json``, or check that the existing one holds the same recipe."""
    if (zoo_dir / ZOO_FILE).exists():
        meta = read_zoo_json(zoo_dir)
        stored = Recipe.from_dict(meta["recipe"], str(zoo_dir / ZOO_FILE)).to_dict()
        wanted = recipe.to_dict()
        if stored != wanted:
            diff = [k for k in wanted if stored.get(k) != wanted[k]]
            k = diff[0]
            raise RecipeError(f"{zoo_dir / ZOO_FILE} was built from another recipe: field '{k}' is "
                              f"{stored.get(k)!r} there, {wanted[k]!r} requested ({len(diff)} fields differ); "
                              "use another zoo name or root")
        return
    write_json(zoo_dir / ZOO_FILE, {"name": recipe.name, "kind": recipe.kind, "family": recipe.family,
                                    "format_version": FORMAT_VERSION, "recipe": recipe.to_dict()})


def _check_base(recipe: Recipe) -> None:
    """Build the recipe's named ``base`` and run it on one input of its first task (nothing is written).

    Raises:
        RecipeError: naming the recipe and the field ``base``: the base cannot be built (class,
            ``init_args``, Hugging Face folder), fails on the task's inputs, or returns no logits
            ``(N, C)`` covering the task's classes (the zoo's loops train and score on them).
    """
    spec = recipe.base_spec()
    if spec is None:
        return
    where = f"recipe '{recipe.name}': field 'base'"
    try:
        module = build_base(spec, where)
    except WeightDiffError as exc:
        raise RecipeError(str(exc)) from None
    task = get_task(recipe.task_lists()[0][0])
    x = task.data().x_train[:1]
    try:
        with torch.no_grad():
            out = base_view(spec, module)(x)
    except Exception as exc:  # the user's network: any failure is a recipe error, named
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise RecipeError(f"{where}: the base fails on an input {tuple(x.shape)} of task '{task.name}': "
                          f"{type(exc).__name__}: {first_line}") from None
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[1] < task.num_classes:
        got = f"a tensor of shape {tuple(out.shape)}" if torch.is_tensor(out) else f"a {type(out).__name__}"
        raise RecipeError(f"{where}: the base returns {got} on an input of task '{task.name}'; expected logits "
                          f"(N, C) with C >= {task.num_classes} classes")


def _check_base_source(recipe: Recipe, zoo_dir: Path) -> None:
    """A resumed zoo's ``pretrained`` base must still be the folder's weights it was built from."""
    spec = recipe.base_spec()
    if spec is None or spec.pretrained is None:
        return
    row = read_json(zoo_dir / BASE_DIR / ENTRY_FILE, "base network row")
    now = sha256_file(Path(spec.pretrained) / HF_WEIGHTS_FILE)
    if row.get("source_sha256") != now:
        raise RecipeError(f"{zoo_dir / BASE_DIR / ENTRY_FILE}: the base was copied from {row.get('source')} with "
                          f"sha256 {row.get('source_sha256')}; the recipe's field 'base' names "
                          f"{Path(spec.pretrained) / HF_WEIGHTS_FILE} with sha256 {now}; use another zoo name or root")


def _prepare_networks(recipe: Recipe, zoo_dir: Path, trainer: ZooTrainer) -> None:
    """Train and publish the base (LoRA) or the parents (full with parents) unless present."""
    if recipe.kind == "lora" and network_problem(zoo_dir / BASE_DIR) is None:
        _check_base_source(recipe, zoo_dir)
    elif recipe.kind == "lora":
        spec = recipe.base_spec()
        if spec is not None and spec.pretrained is not None:
            log.info("copying the base network from %s", spec.pretrained)
        else:
            log.info("training the base network (seed %d)", recipe.base_seed)
        state, metrics = trainer.train_base(recipe)
        row = {"id": "base", "task": base_data_task(recipe), "seed": recipe.base_seed,
               "metrics": _clean_metrics(metrics, "base network")}
        if spec is not None and spec.pretrained is not None:
            source = Path(spec.pretrained) / HF_WEIGHTS_FILE
            row.update(source=str(source.resolve()), source_sha256=sha256_file(source))
        publish_network(zoo_dir / BASE_DIR, row, state, spec)
    for p in range(recipe.parents):
        folder = zoo_dir / PARENTS_DIR / f"p{p}"
        if network_problem(folder) is None:
            continue
        log.info("training parent %d of %d", p + 1, recipe.parents)
        state, metrics = trainer.train_parent(recipe, p)
        row = {"id": f"p{p}", "task": recipe.tasks[0], "seed": recipe.parent_seed + p,
               "metrics": _clean_metrics(metrics, f"parent {p}")}
        publish_network(folder, row, state)


def run_build(recipe: Recipe, root: str | os.PathLike = "checkpoints_zoo", *, shard: tuple[int, int] = (0, 1),
              workers: int = 1, progress: bool = True, trainer: ZooTrainer | None = None) -> BuildReport:
    """Build (or finish) the zoo ``<root>/<recipe.name>``; see the module docstring.

    Args:
        recipe: the zoo recipe.
        root: folder holding zoos.
        shard: ``(i, n)``: build only the runs with index ``i`` modulo ``n``.
        workers: processes training runs in parallel (each single-threaded); 1 trains in-process.
        progress: show a tqdm bar over the runs to train.
        trainer: trains the networks; a :class:`LoopTrainer` (both kinds) by default.

    Raises:
        RecipeError: the zoo folder holds a zoo built from a different recipe, or the recipe's
            ``base`` cannot be built or run (found before anything is written).
        ZooBuildError: a bad shard/worker count, or a trainer that broke its contract.
        OutputPathError: the zoo folder cannot be written (checked before any training; a disk
            filling up later stops the build with this error, leaving no half-written entry).
    """
    from tqdm.auto import tqdm

    i, n = shard
    if not 0 <= i < n:
        raise ZooBuildError(f"shard {shard}: expected (i, n) with 0 <= i < n")
    if workers < 1:
        raise ZooBuildError(f"workers = {workers}: expected >= 1")
    start = time.perf_counter()
    trainer = trainer if trainer is not None else LoopTrainer()
    zoo_dir = check_writable(Path(root) / recipe.name, "zoo folder")
    _check_base(recipe)
    try:
        zoo_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create zoo folder {zoo_dir}: {exc.strerror or exc}") from None
    _ensure_zoo_json(zoo_dir, recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same arithmetic in-process as in the workers: resumed runs match
    try:
        _prepare_networks(recipe, zoo_dir, trainer)
        builder = _Builder(recipe, zoo_dir, trainer)
        plan = recipe.plan()
        mine = shard_runs(plan, shard)
        todo = [r for r in mine if builder.missing(r)]
        report = BuildReport(zoo_dir, len(plan), len(mine), len(mine) - len(todo))
        log.info("zoo %s shard %d/%d: %d runs, %d already built, %d to train with %d worker(s)",
                 recipe.name, i, n, len(mine), report.skipped_runs, len(todo), workers)
        bar = tqdm(total=len(todo), desc=f"zoo {recipe.name}", unit="run", disable=not progress or not todo)
        if workers == 1 or len(todo) <= 1:
            results = map(builder.run, todo)
            _collect(results, report, bar)
        else:
            # spawn: workers start clean (no forked torch thread pools) and can unpickle trainers
            # defined in the caller's script, whose module path spawn passes on.
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(workers, len(todo)), initializer=_init_worker,
                          initargs=(recipe, zoo_dir, trainer)) as pool:
                _collect(pool.imap_unordered(_work, todo), report, bar)
        bar.close()
    finally:
        torch.set_num_threads(threads)
    report.seconds = time.perf_counter() - start
    log.info("zoo %s: trained %d runs (%d entries) in %.1f s", recipe.name, report.trained_runs,
             report.entries_written, report.seconds)
    return report


def _collect(results: Any, report: BuildReport, bar: Any) -> None:
    for written in results:
        report.trained_runs += 1
        report.entries_written += len(written)
        report.test_accs.extend(acc for _, acc in written)
        if report.test_accs:
            bar.set_postfix(test_acc=f"{sum(report.test_accs) / len(report.test_accs):.3f}", refresh=False)
        bar.update(1)


def build_zoo(recipe: Recipe, root: str | os.PathLike = "checkpoints_zoo", *, shard: tuple[int, int] = (0, 1),
              workers: int = 1, progress: bool = True, trainer: ZooTrainer | None = None) -> Path:
    """:func:`run_build`, returning the zoo folder ``<root>/<recipe.name>``."""
    return run_build(recipe, root, shard=shard, workers=workers, progress=progress, trainer=trainer).zoo_dir

