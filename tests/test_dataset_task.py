"""The ``dataset`` family (tasks from data files), per-task metrics and family-supplied description features."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from weightdiff.errors import ConditionError, TaskStringError
from weightdiff.evaluate.weights import evaluate_params, evaluate_weights, score_params, summarize
from weightdiff.targets import Target
from weightdiff.tasks import get_family, get_metric, get_task, make_task
from weightdiff.tasks import dataset as dataset_module
from weightdiff.tasks.dataset import TASK_FILES_ENV, DatasetTaskError, register_task_file
from weightdiff.tasks.numeric import numeric_features, parse_numeric_features

SPLITS = ("train", "val", "test")


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Each test registers its own dataset tasks."""
    monkeypatch.setattr(dataset_module, "_SPECS", {})
    monkeypatch.setattr(dataset_module, "_ENV_FILES_READ", set())
    monkeypatch.delenv(TASK_FILES_ENV, raising=False)
    dataset_module.load_dataset.cache_clear()


def _arrays(n: int = 24, dim: int = 3, classes: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, split in enumerate(SPLITS):
        out[f"x_{split}"] = rng.standard_normal((n + i, dim)).astype(np.float32)
        out[f"y_{split}"] = rng.integers(0, classes, n + i).astype(np.int64)
    return out


def _task_file(tmp_path, entries: list[dict], name: str = "tasks.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"tasks": entries}))
    return path


def _entry(**fields) -> dict:
    return {"name": "toy", "num_classes": 2, "data": "toy.safetensors", "descriptions": ["Sort points in two"],
            **fields}


# ------------------------------------------------------------------------------- the dataset task
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_dataset_task_round_trips_its_data_file(tmp_path, suffix):
    arrays = _arrays()
    if suffix == ".safetensors":
        save_file({k: torch.from_numpy(v) for k, v in arrays.items()}, str(tmp_path / "toy.safetensors"))
    else:
        np.savez(tmp_path / "toy.npz", **arrays)
    names = register_task_file(_task_file(tmp_path, [_entry(data=f"toy{suffix}", code=[1.0, -2.0],
                                                             heldout_description="Two-way split of 3-d points")]))
    assert names == ["dataset:name=toy"]
    task = get_task(" dataset : name = toy ")
    assert task.name == "dataset:name=toy" and get_task(task.name) == task and make_task("dataset", name="toy") == task
    assert task.kind == "lora" and task.num_classes == 2 and task.input_shape == (3,)
    assert task.descriptions() == ["Sort points in two"]
    assert task.heldout_description() == "Two-way split of 3-d points"
    assert torch.equal(task.code(), torch.tensor([1.0, -2.0]))
    assert task.metric.name == "accuracy" and task.metric.higher_is_better
    data = task.data()
    for split in SPLITS:
        x, y = data.split(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, torch.from_numpy(arrays[f"x_{split}"]))
        assert torch.equal(y, torch.from_numpy(arrays[f"y_{split}"]))
    with pytest.raises(DatasetTaskError, match="no network of its own.*base network"):
        task.build_network()


def test_dataset_task_from_a_class_path_and_the_environment(tmp_path, monkeypatch):
    (tmp_path / "toydata.py").write_text(
        "import torch\n"
        "from weightdiff.tasks import TaskData\n"
        "def make(n):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    parts = {}\n"
        "    for s in ('train', 'val', 'test'):\n"
        "        parts['x_' + s] = torch.randn(n, 2, 2, generator=g)\n"
        "        parts['y_' + s] = torch.randn(n, 4, generator=g)\n"
        "    return TaskData(**parts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks:\n  - name: reg.v1\n    num_classes: 4\n    metric: mse\n"
                    "    dataset: {class_path: toydata.make, init_args: {n: 7}}\n"
                    "    descriptions: [Predict four numbers]\n")
    with pytest.raises(TaskStringError, match=f"no dataset task named 'reg.v1'.*{TASK_FILES_ENV}"):
        get_task("dataset:name=reg.v1")
    monkeypatch.setenv(TASK_FILES_ENV, str(path))
    task = get_task("dataset:name=reg.v1")
    assert task.input_shape == (2, 2) and task.metric.name == "mse" and not task.metric.higher_is_better
    x, y = task.data().split("val")
    assert x.shape == (7, 2, 2) and y.shape == (7, 4) and y.dtype == torch.float32
    with pytest.raises(NotImplementedError, match="no heldout_description"):
        task.heldout_description()


@pytest.mark.parametrize("fields, match", [
    ({"metric": "f1"}, r"tasks\[1\]\.metric: = 'f1' is unknown"),
    ({"num_classes": 0}, r"tasks\[1\]\.num_classes"),
    ({"name": "a,b"}, r"tasks\[1\]\.name: = 'a,b' is not a name"),
    ({"descriptions": []}, r"tasks\[1\]\.descriptions"),
    ({"data": "toy.pt"}, r"tasks\[1\]\.data: = 'toy.pt'; expected a path ending in .safetensors or .npz"),
    ({"sha256": "abc"}, r"tasks\[1\]\.sha256"),
    ({"colour": "red"}, r"tasks\[1\]\.colour: unknown field"),
    ({"name": "toy", "num_classes": 3}, r"tasks\[1\]\.name: dataset task 'toy' is already defined differently"),
])
def test_a_bad_task_entry_names_its_field_and_registers_nothing(tmp_path, fields, match):
    path = _task_file(tmp_path, [_entry(), _entry(**{"name": "second", **fields})])
    with pytest.raises(DatasetTaskError, match=match) as info:
        register_task_file(path)
    assert str(path) in str(info.value)
    assert dataset_module._SPECS == {}  # not even the good first entry


def test_bad_data_files_are_refused_naming_file_and_key(tmp_path):
    arrays = _arrays()
    np.savez(tmp_path / "pickled.npz", **{**arrays, "x_val": np.array([object()] * 3, dtype=object)})
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in arrays.items() if k != "y_test"})
    np.savez(tmp_path / "labels.npz", **{**arrays, "y_train": arrays["y_train"] + 5})
    np.savez(tmp_path / "lengths.npz", **{**arrays, "y_val": arrays["y_val"][:-1]})
    save_file({k: torch.from_numpy(v) for k, v in arrays.items()}, str(tmp_path / "good.safetensors"))
    (tmp_path / "torn.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:100])
    entries = [_entry(name=n, data=f"{n}.npz") for n in ("pickled", "missing", "labels", "lengths")]
    entries += [_entry(name="torn", data="torn.safetensors"),
                _entry(name="hashed", data="good.safetensors", sha256="0" * 64)]
    register_task_file(_task_file(tmp_path, entries))
    expected = {"pickled": r"pickled\.npz.*cannot be read as \.npz", "missing": r"missing\.npz.*missing 'y_test'",
                "labels": r"labels\.npz.*'y_train' holds labels in \[5, 6\]; expected classes in \[0, 2\)",
                "lengths": r"'x_val' \(25, 3\) and 'y_val' \(24,\)", "torn": r"torn\.safetensors.*cannot be read",
                "hashed": r"good\.safetensors.*sha256 is .* but the task file records 000000000000"}
    for name, match in expected.items():
        with pytest.raises(DatasetTaskError, match=match):
            get_task(f"dataset:name={name}")


# ------------------------------------------------------------------------------------ metrics
def _linear_setup(tmp_path, metric: str, classes: int, regression: bool = False):
    arrays = _arrays(n=40, dim=3, classes=classes, seed=1)
    if regression:
        rng = np.random.default_rng(2)
        arrays.update({f"y_{s}": rng.standard_normal((arrays[f"x_{s}"].shape[0], classes)).astype(np.float32)
                       for s in SPLITS})
    np.savez(tmp_path / "toy.npz", **arrays)
    register_task_file(_task_file(tmp_path, [_entry(data="toy.npz", num_classes=classes, metric=metric)]))
    task = get_task("dataset:name=toy")
    net = nn.Linear(3, classes)
    torch.manual_seed(0)
    params = {k: torch.randn(5, *v.shape) for k, v in net.state_dict().items()}  # S = 5 networks
    return task, Target.full(net), net, params


def _outputs(net: nn.Module, params, i: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return functional_call(net, {k: v[i] for k, v in params.items()}, (x,))


def test_accuracy_metric_equals_top1_accuracy(tmp_path):
    task, target, _, params = _linear_setup(tmp_path, "accuracy", classes=3)
    acc, _ = evaluate_params(target, task, params)
    assert torch.equal(score_params(target, task, params, chunk=2, input_chunk=7), acc)


@pytest.mark.parametrize("metric", ["neg_loss", "mse"])
def test_other_metrics_score_each_network_by_its_own_outputs(tmp_path, metric):
    task, target, net, params = _linear_setup(tmp_path, metric, classes=3, regression=metric == "mse")
    x, y = task.data().split("test")
    scores = score_params(target, task, params, chunk=2, input_chunk=7)  # ragged chunks on purpose
    want = []
    for i in range(5):
        out = _outputs(net, params, i, x).double()
        want.append(-F.cross_entropy(out, y).item() if metric == "neg_loss" else (out - y.double()).square().mean().item())
    want_t = torch.tensor(want)
    # float32 forward passes: the per-example values carry ~eps·|value| error each (the mean no more).
    tol = 8 * torch.finfo(torch.float32).eps * (want_t.abs() + 1)
    assert ((scores.double() - want_t).abs() <= tol).all(), (scores, want_t)
    assert summarize(scores, task.metric.higher_is_better)["best"] == task.metric.best(scores)
    assert task.metric.best(scores) == (float(scores.max()) if metric == "neg_loss" else float(scores.min()))


def test_evaluate_names_the_metric_of_a_built_in_task(tiny_lora_zoo):
    result = evaluate_weights("rotdigits:angle=0,flip=0", [str(tiny_lora_zoo)])  # a training task of the zoo
    assert result["metric"] == "accuracy" and result["higher_is_better"] is True
    assert all(set(row) == {"id", "path", "accuracy"} for row in result["weights"])
    scores = [row["accuracy"] for row in result["weights"]]
    assert result["best"] == max(scores) and all(0.0 <= s <= 1.0 for s in scores)


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(TaskStringError, match=r"unknown metric 'auc'.*accuracy.*mse.*neg_loss"):
        get_metric("auc")


# ---------------------------------------------------------------------- description features
# [cos A, sin A, has_angle, mirror_sign] of rotdigits' first description, computed by the angle/mirror
# parser as it was before families supplied their features (the cos/sin of these angles in float32).
_GOLDEN = {"rotdigits:angle=90,flip=1": [0.0, 1.0, 1.0, 1.0], "rotdigits:angle=-45,flip=0":
           [math.cos(math.radians(-45)), math.sin(math.radians(-45)), 1.0, -1.0]}


def test_rotdigits_supplies_the_angle_and_mirror_features():
    cls = get_family("rotdigits")
    assert cls.NUMERIC_DIM == 4
    for angle in (-180.0, -97.5, -45.0, 0.0, 12.5, 90.0, 179.0):
        for flip in (0, 1):
            task = make_task("rotdigits", angle=angle, flip=flip)
            texts = task.descriptions() + [task.heldout_description()]
            got = numeric_features(texts, "rotdigits")
            assert torch.equal(got, torch.stack([parse_numeric_features(t) for t in texts]))
            assert torch.equal(numeric_features(texts), got)  # no family: the same angle/mirror features
    for name, want in _GOLDEN.items():
        got = get_family("rotdigits").description_features(get_task(name).descriptions()[0])
        assert torch.allclose(got, torch.tensor(want), atol=torch.finfo(torch.float32).eps)


def test_other_families_supply_no_features_but_old_generators_keep_theirs():
    texts = get_task("digits").descriptions()
    assert numeric_features(texts, "digits").shape == (len(texts), 0)
    # A generator trained with the 4 angle/mirror features on any family keeps getting them.
    assert torch.equal(numeric_features(texts, "digits", numeric_dim=4),
                       torch.stack([parse_numeric_features(t) for t in texts]))
    with pytest.raises(ConditionError, match="reads 3 numeric description features, but family 'digits' supplies 0"):
        numeric_features(texts, "digits", numeric_dim=3)


def test_the_family_says_why_a_description_cannot_condition_its_tasks():
    rot = get_family("rotdigits")
    assert rot.description_problem("rotated by 40 degrees clockwise") is None
    assert "names no angle" in rot.description_problem("upright digits")
    assert get_family("digits").description_problem("upright digits") is None


def test_a_family_without_a_network_of_its_own_says_to_give_the_zoo_a_base():
    from weightdiff.errors import ZooBuildError
    from weightdiff.zoo.training import base_architecture_task

    with pytest.raises(ZooBuildError, match=r"'dataset' names its tasks by 'name'.*--base-config"):
        base_architecture_task("dataset")


def test_training_text_conditions_carry_the_familys_numeric_features_only():
    from weightdiff.models.conditioning import TEXT_DIM
    from weightdiff.training.datamodule import TaskConditions

    rot = "rotdigits:angle=40,flip=0"
    conditions = TaskConditions(["digits", rot], "text")
    assert conditions.text["digits"].shape[1] == TEXT_DIM  # digits states no numbers
    assert conditions.text[rot].shape[1] == TEXT_DIM + 4  # angle and mirror, as before
