"""The ``digits-mlp`` family: a million-parameter WideMLP on the digits, its recipes and a real tiny build."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
from torch import nn

from weightdiff.errors import RecipeError
from weightdiff.io import load_weights
from weightdiff.tasks import DigitsMLPTask, get_family, get_task, list_families
from weightdiff.tasks.networks import WideMLP
from weightdiff.zoo import Recipe, Zoo, build_zoo, load_recipe
from weightdiff.zoo.build import WEIGHTS_FILE
from weightdiff.zoo.manifest import PARENTS_DIR
from weightdiff.zoo.training import evaluate_module

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "zoo"
DIGITS_MLP_PARAMS = 1_126_410  # 64·1024 + 1024 + 1024² + 1024 + 1024·10 + 10, as WideMLP's docstring works out
CHANCE = 0.1  # ten balanced classes


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rms_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """RMS over all weights of ``a - b``."""
    total = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)
    return (total / sum(t.numel() for t in a.values())) ** 0.5


# --------------------------------------------------------------------------------- family, network
def test_the_family_is_registered_in_code_and_as_an_entry_point():
    assert "digits-mlp" in list_families()
    assert get_family("digits-mlp") is DigitsMLPTask
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="weightdiff.tasks") if ep.name == "digits-mlp"]
    assert ep.load() is DigitsMLPTask
    task = get_task("digits-mlp")
    assert (task.name, task.kind, task.num_classes, task.input_shape) == ("digits-mlp", "full", 10, (1, 8, 8))


def test_the_task_is_the_digits_task_with_another_network():
    mlp, cnn = get_task("digits-mlp"), get_task("digits")
    for split in ("train", "val", "test"):
        (xm, ym), (xc, yc) = mlp.data().split(split), cnn.data().split(split)
        assert torch.equal(xm, xc) and torch.equal(ym, yc)
    assert mlp.descriptions() == cnn.descriptions()
    net = mlp.build_network()
    assert isinstance(net, WideMLP) and _params(net) == DIGITS_MLP_PARAMS
    assert net(mlp.data().x_test[:5]).shape == (5, 10)


@pytest.mark.parametrize("in_features, width, classes", [(64, 1024, 10), (1, 1, 2), (40, 7, 3)])
def test_wide_mlp_has_the_parameters_and_names_its_docstring_states(in_features, width, classes):
    net = WideMLP(in_features=in_features, width=width, num_classes=classes)
    want = in_features * width + width + width * width + width + width * classes + classes
    assert _params(net) == want
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {
        "fc1.weight": (width, in_features), "fc1.bias": (width,), "fc2.weight": (width, width),
        "fc2.bias": (width,), "fc3.weight": (classes, width), "fc3.bias": (classes,)}
    assert net(torch.zeros(4, in_features)).shape == (4, classes)


# ------------------------------------------------------------------------------------------ recipes
def test_the_shipped_recipe_is_one_basin_of_many_late_checkpoints():
    r = load_recipe(CONFIGS / "digits-mlp.yaml")
    assert (r.name, r.kind, r.family, r.tasks) == ("digits-mlp", "full", "digits-mlp", ["digits-mlp"])
    assert r.parents == 1 and r.runs >= 25 and len(r.checkpoint_epochs) == 4 and r.late_lr_schedule == "cyclic"
    plan = r.plan()
    assert {run.parent for run in plan} == {0} and len({run.seed for run in plan}) == r.runs
    assert sum(len(run.entry_ids()) for run in plan) >= 100
    tiny = load_recipe(CONFIGS / "tiny-digits-mlp.yaml")
    assert (tiny.family, tiny.parents) == ("digits-mlp", 1)


def test_recipes_mixing_the_families_fail_naming_the_field():
    fields = load_recipe(CONFIGS / "tiny-digits-mlp.yaml").to_dict()
    with pytest.raises(RecipeError, match=r"field 'tasks': task 'digits-mlp' is a full task of family "
                                          r"'digits-mlp', expected a full task of family 'digits'"):
        Recipe.from_dict(dict(fields, family="digits"), "mixed.yaml")
    with pytest.raises(RecipeError, match=r"mixed.yaml: field 'tasks'.*'digits-mlp:width=3': unknown factor 'width'"):
        Recipe.from_dict(dict(fields, tasks=["digits-mlp:width=3"]), "mixed.yaml")


# ------------------------------------------------------------------------------------ a real build
def test_the_tiny_recipe_builds_entries_that_load_and_score_above_chance(tmp_path):
    recipe = load_recipe(CONFIGS / "tiny-digits-mlp.yaml")
    zoo = Zoo.open(build_zoo(recipe, tmp_path, progress=False))
    assert zoo.verify() == []
    rows = zoo.rows()
    assert len(rows) == recipe.runs * len(recipe.checkpoint_epochs)
    assert {r["parent"] for r in rows} == {"p0"} and {r["num_params"] for r in rows} == {DIGITS_MLP_PARAMS}

    data = get_task("digits-mlp").data()
    target = zoo.target()
    states = {}
    for row in rows:
        net = target.load_module(zoo.weight_path(row["id"]))
        # The build scored the same float32 weights with the same module and thread count: equal exactly.
        assert evaluate_module(net, data)["test_acc"] == row["metrics"]["test_acc"]
        assert row["metrics"]["test_acc"] > 5 * CHANCE
        states[row["id"]] = zoo.load(row["id"])

    # Every run starts from the parent: its last checkpoints sit far closer to it than to a fresh
    # initialisation, and the two runs (own seeds, own data order) end at different weights.
    parent = load_weights(zoo.path / PARENTS_DIR / "p0" / WEIGHTS_FILE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = {k: v.detach() for k, v in recipe.build_network().state_dict().items()}
    last = [states[r["id"]] for r in rows if r["checkpoint"] == recipe.checkpoint_epochs[-1]]
    assert len(last) == recipe.runs
    for state in last:
        assert _rms_distance(state, parent) < 0.5 * _rms_distance(fresh, parent)
    assert _rms_distance(last[0], last[1]) > 0
