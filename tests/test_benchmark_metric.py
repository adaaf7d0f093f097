"""The benchmark scores every row with the tasks' own metric: here a regression (``mse``, lower is better).

A tiny zoo of PEFT adapters on ``tests._toy_models.ToyMLP`` (one output) is imported for three
``dataset:`` tasks whose metric is ``mse``: two training tasks of two adapters each and one held-out
task. :func:`run_benchmark` runs on it with a stub generator (noisy copies of the zoo's adapters).
Every reported number must be the mean / minimum / median of ``score_params`` of the same weights,
"best" the lowest score, the floor the mean-target predictor, and the classification-only numbers
(wrong-set IoU, few-shot SGD, best-of-N on labelled examples per class) absent rather than made up.
A zoo mixing an ``mse`` task with an ``accuracy`` one is refused before anything is fitted.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests._tolerance import sum_tol
from tests._toy_models import ToyMLP
from weightdiff.errors import BenchmarkError
from weightdiff.evaluate import benchmark
from weightdiff.evaluate.report import build_accuracy_distributions_figure, slug, table_markdown
from weightdiff.evaluate.weights import score_params, summarize
from weightdiff.io import save_weights
from weightdiff.tasks import dataset, get_metric, get_task
from weightdiff.tasks.dataset import register_task_file
from weightdiff.weights.tokenizer import WeightTokenizer
from weightdiff.zoo import Zoo, import_zoo

WIDTH, INPUTS = 8, 64  # ToyMLP flattens its input: (N, 64) -> (N, 1)
REGRESSION = ("rega", "regb", "regc")
SPLIT_SIZES = {"train": 40, "val": 20, "test": 30}
GIVEN_METRICS = {"train_acc": 0.0, "val_acc": 0.0, "test_acc": 0.0}  # given: the zoo import measures accuracy
NUM = 3


def _task_file(folder: Path) -> Path:
    """Three mse regression tasks (y = x·w_task, one output) and one accuracy task, with their data files."""
    rng = np.random.default_rng(0)
    entries = []
    for i, name in enumerate(REGRESSION):
        w = 0.1 * rng.standard_normal((INPUTS, 1)).astype(np.float32)
        arrays = {}
        for split, n in SPLIT_SIZES.items():
            x = rng.standard_normal((n, INPUTS)).astype(np.float32)
            arrays[f"x_{split}"], arrays[f"y_{split}"] = x, x @ w  # (n, 64), (n, 1)
        np.savez(folder / f"{name}.npz", **arrays)
        entries.append({"name": name, "num_classes": 1, "data": f"{name}.npz", "metric": "mse", "code": [float(i)],
                        "descriptions": [f"predict the number of {name}"]})
    arrays = {}
    for split, n in SPLIT_SIZES.items():
        arrays[f"x_{split}"] = rng.standard_normal((n, INPUTS)).astype(np.float32)
        arrays[f"y_{split}"] = np.zeros(n, dtype=np.int64)
    np.savez(folder / "onecls.npz", **arrays)
    entries.append({"name": "onecls", "num_classes": 1, "data": "onecls.npz", "code": [5.0],
                    "descriptions": ["a one-class classification"]})
    path = folder / "tasks.json"
    path.write_text(json.dumps({"tasks": entries}))
    return path


def _import(folder: Path, name: str, rows: list[tuple[str, str]], base: torch.nn.Module) -> Path:
    """A zoo ``name`` of random (non-zero) PEFT adapters of ``base``, one per (task, split) row."""
    lines = []
    for i, (task, split) in enumerate(rows):
        torch.manual_seed(10 + i)
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["inp", "out"], init_lora_weights=False)
        get_peft_model(copy.deepcopy(base), config).save_pretrained(str(folder / f"{name}{i}"))
        row = {"path": f"{name}{i}", "task": f"dataset:name={task}", "split": split,
               "descriptions": [f"predict {task}"], "metrics": GIVEN_METRICS}
        if split == "heldout":
            row["heldout_kind"] = "far"
        lines.append(json.dumps(row) + "\n")
    manifest = folder / f"{name}.jsonl"
    manifest.write_text("".join(lines))
    return import_zoo(manifest, folder / "base.safetensors", root=folder / "zoos", progress=False,
                      base_config=folder / "base.yaml").zoo_dir


@pytest.fixture(scope="module")
def zoos(tmp_path_factory):
    """The mse zoo, a zoo mixing metrics, and a suite file of the dataset family; the tasks are
    registered while the module's tests run, then forgotten again."""
    folder = tmp_path_factory.mktemp("metric_zoo")
    names = register_task_file(_task_file(folder))
    torch.manual_seed(0)
    base = ToyMLP(width=WIDTH, classes=1).eval()
    save_weights(folder / "base.safetensors", {k: v.contiguous() for k, v in base.state_dict().items()})
    (folder / "base.yaml").write_text(json.dumps({"class_path": "tests._toy_models.ToyMLP",
                                                  "init_args": {"width": WIDTH, "classes": 1}}))
    mse = _import(folder, "mse", [("rega", "train"), ("rega", "train"), ("regb", "train"), ("regb", "train"),
                                  ("regc", "heldout")], base)
    mixed = _import(folder, "mixed", [("rega", "train"), ("onecls", "heldout")], base)
    suite = folder / "regression.yaml"
    suite.write_text("name: regression\nkind: lora\nfamily: dataset\n")
    yield {"mse": mse, "mixed": mixed, "suite": suite}
    for name in names:
        dataset._SPECS.pop(name.removeprefix("dataset:name="), None)
    dataset.load_dataset.cache_clear()


@pytest.fixture
def stub_generator(zoos, monkeypatch):
    """``load_generator`` / ``make_condition`` / ``generate_tokens`` replaced: samples are noisy zoo adapters.

    Returns the calls made, ``(task, sampler, tokens)`` each, so the samples can be scored again.
    """
    zoo = Zoo.open(zoos["mse"])
    sds = [zoo.load(r["id"]) for r in zoo.rows("train")]
    tok = WeightTokenizer.from_state_dict(sds[0], token_size=16).fit(sds)

    class Stub:
        kind, tokenizer = "lora", tok
        config: ClassVar[dict] = {"zoo": {"family": "dataset"}, "model": {"condition": "code"},
                                  "sampling": {"sampler": "ddim", "steps": 2}}

    calls = []

    def generate(gen, cond, num, settings, **kw):
        noise = torch.randn(num, *tok.encode_batch(sds[:1]).shape[1:],
                            generator=torch.Generator().manual_seed(len(calls)))
        tokens = tok.encode_batch([sds[i % len(sds)] for i in range(num)]) + 0.3 * noise
        calls.append((cond, settings.sampler, tokens))
        return tokens, False

    monkeypatch.setattr(benchmark, "load_generator", lambda path: Stub())
    monkeypatch.setattr(benchmark, "make_condition", lambda gen, task=None, description=None, **kw: task)
    monkeypatch.setattr(benchmark, "generate_tokens", generate)
    return {"calls": calls, "tokenizer": tok}


def _stacked(zoo: Zoo, ids: list[str]) -> dict[str, torch.Tensor]:
    loaded = [zoo.load(i) for i in ids]
    return {k: torch.stack([sd[k] for sd in loaded]) for k in loaded[0]}


def test_every_row_reports_score_params_of_its_weights_and_best_is_the_lowest(zoos, stub_generator, tmp_path):
    out = tmp_path / "bench"
    r = benchmark.run_benchmark(zoos["suite"], "stub-model", zoos["mse"], out, num=NUM, hypernet_steps=5,
                                sgd_tasks=None, progress=False)
    zoo = Zoo.open(zoos["mse"])
    target = zoo.target()
    assert r["metric"] == {"name": "mse", "higher_is_better": False}
    assert json.loads((out / "results.json").read_text())["metric"] == r["metric"]
    seen, unseen = r["settings"]["seen_tasks"], r["settings"]["unseen_tasks"]
    assert seen == ["dataset:name=rega", "dataset:name=regb"] and unseen == ["dataset:name=regc"]

    # zoo (original): the task's own adapters, scored again here
    for name in seen:
        task = get_task(name)
        ids = [row["id"] for row in zoo.rows("train") if row["task"] == name]
        scores = score_params(target, task, _stacked(zoo, ids))
        assert float(scores.max()) > float(scores.min())  # two different adapters: best differs from worst
        stats = r["per_task"]["seen"][name]["zoo (original)"]
        want = summarize(scores, higher_is_better=False)
        assert (stats["best"], stats["mean"], stats["median"]) == (want["best"], want["mean"], want["median"])
        assert stats["best"] == float(scores.double().min())
        saved = np.load(out / "scores" / f"seen__{slug(name)}__zoo_original.npz")
        assert saved["scores"].tolist() == scores.double().tolist() and saved["ids"].tolist() == ids

    # generated (and its one-step row): the very samples the stub returned, scored again
    for section, name in [("seen", t) for t in seen] + [("unseen", t) for t in unseen]:
        task = get_task(name)
        for row, sampler in (("generated", "ddim"), ("generated one-step", "x0")):
            (tokens,) = [t for cond, s, t in stub_generator["calls"] if cond == name and s == sampler
                         and t.shape[0] == NUM]
            scores = score_params(target, task, stub_generator["tokenizer"].decode_float(tokens))
            stats = r["per_task"][section][name][row]
            assert stats["best"] == float(scores.double().min()) < stats["mean"] <= float(scores.double().max())
            assert stats["mean"] == float(scores.double().mean())

        # the floor: the mean training target (float32, as the network's outputs are) for every input
        _, y_test = task.data().split("test")
        constant = task.data().y_train.mean(0).double()                           # (1,)
        errors = (y_test.double() - constant).square()                            # (N, 1), in float64
        floor = r["per_task"][section][name]["floor"]
        # float32 side: a difference and a square per term, one division of the sum
        assert abs(floor["mean"] - float(errors.mean())) <= sum_tol(float(errors.mean()), reduction=errors.numel(),
                                                                    roundings=3)
        assert floor["distance"] is None

    # classification-only numbers are absent, not computed on regression outputs
    for section in ("seen", "unseen"):
        assert all(row["iou"] is None for row in r[section].values())
        assert not any(name.startswith("generated best-of") for name in r[section])
    assert r["sgd"] is None and r["sgd_per_task"] is None and r["sgd_examples_to_match"] is None
    assert r["hypernetworks"]["mlp_functional_loss_weight"] == 0.0  # no cross-entropy on regression targets
    assert not (out / "predictions").exists() and not (out / "accuracy_vs_iou.png").exists() \
        and not (out / "accuracy_vs_distance.png").exists()
    assert (out / "accuracy_distributions.png").stat().st_size > 0

    md = (out / "results.md").read_text()
    assert "| row | best mse ↓ | mean mse ↓ | median mse ↓ | wrong-set IoU ↓ |" in md
    assert "acc %" not in md and "not applicable" in md


def test_a_zoo_mixing_metrics_is_refused_naming_the_tasks(zoos, tmp_path, monkeypatch):
    fitted = []
    monkeypatch.setattr(benchmark.ZooState, "fit_hypernets", lambda self, *a: fitted.append(a))
    with pytest.raises(BenchmarkError, match=r"different metrics \(accuracy: dataset:name=onecls; "
                                             r"mse: dataset:name=rega\)"):
        benchmark.run_benchmark(zoos["suite"], None, zoos["mixed"], tmp_path / "bench", num=2, progress=False)
    assert fitted == [] and not (tmp_path / "bench" / "results.json").exists()


def test_tables_and_axes_name_the_metric_and_keep_accuracy_as_it_was():
    rows = {"generated": {"best": 0.75, "mean": 0.5, "median": 0.5, "iou": None, "distance": None}}
    assert table_markdown(rows).splitlines()[0].startswith("| row | best acc % | mean acc % | median acc % |")
    assert "| generated | 75.0 | 50.0 | 50.0 | – |" in table_markdown(rows)
    assert "| generated | 0.75 | 0.5 | 0.5 | – |" in table_markdown(rows, get_metric("mse"))
    fig = build_accuracy_distributions_figure({"seen": {"generated": [0.5, 0.75]}}, metric=get_metric("mse"))
    assert fig.axes[0].get_xlabel() == "test mean squared error (lower is better)"
    fig = build_accuracy_distributions_figure({"seen": {"generated": [0.5, 0.75]}})
    assert fig.axes[0].get_xlabel() == "test accuracy (%)" and fig.axes[0].get_xlim() == (-2.0, 102.0)


def test_import_records_a_regression_base_with_its_own_metric():
    """A base with a vector output (regression) is scored with the task's metric, not accuracy."""
    from weightdiff.tasks.base import TaskData
    from weightdiff.tasks.metrics import get_metric
    from weightdiff.zoo.importer import _base_metrics

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    xs = [torch.randn(n, 3) for n in (8, 5, 6)]
    ys = [torch.randn(n, 2) for n in (8, 5, 6)]
    data = TaskData(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2])
    scores = _base_metrics(net, data, get_metric("mse"))
    assert set(scores) == {"train_mse", "val_mse", "test_mse"}
    with torch.no_grad():
        expected = float(((net(xs[2]) - ys[2]) ** 2).mean())
    assert scores["test_mse"] == pytest.approx(expected, rel=1e-6)
