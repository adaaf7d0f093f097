"""Whole networks on a user's own data: ``dataset-net`` tasks, a state-dict zoo import, fit, sample, evaluate.

A task file names three tasks on the 8×8 digits (plain, mirrored, inverted), each with the same
``network`` (``tests._toy_models.ToyMLP`` by ``class_path``). Small networks trained here on two of
them are saved as ``.safetensors`` state dicts, listed in a manifest with the third held out, and
imported with ``weightdiff zoo import`` (no base: the checkpoints are whole networks). The zoo must
verify, report its entries with their measured accuracies, feed a tiny fit, and the exported
generator's samples must be networks of that class that load strictly and are scored with the
task's data. A task whose entry names no ``network`` or a class that is no module is refused with
one line naming the entry.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from tests._tolerance import network_tol, sum_tol
from tests._toy_models import ToyMLP
from tests.conftest import export_last, fit_tiny
from weightdiff.cli import main as cli_main
from weightdiff.evaluate.weights import evaluate_weights
from weightdiff.io import load_weights, save_weights
from weightdiff.tasks import dataset as dataset_module
from weightdiff.tasks import get_family, get_task
from weightdiff.tasks.dataset import DatasetTaskError, register_task_file
from weightdiff.zoo import Zoo
from weightdiff.zoo.training import evaluate_module

WIDTH = 12
NETWORK = {"class_path": "tests._toy_models.ToyMLP", "init_args": {"width": WIDTH, "classes": 10}}
VIEWS = {"plain": lambda x: x, "mirrored": lambda x: x.flip(-1), "inverted": lambda x: 1.0 - x}
TRAIN, HELDOUT = ("plain", "mirrored"), "inverted"
PER_TASK = 3


def _write_task_file(folder: Path, network: object = NETWORK, names: tuple[str, ...] = tuple(VIEWS)) -> Path:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.int64)
    entries = []
    for name in names:
        view = VIEWS[name](x)
        tensors = {"x_train": view[:600], "y_train": y[:600], "x_val": view[600:800], "y_val": y[600:800],
                   "x_test": view[800:1200], "y_test": y[800:1200]}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{name}.safetensors"))
        entry = {"name": f"dn-{name}", "num_classes": 10, "data": f"{name}.safetensors",
                 "descriptions": [f"{name} handwritten digits"], "network": network}
        entries.append(entry)
    path = folder / "tasks.json"
    path.write_text(json.dumps({"tasks": entries}))
    return path


def _train(task: str, seed: int, steps: int = 150) -> ToyMLP:
    torch.manual_seed(seed)
    net = get_task(task).build_network()
    x, y = get_task(task).data().split("train")
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    """Nine trained networks (three held out) imported as the zoo ``own-nets``."""
    out = tmp_path_factory.mktemp("dataset_net")
    saved = dict(dataset_module._SPECS)
    register_task_file(_write_task_file(out))
    nets, rows = {}, []
    for name in (*TRAIN, HELDOUT):
        for seed in range(PER_TASK):
            task = f"dataset-net:name=dn-{name}"
            net = _train(task, seed)
            path = out / f"{name}-{seed}.safetensors"
            save_weights(path, net.state_dict())
            nets[path.name] = net
            rows.append({"path": path.name, "task": task, "split": "heldout" if name == HELDOUT else "train",
                         "descriptions": [f"{name} handwritten digits"], "seed": seed})
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = cli_main(["zoo", "import", str(out / "manifest.jsonl"), "--name", "own-nets", "--root", str(out / "zoos"),
                     "--no-progress", "true"])
    yield {"out": out, "zoo": out / "zoos" / "own-nets", "nets": nets, "code": code}
    dataset_module._SPECS.clear()
    dataset_module._SPECS.update(saved)


def test_the_family_is_full_and_builds_the_task_files_network(imported):
    assert get_family("dataset-net").kind == "full" and get_family("dataset").kind == "lora"
    net = get_task(f"dataset-net:name=dn-{HELDOUT}").build_network()
    assert type(net) is ToyMLP and net.inp.out_features == WIDTH


def test_state_dicts_import_verify_and_keep_their_measured_accuracies(imported, capsys):
    assert imported["code"] == 0
    zoo = Zoo.open(imported["zoo"])
    assert (zoo.kind, zoo.family) == ("full", "dataset-net")
    assert zoo.verify() == []
    rows = zoo.rows()
    assert len(rows) == PER_TASK * 3 and sum(r["split"] == "heldout" for r in rows) == PER_TASK
    for row in rows:
        net = imported["nets"][Path(row["source"]).name]
        stored = zoo.load(row["id"])
        assert all(torch.equal(stored[k], v) for k, v in net.state_dict().items())
        measured = evaluate_module(_loaded(stored), get_task(row["task"]).data())
        for name, value in measured.items():
            n = get_task(row["task"]).data().split(name.removesuffix("_acc"))[1].numel()
            assert abs(row["metrics"][name] - value) <= 1 / n + 1e-12  # batched vs module forward
    assert min(r["metrics"]["test_acc"] for r in rows) > 0.5  # trained networks, chance is 0.1
    assert cli_main(["zoo", "info", str(imported["zoo"])]) == 0
    assert "own-nets" in capsys.readouterr().out


def _loaded(state: dict) -> ToyMLP:
    net = ToyMLP(**NETWORK["init_args"])
    net.load_state_dict(state, strict=True)
    return net.eval()


def test_a_generator_fits_samples_and_its_networks_are_scored(imported, tmp_path):
    run = fit_tiny(imported["zoo"], tmp_path / "fit", "--trainer.max_steps", "4")
    gen = export_last(run, tmp_path / "gen")
    samples = tmp_path / "samples"
    assert cli_main(["sample", "--model", str(gen), "--task", f"dataset-net:name=dn-{HELDOUT}", "--num", "2",
                     "--out", str(samples)]) == 0
    folders = sorted(p for p in samples.iterdir() if p.is_dir())
    assert len(folders) == 2
    state = load_weights(folders[0] / "model.safetensors")
    net = _loaded(state)  # a whole ToyMLP, strictly
    report = evaluate_weights(f"dataset-net:name=dn-{HELDOUT}", [folders[0]])
    x, y = get_task(f"dataset-net:name=dn-{HELDOUT}").data().split("test")
    with torch.no_grad():
        want = float((net(x).argmax(-1) == y).float().mean())
    assert report["kind"] == "full" and report["metric"] == "accuracy"
    assert abs(report["weights"][0]["accuracy"] - want) <= 1 / len(y) + 1e-12  # batched vs module forward


@pytest.mark.parametrize("network, needle", [
    (None, "no 'network'"),
    ({"class_path": "weightdiff.tasks.get_task"}, "expected an nn.Module subclass"),
    ({"class_path": "tests._no_such_module.Net"}, "cannot be imported"),
    ({"class_path": "tests._toy_models.ToyMLP", "init_args": {"depth": 3}}, "do not fit"),
])
def test_a_task_without_a_buildable_network_is_one_clear_error(network, needle, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "_SPECS", {})
    register_task_file(_write_task_file(tmp_path, network=network, names=("plain",)))
    with pytest.raises(DatasetTaskError) as err:
        get_task("dataset-net:name=dn-plain").build_network()
    message = str(err.value)
    assert needle in message and "tasks.json: tasks[0]" in message and "\n" not in message


def test_a_recipe_builds_a_zoo_of_dataset_net_tasks(imported, tmp_path):
    recipe = {"name": "dn", "kind": "full", "family": "dataset-net",
              "tasks": [f"dataset-net:name=dn-{n}" for n in TRAIN],
              "heldout_tasks": {"far": [f"dataset-net:name=dn-{HELDOUT}"]},
              "runs": 2, "seed": 0, "epochs": 3, "lr": 0.01, "batch_size": 64, "checkpoint_epochs": [3]}
    (tmp_path / "dn.yaml").write_text(json.dumps(recipe))
    assert cli_main(["zoo", "build", "--config", str(tmp_path / "dn.yaml"), "--root", str(tmp_path / "zoos"),
                     "--no-progress", "true"]) == 0
    zoo = Zoo.open(tmp_path / "zoos" / "dn")
    assert zoo.verify() == []
    splits = [r["split"] for r in zoo.rows()]
    assert splits.count("train") == 2 * len(TRAIN) and splits.count("heldout") >= 1  # 2 runs per training task
    for row in zoo.rows():
        measured = evaluate_module(_loaded(zoo.load(row["id"])), get_task(row["task"]).data())
        assert abs(row["metrics"]["test_acc"] - measured["test_acc"]) <= 1 / 400 + 1e-12


def test_an_import_measures_a_task_scored_by_another_metric_with_that_metric(tmp_path, monkeypatch):
    """A ``neg_loss`` task: the entry's missing scores are ``{split}_neg_loss``, the mean −CE, not accuracies."""
    monkeypatch.setattr(dataset_module, "_SPECS", {})
    path = _write_task_file(tmp_path, names=("plain",))
    doc = json.loads(path.read_text())
    doc["tasks"][0]["metric"] = "neg_loss"
    path.write_text(json.dumps(doc))
    register_task_file(path)
    task = "dataset-net:name=dn-plain"
    net = _train(task, seed=0, steps=40)
    save_weights(tmp_path / "net.safetensors", net.state_dict())
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "net.safetensors", "task": task, "split": "train",
                                                  "descriptions": ["digits"]}) + "\n")
    assert cli_main(["zoo", "import", str(tmp_path / "m.jsonl"), "--name", "nl", "--root", str(tmp_path / "zoos"),
                     "--no-progress", "true"]) == 0
    metrics = Zoo.open(tmp_path / "zoos" / "nl").rows()[0]["metrics"]
    assert {"train_neg_loss", "val_neg_loss", "test_neg_loss"} <= set(metrics) and "test_acc" not in metrics
    x, y = get_task(task).data().split("val")
    with torch.no_grad():
        logits = net(x)
        want = -float(F.cross_entropy(logits, y))
    # each example's CE moves by at most 2 max|Δlogit| between the batched and the module forward,
    # and the two means of n non-negative terms are summed in different orders
    n = len(y)
    tol = 2 * network_tol(net, logits) + sum_tol(abs(want) * n, reduction=n, roundings=4) / n
    assert abs(metrics["val_neg_loss"] - want) <= tol
