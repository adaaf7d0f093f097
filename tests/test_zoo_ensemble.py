"""scripts/zoo_ensemble.py: one adapter, the ensemble and the picked adapter of a zoo's own seeds."""

from __future__ import annotations

import importlib.util
from collections import defaultdict

import pytest

from tests.conftest import REPO
from weightdiff.zoo import Zoo

spec = importlib.util.spec_from_file_location("zoo_ensemble", REPO / "scripts" / "zoo_ensemble.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_one_adapter_scores_what_the_zoo_recorded(tiny_lora_zoo):
    """The tiny zoo trains one adapter per task: its ensemble and its pick are that adapter."""
    zoo = Zoo.open(tiny_lora_zoo)
    recorded = defaultdict(list)
    for row in zoo.rows("train"):
        recorded[row["task"]].append(row["metrics"]["test_acc"])
    names = sorted(recorded)[:3]
    out = probe.seed_rows(zoo, names)
    assert out["tasks"] == 3 and out["adapters_per_task"] == 1
    # the probe re-evaluates every adapter: its mean is the zoo's recorded test accuracy, up to the
    # float32 rounding of accuracies over a few hundred test examples
    expected = 100 * sum(recorded[t][0] for t in names) / 3
    assert out["single"] == pytest.approx(expected, abs=1e-4)
    assert out["ensemble"] == pytest.approx(out["single"], abs=1e-4)  # argmax of one softmax is its argmax
    assert out["best_of"] == pytest.approx(out["single"], abs=1e-4)


def test_a_task_the_zoo_does_not_train_is_refused(tiny_lora_zoo):
    with pytest.raises(SystemExit, match="no training adapters"):
        probe.seed_rows(Zoo.open(tiny_lora_zoo), ["rotdigits:angle=7,flip=0"])


def test_with_two_seeds_the_pick_is_one_of_them(tmp_path):
    import yaml

    from weightdiff.zoo import Recipe, build_zoo

    data = yaml.safe_load((REPO / "configs/zoo/tiny-rotdigits-lora.yaml").read_text())
    data.update(runs=2, name="tiny-two-seeds")
    zoo = Zoo.open(build_zoo(Recipe.from_dict(data), tmp_path, workers=1, progress=False))
    recorded = defaultdict(list)
    for row in zoo.rows("train"):
        recorded[row["task"]].append(row["metrics"]["test_acc"])
    names = sorted(recorded)[:2]
    out = probe.seed_rows(zoo, names)
    assert out["adapters_per_task"] == 2
    assert out["single"] == pytest.approx(100 * sum(sum(recorded[t]) / 2 for t in names) / 2, abs=1e-4)
    low, high = (100 * sum(f(recorded[t]) for t in names) / 2 for f in (min, max))
    assert low - 1e-4 <= out["best_of"] <= high + 1e-4
