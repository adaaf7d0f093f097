"""Checkpoint zoos: recipes, resumable sharded builds, and a lazily loading store.

``load_recipe("configs/zoo/rotdigits-lora.yaml")`` → :class:`Recipe`; ``build_zoo(recipe, root,
shard=(i, n), workers=K)`` fills ``<root>/<name>``; ``import_zoo(manifest, base)`` fills it with
existing checkpoints instead; ``Zoo.open(path)`` reads it back.
"""

from weightdiff.zoo.build import (BuildReport, LoopTrainer, TrainedCheckpoint, ZooTrainer, build_zoo, parse_shard,
                                  run_build, shard_runs)
from weightdiff.zoo.importer import ImportReport, import_zoo, plan_import, read_manifest
from weightdiff.zoo.recipe import Recipe, RotationGrid, RunSpec, load_recipe, task_slug
from weightdiff.zoo.store import Zoo

__all__ = [
    "BuildReport", "ImportReport", "LoopTrainer", "Recipe", "RotationGrid", "RunSpec", "TrainedCheckpoint", "Zoo",
    "ZooTrainer", "build_zoo", "import_zoo", "load_recipe", "parse_shard", "plan_import", "read_manifest",
    "run_build", "shard_runs", "task_slug",
]
