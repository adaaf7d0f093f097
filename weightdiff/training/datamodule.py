"""``ZooDataModule``: weight tokens + task conditions from a built zoo, for Lightning.

Each item is one zoo checkpoint:

- ``tokens`` (L, D): the checkpoint tokenised by a :class:`~weightdiff.weights.tokenizer.WeightTokenizer`
  fitted on the training split (optionally canonicalised first: LoRA gauge fixing, or hidden-unit
  alignment to a reference checkpoint);
- ``cond``: the raw condition of its task (:mod:`weightdiff.models.conditioning`) — for text, one of the
  task's descriptions drawn at random each time, so the model never sees only one phrasing; for
  labelled examples and unlabelled inputs, ``num_examples`` of them drawn afresh from the task's
  training split each time the item is read;
- ``fx``, ``fy``: a small batch of that task's training data for the functional loss.

Training uses the ``train`` split of the zoo; validation uses held-out tasks (the generator never
trains on them), so ``val/weight_loss`` measures generalisation to unseen tasks.

Which descriptions (:func:`zoo_descriptions`): a built zoo's tasks are described by their family
(``Task.descriptions()``, held-out paraphrase ``Task.heldout_description()``). An imported zoo
(``weightdiff zoo import``) brings its own: per task, the union of its rows' ``descriptions`` in
manifest order, duplicates dropped. When a task has at least :data:`MIN_DESCRIPTIONS_TO_HOLD_OUT`
of them, the last is its held-out paraphrase, never trained on (what ``benchmark
--from-description`` conditions on) and the others are its conditions; a task with a single
description trains on it and keeps its family's held-out paraphrase. What the generator was
trained on is saved in every checkpoint (:meth:`ZooDataModule.descriptions_record`) and exported
with it (``descriptions.json``).

The fitted tokenizer is part of the trained model: :meth:`ZooDataModule.state_dict` puts it (layout
and the statistics fitted at training time) into every Lightning checkpoint, with a record of the
zoo it came from (absolute path, counts, the base network's sha256 and adapter config), and
:meth:`~ZooDataModule.load_state_dict` restores it on resume instead of re-fitting it. Export reads
both from the checkpoint (:func:`tokenizer_from_state`), never from the zoo's current contents.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from weightdiff.errors import ConditionError, WeightDiffError, WeightFileError
from weightdiff.io import read_json, sha256_file
from weightdiff.models.conditioning import (
    DEFAULT_NUM_EXAMPLES, ConditionKind, examples_condition, none_condition, text_condition,
    unlabelled_condition,
)
from weightdiff.tasks import get_task
from weightdiff.weights.canonical import RunAlignment, canonicalize
from weightdiff.weights.layout import TokenLayout, parse_dtype
from weightdiff.weights.tokenizer import WeightTokenizer
from weightdiff.zoo import Zoo
from weightdiff.zoo.manifest import BASE_DIR, ENTRIES_DIR, ENTRY_FILE

#: A task of an imported zoo with at least this many descriptions holds its last one out of training.
MIN_DESCRIPTIONS_TO_HOLD_OUT = 2


def tokenizer_state(tokenizer: WeightTokenizer) -> dict[str, Any]:
    """A tokenizer as plain data (dicts, lists, strings, numbers, tensors): ``torch.load(weights_only=True)`` reads it."""
    layout = tokenizer.layout
    return {"layout": layout.to_json(), "mean": layout.mean.clone(), "std": layout.std.clone()}


def tokenizer_from_state(state: dict[str, Any], source: str) -> WeightTokenizer:
    """Rebuild the tokenizer saved by :func:`tokenizer_state`, exactly (errors name ``source``).

    The layout is laid out again from the saved names, shapes and dtypes, and must reproduce the
    saved layout field for field; the statistics are the saved tensors themselves.
    """
    try:
        saved, mean, std = state["layout"], state["mean"], state["std"]
        specs = {d["name"]: d for d in (*saved["tensors"], *saved["passthrough"])}
        shapes = {name: (tuple(specs[name]["shape"]), parse_dtype(specs[name]["dtype"])) for name in saved["key_order"]}
        layout = TokenLayout.from_shapes(shapes, saved["token_size"], [d["name"] for d in saved["tensors"]])
        if saved["normalize"]:
            layout = layout.with_stats(mean, std)
    except (KeyError, TypeError, ValueError, WeightDiffError) as exc:
        raise WeightFileError(f"{source}: the saved tokenizer is incomplete or malformed: "
                              f"{type(exc).__name__}: {exc}") from None
    if layout.to_json() != saved or not (torch.equal(layout.mean, mean) and torch.equal(layout.std, std)):
        raise WeightFileError(f"{source}: the saved tokenizer layout does not rebuild exactly "
                              f"(format_version {saved.get('format_version')!r})")
    return WeightTokenizer(layout)


@dataclass(frozen=True)
class TaskDescriptions:
    """The descriptions of one task: those its conditions are drawn from, and its held-out paraphrase.

    Attributes:
        train: the phrasings text conditions are drawn from (training and validation items).
        heldout: a phrasing never trained on; ``None``: the family's ``Task.heldout_description()``.
        entry_file: the ``entry.json`` of the task's first row, for a zoo's own descriptions;
            ``None`` for the family's.
    """

    train: tuple[str, ...]
    heldout: str | None = None
    entry_file: str | None = None


def zoo_descriptions(zoo: Zoo) -> dict[str, TaskDescriptions] | None:
    """Per task, the descriptions an imported zoo's rows carry (see the module docstring); ``None``
    for a built zoo, whose tasks are described by their family.

    Rows are taken in manifest order (the order of ``zoo.json``'s ``imported.entries``; by id for
    rows it does not list), so the first description of a task is the first one its manifest gives.
    """
    if zoo.imported is None:
        return None
    order = {entry_id: i for i, entry_id in enumerate(zoo.imported.get("entries", {}))}
    rows = sorted(zoo.rows(), key=lambda r: (order.get(r["id"], len(order)), r["id"]))
    texts: dict[str, dict[str, None]] = {}
    files: dict[str, str] = {}
    for row in rows:
        texts.setdefault(row["task"], {}).update(dict.fromkeys(row["descriptions"]))
        files.setdefault(row["task"], str(zoo.path / ENTRIES_DIR / row["id"] / ENTRY_FILE))
    out = {}
    for task, unique in texts.items():
        found = list(unique)
        held = len(found) >= MIN_DESCRIPTIONS_TO_HOLD_OUT
        out[task] = TaskDescriptions(tuple(found[:-1] if held else found), found[-1] if held else None, files[task])
    return out


class TaskConditions:
    """Per-task condition material, computed once: text features, codes, training data.

    Args:
        task_names: the tasks of the zoo.
        kind: the condition the items carry.
        descriptions: (text) per task, the phrasings its conditions are drawn from; tasks not
            given use their family's ``Task.descriptions()``.
    """

    def __init__(self, task_names: list[str], kind: ConditionKind,
                 descriptions: Mapping[str, TaskDescriptions] | None = None):
        self.kind = kind
        self.tasks = {name: get_task(name) for name in task_names}
        self.data = {name: task.data() for name, task in self.tasks.items()}
        given = descriptions or {}
        self.descriptions = {name: given.get(name) or TaskDescriptions(tuple(task.descriptions()))
                             for name, task in self.tasks.items()}
        self.text: dict[str, torch.Tensor] = {}
        if kind == "text":
            for name, desc in self.descriptions.items():
                try:
                    self.text[name] = text_condition(desc.train, self.tasks[name].family_name)  # (n_desc, 384 + F)
                except ConditionError as exc:
                    if desc.entry_file is None:
                        raise
                    raise ConditionError(f"{desc.entry_file}: field 'descriptions' of task {name!r}: {exc}") from None

    def raw(self, name: str, rng: random.Random, k: int, gen: torch.Generator):
        if self.kind == "text":
            feats = self.text[name]
            return feats[rng.randrange(feats.shape[0])]
        if self.kind == "code":
            return self.tasks[name].code().float()
        if self.kind == "examples":
            d = self.data[name]
            return examples_condition(d.x_train, d.y_train, k, gen)
        if self.kind == "unlabelled":
            return unlabelled_condition(self.data[name].x_train, k, gen)
        return none_condition(1)[0]

    def dims(self, num_examples: int) -> dict[str, int]:
        first = next(iter(self.tasks.values()))
        if self.kind == "text":
            return {"raw_dim": int(next(iter(self.text.values())).shape[1])}
        if self.kind == "code":
            return {"raw_dim": int(first.code().numel())}
        x_dim = math.prod(int(s) for s in first.input_shape)
        if self.kind == "examples":
            return {"x_dim": x_dim, "num_classes": int(first.num_classes)}
        if self.kind == "unlabelled":
            return {"x_dim": x_dim}
        return {"raw_dim": 1}

    def record(self) -> dict[str, Any]:
        """The descriptions as :data:`~weightdiff.models.generator.DESCRIPTIONS_FILE` of an exported
        generator records them: ``source`` (``"zoo"``: the zoo's own, ``"family"``: the family's)
        and per task ``train`` (the phrasings trained on) and ``heldout`` (``None``: the family's)."""
        own = any(d.entry_file is not None for d in self.descriptions.values())
        return {"source": "zoo" if own else "family",
                "tasks": {name: {"train": list(d.train), "heldout": d.heldout}
                          for name, d in sorted(self.descriptions.items())}}


class ZooTokenDataset(Dataset):
    """Zoo entries as (tokens, condition, functional batch) items.

    Tokens are encoded once and kept in memory when ``cache`` is set (a 600-adapter zoo is a few
    MB); otherwise each item is read lazily from the memory-mapped safetensors file.
    """

    def __init__(self, rows: list[dict], prepare: Callable[[dict], dict[str, torch.Tensor]],
                 tokenizer: WeightTokenizer, conds: TaskConditions, *, num_examples: int, functional_batch: int,
                 seed: int, cache: bool):
        self.rows, self.prepare, self.tokenizer, self.conds = rows, prepare, tokenizer, conds
        self.num_examples, self.functional_batch = num_examples, functional_batch
        self.seed = seed
        self._epoch_calls = 0
        self.tokens = torch.stack([self._encode(r) for r in rows]) if cache else None

    def _encode(self, row: dict) -> torch.Tensor:
        return self.tokenizer.encode(self.prepare(row))[0]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        # A fresh stream per (item, call) keeps draws varied across epochs yet seed-determined.
        self._epoch_calls += 1
        rng = random.Random(hash((self.seed, i, self._epoch_calls)))
        gen = torch.Generator().manual_seed(rng.randrange(2**62))
        item = {"tokens": self.tokens[i] if self.tokens is not None else self._encode(row),
                "cond": self.conds.raw(row["task"], rng, self.num_examples, gen)}
        if self.functional_batch > 0:
            d = self.conds.data[row["task"]]
            idx = torch.randint(0, d.x_train.shape[0], (self.functional_batch,), generator=gen)
            item["fx"], item["fy"] = d.x_train[idx], d.y_train[idx]
        return item


class ZooDataModule(L.LightningDataModule):
    """Batches of weight tokens and task conditions from ``checkpoints_zoo/<name>``.

    Args:
        zoo: path of a built zoo.
        token_size: entries per token (D).
        normalize: per-tensor z-scoring of weights before tokenising.
        canonicalize: remove weight-space symmetries first (LoRA gauge / hidden-unit permutations).
        align_runs: (full networks, with ``canonicalize``) permute every checkpoint of a training
            run as its run's last checkpoint aligns to the reference
            (:class:`~weightdiff.weights.canonical.RunAlignment`), so that a run's checkpoints stay
            as close as they are; by default each checkpoint is aligned on its own.
        condition: which condition the items carry (must match the model's provider; linked).
        num_examples: examples per item for the ``examples`` (labelled) and ``unlabelled``
            (inputs only) conditions, drawn from the task's training split.
        functional_batch: task examples per item for the functional loss (0 = none).
        batch_size, num_workers, seed: loader settings.
        cache_tokens: encode every checkpoint once and keep the tokens in memory.
    """

    def __init__(self, zoo: str, token_size: int = 64, normalize: bool = True, canonicalize: bool = True,
                 condition: ConditionKind = "text", num_examples: int = DEFAULT_NUM_EXAMPLES,
                 functional_batch: int = 64, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 cache_tokens: bool = True, align_runs: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.zoo_path = Path(zoo)
        self._tokenizer: WeightTokenizer | None = None
        self._zoo_record: dict[str, Any] | None = None
        self._train: ZooTokenDataset | None = None
        self._val: ZooTokenDataset | None = None

    # ------------------------------------------------------------------ known after data loading
    @cached_property
    def zoo(self) -> Zoo:
        return Zoo.open(self.zoo_path)

    @cached_property
    def train_rows(self) -> list[dict]:
        rows = self.zoo.rows(split="train")
        if not rows:
            raise WeightDiffError(f"zoo {self.zoo_path} has no training entries (split 'train')")
        return rows

    @cached_property
    def heldout_rows(self) -> list[dict]:
        return self.zoo.rows(split="heldout")

    @cached_property
    def reference(self) -> dict | None:
        """Alignment reference for full-network zoos: the first training checkpoint."""
        if self.zoo.kind != "full" or not self.hparams.canonicalize:
            return None
        return self.zoo.load(self.train_rows[0]["id"])

    @cached_property
    def run_alignment(self) -> RunAlignment | None:
        """The shared permutation of each run's checkpoints (``align_runs``), else None."""
        if self.reference is None or not self.hparams.align_runs:
            return None
        return RunAlignment(self.train_rows + self.heldout_rows, self.zoo.load, self.reference)

    def prepared(self, row: dict) -> dict[str, torch.Tensor]:
        """A zoo entry as the tokenizer sees it (canonicalised when ``canonicalize`` is set)."""
        state = self.zoo.load(row["id"])
        if self.run_alignment is not None:
            return self.run_alignment(state, row["run_id"])
        return canonicalize(state, self.zoo.kind, self.reference) if self.hparams.canonicalize else state

    @property
    def tokenizer(self) -> WeightTokenizer:
        """Fitted on the training split on first use, or restored from a checkpoint (:meth:`load_state_dict`)."""
        if self._tokenizer is None:
            tok = WeightTokenizer.from_state_dict(self.prepared(self.train_rows[0]), token_size=self.hparams.token_size)
            if self.hparams.normalize:
                tok = tok.fit(self.prepared(r) for r in self.train_rows)
            self._tokenizer = tok
        return self._tokenizer

    @property
    def zoo_record(self) -> dict[str, Any]:
        """What the generator is trained on: the zoo's identity, absolute path, counts and (LoRA) base network."""
        if self._zoo_record is None:
            zoo = self.zoo
            record: dict[str, Any] = {
                "path": str(self.zoo_path.resolve()), "name": zoo.name, "kind": zoo.kind, "family": zoo.family,
                "recipe": zoo.recipe, "num_train_tasks": len({r["task"] for r in self.train_rows}),
                "num_train_checkpoints": len(self.train_rows),
                "num_heldout_tasks": len({r["task"] for r in self.heldout_rows}),
            }
            if zoo.kind == "lora":
                base_dir = self.zoo_path.resolve() / BASE_DIR
                file = base_dir / read_json(base_dir / ENTRY_FILE, "base row")["file"]
                record["base"] = {"file": str(file), "sha256": sha256_file(file)}
                record["adapter_config"] = zoo.adapter_config()
            self._zoo_record = record
        return self._zoo_record

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The fitted tokenizer, the zoo record and (text) the descriptions, saved in every Lightning checkpoint."""
        state = {"tokenizer": tokenizer_state(self.tokenizer), "zoo": self.zoo_record}
        record = self.descriptions_record
        if record is not None:
            state["descriptions"] = record
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: train on with the checkpoint's tokenizer (never a re-fit on today's zoo)."""
        restored = tokenizer_from_state(state_dict["tokenizer"], "checkpoint")
        if restored.layout.to_json() != self.tokenizer.layout.to_json():
            raise WeightDiffError(f"zoo {self.zoo_path}: its entries are laid out differently from the checkpoint's "
                                  "tokenizer (another network?); resume from a checkpoint of this zoo")
        self._check_descriptions(state_dict.get("descriptions"))
        record = state_dict["zoo"]
        if "base" in record and record["base"]["sha256"] != self.zoo_record.get("base", {}).get("sha256"):
            raise WeightFileError(f"{self.zoo_record.get('base', {}).get('file')}: sha256 differs from the base "
                                  f"network the checkpoint was trained with ({record['base']['sha256']})")
        changed = not (torch.equal(restored.layout.mean, self.tokenizer.layout.mean)
                       and torch.equal(restored.layout.std, self.tokenizer.layout.std))
        self._tokenizer, self._zoo_record = restored, record
        if changed:  # datasets already encoded with the re-fitted statistics: encode them again
            self._train = self._val = None
            self.setup("fit")

    def _check_descriptions(self, saved: dict[str, Any] | None) -> None:
        """Refuse to resume on descriptions other than those the checkpoint was trained on."""
        ours = self.descriptions_record
        if saved is None or ours is None or saved == ours:
            return
        changed = sorted(t for t in {*saved["tasks"], *ours["tasks"]}
                         if saved["tasks"].get(t) != ours["tasks"].get(t))
        task = changed[0] if changed else None
        raise WeightDiffError(f"zoo {self.zoo_path}: the descriptions of task {task!r} are {ours['tasks'].get(task)!r} "
                              f"(source {ours['source']!r}), the checkpoint was trained on "
                              f"{saved['tasks'].get(task)!r} (source {saved['source']!r}); resume from a checkpoint "
                              "of this zoo")

    @cached_property
    def conditions(self) -> TaskConditions:
        """Condition material of every task of the zoo; text from the zoo's own descriptions if it has them."""
        names = sorted({r["task"] for r in self.train_rows} | {r["task"] for r in self.heldout_rows})
        return TaskConditions(names, self.hparams.condition, zoo_descriptions(self.zoo))

    @property
    def descriptions_record(self) -> dict[str, Any] | None:
        """(text condition) The descriptions trained on, per task, with their held-out paraphrase
        (:meth:`TaskConditions.record`); ``None`` for other conditions."""
        return self.conditions.record() if self.hparams.condition == "text" else None

    @property
    def spec(self) -> dict[str, Any]:
        """Sizes the model needs, linked into ``model.spec`` by the CLI."""
        lay = self.tokenizer.layout
        return {
            "token_size": int(self.hparams.token_size),
            "num_tensors": int(lay.num_tensors), "max_chunks": int(lay.max_chunks),
            "max_depth": int(lay.max_depth), "num_kinds": int(lay.num_kinds),
            "token_ids": {"tensor_index": lay.token_tensor_index.tolist(),
                          "chunk_index": lay.token_chunk_index.tolist(),
                          "depth": lay.token_depth.tolist(), "kind": lay.token_kind.tolist()},
            "token_length": lay.token_length.tolist(),
            "condition_dims": self.conditions.dims(self.hparams.num_examples),
            "zoo": {"path": str(self.zoo_path), "name": self.zoo.name, "kind": self.zoo.kind,
                    "family": self.zoo.family},
        }

    def train_tokens(self) -> torch.Tensor:
        """Tokens ``(N, L, D)`` of every training entry, in zoo order (cached ones when ``cache_tokens``)."""
        if self._train is not None and self._train.tokens is not None:
            return self._train.tokens
        return torch.stack([self.tokenizer.encode(self.prepared(r))[0] for r in self.train_rows])

    def condition_vectors(self) -> torch.Tensor:
        """(text, code) The raw condition vectors ``(N, C)`` the training entries are drawn with: one
        per training task (its code), or every phrasing of it (text features)."""
        names = sorted({r["task"] for r in self.train_rows})
        cond = self.conditions
        if cond.kind == "text":
            return torch.cat([cond.text[name] for name in names]).float()
        if cond.kind == "code":
            return torch.stack([cond.tasks[name].code().float() for name in names])
        raise WeightDiffError(f"condition_vectors: a {cond.kind!r} condition has no vector per task")

    def functional_parts(self):
        """(tokenizer, target network) for the functional loss."""
        return self.tokenizer, self.zoo.target()

    # ---------------------------------------------------------------------------------- loaders
    def setup(self, stage: str) -> None:
        common = dict(num_examples=self.hparams.num_examples, functional_batch=self.hparams.functional_batch,
                      cache=self.hparams.cache_tokens)
        if self._train is None:
            self._train = ZooTokenDataset(self.train_rows, self.prepared, self.tokenizer, self.conditions,
                                          seed=self.hparams.seed, **common)
        if self._val is None:
            rows = self.heldout_rows or self.train_rows[: max(1, len(self.train_rows) // 10)]
            self._val = ZooTokenDataset(rows, self.prepared, self.tokenizer, self.conditions,
                                        seed=self.hparams.seed + 1, **common)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self._train, batch_size=self.hparams.batch_size, shuffle=True, drop_last=False,
                          num_workers=self.hparams.num_workers, generator=g,
                          persistent_workers=self.hparams.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._val, batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)
