"""Import existing checkpoints into a zoo: ``weightdiff zoo import MANIFEST --base BASE``.

The manifest (JSONL or CSV, one row per checkpoint: a PEFT adapter folder or a ``.safetensors``
state dict, its task, split and descriptions) is described in :mod:`weightdiff.zoo.import_manifest`.

Every row is checked before anything is written (safetensors only, the same tensor names and
shapes in every file, loading into the family's network, adapter configs agreeing on every field
that changes the adapter's function), so a bad row fails with one error naming the manifest, the
line and the field, and no zoo. The zoo then has the layout of a built one (entries written by
:func:`weightdiff.zoo.build.write_entry`), ``zoo.json`` records the manifest (path and sha256)
and, per entry, the sha256 of its source files; an import that was killed resumes: entries whose
source hashes match are kept, the others written.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from weightdiff.base_networks import (
    BaseSpec,
    base_call,
    build_base,
    hf_folder,
    read_base_spec,
    record_base_spec,
)
from weightdiff.errors import ManifestError, OutputPathError, WeightDiffError
from weightdiff.io import (
    check_weight_dtypes,
    check_writable,
    load_weights,
    read_json,
    sha256_file,
    write_json,
)
from weightdiff.targets import (
    ADAPTER_CONFIG_FILE,
    FULL_WEIGHTS_FILE,
    Target,
    load_base_network,
    make_lora_config,
)
from weightdiff.tasks import get_family, get_task
from weightdiff.zoo.build import TrainedCheckpoint, publish_network, write_entry
from weightdiff.zoo.import_manifest import (
    PICKLE_SUFFIXES,
    ImportRow,
    Manifest,
    parse_row,
    read_manifest,
)
from weightdiff.zoo.manifest import (
    BASE_DIR,
    ENTRIES_DIR,
    ENTRY_FILE,
    FORMAT_VERSION,
    METRIC_FIELDS,
    ZOO_FILE,
    entry_problem,
    network_problem,
    read_zoo_json,
)
from weightdiff.zoo.recipe import Recipe
from weightdiff.zoo.training import (
    FULL_DEFAULTS,
    base_architecture_task,
    evaluate_module,
)

log = logging.getLogger(__name__)

#: ``LoraConfig`` fields that change what an adapter computes from its tensors; every adapter of a
#: zoo must agree on them, and with the zoo's target (dropout and initialisation only act in training).
FUNCTION_FIELDS = (
    "r", "lora_alpha", "target_modules", "exclude_modules", "fan_in_fan_out", "bias", "use_rslora",
    "modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "trainable_token_indices", "use_dora", "lora_bias", "use_qalora", "qalora_group_size", "layer_replication",
    "target_parameters", "alora_invocation_tokens", "use_bdlora", "arrow_config", "kasa_config",
)
# The recipe stored with an imported zoo records what the checkpoints are (kind, family, tasks,
# adapter shape). Its training fields only configure the baselines that train networks of their
# own (few-shot SGD); the imported checkpoints were trained elsewhere. These are the settings of
# configs/zoo/rotdigits-lora.yaml; full families use their FULL_DEFAULTS.
IMPORT_LORA_TRAINING = {"steps": 100, "lr": 0.03}


@dataclass
class ImportReport:
    """What one :func:`import_zoo` call did."""

    zoo_dir: Path
    rows: int
    skipped: int = 0
    written: int = 0
    seconds: float = 0.0


def function_fields(config: Mapping[str, Any] | LoraConfig) -> dict[str, Any]:
    """The :data:`FUNCTION_FIELDS` of an adapter config, sets as sorted lists (comparable, JSON-able)."""
    if not isinstance(config, LoraConfig):
        known = set(LoraConfig.__dataclass_fields__)  # fields of another PEFT version are dropped, as Target.build does
        config = make_lora_config({k: v for k, v in config.items() if k in known})
    out = {}
    for name in FUNCTION_FIELDS:
        if hasattr(config, name):
            value = getattr(config, name)
            out[name] = sorted(value) if isinstance(value, (set, frozenset)) else value
    return out


# ------------------------------------------------------------------------------------ validation
@dataclass
class ImportPlan:
    """A fully validated import: the rows, the zoo's target and what ``zoo.json`` records."""

    rows: list[ImportRow]
    family: str
    kind: str
    target: Any
    recipe: Recipe
    base_state: dict[str, torch.Tensor] | None
    base_file: Path | None
    base_spec: BaseSpec | None = None  # None: the family's network is the base architecture


def _base_spec(base: str | os.PathLike | None, base_config: str | os.PathLike | None) -> BaseSpec | None:
    """The base architecture given: ``--base-config``, a Hugging Face folder as ``--base``, or none (the family's)."""
    if base_config is not None:
        spec = read_base_spec(base_config)
        if spec.pretrained is not None and base is not None:
            raise ManifestError(f"--base {base}: {base_config} names the pretrained folder {spec.pretrained}, "
                                "whose model.safetensors are the base weights; give one of the two")
        if spec.class_path is not None and base is None:
            raise ManifestError(f"--base-config {base_config}: a class_path base needs its trained weights: "
                                "give them with --base (a .safetensors state dict)")
        return spec
    if base is not None and hf_folder(base):
        return BaseSpec(pretrained=str(base))
    return None


def _load_base(base: str | os.PathLike | None, family: str, spec: BaseSpec | None,
               spec_source: str) -> tuple[Path, dict[str, torch.Tensor], torch.nn.Module]:
    """The base network: weights loading strictly into the spec's (or the family's) architecture.

    Args:
        spec_source: where ``spec`` was given, named in its errors.
    """
    if spec is not None and spec.pretrained is not None:
        network = build_base(spec, spec_source)
        file = Path(spec.pretrained) / FULL_WEIGHTS_FILE
        state = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
        check_weight_dtypes(state, str(file))
        return file, state, network
    assert base is not None
    path = Path(base)
    file = path / FULL_WEIGHTS_FILE if path.is_dir() else path
    if file.suffix in PICKLE_SUFFIXES:
        raise ManifestError(f"--base {file} is a pickle file; only safetensors weights are accepted")
    state = load_weights(file)  # missing, pickle or non-safetensors file: WeightFileError naming it
    check_weight_dtypes(state, str(file))
    untrained = (build_base(spec, spec_source) if spec is not None
                 else base_architecture_task(family).build_network())
    network = load_base_network(untrained, state, file)
    return file, state, network


def plan_import(manifest: str | os.PathLike, base: str | os.PathLike | None, name: str,
                base_config: str | os.PathLike | None = None) -> ImportPlan:
    """Validate every row and file of ``manifest`` (nothing is written).

    Args:
        manifest: JSONL or CSV file, one row per checkpoint.
        base: the base weights (a ``.safetensors`` state dict, a folder holding ``model.safetensors``,
            or a Hugging Face model folder, whose ``config.json`` then gives the architecture).
        name: zoo name.
        base_config: YAML/JSON :class:`~weightdiff.base_networks.BaseSpec` of the base architecture
            (``class_path`` + ``init_args``, weights from ``base``; or ``pretrained``); default
            the family's network.

    Raises:
        ManifestError: a bad row, naming the manifest, the line and the field.
        WeightDiffError: a bad base network (naming the file).
    """
    m = Manifest(Path(manifest))
    raw_rows = read_manifest(m.path)
    rows: list[ImportRow] = []
    family = None
    for line, raw in raw_rows:
        rows.append(parse_row(m, line, raw, family))
        family = family or get_task(rows[0].task).family
    assert family is not None
    kind = get_family(family).kind
    if not any(r.split == "train" for r in rows):
        raise m.error(rows[0].line, "split", "is 'heldout' in every row; a zoo needs at least one 'train' row")
    base_file = base_state = base_module = None
    spec = _base_spec(base, base_config) if kind == "lora" else None
    if kind == "lora":
        if base is None and spec is None:
            raise ManifestError(f"{m.path}: family '{family}' is a LoRA family: give its base network with --base "
                                "(a .safetensors state dict, a folder holding model.safetensors, or a Hugging "
                                "Face model folder) or --base-config")
        spec_source = f"--base-config {base_config}" if base_config is not None else f"--base {base}"
        base_file, base_state, base_module = _load_base(base, family, spec, spec_source)
    elif base is not None or base_config is not None:
        raise ManifestError(f"--base {base or base_config}: family '{family}' is a full family; its checkpoints "
                            "need no base network")
    _number_entries(m, rows)
    seen: dict[Any, int] = {}
    reference: tuple[int, dict[str, tuple[int, ...]], dict[str, Any] | None] | None = None
    target = recipe = None
    for row in rows:
        where = f"= {row.weights}:"
        if row.weights.resolve() in seen:
            raise m.error(row.line, "path", f"{where} the same checkpoint as line {seen[row.weights.resolve()]} "
                                            "(duplicate row)")
        seen[row.weights.resolve()] = row.line
        try:
            tensors = load_weights(row.weights)
            check_weight_dtypes(tensors, str(row.weights))
            cfg = function_fields(read_json(row.config, "adapter config")) if row.config is not None else None
        except WeightDiffError as exc:
            raise m.error(row.line, "path", f"{where} {exc}") from None
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if reference is None:
            reference = (row.line, shapes, cfg)
            recipe = _recipe(name, family, kind, rows, cfg)
            if kind == "lora":
                zoo_cfg = function_fields(recipe.lora_config())
                bad = [k for k in zoo_cfg if cfg.get(k) != zoo_cfg[k]]
                if bad:
                    raise m.error(row.line, "path", f"{where} {row.config.name}: '{bad[0]}' = {cfg.get(bad[0])!r} "
                                                    f"is not supported by the zoo's LoRA target (it computes with "
                                                    f"{zoo_cfg[bad[0]]!r})")
                target = Target.build("lora", base_module, base_state=base_state, lora_config=recipe.lora_config(),
                                      source=base_file)
            else:
                target = Target.build("full", recipe.build_network())
        first, ref_shapes, ref_cfg = reference
        if shapes != ref_shapes:
            diff = sorted(set(shapes) ^ set(ref_shapes)) or sorted(k for k in shapes if shapes[k] != ref_shapes[k])
            raise m.error(row.line, "path", f"{where} tensor '{diff[0]}' has shape {shapes.get(diff[0])}, line "
                                            f"{first}'s has {ref_shapes.get(diff[0])} (every checkpoint of a zoo "
                                            "has the same tensor names and shapes)")
        if cfg != ref_cfg:
            key = next(k for k in cfg if cfg[k] != ref_cfg.get(k))
            raise m.error(row.line, "path", f"{where} {ADAPTER_CONFIG_FILE}: '{key}' = {cfg[key]!r}, line {first}'s "
                                            f"adapter has {ref_cfg.get(key)!r} (adapters of a zoo agree on every "
                                            "field that changes their function)")
        try:
            target.check(tensors, str(row.weights))
        except WeightDiffError as exc:
            network = "the family's network" if spec is None else f"the base network ({spec.kind})"
            raise m.error(row.line, "path", f"does not fit {network}: {exc}") from None
        if row is rows[0]:
            problem = _scored_output_problem(target, row, tensors)
            if problem is not None:
                source = (f"--base-config {base_config}" if base_config is not None else f"--base {base}"
                          if base is not None else f"family '{family}'")
                if any(_unmeasured(r) for r in rows):  # a score would have to be measured
                    raise ManifestError(f"{source}: {problem}; or give every row's metrics in the manifest")
                log.warning("%s: %s. The manifest gives every row's metrics, so the import goes on, but "
                            "weightdiff cannot evaluate these networks or train with the functional loss", source,
                            problem)
        row.source_sha256 = sha256_file(row.weights)
        row.config_sha256 = sha256_file(row.config) if row.config is not None else None
        if row.source_sha256 in seen:
            raise m.error(row.line, "path", f"{where} the same contents (sha256 {row.source_sha256[:12]}…) as "
                                            f"line {seen[row.source_sha256]} (duplicate row)")
        seen[row.source_sha256] = row.line
    return ImportPlan(rows, family, kind, target, recipe, base_state, base_file, spec)


def _unmeasured(row: ImportRow) -> list[str]:
    """The scores the import would measure for ``row``: those of its task's metric that it lacks."""
    metric = get_task(row.task).metric
    names = (METRIC_FIELDS if metric.name == "accuracy"
             else tuple(f"{split}_{metric.name}" for split in ("train", "val", "test")))
    return [n for n in names if n not in row.metrics]


def _scored_output_problem(target: Target, row: ImportRow, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why the task's metric cannot score the network's output (checked on one input), or None.

    The output must be a tensor (not, e.g., the ``ModelOutput`` of a model without a head), and
    ``(N, num_classes)`` logits for a classification metric.
    """
    task = get_task(row.task)
    x = task.data().split("val")[0][:1]
    with torch.no_grad():
        try:
            out = target.forward_batched({k: v[None] for k, v in tensors.items()}, x)
        except WeightDiffError as exc:
            return str(exc)
    hint = ("name the output to score with 'output' in the base config (e.g. output: pooler_output), or load a "
            "model with a head (e.g. auto_class: AutoModelForSequenceClassification)")
    if not torch.is_tensor(out):
        keys = f" with {sorted(out)}" if isinstance(out, Mapping) else ""
        return (f"the network returns a {type(out).__name__}{keys}, not a tensor that metric "
                f"'{task.metric.name}' of task {row.task!r} can score; {hint}")
    if task.metric.classification and (out.dim() != 3 or out.shape[-1] != task.num_classes):
        return (f"the network's output has shape {tuple(out.shape[1:])} on one input, but task {row.task!r} "
                f"scores logits (1, {task.num_classes}); {hint}")
    return None


def _number_entries(m: Manifest, rows: list[ImportRow]) -> None:
    """Fill unset seeds (the row's rank among its task's rows) and refuse two rows of one entry id."""
    per_task: dict[str, int] = {}
    for row in rows:
        if row.seed < 0:
            row.seed = per_task.get(row.task, 0)
        per_task[row.task] = max(per_task.get(row.task, 0), row.seed) + 1
    ids: dict[str, int] = {}
    for row in rows:
        if row.entry_id in ids:
            raise m.error(row.line, "seed", f"= {row.seed} (with task {row.task!r}, checkpoint {row.checkpoint}) "
                                            f"gives entry id {row.entry_id!r}, as line {ids[row.entry_id]} does "
                                            "(duplicate row)")
        ids[row.entry_id] = row.line


def _recipe(name: str, family: str, kind: str, rows: list[ImportRow], cfg: dict[str, Any] | None) -> Recipe:
    tasks = sorted({r.task for r in rows if r.split == "train"})
    fields: dict[str, Any] = {"name": name, "kind": kind, "family": family, "tasks": tasks}
    if kind == "lora":
        assert cfg is not None
        fields.update(IMPORT_LORA_TRAINING, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                      target_modules=list(cfg["target_modules"]))
    else:
        defaults = FULL_DEFAULTS.get(family, {"epochs": 1, "checkpoint_epochs": [1]})
        fields.update({k: v for k, v in defaults.items() if k in Recipe.__dataclass_fields__})
    return Recipe.from_dict(fields, f"zoo '{name}'")


# --------------------------------------------------------------------------------------- writing
def _zoo_json(plan: ImportPlan, manifest: Path) -> dict[str, Any]:
    entries = {}
    for row in plan.rows:
        entries[row.entry_id] = row.expect()
    imported: dict[str, Any] = {
        "manifest": str(manifest.resolve()), "manifest_sha256": sha256_file(manifest),
        "base": None if plan.base_file is None else {
            "path": str(plan.base_file.resolve()), "sha256": sha256_file(plan.base_file),
            "spec": None if plan.base_spec is None else plan.base_spec.to_dict()},
        "training_settings": "not recorded: the recipe's training fields configure baselines only",
        "entries": entries,
    }
    return {"name": plan.recipe.name, "kind": plan.kind, "family": plan.family, "format_version": FORMAT_VERSION,
            "recipe": plan.recipe.to_dict(), "imported": imported}


def _check_existing(zoo_dir: Path, meta: dict[str, Any]) -> None:
    """An existing zoo folder may be resumed only if it is an import of the same checkpoints' kind."""
    if not (zoo_dir / ZOO_FILE).exists():
        return
    old = read_zoo_json(zoo_dir)
    where = zoo_dir / ZOO_FILE
    if "imported" not in old:
        raise ManifestError(f"{where} is a zoo built by `weightdiff zoo build`; import into another --name or --root")
    for key in ("kind", "family"):
        if old[key] != meta[key]:
            raise ManifestError(f"{where}: field '{key}' is {old[key]!r}, this manifest's is {meta[key]!r}; "
                                "import into another --name or --root")
    old_base, new_base = old["imported"].get("base"), meta["imported"]["base"]
    if (old_base or {}).get("spec") != (new_base or {}).get("spec"):
        raise ManifestError(f"{where}: field 'imported.base.spec' is {(old_base or {}).get('spec')!r}, this "
                            f"import's base is {(new_base or {}).get('spec')!r}; import into another --name or --root")
    if (old_base or {}).get("sha256") != (new_base or {}).get("sha256"):
        raise ManifestError(f"{where}: field 'imported.base' names a base network with sha256 "
                            f"{(old_base or {}).get('sha256')}, --base has {(new_base or {}).get('sha256')}; "
                            "import into another --name or --root")
    entries = zoo_dir / ENTRIES_DIR
    listed = meta["imported"]["entries"]
    stale = sorted(p.name for p in entries.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and p.name not in listed) if entries.is_dir() else []
    if stale:
        raise ManifestError(f"{zoo_dir}: entry '{stale[0]}' ({len(stale)} in all) is not listed in "
                            f"{meta['imported']['manifest']}; import into another --name or --root")


def _measured(plan: ImportPlan, row: ImportRow, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """The row's metrics, with the scores it lacks measured on its task's splits.

    Accuracy tasks measure :data:`METRIC_FIELDS`; a task scored by another metric measures
    ``{split}_{metric}`` (e.g. ``test_mse``), the mean of its per-example scores.
    """
    metrics = dict(row.metrics)
    task = get_task(row.task)
    data, metric = task.data(), task.metric
    params = {k: v[None] for k, v in tensors.items()}  # (1, ...): the target's batched evaluation
    for name in _unmeasured(row):
        x, y = data.split(name.partition("_")[0])  # "val_neg_loss" -> "val"
        if metric.name == "accuracy":
            metrics[name] = float(plan.target.accuracy(params, x, y)[0])
        else:
            with torch.no_grad():
                metrics[name] = float(metric.per_example(plan.target.forward_batched(params, x), y).mean())
    return metrics


def _base_metrics(module: torch.nn.Module, data: Any, metric: Any) -> dict[str, float]:
    """The base network's scores on its family's data, or none when its scored output is not a tensor.

    Accuracy tasks record ``{split}_acc`` on logits (N, C); other metrics record
    ``{split}_{metric.name}``, the mean of the metric's per-example scores. The base is called as
    :class:`~weightdiff.targets.Target` calls it (:func:`~weightdiff.base_networks.base_call`):
    padded token ids masked, and an output mapping scored on its ``logits`` or the spec's ``output``.
    """
    call = base_call(module)
    with torch.no_grad():
        out = call(module, data.split("val")[0][:1])
    if not torch.is_tensor(out) or (metric.name == "accuracy" and out.dim() != 2):
        log.info("base network: its output is a %s, not logits (N, C); no base accuracies recorded",
                 type(out).__name__)
        return {}
    if metric.name == "accuracy":
        return evaluate_module(module, data)
    scores = {}
    with torch.no_grad():
        for split in ("train", "val", "test"):
            x, y = data.split(split)
            scores[f"{split}_{metric.name}"] = float(metric.per_example(call(module, x)[None], y).mean())
    return scores


def import_zoo(manifest: str | os.PathLike, base: str | os.PathLike | None = None, *, name: str | None = None,
               root: str | os.PathLike = "checkpoints_zoo", progress: bool = True,
               base_config: str | os.PathLike | None = None) -> ImportReport:
    """Import the checkpoints of ``manifest`` into the zoo ``<root>/<name>`` (see the module docstring).

    Args:
        manifest: JSONL or CSV file, one row per checkpoint.
        base: the base network of a LoRA family (``.safetensors`` state dict, a folder holding
            ``model.safetensors``, or a Hugging Face model folder); ``None`` for full families.
        name: zoo name (default: the manifest's file name without its suffix).
        root: folder holding zoos.
        progress: show a tqdm bar over the entries to write.
        base_config: the base architecture as a :class:`~weightdiff.base_networks.BaseSpec` file
            (see :func:`plan_import`), recorded in the zoo's ``base/``; default the family's network.

    Raises:
        ManifestError: a bad row (naming the manifest, line and field), or a zoo folder holding
            another zoo; found before anything is written.
        WeightDiffError: a base network that does not load strictly into the family's network.
        OutputPathError: the zoo folder cannot be written.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    manifest = Path(manifest)
    plan = plan_import(manifest, base, name or manifest.stem, base_config)
    zoo_dir = check_writable(Path(root) / plan.recipe.name, "zoo folder")
    meta = _zoo_json(plan, manifest)
    _check_existing(zoo_dir, meta)
    try:
        zoo_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create zoo folder {zoo_dir}: {exc.strerror or exc}") from None
    write_json(zoo_dir / ZOO_FILE, meta)
    base_sha = None
    if plan.kind == "lora":
        assert plan.base_state is not None and plan.base_file is not None
        if network_problem(zoo_dir / BASE_DIR) is not None:
            data_family = get_family(plan.family).base_family or plan.recipe.tasks[0]  # the base's own data
            row = {"id": "base", "task": data_family,
                   "metrics": _base_metrics(plan.target.module, get_task(data_family).data(),
                                            get_task(data_family).metric),
                   "source": str(plan.base_file.resolve()), "source_sha256": meta["imported"]["base"]["sha256"]}
            publish_network(zoo_dir / BASE_DIR, row, plan.base_state)
        if plan.base_spec is not None:  # rewritten on resume: a kill may fall between the two
            record_base_spec(plan.base_spec, zoo_dir / BASE_DIR)
            if plan.base_spec.pretrained is not None:  # AutoPeftModel finds the base from the adapter config
                plan.target.lora_config.base_model_name_or_path = str((zoo_dir / BASE_DIR).resolve())
        base_sha = read_json(zoo_dir / BASE_DIR / ENTRY_FILE, "base network row")["sha256"]
    report = ImportReport(zoo_dir, len(plan.rows))
    todo = []
    for row in plan.rows:
        expect = dict(row.expect(), **({"base_sha256": base_sha} if base_sha else {}))
        if entry_problem(zoo_dir / ENTRIES_DIR / row.entry_id, expect=expect) is None:
            report.skipped += 1
        else:
            todo.append(row)
    bar = tqdm(total=len(todo), desc=f"import {plan.recipe.name}", unit="entry", disable=not progress or not todo)
    for row in todo:
        tensors = load_weights(row.weights)
        metrics = _measured(plan, row, tensors)
        extra = {"source": str(row.weights.parent if row.config is not None else row.weights),
                 **{k: v for k, v in row.expect().items() if k.startswith("source")}}
        write_entry(zoo_dir, plan.target, row.run(), TrainedCheckpoint(row.checkpoint, tensors, metrics),
                    family=plan.family, kind=plan.kind, code=row.code, descriptions=row.descriptions,
                    base_sha=base_sha, extra=extra)
        report.written += 1
        bar.update(1)
    bar.close()
    report.seconds = time.perf_counter() - start
    log.info("zoo %s: %d entries imported, %d already there, in %.1f s", zoo_dir, report.written, report.skipped,
             report.seconds)
    return report
