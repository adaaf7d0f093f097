"""Read a built zoo: manifest rows, lazily loaded weights, the target network, checks and stats.

``Zoo.open(path)`` reads only ``zoo.json``; rows are read on first use and weights only when
asked for, through memory-mapped ``safetensors.safe_open``, so a zoo larger than memory can be
streamed entry by entry::

    >>> zoo = Zoo.open("checkpoints_zoo/rotdigits-lora")
    >>> row = zoo.rows(split="heldout")[0]
    >>> params = zoo.load(row["id"])             # {"base_model.model.conv1.lora_A.weight": ...}
    >>> zoo.target().accuracy({k: v[None] for k, v in params.items()}, x, y)
"""

from __future__ import annotations

import copy
import functools
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from weightdiff.base_networks import BaseSpec, build_base, recorded_base_spec
from weightdiff.errors import ManifestError, WeightDiffError, WeightFileError
from weightdiff.tasks.metrics import METRICS
from weightdiff.io import check_finite, check_weight_dtypes, load_weights, read_json
from weightdiff.zoo.manifest import (BASE_DIR, ENTRIES_DIR, ENTRY_FILE, PARENTS_DIR, entry_problem,
                                     network_problem, read_row, read_zoo_json)
from weightdiff.zoo.recipe import Recipe
from weightdiff.targets import Target, load_base_network, make_lora_config

ADAPTER_CONFIG_FILE = "adapter_config.json"


def _stats(values: Iterable[float]) -> dict[str, float | None]:
    """``{"n", "mean", "min", "max"}`` of a list of scores (``None`` when empty: valid JSON)."""
    vals = list(values)
    if not vals:
        return {"n": 0, "mean": None, "min": None, "max": None}
    return {"n": len(vals), "mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}


def _test_metric(rows: Sequence[dict[str, Any]]) -> str:
    """The test score the rows record: ``test_acc`` where any row has it, else the most common
    ``test_<metric>`` of a known metric (``test_mse`` for a regression zoo; the names
    :func:`weightdiff.zoo.manifest.validate_row` accepts); ``test_acc`` for an empty zoo."""
    known = {f"test_{m}" for m in METRICS}
    counts = Counter(k for r in rows for k in r.get("metrics", {}) if k in known)
    if "test_acc" in counts or not counts:
        return "test_acc"
    return max(sorted(counts), key=counts.__getitem__)


class Zoo:
    """A built zoo folder (see :mod:`weightdiff.zoo.manifest` for the layout).

    Attributes:
        path: the zoo folder.
        name, kind, family: from ``zoo.json``.
        recipe: the recipe stored in ``zoo.json``, as a plain dict (JSON-able).
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.name: str = meta["name"]
        self.kind: str = meta["kind"]
        self.family: str = meta["family"]
        self.recipe: dict[str, Any] = meta["recipe"]
        self.imported: dict[str, Any] | None = meta.get("imported")  # zoos of `weightdiff zoo import`
        self._rows: list[dict[str, Any]] | None = None
        self._dirs: dict[str, Path] = {}
        self._by_id: dict[str, dict[str, Any]] = {}
        self._target: Any = None
        self._base: nn.Module | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> Zoo:
        """Open a zoo folder.

        Raises:
            ManifestError: no ``zoo.json``, or a corrupt/incomplete one (naming file and field).
        """
        path = Path(path)
        return cls(path, read_zoo_json(path))

    @functools.cached_property
    def parsed_recipe(self) -> Recipe:
        """The stored recipe as a validated :class:`Recipe` (parsed once)."""
        return Recipe.from_dict(self.recipe, str(self.path / "zoo.json"))

    # ------------------------------------------------------------------------------------ rows
    def _entry_dirs(self) -> list[Path]:
        entries = self.path / ENTRIES_DIR
        if not entries.is_dir():
            return []
        # Hidden names are temporary folders of a build in progress (or one that was killed).
        return sorted(p for p in entries.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _load_rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            rows, dirs = [], {}
            for d in self._entry_dirs():
                row = read_row(d, check_id=False)
                if row["id"] in dirs:
                    raise ManifestError(f"{d / ENTRY_FILE}: field 'id' = {row['id']!r} duplicates the id of "
                                        f"{dirs[row['id']] / ENTRY_FILE}")
                dirs[row["id"]] = d
                rows.append(row)
            self._rows = sorted(rows, key=lambda r: r["id"])
            self._by_id = {r["id"]: r for r in rows}
            self._dirs = dirs
        return self._rows

    def rows(self, split: str | None = None) -> list[dict[str, Any]]:
        """Manifest rows sorted by id, optionally of one split (``"train"`` / ``"heldout"``).

        Raises:
            ManifestError: a row with a missing or ill-typed field, or a duplicate id (naming
                the file and the field).
        """
        rows = self._load_rows()
        return [r for r in rows if split is None or r["split"] == split]

    def row(self, entry_id: str) -> dict[str, Any]:
        """The manifest row of one entry."""
        self._load_rows()
        if entry_id not in self._dirs:
            raise ManifestError(f"{self.path}: no entry with id {entry_id!r}")
        return self._by_id[entry_id]

    def tasks(self, split: str | None = None) -> list[str]:
        """Distinct task names of the rows (optionally of one split), sorted."""
        return sorted({r["task"] for r in self.rows(split)})

    def entry_dir(self, entry_id: str) -> Path:
        """Folder of one entry (loadable with ``Target.load_module`` / ``PeftModel.from_pretrained``)."""
        self.row(entry_id)
        return self._dirs[entry_id]

    def weight_path(self, entry_id: str) -> Path:
        return self.entry_dir(entry_id) / self.row(entry_id)["file"]

    # --------------------------------------------------------------------------------- weights
    def load(self, entry_id: str, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of one entry (all, or only ``keys``), read through a memory map.

        Only the requested tensors are read from disk. The hash is not checked here (see
        :meth:`verify`).

        Raises:
            ManifestError: unknown entry id or key.
            WeightFileError: the weight file is missing or not safetensors, or a tensor is not float32.
            NonFiniteWeightsError: a requested tensor holds NaN/Inf (naming the file and tensor).
        """
        path = self.weight_path(entry_id)
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                wanted = names if keys is None else list(keys)
                unknown = [k for k in wanted if k not in names]
                if unknown:
                    raise ManifestError(f"{path}: no tensor '{unknown[0]}'; the file holds {names}")
                tensors = {k: f.get_tensor(k) for k in wanted}
        except (SafetensorError, OSError) as exc:
            raise WeightFileError(f"{path} is not a readable safetensors file: {exc}") from None
        check_finite(tensors, str(path))  # a diverged run must not reach training as data
        check_weight_dtypes(tensors, str(path))
        return tensors

    def base_file(self) -> Path:
        """The weight file of the frozen base network (LoRA zoos)."""
        if self.kind != "lora":
            raise ManifestError(f"{self.path}: a {self.kind} zoo has no base network")
        return self.path / BASE_DIR / read_json(self.path / BASE_DIR / ENTRY_FILE, "base row")["file"]

    def base_state(self) -> dict[str, torch.Tensor]:
        """State dict of the frozen base network (LoRA zoos)."""
        return load_weights(self.base_file())

    def base_spec(self) -> BaseSpec | None:
        """The base architecture recorded in ``base/`` (``base_spec.json``), or ``None``: the family's network.

        Raises:
            TargetMismatchError: a recorded spec that is invalid (naming the file and field).
        """
        if self.kind != "lora":
            return None
        return recorded_base_spec(self.path / BASE_DIR)

    def _base_network(self) -> nn.Module | BaseSpec:
        """What the base weights load into: the recorded spec, or the family's untrained network."""
        spec = self.base_spec()
        return spec if spec is not None else self.parsed_recipe.build_network()

    def base_module(self) -> nn.Module:
        """The frozen base network (eval mode, no gradients), loaded strictly."""
        if self._base is None:
            network = self._base_network()
            network = build_base(network, str(self.path / BASE_DIR)) if isinstance(network, BaseSpec) else network
            self._base = load_base_network(network, self.base_state(), self.base_file())
        return copy.deepcopy(self._base)

    def adapter_config(self) -> dict[str, Any]:
        """The PEFT ``adapter_config.json`` of the entries (LoRA zoos)."""
        if self.kind != "lora":
            raise ManifestError(f"{self.path}: a {self.kind} zoo has no adapter config")
        for row in self.rows():
            cfg = self.entry_dir(row["id"]) / ADAPTER_CONFIG_FILE
            if cfg.is_file():
                return read_json(cfg, "adapter config")
        return self.parsed_recipe.lora_config()

    def target(self) -> Any:
        """The :class:`weightdiff.targets.Target` that evaluates this zoo's weight sets (cached)."""
        if self._target is None:
            if self.kind == "full":
                self._target = Target.build("full", self.parsed_recipe.build_network())
            else:
                self._target = Target.build("lora", self._base_network(), base_state=self.base_state(),
                                            lora_config=self.parsed_recipe.lora_config(), source=self.base_file())
        return self._target

    # ---------------------------------------------------------------------------------- checks
    def verify(self) -> list[tuple[str, str]]:
        """Re-check every entry; return ``[(entry_id, problem)]`` (empty when the zoo is intact).

        Checks the base/parents, every row (fields, id = folder name, planned task/seed/split),
        the weight file's sha256, that it is finite float32 safetensors whose names and shapes load
        strictly into the target network, the adapter config of LoRA entries, and that every
        entry the recipe plans exists.
        """
        problems: list[tuple[str, str]] = []
        recipe = self.parsed_recipe
        base_sha = None
        if self.kind == "lora":
            why = network_problem(self.path / BASE_DIR)
            if why is None:
                base_sha = read_json(self.path / BASE_DIR / ENTRY_FILE, "base row")["sha256"]
                try:
                    self.base_module()
                except (WeightDiffError, RuntimeError) as exc:
                    why = f"base network does not load strictly: {exc}"
            if why is not None:
                return [("base", why)]  # every adapter depends on it
        for p in range(recipe.parents):
            why = network_problem(self.path / PARENTS_DIR / f"p{p}")
            if why is not None:
                problems.append((f"parent p{p}", why))
        planned = self.planned()
        if base_sha is not None:
            planned = {eid: dict(expect, base_sha256=base_sha) for eid, expect in planned.items()}
        source = "the import manifest" if self.imported is not None else "the zoo's recipe"
        target = self.target()
        seen = set()
        for d in self._entry_dirs():
            seen.add(d.name)
            if d.name not in planned:
                problems.append((d.name, f"not planned by {source}"))
                continue
            why = entry_problem(d, expect=planned[d.name]) or self._check_weights(d, target)
            if why is not None:
                problems.append((d.name, why))
        missing = ("listed in the import manifest but not imported" if self.imported is not None
                   else "planned by the recipe but not built")
        problems += [(eid, f"missing: {missing}") for eid in planned if eid not in seen]
        return sorted(problems)

    def planned(self) -> dict[str, dict[str, Any]]:
        """Every planned entry id with the row fields its entry must have.

        A built zoo plans the runs of its recipe; an imported zoo the rows of its import manifest
        (``zoo.json``'s ``imported.entries``, which also pin the hash of each source checkpoint).
        """
        if self.imported is not None:
            return {eid: dict(expect) for eid, expect in self.imported["entries"].items()}
        return {run.entry_id(c): {"task": run.task, "split": run.split, "seed": run.seed, "checkpoint": c}
                for run in self.parsed_recipe.plan() for c in run.checkpoints}

    def _check_weights(self, entry_dir: Path, target: Any) -> str | None:
        row = read_json(entry_dir / ENTRY_FILE)
        try:
            params = load_weights(entry_dir / row["file"])
            check_weight_dtypes(params, str(entry_dir / row["file"]))
            target.check(params, str(entry_dir / row["file"]))
            if self.kind == "lora":
                cfg = make_lora_config(read_json(entry_dir / ADAPTER_CONFIG_FILE, "adapter config"))
                want = self.parsed_recipe.lora_config()
                if (cfg.r, float(cfg.lora_alpha), sorted(cfg.target_modules)) != (
                        want["r"], float(want["lora_alpha"]), sorted(want["target_modules"])):
                    return (f"{entry_dir / ADAPTER_CONFIG_FILE}: r={cfg.r}, lora_alpha={cfg.lora_alpha}, "
                            f"target_modules={sorted(cfg.target_modules)}; expected {want}")
        except WeightDiffError as exc:
            return str(exc)
        n = sum(int(t.numel()) for t in params.values())
        if n != row["num_params"]:
            return f"{entry_dir / ENTRY_FILE}: num_params = {row['num_params']}, the file holds {n}"
        return None

    # ----------------------------------------------------------------------------------- stats
    def info(self) -> dict[str, Any]:
        """Counts and the test score (n/mean/min/max) overall, per split, held-out kind and task.

        The score is ``test_acc`` where the rows record it, else the test metric they do record
        (``test_mse`` for a regression zoo); ``"metric"`` names it and it is the key of every block.
        """
        rows = self.rows()
        planned = len(self.planned())
        key = _test_metric(rows)
        acc = lambda rs: _stats(r["metrics"][key] for r in rs if key in r["metrics"])  # noqa: E731
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "family": self.family, "path": str(self.path),
            "entries": len(rows), "planned_entries": planned, "runs": len({r["run_id"] for r in rows}),
            "tasks": len({r["task"] for r in rows}), "metric": key, key: acc(rows),
            "num_params": rows[0]["num_params"] if rows else 0, "splits": {}, "heldout_kinds": {}, "per_task": {},
        }
        for split in sorted({r["split"] for r in rows}):
            rs = [r for r in rows if r["split"] == split]
            out["splits"][split] = {"entries": len(rs), "tasks": len({r["task"] for r in rs}), key: acc(rs)}
        for kind in sorted({r.get("heldout_kind") for r in rows} - {None}):
            rs = [r for r in rows if r.get("heldout_kind") == kind]
            out["heldout_kinds"][kind] = {"entries": len(rs), "tasks": len({r["task"] for r in rs}),
                                          key: acc(rs)}
        by_task: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_task.setdefault(r["task"], []).append(r)
        for task, rs in sorted(by_task.items()):
            out["per_task"][task] = {"split": rs[0]["split"], "heldout_kind": rs[0].get("heldout_kind"),
                                     "entries": len(rs), key: acc(rs)}
        if self.kind == "lora" and (self.path / BASE_DIR / ENTRY_FILE).is_file():
            out["base"] = read_json(self.path / BASE_DIR / ENTRY_FILE, "base row").get("metrics", {})
        entries = self.path / ENTRIES_DIR
        out["temporary_dirs"] = (sum(1 for p in entries.iterdir() if p.name.startswith("."))
                                 if entries.is_dir() else 0)
        return out
